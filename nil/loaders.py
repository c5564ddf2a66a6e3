"""Data loaders for training and evaluation, seeded so that a CPU run repeats exactly."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, RandomSampler

from nil.data import ChunkShuffleSampler, make_transform
from nil.data.sampler import GlobalBatchSlices
from nil.data.base import SampleSet, TorchSplit


def make_loader(samples: SampleSet, *, train: bool, cfg, image_size: int, channels: int,
                device: torch.device, batch_size: int | None = None, rank: int = 0,
                world_size: int = 1, normalize: dict | None = None) -> DataLoader:
    """A loader over ``samples`` yielding ``(x (B, C, S, S) float, y (B,) int64, ids (B,) int64)``.

    Training shuffles with a generator seeded from ``cfg.seed``; chunked stores (zarr) are read in a
    chunk-local shuffled order so a multi-million-patch store streams instead of thrashing. With
    ``world_size > 1`` the batch size is the global batch and this rank loads its slice of each
    global batch (``batch_size // world_size`` samples, see :class:`GlobalBatchSlices`).
    """
    workers = cfg.workers if cfg.workers is not None else (4 if device.type == "cuda" else 0)
    dataset = TorchSplit(samples, make_transform(train, image_size, channels, normalize))
    sampler = None
    if train:
        if samples.chunk_size():
            sampler = ChunkShuffleSampler(samples, seed=cfg.seed)
        else:
            sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(cfg.seed))
    batch = batch_size or cfg.batch_size
    drop_last = train and len(samples) > batch
    if train and world_size > 1:
        sampler = GlobalBatchSlices(sampler, rank, world_size, batch, drop_last)
        batch, drop_last = batch // world_size, False
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        shuffle=False,
        drop_last=drop_last,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )


def checkpoint_loader(samples: SampleSet, ckpt: dict, *, cfg, channels: int, device: torch.device,
                      batch_size: int | None = None) -> DataLoader:
    """An evaluation loader that feeds a checkpoint's model as it was trained (its image size and
    input normalisation; checkpoints from before normalisation was recorded used 0.5 / 0.5)."""
    spec = ckpt["model_spec"]
    return make_loader(samples, train=False, cfg=cfg, image_size=spec["image_size"], channels=channels, device=device,
                       batch_size=batch_size, normalize=spec.get("normalize"))
