"""SearchResult: what every index returns for a batch of queries."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

LOG = logging.getLogger(__name__)

__all__ = ["SearchResult", "make_result"]


@dataclass
class SearchResult:
    """Neighbours of Q queries, all tensors on the index's device.

    ids: (Q, k) int64 sample ids, -1 where there is no neighbour.
    labels: (Q, k) int64 labels of the neighbours, -1 there.
    distances: (Q, k) float32 Euclidean distances, ascending, +inf there.
    vectors: (Q, k, D) float32 freshest stored vectors of the neighbours (zeros where -1), or None
        unless the search asked for them.
    """

    ids: torch.Tensor
    labels: torch.Tensor
    distances: torch.Tensor
    vectors: torch.Tensor | None = None


def make_result(rows: torch.Tensor, dist: torch.Tensor, vectors: torch.Tensor, labels: torch.Tensor,
                ids: torch.Tensor, return_vectors: bool) -> SearchResult:
    """Turn (Q, k) store rows (-1 for none) and distances into a SearchResult."""
    found = rows >= 0
    r = rows.clamp_min(0)
    none = torch.full_like(rows, -1)
    vec = None
    if return_vectors:
        vec = vectors[r].float() * found.unsqueeze(2)
    return SearchResult(
        ids=torch.where(found, ids[r], none),
        labels=torch.where(found, labels[r], none),
        distances=dist.to(torch.float32),
        vectors=vec,
    )
