"""make_index: one entry point for every kind."""
from __future__ import annotations

import logging
from typing import Any

import torch

from ..errors import IndexInputError
from ..kinds import KINDS
from .base import BaseIndex

LOG = logging.getLogger(__name__)

__all__ = ["make_index"]


def make_index(kind: str, dim: int, num_classes: int, device: str | torch.device = "cpu", **params: Any) -> BaseIndex:
    """Create an empty index: kind "exact" -> ExactIndex, any other kind -> FaissIndex.

    params go to the index (e.g. refresh_every, nlist, nprobe, m, nbits, rerank, efSearch,
    strategy, store_dtype for faiss kinds; chunk and store_dtype for "exact", which also accepts and
    ignores refresh_every).
    """
    if kind == "exact":
        from .exact_index import ExactIndex

        unknown = sorted(set(params) - {"chunk", "refresh_every", "store_dtype"})
        if unknown:
            raise IndexInputError(f"unknown parameter(s) {', '.join(unknown)} for kind 'exact'; "
                                  "known: chunk, store_dtype.")
        params.pop("refresh_every", None)  # accepted so callers can pass it for every kind; nothing to refresh
        return ExactIndex(dim, num_classes, device, **params)
    if kind not in KINDS:
        raise IndexInputError(f"unknown index kind {kind!r}; kinds are {', '.join(KINDS)}.")
    from .faiss_index import FaissIndex

    return FaissIndex(dim, num_classes, kind=kind, device=device, **params)
