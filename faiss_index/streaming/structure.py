"""Engine: the approximate structure behind a FaissIndex (one of partitioned / sharded / filtered).

An engine is rebuilt from the store's rows at every refresh and never updated in between; its
faiss ids are store rows (or positions mapped to rows), and it only proposes candidate rows. The
FaissIndex skips candidates that changed since the build and re-ranks the rest exactly.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from types import ModuleType

import torch

from ..kinds import IndexParams

LOG = logging.getLogger(__name__)

__all__ = ["Engine"]


class Engine(ABC):
    """Base of the approximate structures.

    Args:
        faiss: the faiss module.
        kind: one of flat, ivf, ivfpq, hnsw, cagra.
        dim, num_classes: as the index.
        device: torch device of the store (queries arrive there).
        params: user parameters; resolved values are published in ``self.resolved``.
    """

    #: True when the engine may miss qualifying rows for reasons other than approximation
    #: (over-fetch and filter); the index then answers starved queries exactly.
    needs_fallback = False

    def __init__(self, faiss: ModuleType, kind: str, dim: int, num_classes: int, device: torch.device,
                 params: IndexParams):
        self.faiss = faiss
        self.kind = kind
        self.dim = dim
        self.num_classes = num_classes
        self.device = device
        self.params = params
        self.resolved: dict = {}
        self.built = False
        self.ntotal = 0

    @abstractmethod
    def build(self, vectors: torch.Tensor, labels: torch.Tensor, changed: torch.Tensor | None = None) -> None:
        """(Re)build from all store rows: vectors (N, D) float32, labels (N,) int64; row i has faiss id i.

        changed: optional (N,) bool, rows written since the previous build (None: all); an engine
        may reuse per-row work (e.g. PQ codes) for the others.
        """

    @abstractmethod
    def candidates(self, xq: torch.Tensor, yq: torch.Tensor, same_class: bool,
                   k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Approximate neighbours of another (or the same) class.

        xq: (Q, D) float32 on the index device; yq: (Q,) int64. Returns approximate squared
        distances (Q, K') float32 and store rows (Q, K') int64, -1 where none, K' >= k.
        """

    @abstractmethod
    def nbytes(self) -> int:
        """Approximate bytes held by the structure."""

    @abstractmethod
    def save(self, folder: Path) -> dict:
        """Write the structure's files into folder (CPU copies of GPU indexes); return metadata."""

    @abstractmethod
    def load(self, folder: Path, meta: dict) -> None:
        """Restore what :meth:`save` wrote."""
