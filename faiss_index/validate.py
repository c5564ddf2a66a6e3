"""Coercion and checking of user inputs (torch tensors or numpy arrays) into torch tensors.

Every check raises :class:`IndexInputError` with one sentence that names the argument.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from .errors import IndexInputError

LOG = logging.getLogger(__name__)

__all__ = ["as_vectors", "as_labels", "as_ids", "as_int", "check_k", "check_same_length", "resolve_device",
           "as_queries"]


def resolve_device(device: str | torch.device) -> torch.device:
    """Parse a device string; "cuda" without an index means the current CUDA device."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise IndexInputError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}.") from e
    if dev.type not in ("cpu", "cuda"):
        raise IndexInputError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}.")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise IndexInputError(f"device {device!r} was requested but CUDA is not available to torch.")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _to_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise IndexInputError(f"{name} must be a numeric array, got dtype object.")
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, (list, tuple)):
        try:
            return torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError, RuntimeError) as e:
            raise IndexInputError(f"{name} could not be converted to a tensor: {e}.") from e
    raise IndexInputError(f"{name} must be a torch tensor or numpy array, got {type(x).__name__}.")


def as_vectors(x: Any, dim: int, device: torch.device, name: str = "vectors") -> torch.Tensor:
    """Return x as a contiguous (N, dim) float32 tensor on device; reject NaN/inf and bad shapes."""
    t = _to_tensor(x, name)
    if not t.dtype.is_floating_point:
        raise IndexInputError(f"{name} must be floating point, got {t.dtype}.")
    if t.dim() == 1 and dim > 0 and t.numel() == dim:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise IndexInputError(f"{name} must have shape (N, {dim}), got {tuple(t.shape)}.")
    if t.shape[1] != dim:
        raise IndexInputError(f"{name} has dimension {t.shape[1]} but the index has dimension {dim}.")
    t = t.to(device=device, dtype=torch.float32).contiguous()
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise IndexInputError(f"{name} contains NaN or infinite values.")
    return t


def as_int(x: Any, name: str, device: torch.device) -> torch.Tensor:
    t = _to_tensor(x, name)
    if t.dim() == 0:
        t = t.reshape(1)
    if t.dim() != 1:
        raise IndexInputError(f"{name} must be one-dimensional, got shape {tuple(t.shape)}.")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise IndexInputError(f"{name} must have an integer dtype, got {t.dtype}.")
    return t.to(device=device, dtype=torch.int64).contiguous()


def as_labels(y: Any, num_classes: int, device: torch.device, name: str = "labels") -> torch.Tensor:
    """Return y as a (N,) int64 tensor on device with every value in 0..num_classes-1."""
    t = as_int(y, name, device)
    if t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise IndexInputError(f"{name} contains {bad}, outside 0..{num_classes - 1}.")
    return t


def as_ids(ids: Any, device: torch.device, name: str = "ids") -> torch.Tensor:
    """Return ids as a (N,) int64 tensor on device; ids must be non-negative (-1 means "none")."""
    t = as_int(ids, name, device)
    if t.numel() and int(t.min()) < 0:
        raise IndexInputError(f"{name} must be non-negative, got {int(t.min())}.")
    return t


def check_k(k: Any) -> int:
    """Return k as a positive int."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise IndexInputError(f"k must be a positive integer, got {k!r}.")
    if k <= 0:
        raise IndexInputError(f"k must be a positive integer, got {k}.")
    return int(k)


def check_same_length(**arrays: torch.Tensor) -> int:
    """Return the common first dimension of the named arrays, or raise naming the mismatch."""
    lengths = {name: int(a.shape[0]) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        desc = ", ".join(f"{n}={v}" for n, v in lengths.items())
        raise IndexInputError(f"mismatched lengths: {desc}.")
    return next(iter(lengths.values()))


def as_queries(vectors: Any, labels: Any, query_ids: Any, k: Any, dim: int, num_classes: int,
               device: torch.device) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The checked arguments of a search: k, vectors (Q, dim) float32, labels (Q,) int64, query_ids (Q,) int64 or None."""
    k = check_k(k)
    xq = as_vectors(vectors, dim, device, "query vectors")
    yq = as_labels(labels, num_classes, device, "query labels")
    if query_ids is not None:
        qid = as_ids(query_ids, device, "query_ids")
        check_same_length(vectors=xq, labels=yq, query_ids=qid)
    else:
        qid = None
        check_same_length(vectors=xq, labels=yq)
    return k, xq, yq, qid
