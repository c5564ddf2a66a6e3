"""What every command needs before it trains, evaluates or embeds: a device, seeds, the configured data."""

from __future__ import annotations

import random

import numpy as np
import torch

from nil.config import TrainConfig
from nil.data import CsvOptions, open_dataset
from nil.data.base import Dataset
from nil.errors import NilError


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is a clear error.

    The one place where nil and its commands turn a ``--device`` value into a device."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise NilError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise NilError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def open_config_dataset(cfg: TrainConfig) -> Dataset:
    """The dataset a config names, with the same splits every time for the same config."""
    csv = CsvOptions(cfg.csv_path_col, cfg.csv_label_col, cfg.csv_label_cols, cfg.image_root, cfg.image_suffix)
    return open_dataset(cfg.data, cfg.format, seed=cfg.seed, val_fraction=cfg.val_fraction,
                        test_fraction=cfg.test_fraction, csv=csv)
