"""Request checks beyond the schema: batch size (413), k, dimension, finiteness and labels (422 naming the field).

The schema (:mod:`.schema`) checks types; these checks need the served index (dimension, classes)
and the server's limits, and answer in the service's own words rather than as IndexInputError.
"""
from __future__ import annotations

import logging

import numpy as np
from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError

from .service import ServiceLimits

LOG = logging.getLogger(__name__)

__all__ = ["RequestChecks", "field_error"]


def field_error(field: str, msg: str) -> RequestValidationError:
    """A 422 whose detail names ``body.<field>``."""
    return RequestValidationError([{"loc": ("body", field), "msg": msg, "type": "value_error"}])


class RequestChecks:
    """Checks of request values against an index of dimension ``dim`` with ``num_classes`` classes."""

    def __init__(self, limits: ServiceLimits, dim: int, num_classes: int):
        self.limits, self.dim, self.num_classes = limits, dim, num_classes

    def queries(self, vectors: list, labels: list, k: int) -> tuple[np.ndarray, np.ndarray]:
        """A search's vectors (Q, D) float32 and labels (Q,) int64, with k checked."""
        self.batch("vectors", len(vectors))
        self.k(k)
        return self.vectors(vectors), self.labels(labels, len(vectors))

    def batch(self, field: str, n: int) -> None:
        if n > self.limits.max_batch:
            raise HTTPException(413, f"{field} holds {n} rows; this server takes at most {self.limits.max_batch} "
                                     "per request (--max-batch).")

    def k(self, k: int) -> None:
        if not 1 <= k <= self.limits.max_k:
            raise field_error("k", f"k must lie in 1..{self.limits.max_k}, got {k}.")

    def label(self, label: int) -> None:
        if not 0 <= label < self.num_classes:
            raise field_error("label", f"label {label} is unknown; labels lie in 0..{self.num_classes - 1}.")

    def vectors(self, vectors: list) -> np.ndarray:
        """Rows of floats -> (B, D) float32: non-empty, not ragged, the index's dimension, finite."""
        if not vectors:
            raise field_error("vectors", "vectors is empty; send at least one row.")
        try:
            with np.errstate(over="ignore"):  # beyond float32 becomes inf, refused just below
                x = np.array(vectors, dtype=np.float32)
        except ValueError:
            raise field_error("vectors", "vectors rows have different lengths.") from None
        if x.shape[1] != self.dim:
            raise field_error("vectors", f"vectors have dimension {x.shape[1]} but the index has dimension "
                                         f"{self.dim}.")
        if not np.isfinite(x).all():
            raise field_error("vectors", "vectors contain NaN or infinite values (or values beyond float32).")
        return x

    def labels(self, labels: list, n: int) -> np.ndarray:
        """n labels in 0..num_classes-1 -> (n,) int64."""
        if len(labels) != n:
            raise field_error("labels", f"labels has {len(labels)} entries for {n} vectors.")
        bad = [y for y in labels if not 0 <= y < self.num_classes]
        if bad:
            raise field_error("labels", f"label {bad[0]} is unknown; labels lie in 0..{self.num_classes - 1}.")
        return np.array(labels, dtype=np.int64)

    def upsert(self, ids: list, vectors: list, labels: list, keys: list | None) -> tuple[np.ndarray, ...]:
        """An upsert's ids (B,) int64, vectors (B, D) float32, labels (B,) int64, keys checked for length."""
        self.batch("vectors", len(vectors))
        xb = self.vectors(vectors)
        yb = self.labels(labels, len(xb))
        if len(ids) != len(xb):
            raise field_error("ids", f"ids has {len(ids)} entries for {len(xb)} vectors.")
        if keys is not None and len(keys) != len(xb):
            raise field_error("keys", f"keys has {len(keys)} entries for {len(xb)} vectors.")
        return np.array(ids, dtype=np.int64), xb, yb
