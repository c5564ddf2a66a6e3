"""Shared fixtures: tiny seeded datasets written on the fly, and the real MedMNIST files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shared_npz():
    """Path of a real MedMNIST file in ../shared/data, or a skip with the reason."""

    def get(name: str) -> Path:
        path = SHARED_DATA / name
        if not path.exists():
            pytest.skip(f"{path} is absent (CI always has ../shared/data)")
        return path

    return get


@pytest.fixture
def tiny_npz(tmp_path) -> Path:
    """A learnable 3-class RGB MedMNIST-style file: class c has a bright block in region c."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 96), ("val", 24), ("test", 30)):
        labels = np.arange(n) % 3
        images = rng.integers(0, 60, size=(n, 16, 16, 3), dtype=np.uint8)
        for i, c in enumerate(labels):
            images[i, :, 5 * c:5 * c + 5, :] += 150
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels.reshape(-1, 1)
    path = tmp_path / "tiny.npz"
    np.savez(path, **arrays)
    return path
