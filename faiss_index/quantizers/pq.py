"""Product-quantizer codebooks, encoding and faiss bit packing, in torch.

Used to fill faiss IVF-PQ inverted lists directly: faiss' own encoder loops over sub-quantizers
per vector (seconds for a million vectors with one dimension per sub-quantizer), while a batched
torch argmin does it in a fraction of that. The packing matches faiss' ``PQEncoderGeneric``
(sub-quantizer m occupies bits [m*nbits, (m+1)*nbits), little-endian), which the tests check
against ``ProductQuantizer.compute_codes``.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from .kmeans import seeded_sample

LOG = logging.getLogger(__name__)

__all__ = ["pq_errors", "train_pq", "encode_pq", "pack_codes", "pq_mse"]

_ENCODE_ROWS = 4096


def _split(x: torch.Tensor, m: int) -> torch.Tensor:
    """(N, D) -> (M, N, dsub) sub-vectors."""
    n, d = x.shape
    return x.reshape(n, m, d // m).transpose(0, 1)


def train_pq(x: torch.Tensor, m: int, nbits: int, *, niter: int = 20, seed: int = 0) -> torch.Tensor:
    """Train M sub-quantizers of 2**nbits centroids each, all M at once (batched Lloyd).

    x: (N, D) float32, D divisible by m -> centroids (M, 2**nbits, D // M) float32. With one
    dimension per sub-quantizer the levels are returned sorted (encoding relies on it).
    """
    n, d = x.shape
    ksub = 1 << nbits
    if n < ksub:
        # Too few points: repeat them; the codebook is then exact on the training points.
        x = x.repeat(-(-ksub // max(n, 1)), 1)
        n = x.shape[0]
    if d == m:
        return _train_scalar(x, ksub, niter).unsqueeze(2)
    sub = _split(x, m).contiguous()  # (M, N, dsub)
    c = sub[:, seeded_sample(n, ksub, seed, x.device)].clone()  # (M, ksub, dsub)
    for _ in range(niter):
        codes = _nearest(sub, c)  # (M, N)
        sums = torch.zeros_like(c).scatter_add_(1, codes.unsqueeze(2).expand(-1, -1, sub.shape[2]), sub)
        cnt = torch.zeros(c.shape[:2], dtype=x.dtype, device=x.device).scatter_add_(
            1, codes, torch.ones_like(codes, dtype=x.dtype))
        upd = cnt > 0
        c = torch.where(upd.unsqueeze(2), sums / cnt.clamp_min(1).unsqueeze(2), c)
    return c


def _train_scalar(x: torch.Tensor, ksub: int, niter: int) -> torch.Tensor:
    """1-D Lloyd per dimension, started from quantiles: x (N, M) -> sorted levels (M, ksub)."""
    q = (torch.arange(ksub, dtype=x.dtype, device=x.device) + 0.5) / ksub
    levels = torch.quantile(x, q, dim=0).T.contiguous()  # (M, ksub), sorted
    xt = x.T.contiguous()
    for _ in range(niter):
        codes = _scalar_codes(x, levels).T.long()  # (M, N)
        sums = torch.zeros_like(levels).scatter_add_(1, codes, xt)
        cnt = torch.zeros_like(levels).scatter_add_(1, codes, torch.ones_like(xt))
        levels = torch.where(cnt > 0, sums / cnt.clamp_min(1), levels).sort(dim=1).values
    return levels


def _scalar_codes(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """x (N, M), sorted levels (M, K) -> (N, M) uint8 index of the nearest level.

    The nearest of sorted levels is the number of midpoints below the value: one broadcast
    comparison per block of rows (2x faster than torch.searchsorted on CPU, and few kernel calls).
    """
    mid = ((levels[:, 1:] + levels[:, :-1]) * 0.5).unsqueeze(0)  # (1, M, K-1)
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    step = 8192
    for s in range(0, x.shape[0], step):
        codes[s:s + step] = (x[s:s + step].to(torch.float32).unsqueeze(2) > mid).sum(dim=2, dtype=torch.uint8)
    return codes


def _nearest(sub: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """sub (M, N, dsub), c (M, K, dsub) -> (M, N) int64 nearest centroid per sub-quantizer."""
    score = torch.baddbmm((c * c).sum(2).unsqueeze(1), sub, c.transpose(1, 2), alpha=-2.0)
    return score.argmin(dim=2)


def encode_pq(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """x: (N, D) float32 or float16 (cast block by block), centroids (M, K, dsub) -> codes (N, M) uint8 (K <= 256)."""
    m = centroids.shape[0]
    if centroids.shape[2] == 1:
        levels, perm = centroids[:, :, 0].sort(dim=1)
        codes = _scalar_codes(x, levels)
        if bool((perm != torch.arange(perm.shape[1], device=perm.device)).any()):
            codes = perm.T.gather(0, codes.long()).to(torch.uint8)
        return codes
    out = torch.empty(x.shape[0], m, dtype=torch.uint8, device=x.device)
    for s in range(0, x.shape[0], _ENCODE_ROWS):
        xs = x[s:s + _ENCODE_ROWS].to(torch.float32)
        out[s:s + xs.shape[0]] = _nearest(_split(xs, m), centroids).T.to(torch.uint8)
    return out


def pq_errors(x: torch.Tensor, codes: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Squared reconstruction error (N,) of x (N, D) float32 encoded as codes (N, M) under (M, K, dsub)."""
    m = centroids.shape[0]
    recon = centroids[torch.arange(m, device=x.device).unsqueeze(0), codes.long()]  # (N, M, dsub)
    return ((recon.reshape(x.shape) - x) ** 2).sum(1)


def pq_mse(x: torch.Tensor, centroids: torch.Tensor) -> float:
    """Mean squared reconstruction error of x (N, D) under the codebook (M, K, dsub)."""
    return float(pq_errors(x, encode_pq(x, centroids), centroids).mean())


def pack_codes(codes: torch.Tensor, nbits: int) -> np.ndarray:
    """codes: (N, M) uint8 sub-quantizer indices -> (N, ceil(M * nbits / 8)) uint8, faiss layout."""
    c = codes.cpu().numpy()
    n, m = c.shape
    if nbits == 8:
        return np.ascontiguousarray(c)
    if nbits == 4:
        if m % 2:
            c = np.concatenate([c, np.zeros((n, 1), np.uint8)], axis=1)
        return np.ascontiguousarray(c[:, 0::2] | (c[:, 1::2] << 4))
    bits = ((c[:, :, None].astype(np.uint16) >> np.arange(nbits, dtype=np.uint16)) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(n, m * nbits), axis=1, bitorder="little")
