"""Snapshot: the store's rows as they were when a background build started, without copying them.

A rebuild in a thread reads the store while training goes on writing it. Copying the store at
the start would cost its whole size (512 MB at 1M x 128 float32) and a long pause in the training
step; instead the training thread saves the old value of each row just before its first write
(:meth:`save`), and the build reads through :meth:`read`, which takes the live rows and then puts
back the saved ones. Reading first and looking up the saved rows second is what makes this exact:
a row written after the read was read with its old value, and a row written before (or during)
the read was saved before the write began. So a build sees exactly the store as it was, however
the two threads interleave, and a seeded run stays reproducible.
"""
from __future__ import annotations

import logging
import threading

import torch

from .growth import grow_rows

LOG = logging.getLogger(__name__)

__all__ = ["Snapshot"]


class Snapshot:
    """The first ``n`` rows of ``vectors`` (a live view of the store) as they are now.

    vectors: (N, D) float32 or float16 on CPU; only rows < N are tracked (rows added later are not
    part of the snapshot and are never read through it).
    """

    def __init__(self, vectors: torch.Tensor):
        self.vectors = vectors
        self.n = vectors.shape[0]
        self._pos: torch.Tensor | None = None  # row -> slot in _old, -1 if not saved (allocated on first save)
        self._old = torch.empty(1024, vectors.shape[1], dtype=vectors.dtype)
        self._count = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Rows saved so far (written since the snapshot)."""
        return self._count

    def save(self, rows: torch.Tensor) -> None:
        """Keep the current value of rows about to be written (the first write of each counts)."""
        rows = rows[(rows >= 0) & (rows < self.n)].to("cpu")
        if rows.numel() == 0:
            return
        with self._lock:
            if self._pos is None:
                self._pos = torch.full((self.n,), -1, dtype=torch.int64)
            rows = rows[self._pos[rows] < 0].unique()
            k = rows.numel()
            if k == 0:
                return
            if self._count + k > self._old.shape[0]:
                (self._old,) = grow_rows((self._old,), self._count, self._count + k, fills=(None,))
            self._old[self._count:self._count + k] = self.vectors[rows]
            self._pos[rows] = torch.arange(self._count, self._count + k)
            self._count += k

    def read(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(R, D) float32 copy of the given rows (None: all) as they were at the snapshot."""
        x = (self.vectors if rows is None else self.vectors[rows]).to(torch.float32, copy=True)  # live read first
        with self._lock:
            if self._count:
                pos = self._pos if rows is None else self._pos[rows]
                hit = (pos >= 0).nonzero().squeeze(1)
                if hit.numel():
                    x[hit] = self._old[pos[hit]].to(torch.float32)
        return x

    def saved(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows saved so far (S,) int64 and their snapshot values (S, D) float32: whatever a bulk
        read of the live store took before this call, these rows must be taken from here."""
        with self._lock:
            if not self._count:
                return torch.empty(0, dtype=torch.int64), torch.empty(0, self.vectors.shape[1])
            rows = (self._pos >= 0).nonzero().squeeze(1)
            return rows, self._old[self._pos[rows]].to(torch.float32)
