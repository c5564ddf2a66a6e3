"""Evaluate a checkpoint on a split of a dataset."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from nil.checkpoint import load_checkpoint
from nil.config import TrainConfig
from nil.data.base import Dataset
from nil.errors import NilError
from nil.loaders import checkpoint_loader
from nil.metrics import classification_metrics
from nil.models import build_model
from nil.predict import predict
from nil.runtime import open_config_dataset, resolve_device

LOG = logging.getLogger(__name__)


def load_model(checkpoint: str | Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model stored in a nil checkpoint, in eval mode on ``device``."""
    ckpt = load_checkpoint(checkpoint)
    spec = ckpt["model_spec"]
    model = build_model(spec["name"], spec["num_classes"], spec["in_channels"], spec["image_size"], spec["embed_dim"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def open_with_checkpoint(checkpoint: str | Path, data: str | None, fmt: str | None,
                         device: torch.device) -> tuple[torch.nn.Module, dict, TrainConfig, Dataset]:
    """The checkpoint's model and a dataset it fits: ``data`` if given, else the run's own data.

    The dataset is opened with the training run's seed and fractions, so seeded splits are the
    run's splits; a dataset whose classes or channels differ from the model's is refused.
    """
    model, ckpt = load_model(checkpoint, device)
    cfg = TrainConfig.from_dict(ckpt["config"])
    if data is not None:
        cfg.data, cfg.format = str(data), fmt
    ds = open_config_dataset(cfg)
    spec = ckpt["model_spec"]
    if ds.num_classes != spec["num_classes"] or ds.channels != spec["in_channels"]:
        raise NilError(f"{cfg.data} has {ds.num_classes} classes and {ds.channels} channels but the checkpoint "
                       f"expects {spec['num_classes']} and {spec['in_channels']}")
    return model, ckpt, cfg, ds


def evaluate_checkpoint(checkpoint: str | Path, data: str | None = None, split: str = "test",
                        fmt: str | None = None, batch_size: int = 256, device: str = "auto",
                        progress: bool = False) -> dict:
    """Metrics of ``checkpoint`` on ``split`` of ``data`` (default: the data it was trained on).

    The split is rebuilt with the training run's seed and fractions, so ``test`` is the same test
    set the run reported on.
    """
    dev = resolve_device(device)
    model, ckpt, cfg, ds = open_with_checkpoint(checkpoint, data, fmt, dev)
    loader = checkpoint_loader(ds.split(split), ckpt, cfg=cfg, channels=ds.channels, device=dev, batch_size=batch_size)
    p = predict(model, loader, dev, progress=progress, desc=f"eval {split}")
    metrics = classification_metrics(p.labels, p.probs)
    metrics["classes"] = ds.classes
    metrics["split"] = split
    return metrics
