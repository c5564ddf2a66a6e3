"""Exact re-ranking of candidate rows with the freshest stored vectors.

Whatever an approximate structure proposes, the returned distances, labels and vectors come from
the VectorStore, so a stale structure can cost recall but never correctness: a candidate of the
wrong class (after a label change), the query's own id, or a duplicate is dropped here.
"""
from __future__ import annotations

import logging

import torch

from ..engines.exact import pairwise_distances

LOG = logging.getLogger(__name__)

__all__ = ["rerank"]


def rerank(
    xq: torch.Tensor,
    yq: torch.Tensor,
    qid: torch.Tensor | None,
    cand: torch.Tensor,
    vectors: torch.Tensor,
    labels: torch.Tensor,
    ids: torch.Tensor,
    k: int,
    same_class: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best k candidates by exact distance.

    xq: (Q, D) float32; yq: (Q,) int64; qid: (Q,) int64 or None; cand: (Q, K) int64 store rows,
    -1 for none (duplicates allowed); vectors/labels/ids: the store's row tensors.
    Returns D (Q, k) float32 ascending (+inf where none) and rows (Q, k) int64 (-1 where none).
    """
    nq = xq.shape[0]
    device = xq.device
    if cand.shape[1] == 0:
        return (torch.full((nq, k), float("inf"), device=device),
                torch.full((nq, k), -1, dtype=torch.int64, device=device))
    cand = cand.to(device)
    # Dedupe: sort each row's candidates and drop repeats.
    cand, _ = cand.sort(dim=1)
    dup = torch.zeros_like(cand, dtype=torch.bool)
    dup[:, 1:] = cand[:, 1:] == cand[:, :-1]
    valid = (cand >= 0) & ~dup
    r = cand.clamp_min(0)
    lab = labels[r]
    valid &= (lab == yq.unsqueeze(1)) if same_class else (lab != yq.unsqueeze(1))
    if qid is not None:
        valid &= ids[r] != qid.unsqueeze(1)
    dist = pairwise_distances(xq, vectors, r)
    dist = dist.masked_fill(~valid, float("inf"))
    kk = min(k, dist.shape[1])
    d, j = dist.topk(kk, dim=1, largest=False, sorted=True)
    rows = cand.gather(1, j)
    rows = torch.where(torch.isfinite(d), rows, torch.full_like(rows, -1))
    if kk < k:
        d = torch.cat([d, torch.full((nq, k - kk), float("inf"), device=device)], dim=1)
        rows = torch.cat([rows, torch.full((nq, k - kk), -1, dtype=torch.int64, device=device)], dim=1)
    return d, rows
