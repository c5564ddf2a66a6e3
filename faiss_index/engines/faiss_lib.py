"""Deferred import of faiss with messages that name the extra to install.

faiss is imported only inside this package and only when a faiss kind is used, so the exact
engine works without it.
"""
from __future__ import annotations

import logging
from types import ModuleType

import torch

from ..errors import FaissUnavailableError

LOG = logging.getLogger(__name__)

__all__ = ["import_faiss", "gpu_count", "has_cuvs", "follow_torch_threads"]

CPU_EXTRA = 'pip install "nil[cpu]"'
GPU_EXTRA = 'pip install "nil[gpu]"'


def import_faiss(device: torch.device | None = None) -> ModuleType:
    """Return the faiss module, checking it can serve ``device``; raise FaissUnavailableError if not."""
    try:
        import faiss  # noqa: PLC0415 - deliberately deferred
    except ImportError as e:
        raise FaissUnavailableError(
            f"faiss is not installed; install it with {CPU_EXTRA} (or {GPU_EXTRA} for CUDA), "
            "or use kind 'exact', which needs only torch.") from e
    if device is not None and device.type == "cuda" and gpu_count(faiss) == 0:
        raise FaissUnavailableError(
            f"the installed faiss has no GPU support (or sees no GPU); install it with {GPU_EXTRA} "
            "to use device 'cuda', or use kind 'exact' on CUDA.")
    return faiss


def gpu_count(faiss: ModuleType) -> int:
    """GPUs visible to faiss; 0 for a CPU-only build."""
    if not hasattr(faiss, "StandardGpuResources") or not hasattr(faiss, "get_num_gpus"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except RuntimeError:
        return 0


def has_cuvs(faiss: ModuleType) -> bool:
    """Whether this faiss was built with cuVS (needed for CAGRA)."""
    return hasattr(faiss, "GpuIndexCagra")


def follow_torch_threads(faiss: ModuleType) -> None:
    """Give faiss' OpenMP pool as many threads as torch uses.

    faiss and torch ship separate OpenMP runtimes; if a caller lowers torch's threads (e.g. to
    leave cores to data loading), faiss would otherwise keep one thread per core and the two
    pools would oversubscribe the CPU.
    """
    n = torch.get_num_threads()
    if faiss.omp_get_max_threads() != n:
        faiss.omp_set_num_threads(n)
