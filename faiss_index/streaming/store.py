"""VectorStore: the freshest vector and label of every sample id, one row per id.

Rows are assigned in order of first appearance and never move, so a row number is a stable
handle that approximate structures can store as their faiss id.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from ..errors import IndexInputError
from ..validate import as_ids, as_int, as_labels, as_vectors, check_same_length, resolve_device
from .growth import assign_slots, grow_rows, grow_table

LOG = logging.getLogger(__name__)

__all__ = ["VectorStore", "STORE_DTYPES"]

# What a store may keep its vectors in. float16 halves the largest part of an index's memory
# (10M x 128: 2.6 GB instead of 5.1 GB); every search casts the rows it reads back to float32, so
# only the stored values are rounded (relative error 2^-11), never the arithmetic.
STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16}

# The id map is a dense table (one int64 per possible id, the fastest lookup) only while that table
# is at most DENSE_SLACK times the number of stored ids (plus a small floor); sparse ids (database
# keys, hashed or patient x slice numbers) switch it to sorted keys. Memory stays proportional to the
# number of stored samples whatever their ids.
DENSE_SLACK = 4
DENSE_FLOOR = 1 << 16
_INITIAL_CAPACITY = 1024
_MERGE_MIN = 4096  # sorted mode: new ids wait in a small sorted side list until it holds this many


class _IdMap:
    """Map non-negative int64 sample ids to rows, on the store's device.

    Dense mode: ``table[id] = row``. Sorted mode: ``keys`` (sorted ids) and ``rows`` searched with
    ``searchsorted``; new ids go to a small sorted side list merged into the main one when it holds
    ``max(_MERGE_MIN, len(keys) // 32)``, so inserting costs O(log n) amortised and a lookup two
    binary searches.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.table: torch.Tensor | None = torch.full((_INITIAL_CAPACITY,), -1, dtype=torch.int64, device=device)
        self.count = 0
        empty = torch.empty(0, dtype=torch.int64, device=device)
        self.keys, self.rows, self.side_keys, self.side_rows = empty, empty, empty, empty

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: (B,) int64 >= 0 -> rows (B,) int64, -1 for unknown ids."""
        if self.table is not None:
            inside = ids < self.table.shape[0]
            rows = self.table[ids.clamp_max(self.table.shape[0] - 1)]
            return torch.where(inside, rows, torch.full_like(rows, -1))
        rows = _sorted_lookup(self.keys, self.rows, ids)
        if self.side_keys.numel():
            rows = torch.where(rows >= 0, rows, _sorted_lookup(self.side_keys, self.side_rows, ids))
        return rows

    def insert(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Record rows for new (unique, not yet stored) ids."""
        if ids.numel() == 0:
            return
        self.count += ids.numel()
        if self.table is not None:
            top = int(ids.max())
            if top < max(DENSE_FLOOR, DENSE_SLACK * self.count):
                self.table = grow_table(self.table, top)
                self.table[ids] = rows
                return
            self._to_sorted()
        keys, order = torch.sort(torch.cat([self.side_keys, ids]))
        self.side_keys, self.side_rows = keys, torch.cat([self.side_rows, rows])[order]
        if self.side_keys.numel() >= max(_MERGE_MIN, self.keys.numel() // 32):
            keys, order = torch.sort(torch.cat([self.keys, self.side_keys]))
            self.keys, self.rows = keys, torch.cat([self.rows, self.side_rows])[order]
            self.side_keys, self.side_rows = self.side_keys[:0], self.side_rows[:0]

    def _to_sorted(self) -> None:
        known = (self.table >= 0).nonzero().squeeze(1)  # ascending: already sorted
        self.keys, self.rows = known, self.table[known]
        self.table = None
        LOG.info("sample ids are sparse (largest beyond %d x the stored count); the id map switched to sorted keys",
                 DENSE_SLACK)

    def nbytes(self) -> int:
        parts = (self.table,) if self.table is not None else (self.keys, self.rows, self.side_keys, self.side_rows)
        return sum(t.numel() * t.element_size() for t in parts)


def _sorted_lookup(keys: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows of ``ids`` in sorted ``keys``, -1 where absent."""
    if keys.numel() == 0:
        return torch.full_like(ids, -1)
    pos = torch.searchsorted(keys, ids).clamp_max(keys.numel() - 1)
    return torch.where(keys[pos] == ids, rows[pos], torch.full_like(ids, -1))


class VectorStore:
    """One row per sample id: ``vectors`` (cap, D) in ``dtype``, ``labels`` (cap,) int64, ``ids`` (cap,) int64.

    Only the first ``len(store)`` rows are meaningful; capacity grows geometrically. All tensors
    live on ``device``. ``dtype``: "float32" or "float16" (:data:`STORE_DTYPES`); readers of
    ``vectors`` cast what they read to float32 (:meth:`get` does).
    """

    def __init__(self, dim: int, device: str | torch.device = "cpu", dtype: str = "float32"):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise IndexInputError(f"dim must be a positive integer, got {dim!r}.")
        if dtype not in STORE_DTYPES:
            raise IndexInputError(f"store_dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}.")
        self.dim, self.dtype_name = dim, dtype
        self.device = resolve_device(device)
        self.vectors = torch.zeros(_INITIAL_CAPACITY, dim, dtype=STORE_DTYPES[dtype], device=self.device)
        self.labels = torch.full((_INITIAL_CAPACITY,), -1, dtype=torch.int64, device=self.device)
        self.ids = torch.full((_INITIAL_CAPACITY,), -1, dtype=torch.int64, device=self.device)
        self._n = 0
        self._map = _IdMap(self.device)

    def __len__(self) -> int:
        return self._n

    @property
    def capacity(self) -> int:
        return self.vectors.shape[0]

    def _reserve(self, n: int) -> None:
        self.vectors, self.labels, self.ids = grow_rows((self.vectors, self.labels, self.ids), self._n, n,
                                                        fills=(0.0, -1, -1))

    def reserve(self, n: int) -> None:
        """Make room for ``n`` rows in one step, exactly (a bulk load that knows its size: geometric
        growth would hold up to twice the rows, and briefly old and new copies together)."""
        if n > self.capacity:
            self.vectors, self.labels, self.ids = grow_rows((self.vectors, self.labels, self.ids), self._n, n,
                                                            fills=(0.0, -1, -1), exact=True)

    def rows_of(self, ids: Any) -> torch.Tensor:
        """ids: (B,) int -> (B,) int64 rows, -1 for ids not stored."""
        return self._map.lookup(as_ids(ids, self.device))

    def upsert(self, ids: Any, vectors: Any, labels: Any, num_classes: int | None = None) -> torch.Tensor:
        """Insert new ids, overwrite known ones in place; within one call the last duplicate wins.

        ids: (B,) int >= 0; vectors: (B, D) float; labels: (B,) int (checked against
        0..num_classes-1 when num_classes is given). Returns (U,) int64 rows written, one per
        distinct id, in order of first appearance of each id in this call.
        """
        ids = as_ids(ids, self.device)
        vectors = as_vectors(vectors, self.dim, self.device)
        labels = as_labels(labels, num_classes, self.device) if num_classes is not None else _plain_labels(labels, self.device)
        check_same_length(ids=ids, vectors=vectors, labels=labels)
        if ids.numel() == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        ids, vectors, labels = _last_wins(ids, vectors, labels)
        rows, new, fresh = assign_slots(self._map.lookup(ids), self._n)
        if fresh.numel():
            self._reserve(self._n + fresh.numel())
            self._map.insert(ids[new], fresh)
            self._n += fresh.numel()
        self.vectors[rows] = vectors.to(self.vectors.dtype)
        self.labels[rows] = labels
        self.ids[rows] = ids
        return rows

    def get(self, ids: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """ids: (B,) int -> vectors (B, D) float32 (zeros for unknown ids), labels (B,) int64 (-1)."""
        rows = self.rows_of(ids)
        known = rows >= 0
        r = rows.clamp_min(0)
        vec = torch.where(known.unsqueeze(1), self.vectors[r].float(), torch.zeros((), device=self.device))
        lab = torch.where(known, self.labels[r], torch.full_like(rows, -1))
        return vec, lab

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stored rows: vectors (N, D), labels (N,), ids (N,), as views (no copy)."""
        n = self._n
        return self.vectors[:n], self.labels[:n], self.ids[:n]

    def nbytes(self) -> int:
        """Bytes held by the row tensors (at capacity) and the id map."""
        return sum(t.numel() * t.element_size() for t in (self.vectors, self.labels, self.ids)) + self._map.nbytes()

    def load_rows(self, vectors: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> None:
        """Replace the content by rows in the given order (used when loading a saved index)."""
        n = int(ids.shape[0])
        self.__init__(self.dim, self.device, self.dtype_name)
        if n == 0:
            return
        if int(torch.unique(ids).numel()) != n:
            raise IndexInputError("stored ids are not unique.")
        self._reserve(n)
        self.vectors[:n] = vectors.to(self.device, self.vectors.dtype)
        self.labels[:n] = labels.to(self.device, torch.int64)
        self.ids[:n] = ids.to(self.device, torch.int64)
        self._n = n
        self._map.insert(self.ids[:n], torch.arange(n, device=self.device))


def _plain_labels(labels: Any, device: torch.device) -> torch.Tensor:
    t = as_int(labels, "labels", device)
    if t.numel() and int(t.min()) < 0:
        raise IndexInputError(f"labels must be non-negative, got {int(t.min())}.")
    return t


def _last_wins(ids: torch.Tensor, vectors: torch.Tensor, labels: torch.Tensor):
    """Collapse duplicate ids to their last occurrence, keeping first-appearance order."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    if uniq.numel() == ids.numel():
        return ids, vectors, labels
    pos = torch.arange(ids.numel(), device=ids.device)
    last = torch.full((uniq.numel(),), -1, dtype=torch.int64, device=ids.device).scatter_reduce(
        0, inverse, pos, reduce="amax")
    first = torch.full((uniq.numel(),), ids.numel(), dtype=torch.int64, device=ids.device).scatter_reduce(
        0, inverse, pos, reduce="amin")
    order = torch.argsort(first)
    take = last[order]
    return ids[take], vectors[take], labels[take]
