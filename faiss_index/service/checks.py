"""Request checks beyond the schema: batch size (413), k, dimension, finiteness and labels (422 naming the field).

The schema (:mod:`.schema`) checks the types of a JSON body; a binary body (:mod:`faiss_index.npy_stream`)
has its arrays' shapes and dtypes checked here instead. The checks of values need the served index
(dimension, classes) and the server's limits, and answer in the service's own words rather than
as IndexInputError; JSON lists and binary arrays go through the same ones.
"""
from __future__ import annotations

import logging

import numpy as np
from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError

from .service import ServiceLimits

LOG = logging.getLogger(__name__)

__all__ = ["RequestChecks", "field_error"]

_INT64_MAX = (1 << 63) - 1


def field_error(field: str, msg: str, where: str = "body") -> RequestValidationError:
    """A 422 whose detail names ``<where>.<field>`` (where: "body" or "query")."""
    return RequestValidationError([{"loc": (where, field), "msg": msg, "type": "value_error"}])


class RequestChecks:
    """Checks of request values against an index of dimension ``dim`` with ``num_classes`` classes."""

    def __init__(self, limits: ServiceLimits, dim: int, num_classes: int):
        self.limits, self.dim, self.num_classes = limits, dim, num_classes

    def queries(self, vectors: list | np.ndarray, labels: list | np.ndarray, k: int,
                k_in: str = "body") -> tuple[np.ndarray, np.ndarray]:
        """A search's vectors (Q, D) float32 and labels (Q,) int64, with k checked (k_in: where k was sent)."""
        self.batch("vectors", len(vectors))
        self.k(k, k_in)
        return self.vectors(vectors), self.labels(labels, len(vectors))

    def query_arrays(self, arrays: dict[str, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
        """A binary search's {"vectors": (Q, D) float32, "labels": (Q,) integers} and k (a query
        parameter) -> as :meth:`queries`."""
        xq = self.float_rows("vectors", arrays["vectors"])
        return self.queries(xq, self.integers("labels", arrays["labels"]), k, "query")

    def upsert_arrays(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        """A binary upsert's {"ids", "vectors", "labels"[, "keys" (B,) str]} -> as :meth:`upsert`, then the
        keys (a list of B str, or None)."""
        ids = self.integers("ids", arrays["ids"])
        if ids.size and (ids.min() < 0 or ids.max() > _INT64_MAX):
            bad = ids.min() if ids.min() < 0 else ids.max()
            raise field_error("ids", f"ids must lie in 0..{_INT64_MAX}, got {bad}.")
        keys = arrays.get("keys")
        if keys is not None:
            if keys.ndim != 1 or keys.dtype.kind != "U":
                raise field_error("keys", f"keys must be a 1-d array of str, got {keys.dtype} of shape "
                                          f"{tuple(keys.shape)}.")
            keys = keys.tolist()
        xb = self.float_rows("vectors", arrays["vectors"])
        return (*self.upsert(ids, xb, self.integers("labels", arrays["labels"]), keys), keys)

    @staticmethod
    def float_rows(field: str, a: np.ndarray) -> np.ndarray:
        """A binary (B, D) float32 array (either byte order), else a 422 naming ``field``."""
        if a.dtype.kind != "f" or a.dtype.itemsize != 4:
            raise field_error(field, f"{field} must be float32, got {a.dtype}.")
        if a.ndim != 2:
            raise field_error(field, f"{field} must be a 2-d array (rows, dimension), got shape {tuple(a.shape)}.")
        return np.ascontiguousarray(a, dtype=np.float32)

    @staticmethod
    def integers(field: str, a: np.ndarray) -> np.ndarray:
        """A binary 1-d array of integers (any width, signed or not), else a 422 naming ``field``."""
        if a.dtype.kind not in "iu":
            raise field_error(field, f"{field} must be an integer array, got {a.dtype}.")
        if a.ndim != 1:
            raise field_error(field, f"{field} must be a 1-d array, got shape {tuple(a.shape)}.")
        return a

    def batch(self, field: str, n: int) -> None:
        if n > self.limits.max_batch:
            raise HTTPException(413, f"{field} holds {n} rows; this server takes at most {self.limits.max_batch} "
                                     "per request (--max-batch).")

    def k(self, k: int, where: str = "body") -> None:
        if not 1 <= k <= self.limits.max_k:
            raise field_error("k", f"k must lie in 1..{self.limits.max_k}, got {k}.", where)

    def label(self, label: int) -> None:
        if not 0 <= label < self.num_classes:
            raise field_error("label", f"label {label} is unknown; labels lie in 0..{self.num_classes - 1}.")

    def vectors(self, vectors: list | np.ndarray) -> np.ndarray:
        """Rows of floats -> (B, D) float32: non-empty, not ragged, the index's dimension, finite."""
        if len(vectors) == 0:
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

    def labels(self, labels: list | np.ndarray, n: int) -> np.ndarray:
        """n labels in 0..num_classes-1 -> (n,) int64."""
        if len(labels) != n:
            raise field_error("labels", f"labels has {len(labels)} entries for {n} vectors.")
        y = np.asarray(labels)  # JSON ints beyond int64 give an object array; comparing it still works
        bad = (y < 0) | (y >= self.num_classes)
        if bad.any():
            raise field_error("labels", f"label {y[bad][0]} is unknown; labels lie in 0..{self.num_classes - 1}.")
        return y.astype(np.int64)

    def upsert(self, ids: list | np.ndarray, vectors: list | np.ndarray, labels: list | np.ndarray,
               keys: list | None) -> tuple[np.ndarray, ...]:
        """An upsert's ids (B,) int64, vectors (B, D) float32, labels (B,) int64, keys checked for length."""
        self.batch("vectors", len(vectors))
        xb = self.vectors(vectors)
        yb = self.labels(labels, len(xb))
        if len(ids) != len(xb):
            raise field_error("ids", f"ids has {len(ids)} entries for {len(xb)} vectors.")
        if keys is not None and len(keys) != len(xb):
            raise field_error("keys", f"keys has {len(keys)} entries for {len(xb)} vectors.")
        return np.array(ids, dtype=np.int64), xb, yb
