"""The synthetic histology-like patch store: determinism, layout, balance, atomicity, look-alikes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

import nil.data.synth as synth
from nil.data import open_dataset, write_synthetic
from nil.errors import NilError


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    a = write_synthetic(tmp_path / "a.zarr", 300, chunk=128, seed=7)
    b = write_synthetic(tmp_path / "b.zarr", 300, chunk=128, seed=7)
    c = write_synthetic(tmp_path / "c.zarr", 300, chunk=128, seed=8)
    fa, fb = _files(a), _files(b)
    assert fa == fb and any(k.startswith("images/") for k in fa)
    ia = zarr.open_group(str(a), mode="r")["images"][:]
    ic = zarr.open_group(str(c), mode="r")["images"][:]
    assert (ia != ic).mean() > 0.5


def test_layout_attrs_and_balance(tmp_path):
    out = write_synthetic(tmp_path / "s.zarr", 1001, size=24, classes=3, chunk=256)
    g = zarr.open_group(str(out), mode="r")
    images, labels = g["images"], g["labels"][:]
    assert images.shape == (1001, 24, 24, 3) and images.dtype == np.uint8
    assert images.chunks == (256, 24, 24, 3)
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [334, 334, 333]
    assert not np.array_equal(labels[:12], np.arange(12) % 3)  # balanced but in a seeded order
    assert g.attrs["classes"] == ["tumour-a", "tumour-b", "stroma"]
    gen = g.attrs["generator"]
    assert gen["seed"] == 0 and gen["similarity"] == 0.8 and gen["n"] == 1001
    x = images[:]
    assert 0 < x.min() and x.max() <= 255 and x.std() > 10  # not blank, not saturated


def test_opens_as_a_dataset(tmp_path):
    out = write_synthetic(tmp_path / "s.zarr", 400, chunk=64)
    ds = open_dataset(out, seed=0)
    assert ds.format == "zarr" and ds.classes == ["tumour-a", "tumour-b", "stroma-a", "stroma-b"]
    assert ds.channels == 3 and ds.image_size == 32 and ds.train.chunk_size() == 64
    assert [len(ds.split(s)) for s in ("train", "val", "test")] == [280, 40, 80]
    stored = zarr.open_group(str(out), mode="r")["images"]
    i = int(ds.test.ids[5])
    np.testing.assert_array_equal(ds.test.load(5), stored[i])
    assert np.bincount(ds.test.labels).tolist() == [20] * 4


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synth.render

    def failing(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk full")
        return real(*args, **kw)

    monkeypatch.setattr(synth, "render", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        write_synthetic(tmp_path / "s.zarr", 500, chunk=100)
    assert calls["n"] >= 3
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite(tmp_path):
    out = write_synthetic(tmp_path / "s.zarr", 50, chunk=16)
    with pytest.raises(NilError, match="already exists"):
        write_synthetic(out, 50, chunk=16)
    write_synthetic(out, 60, chunk=16, overwrite=True)
    assert zarr.open_group(str(out), mode="r")["images"].shape[0] == 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def test_bad_arguments(tmp_path):
    with pytest.raises(NilError, match="similarity"):
        write_synthetic(tmp_path / "s.zarr", 10, similarity=1.5)
    with pytest.raises(NilError, match="classes"):
        write_synthetic(tmp_path / "s.zarr", 10, classes=1)


def _class_features(images: np.ndarray, labels: np.ndarray, classes: int) -> np.ndarray:
    """Per class: mean R, G, B, fraction of nucleus (dark) pixels, mean pixel std. ``(C, 5)``."""
    x = images.astype(np.float32)
    per_image = np.stack([
        x[..., 0].mean((1, 2)), x[..., 1].mean((1, 2)), x[..., 2].mean((1, 2)),
        (x[..., 1] < 140).mean((1, 2)), x.std((1, 2, 3)),
    ], axis=1)
    return np.stack([per_image[labels == k].mean(0) for k in range(classes)])


def _pair_distances(similarity: float, classes: int, n: int = 4000) -> tuple[float, float]:
    """(largest within-pair distance, smallest between-pair distance) of the class features."""
    design = synth.design_classes(classes, similarity)
    labels = synth.balanced_labels(n, classes, seed=0)
    images = synth.render(labels, design, 32, np.random.default_rng(0))
    f = _class_features(images, labels, classes)
    f = (f - f.mean(0)) / f.std(0)
    d = np.linalg.norm(f[:, None] - f[None], axis=-1)
    pair = np.arange(classes) // 2
    same = (pair[:, None] == pair[None]) & ~np.eye(classes, dtype=bool)
    return d[same].max(), d[pair[:, None] != pair[None]].min()


@pytest.mark.parametrize("classes", [4, 6])
def test_look_alike_pairs_are_closest_in_simple_features(classes):
    within, between = _pair_distances(0.8, classes)
    assert within < 0.5 * between
    within_identical, _ = _pair_distances(1.0, classes)
    assert within_identical < 0.5 * within  # similarity 1: only sampling noise remains


def test_pairs_differ_in_design_unless_identical():
    d = synth.design_classes(4, 0.8)
    assert not np.allclose(d.means[0], d.means[1])
    same = synth.design_classes(4, 1.0)
    np.testing.assert_array_equal(same.means[0], same.means[1])
    np.testing.assert_array_equal(same.means[2], same.means[3])
