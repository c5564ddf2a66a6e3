"""Errors a user of the index can cause, each ending in one clear sentence."""
from __future__ import annotations

__all__ = ["IndexInputError", "IndexFormatError", "IndexWriteError", "FaissUnavailableError"]


class IndexInputError(ValueError):
    """Bad input: wrong shape or dtype, NaN/inf, k <= 0, label out of range, unknown kind."""


class IndexFormatError(ValueError):
    """A saved index that is missing, mismatched with its manifest, or corrupt."""


class IndexWriteError(IndexFormatError, OSError):
    """Writing an index failed (a full disk, no permission); the previous index is left as it was.

    Both an IndexFormatError (reported like every index error) and an OSError (what it wraps).
    """


class FaissUnavailableError(ImportError):
    """faiss (or the GPU build of faiss, or its cuVS support) is not installed."""
