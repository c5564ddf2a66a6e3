"""ExactIndex: a VectorStore searched with the exact engine; needs only torch."""
from __future__ import annotations

import logging

import torch

from ..engines.exact import knn_other_class
from .base import BaseIndex

LOG = logging.getLogger(__name__)

__all__ = ["ExactIndex"]


class ExactIndex(BaseIndex):
    """Exact other-class / same-class search over every stored sample (the default on CUDA).

    ``dim``, ``num_classes`` and ``device`` as for :class:`BaseIndex` (the store and every result
    live on ``device``); ``chunk`` is how many stored rows are scored at once (memory O(Q * chunk)).
    """

    kind = "exact"

    def __init__(self, dim: int, num_classes: int, device: str | torch.device = "cpu", *, chunk: int = 65536,
                 store_dtype: str = "float32"):
        super().__init__(dim, num_classes, device, store_dtype)
        self.chunk = int(chunk)
        self.params = {"chunk": self.chunk, "store_dtype": store_dtype}
        self.last_refresh_s = 0.0

    def construct_args(self) -> dict:
        return {"chunk": self.chunk, "store_dtype": self.store.dtype_name}

    def _search_rows(self, xq, yq, qid, k, same_class):
        vectors, labels, ids = self.store.view()
        bid = ids if qid is not None else None
        return knn_other_class(xq, yq, vectors, labels, k, qid=qid, bid=bid, same_class=same_class,
                               chunk=self.chunk)
