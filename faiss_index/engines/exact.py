"""The exact engine: nearest stored rows of another (or the same) class, as plain torch.

Every approximate engine in this package is checked against :func:`knn_other_class`.

How it is fast on a CPU: the score ``|b|^2 - 2 q.b`` (squared distance minus ``|q|^2``) is
computed as ``mm(-2 xq, b.T)`` plus a second thin GEMM ``[1, onehot(yq)] . [|b|^2, BIG onehot(yb)]``
accumulated into the same buffer, so a same-class pair gets ``+BIG`` without a separate masking
pass over the (Q, block) score matrix (on two cores such a pass costs as much as the product).
Per block, the cheap row minimum decides which queries can improve their running top-k, and only
those rows go through the (slow on CPU) indexed selection. Labels outside 0..63 fall back to an
explicit mask. The winners' distances are recomputed directly as ``|q - b|`` so the reported
values do not suffer from the cancellation of the expanded form.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from ..errors import IndexInputError

LOG = logging.getLogger(__name__)

__all__ = ["knn_other_class", "pairwise_distances"]

# Labels 0..MAX_AUG_CLASSES-1 are folded into the GEMM; wider label ranges use a mask.
MAX_AUG_CLASSES = 64
# Size of one (Q, block) float32 score matrix on CPU (measured best on a 2-core Xeon).
_CPU_SCORE_BYTES = 8 << 20


def _tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise IndexInputError(f"{name} must be a torch tensor or numpy array, got {type(x).__name__}.")


def _int1d(x: Any, name: str, n: int, device: torch.device) -> torch.Tensor:
    t = _tensor(x, name)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise IndexInputError(f"{name} must have an integer dtype, got {t.dtype}.")
    if t.dim() != 1 or t.shape[0] != n:
        raise IndexInputError(f"{name} must have shape ({n},), got {tuple(t.shape)}.")
    return t.to(device=device, dtype=torch.int64)


def pairwise_distances(xq: torch.Tensor, xb: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Euclidean distances from each query to its own rows of xb, computed directly (no expansion).

    xq: (Q, D) float32; xb: (N, D) float32 or float16; rows: (Q, K) int64 in [0, N) -> (Q, K) float32.
    One index_select and an in-place difference: advanced indexing plus a second (Q, K, D)
    temporary cost about 4x more on CPU (page faults on two fresh 16 MB buffers at Q=256, K=128).
    """
    v = xb.index_select(0, rows.reshape(-1)).view(*rows.shape, xb.shape[1])
    v = v.float() if v.dtype != torch.float32 else v  # a float16 store is read back as float32
    return torch.linalg.vector_norm(v.sub_(xq.unsqueeze(1)), dim=2)


def _block_rows(q: int, chunk: int, device: torch.device) -> int:
    if device.type != "cpu":
        return chunk
    rows = _CPU_SCORE_BYTES // (4 * max(q, 1))
    rows = max(1024, min(16384, rows))
    return max(1, min(chunk, rows))


def knn_other_class(
    xq: torch.Tensor,
    yq: torch.Tensor,
    xb: torch.Tensor,
    yb: torch.Tensor,
    k: int = 1,
    *,
    qid: torch.Tensor | None = None,
    bid: torch.Tensor | None = None,
    same_class: bool = False,
    chunk: int = 65536,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest rows of xb whose label differs from the query's (or equals it).

    Args:
        xq: (Q, D) float queries.
        yq: (Q,) int64 query labels.
        xb: (N, D) float stored vectors, on the same device as xq.
        yb: (N,) int64 stored labels.
        k: number of neighbours.
        qid: optional (Q,) int64 query sample ids; a row whose ``bid`` equals the query's id is
            never returned.
        bid: optional (N,) int64 sample ids of the rows of xb (needed with qid).
        same_class: search rows with the same label instead of another label.
        chunk: at most this many rows of xb are scored at once, so memory stays O(Q * chunk).

    Returns:
        D: (Q, k) float32 Euclidean distances, ascending; +inf where fewer than k rows qualify.
        I: (Q, k) int64 row indices into xb; -1 where fewer than k rows qualify.
    """
    xq, xb = _tensor(xq, "xq"), _tensor(xb, "xb")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise IndexInputError(f"k must be a positive integer, got {k!r}.")
    if not isinstance(chunk, (int, np.integer)) or chunk <= 0:
        raise IndexInputError(f"chunk must be a positive integer, got {chunk!r}.")
    if xq.dim() != 2 or xb.dim() != 2:
        raise IndexInputError(f"xq and xb must be 2-D, got shapes {tuple(xq.shape)} and {tuple(xb.shape)}.")
    if xq.shape[1] != xb.shape[1]:
        raise IndexInputError(f"xq has dimension {xq.shape[1]} but xb has dimension {xb.shape[1]}.")
    if xb.device != xq.device:
        raise IndexInputError(f"xq is on {xq.device} but xb is on {xb.device}.")
    device = xq.device
    nq, d = xq.shape
    nb = xb.shape[0]
    yq = _int1d(yq, "yq", nq, device)
    yb = _int1d(yb, "yb", nb, device)
    if (qid is None) != (bid is None):
        raise IndexInputError("qid and bid must be given together.")
    if qid is not None:
        qid = _int1d(qid, "qid", nq, device)
        bid = _int1d(bid, "bid", nb, device)
    k = int(k)
    xq = xq.to(torch.float32).contiguous()
    if not xb.is_floating_point():
        xb = xb.to(torch.float32)

    if nq == 0 or nb == 0:
        return (torch.full((nq, k), float("inf"), dtype=torch.float32, device=device),
                torch.full((nq, k), -1, dtype=torch.int64, device=device))

    lo = int(torch.minimum(yq.min(), yb.min()))
    hi = int(torch.maximum(yq.max(), yb.max()))
    augmented = lo >= 0 and hi < MAX_AUG_CLASSES
    block = _block_rows(nq, int(chunk), device)

    sq_b = torch.cat([torch.linalg.vector_norm(xb[s:s + block].to(torch.float32), dim=1).square_()
                      for s in range(0, nb, block)])  # (N,) computed once, reused per block
    xq_m2 = -2.0 * xq
    if augmented:
        # Scores must stay below BIG / 2 for every allowed pair: |b|^2 - 2 q.b <= 2|q|^2 + 3|b|^2.
        big = float(4.0 * (xq * xq).sum(1).max() + 4.0 * sq_b.max() + 1.0)
        augmented = math.isfinite(big) and big < 1e30  # huge vectors: BIG * 0 must stay 0
    if augmented:
        ncls = hi + 1
        onehot_q = torch.nn.functional.one_hot(yq, ncls).to(torch.float32)
        aux_q = torch.cat([torch.ones(nq, 1, device=device), 1.0 - onehot_q if same_class else onehot_q], dim=1)
        table = torch.eye(ncls, device=device) * big
        aux_b = torch.empty(min(block, nb), 1 + ncls, dtype=torch.float32, device=device)
        limit = big * 0.5
    else:
        limit = float("inf")

    own = None
    if qid is not None:
        # CPU: binary search of each row id among the sorted query ids; GPU: dense compare.
        own = (qid, qid.sort().values if device.type == "cpu" else None)

    inf = float("inf")
    best_v = torch.full((nq, k), inf, dtype=torch.float32, device=device)
    best_i = torch.full((nq, k), -1, dtype=torch.int64, device=device)
    on_cpu = device.type == "cpu"
    for start in range(0, nb, block):
        stop = min(nb, start + block)
        m = stop - start
        xb_blk = xb[start:stop].to(torch.float32)  # a float16 store is cast block by block, never whole
        if augmented:
            # score = |b|^2 - 2 q.b + BIG * [class excluded], as two GEMMs into one buffer.
            a = aux_b[:m]
            a[:, 0] = sq_b[start:stop]
            a[:, 1:] = table[yb[start:stop]]
            score = torch.mm(xq_m2, xb_blk.T)
            score.addmm_(aux_q, a.T)
        else:
            score = torch.addmm(sq_b[start:stop], xq, xb_blk.T, alpha=-2.0)
            yb_blk = yb[start:stop].unsqueeze(0)
            excluded = yq.unsqueeze(1) != yb_blk if same_class else yq.unsqueeze(1) == yb_blk
            score.masked_fill_(excluded, inf)
        if own is not None:
            _mask_own_ids(score, own, bid[start:stop])
        kk = min(k, m)
        if on_cpu:
            # Selecting with indices is slow on CPU; a plain row minimum is not. Only rows whose
            # minimum beats their current k-th best need the indexed selection.
            thresh = best_v[:, -1].clamp_max(limit)
            act = (score.amin(dim=1) < thresh).nonzero().squeeze(1)
            if act.numel() == 0:
                continue
            sub = score.index_select(0, act)
            if kk == 1:
                v, i = sub.min(dim=1, keepdim=True)
            else:
                v, i = sub.topk(kk, dim=1, largest=False, sorted=False)
            v = v.masked_fill(v >= limit, inf)
            v = torch.cat([best_v.index_select(0, act), v], dim=1)
            i = torch.cat([best_i.index_select(0, act), i + start], dim=1)
            v, j = v.topk(k, dim=1, largest=False, sorted=True)
            best_v.index_copy_(0, act, v)
            best_i.index_copy_(0, act, i.gather(1, j))
        else:
            v, i = score.topk(kk, dim=1, largest=False, sorted=False)
            v = v.masked_fill(v >= limit, inf)
            v = torch.cat([best_v, v], dim=1)
            i = torch.cat([best_i, i + start], dim=1)
            best_v, j = v.topk(k, dim=1, largest=False, sorted=True)
            best_i = i.gather(1, j)

    valid = torch.isfinite(best_v) & (best_i >= 0)
    rows = torch.where(valid, best_i, torch.full_like(best_i, -1))
    # Exact distances for the winners, re-sorted (the expanded form can swap near-ties).
    dist = pairwise_distances(xq, xb, rows.clamp_min(0))
    dist = torch.where(valid, dist, torch.full_like(dist, inf))
    dist, order = dist.sort(dim=1, stable=True)
    return dist, rows.gather(1, order)


def _mask_own_ids(score: torch.Tensor, own: tuple, bid_blk: torch.Tensor) -> None:
    """Set score[q, j] = inf where bid_blk[j] equals the id of query q."""
    qid, sorted_qid = own
    if sorted_qid is None:
        score.masked_fill_(qid.unsqueeze(1) == bid_blk.unsqueeze(0), float("inf"))
        return
    pos = torch.searchsorted(sorted_qid, bid_blk).clamp_max(sorted_qid.shape[0] - 1)
    hit = (sorted_qid[pos] == bid_blk).nonzero().squeeze(1)
    if hit.numel() == 0:
        return
    cols = bid_blk[hit]
    eq = qid.unsqueeze(1) == cols.unsqueeze(0)  # (Q, hits)
    sub = score[:, hit]
    sub.masked_fill_(eq, float("inf"))
    score[:, hit] = sub
