"""A shuffling sampler that keeps reads of a chunked store local to a few chunks at a time."""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
from torch.utils.data import Sampler

from nil.data.base import SampleSet, Subset

LOG = logging.getLogger(__name__)

DEFAULT_CHUNK = 1024  # grouping used when the samples are not chunked


def storage_positions(samples: SampleSet) -> np.ndarray:
    """Position of each sample in the innermost stored set: int64 ``(N,)``.

    A Subset (a seeded split of a zarr store) is followed down to its parent, so samples are
    grouped by the chunk they are stored in, not by their position in the split.
    """
    pos = np.arange(len(samples), dtype=np.int64)
    while isinstance(samples, Subset):
        pos = np.asarray(samples.index, dtype=np.int64)[pos]
        samples = samples.parent
    return pos


class ChunkShuffleSampler(Sampler[int]):
    """Every index of ``samples`` once per epoch, in an order that reads few chunks at a time.

    Each epoch the chunks (``samples.chunk_size()`` samples, or 1024 when None) are put in a
    random order, cut into windows of ``window_chunks`` consecutive chunks, and the samples of
    each window are shuffled together. A DataLoader reading in this order decodes each chunk
    about once while batches still mix ``window_chunks`` chunks. The order depends only on
    ``seed`` and the epoch: set it with :meth:`set_epoch`, or let each pass over the sampler
    move on to the next epoch by itself (so a loader that never calls set_epoch still
    reshuffles).
    """

    def __init__(self, samples: SampleSet, seed: int, window_chunks: int = 4):
        if window_chunks < 1:
            raise ValueError(f"window_chunks must be at least 1, got {window_chunks}")
        self.seed, self.window_chunks, self.epoch = seed, window_chunks, 0
        self.chunk = samples.chunk_size() or DEFAULT_CHUNK
        self.chunk_of = storage_positions(samples) // self.chunk  # (N,) chunk of each sample

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.chunk_of)

    def order(self) -> np.ndarray:
        """This epoch's order: a permutation of ``range(N)``, int64 ``(N,)``."""
        rng = np.random.default_rng([self.seed, self.epoch])
        chunks, inverse = np.unique(self.chunk_of, return_inverse=True)
        rank = np.empty(len(chunks), dtype=np.int64)
        rank[rng.permutation(len(chunks))] = np.arange(len(chunks))
        window = rank[inverse] // self.window_chunks
        # Sort by window, ties broken by a random key: a shuffle inside each window.
        return np.lexsort((rng.random(len(window)), window)).astype(np.int64)

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        self.epoch += 1
        return iter(order.tolist())


class GlobalBatchSlices(Sampler[int]):
    """One rank's slice of every global batch of another sampler: the data side of DDP.

    ``base`` (the single-process sampler, built with the same seed on every rank) gives each
    epoch's order; it is cut into global batches of ``batch_size`` and rank r takes positions
    ``[r*b, (r+1)*b)`` of each, ``b = batch_size // world_size`` (the per-rank batch: load with
    ``batch_size=b``). At every step the ranks together train on exactly the batch one process
    would, and every sample once per epoch. A last partial global batch is dropped with
    ``drop_last``, else split as evenly as possible (dropped too when it has fewer samples than
    ranks, so that every rank takes the same number of steps).
    """

    def __init__(self, base: Sampler, rank: int, world_size: int, batch_size: int, drop_last: bool):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if batch_size % world_size:
            raise ValueError(f"the global batch {batch_size} does not divide over {world_size} processes")
        self.base, self.rank, self.world_size = base, rank, world_size
        self.batch_size, self.drop_last = batch_size, drop_last
        self.per_rank = batch_size // world_size

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    @property
    def generator(self):
        """The base sampler's torch.Generator, if it has one (its state is the order's state)."""
        return getattr(self.base, "generator", None)

    def _tail(self, n: int) -> int:
        tail = n % self.batch_size
        return 0 if self.drop_last or tail < self.world_size else tail

    def __len__(self) -> int:
        n = len(self.base)
        tail = self._tail(n)
        return (n // self.batch_size) * self.per_rank + (len(np.array_split(np.arange(tail), self.world_size)[self.rank])
                                                          if tail else 0)

    def __iter__(self) -> Iterator[int]:
        order = np.fromiter(iter(self.base), dtype=np.int64)
        full = len(order) // self.batch_size
        mine = order[: full * self.batch_size].reshape(full, self.world_size, self.per_rank)[:, self.rank].ravel()
        tail = self._tail(len(order))
        if tail:
            mine = np.concatenate([mine, np.array_split(order[len(order) - tail:], self.world_size)[self.rank]])
        return iter(mine.tolist())
