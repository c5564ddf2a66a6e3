"""Seeded k-means and nearest-centroid assignment in torch.

The coarse quantizers are trained here rather than with ``faiss.Kmeans``: torch's BLAS is much
faster than the one bundled with faiss-cpu on small machines (and with two OpenMP pools competing,
faiss' BLAS-backed training was measured 5x slower than single-threaded), and torch makes seeding
and warm starts explicit.
"""
from __future__ import annotations

import logging

import torch

LOG = logging.getLogger(__name__)

__all__ = ["kmeans", "assign", "seeded_sample"]

# Rows scored per matrix product when assigning many vectors (bounds memory at rows x k floats).
_ASSIGN_ROWS = 32768


def seeded_sample(n: int, size: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Indices of a seeded uniform sample without replacement: (min(n, size),) int64, sorted."""
    if size >= n:
        return torch.arange(n, device=device)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:size].sort().values.to(device)


def assign(x: torch.Tensor, centroids: torch.Tensor, c_sq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each row.

    x: (N, D) float32; centroids: (K, D) float32 -> (index (N,) int64, squared distance (N,) float32).
    """
    if c_sq is None:
        c_sq = (centroids * centroids).sum(1)
    idx = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    dis = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], _ASSIGN_ROWS):
        xs = x[s:s + _ASSIGN_ROWS]
        score = torch.addmm(c_sq, xs, centroids.T, alpha=-2.0)
        v, i = score.min(dim=1)
        idx[s:s + xs.shape[0]] = i
        dis[s:s + xs.shape[0]] = (v + (xs * xs).sum(1)).clamp_min_(0.0)
    return idx, dis


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    niter: int = 20,
    seed: int = 0,
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """Lloyd's k-means.

    x: (N, D) float32 training points; k <= N. init: optional (k, D) starting centroids (warm
    start, e.g. the previous quantizer at a refresh); otherwise k distinct seeded points.
    Empty clusters are re-seeded from the points farthest from their centroid.
    Returns (k, D) float32 centroids.
    """
    n = x.shape[0]
    if k <= 0 or n == 0:
        raise ValueError(f"kmeans needs k > 0 and points, got k={k}, n={n}")
    k = min(k, n)
    if init is not None and init.shape == (k, x.shape[1]):
        c = init.to(x.device, torch.float32).clone()
    else:
        c = x[seeded_sample(n, k, seed, x.device)].clone()
    for it in range(niter):
        idx, dis = assign(x, c)
        sums = torch.zeros_like(c).index_add_(0, idx, x)
        cnt = torch.bincount(idx, minlength=k).to(x.dtype)
        nonempty = cnt > 0
        c[nonempty] = sums[nonempty] / cnt[nonempty].unsqueeze(1)
        n_empty = int((~nonempty).sum())
        if n_empty:
            far = dis.topk(min(n_empty, n)).indices
            c[(~nonempty).nonzero().squeeze(1)[: far.numel()]] = x[far]
    return c
