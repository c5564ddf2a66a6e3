"""DeltaBuffer: the rows written since the last build, searched exactly between refreshes.

It keeps contiguous copies of those rows' fresh vectors, labels and ids, so a search scans them
with :func:`knn_other_class` without gathering from the store (at 50k delta rows the gather
alone costs several milliseconds per batch on two cores).
"""
from __future__ import annotations

import logging

import torch

from .growth import assign_slots, grow_rows, grow_table

LOG = logging.getLogger(__name__)

__all__ = ["DeltaBuffer"]

_INITIAL_CAPACITY = 1024
_SHRINK_ABOVE = 1 << 17  # rows of buffer kept after a clear


class DeltaBuffer:
    """Store rows changed since the last build; ``pos[row]`` is the row's slot, -1 if absent."""

    def __init__(self, dim: int, device: torch.device):
        self.dim = dim
        self.device = device
        self.pos = torch.full((_INITIAL_CAPACITY,), -1, dtype=torch.int64, device=device)
        self.rows = torch.empty(_INITIAL_CAPACITY, dtype=torch.int64, device=device)
        self.vectors = torch.empty(_INITIAL_CAPACITY, dim, dtype=torch.float32, device=device)
        self.labels = torch.empty(_INITIAL_CAPACITY, dtype=torch.int64, device=device)
        self.ids = torch.empty(_INITIAL_CAPACITY, dtype=torch.int64, device=device)
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def contains(self, rows: torch.Tensor) -> torch.Tensor:
        """rows: any-shape int64 store rows >= 0 -> bool mask of those in the delta."""
        inside = rows < self.pos.shape[0]
        return inside & (self.pos[rows.clamp_max(self.pos.shape[0] - 1)] >= 0)

    def changed(self, n: int) -> torch.Tensor:
        """(n,) bool: which of the first n store rows are in the delta."""
        out = torch.zeros(n, dtype=torch.bool, device=self.device)
        m = min(n, self.pos.shape[0])
        out[:m] = self.pos[:m] >= 0
        return out

    def write(self, rows: torch.Tensor, vectors: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> None:
        """Record fresh values of (unique) store rows; rows already present are overwritten."""
        if rows.numel() == 0:
            return
        self.pos = grow_table(self.pos, int(rows.max()))
        slot, new, fresh = assign_slots(self.pos[rows], self.n)
        if fresh.numel():
            self._reserve(self.n + fresh.numel())
            self.pos[rows[new]] = fresh
            self.rows[fresh] = rows[new]
            self.n += fresh.numel()
        self.vectors[slot] = vectors.to(self.vectors.dtype)
        self.labels[slot] = labels
        self.ids[slot] = ids

    def pop(self, k: int) -> torch.Tensor:
        """Remove up to k rows (the newest slots, so nothing moves) and return them (k,) int64."""
        k = min(int(k), self.n)
        out = self.rows[self.n - k:self.n].clone()
        self.pos[out] = -1
        self.n -= k
        return out

    def _reserve(self, n: int) -> None:
        self.rows, self.vectors, self.labels, self.ids = grow_rows(
            (self.rows, self.vectors, self.labels, self.ids), self.n, n, fills=(None, None, None, None))

    def clear(self) -> None:
        self.pos[self.rows[: self.n]] = -1
        self.n = 0
        if self.rows.shape[0] > _SHRINK_ABOVE:
            # A bulk load passes through the delta once; do not keep its copy's memory.
            self.__init__(self.dim, self.device)

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """rows (n,), vectors (n, D), labels (n,), ids (n,) of the delta (views)."""
        n = self.n
        return self.rows[:n], self.vectors[:n], self.labels[:n], self.ids[:n]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.pos, self.rows, self.vectors, self.labels, self.ids))
