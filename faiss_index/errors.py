"""Errors a user of the index can cause, each ending in one clear sentence."""
from __future__ import annotations

__all__ = ["IndexInputError", "IndexFormatError", "FaissUnavailableError"]


class IndexInputError(ValueError):
    """Bad input: wrong shape or dtype, NaN/inf, k <= 0, label out of range, unknown kind."""


class IndexFormatError(ValueError):
    """A saved index that is missing, mismatched with its manifest, or corrupt."""


class FaissUnavailableError(ImportError):
    """faiss (or the GPU build of faiss, or its cuVS support) is not installed."""
