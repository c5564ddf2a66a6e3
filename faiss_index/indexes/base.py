"""BaseIndex: the checks and bookkeeping every index shares; variants implement ``_search_rows``."""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from ..errors import IndexInputError
from ..result import SearchResult, make_result
from ..streaming.store import VectorStore
from ..validate import as_queries, resolve_device

LOG = logging.getLogger(__name__)

__all__ = ["BaseIndex"]


class BaseIndex(ABC):
    """A class-aware nearest-neighbour index over a :class:`VectorStore`.

    Subclasses set ``kind`` and ``params`` and implement :meth:`_search_rows`.
    """

    kind: str = ""

    def __init__(self, dim: int, num_classes: int, device: str | torch.device = "cpu", store_dtype: str = "float32"):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise IndexInputError(f"dim must be a positive integer, got {dim!r}.")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
            raise IndexInputError(f"num_classes must be a positive integer, got {num_classes!r}.")
        self.dim = dim
        self.num_classes = num_classes
        self.device = resolve_device(device)
        self.store = VectorStore(dim, self.device, store_dtype)
        self.params: dict = {}

    # ------------------------------------------------------------------ contents
    def __len__(self) -> int:
        return len(self.store)

    def counts(self) -> list[int]:
        """Stored samples per class: a list of num_classes ints."""
        _, labels, _ = self.store.view()
        return torch.bincount(labels, minlength=self.num_classes).tolist()

    def upsert(self, ids: Any, vectors: Any, labels: Any) -> torch.Tensor:
        """Insert or replace samples: ids (B,) int >= 0, vectors (B, D) float, labels (B,) int.

        Returns the (U,) int64 store rows written (one per distinct id).
        """
        return self.store.upsert(ids, vectors, labels, self.num_classes)

    def reserve(self, n: int) -> None:
        """Room for ``n`` stored samples at once (a bulk load of known size keeps memory at n rows)."""
        self.store.reserve(int(n))

    def get(self, ids: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Freshest vectors (B, D) float32 and labels (B,) int64 of ids (zeros / -1 if unknown)."""
        return self.store.get(ids)

    def nbytes(self) -> int:
        """Approximate memory held by the index, in bytes."""
        return self.store.nbytes()

    # ------------------------------------------------------------------ search
    def search_other_class(self, vectors: Any, labels: Any, k: int = 1, *, query_ids: Any = None,
                           return_vectors: bool = False) -> SearchResult:
        """Nearest stored samples whose label differs from each query's label.

        vectors: (Q, D) float; labels: (Q,) int in 0..num_classes-1; query_ids: optional (Q,) int
        sample ids never returned for their own query. A query whose other classes are all empty
        gets id -1.
        """
        return self._search(vectors, labels, k, query_ids, return_vectors, same_class=False)

    def search_same_class(self, vectors: Any, labels: Any, k: int = 1, *, query_ids: Any = None,
                          return_vectors: bool = False) -> SearchResult:
        """Nearest stored samples with the same label as each query (triplet positives).

        Same arguments as :meth:`search_other_class`; pass query_ids so a sample is not its own
        positive.
        """
        return self._search(vectors, labels, k, query_ids, return_vectors, same_class=True)

    def _search(self, vectors, labels, k, query_ids, return_vectors, same_class) -> SearchResult:
        k, xq, yq, qid = as_queries(vectors, labels, query_ids, k, self.dim, self.num_classes, self.device)
        dist, rows = self._search_rows(xq, yq, qid, k, same_class)
        s = self.store  # full-capacity tensors: row 0 exists even when the store is empty
        return make_result(rows, dist, s.vectors, s.labels, s.ids, return_vectors)

    @abstractmethod
    def _search_rows(self, xq: torch.Tensor, yq: torch.Tensor, qid: torch.Tensor | None, k: int,
                     same_class: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated (Q, D) queries -> distances (Q, k) float32 and store rows (Q, k) int64 (-1)."""

    # ------------------------------------------------------------------ state (what a saved folder holds)
    def construct_args(self) -> dict:
        """The keyword arguments of :func:`make_index` (besides kind, dim, num_classes, device) that remake this index."""
        return {}

    def state(self) -> dict:
        """What a saved folder records about this index besides its rows and structure files (JSON-ready).

        kind, strategy (None for exact search), params (resolved), construct (:meth:`construct_args`),
        steps_since_refresh (upserts since the structure was built).
        """
        return {"kind": self.kind, "strategy": None, "params": self.params, "construct": self.construct_args(),
                "steps_since_refresh": 0}

    def delta_rows(self) -> torch.Tensor:
        """(M,) int64 store rows written since the approximate structure was built (none for exact search)."""
        return torch.empty(0, dtype=torch.int64)

    def save_structure(self, folder: Path) -> dict:
        """Write the approximate structure's files into folder; return what loading them needs."""
        return {"files": []}

    def load_state(self, vectors: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, *, structure: dict,
                   folder: Path, delta_rows: torch.Tensor, steps_since_refresh: int) -> None:
        """Refill an index made from a saved ``state()["construct"]``: rows (N, D) / (N,) / (N,) in store
        order, the :meth:`save_structure` entry and its folder, and the saved :meth:`delta_rows`."""
        self.store.load_rows(vectors, labels, ids)

    # ------------------------------------------------------------------ maintenance
    def refresh(self) -> None:
        """Rebuild any approximate structure from the store (no-op for exact search)."""

    def build(self) -> None:
        """Build after a bulk load (same as :meth:`refresh`)."""
        self.refresh()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(kind={self.kind!r}, dim={self.dim}, num_classes={self.num_classes}, "
                f"device={str(self.device)!r}, n={len(self)})")
