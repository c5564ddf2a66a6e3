"""make_index: one entry point for every kind."""
from __future__ import annotations

import logging
from typing import Any

import torch

from ..errors import IndexInputError
from ..kinds import KINDS, IndexParams
from .base import BaseIndex

LOG = logging.getLogger(__name__)

__all__ = ["make_index", "check_params"]

EXACT_PARAMS = ("chunk", "refresh_every", "store_dtype")


def check_params(kind: str, params: dict) -> None:
    """Raise IndexInputError with one sentence if ``make_index(kind, ..., **params)`` would refuse the
    parameters; builds nothing, so a caller can check them before it writes anything."""
    from ..streaming.store import STORE_DTYPES

    if kind == "exact":
        unknown = sorted(set(params) - set(EXACT_PARAMS))
        if unknown:
            raise IndexInputError(f"unknown parameter(s) {', '.join(unknown)} for kind 'exact'; "
                                  "known: chunk, store_dtype.")
        chunk = params.get("chunk", 1)
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
            raise IndexInputError(f"chunk must be a positive integer, got {chunk!r}.")
    elif kind in KINDS:
        IndexParams.from_kwargs(kind, **{k: v for k, v in params.items() if k not in ("refresh_every", "background")})
    else:
        raise IndexInputError(f"unknown index kind {kind!r}; kinds are {', '.join(KINDS)}.")
    dtype = params.get("store_dtype", "float32")
    if dtype not in STORE_DTYPES:
        raise IndexInputError(f"store_dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}.")


def make_index(kind: str, dim: int, num_classes: int, device: str | torch.device = "cpu", **params: Any) -> BaseIndex:
    """Create an empty index: kind "exact" -> ExactIndex, any other kind -> FaissIndex.

    params go to the index (e.g. refresh_every, nlist, nprobe, m, nbits, rerank, efSearch,
    strategy, store_dtype for faiss kinds; chunk and store_dtype for "exact", which also accepts and
    ignores refresh_every).
    """
    check_params(kind, params)
    if kind == "exact":
        from .exact_index import ExactIndex

        params.pop("refresh_every", None)  # accepted so callers can pass it for every kind; nothing to refresh
        return ExactIndex(dim, num_classes, device, **params)
    from .faiss_index import FaissIndex

    return FaissIndex(dim, num_classes, kind=kind, device=device, **params)
