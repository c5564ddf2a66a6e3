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
