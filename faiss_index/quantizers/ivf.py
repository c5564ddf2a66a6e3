"""Construction of faiss IVF indexes from quantizers trained in torch.

Coarse centroids and PQ codebooks come from :mod:`.kmeans` / :mod:`.pq`; this module writes them
into faiss objects and fills the inverted lists directly from a precomputed list assignment, so
faiss never re-assigns vectors (which is what lets one container hold class-pure lists).
"""
from __future__ import annotations

import logging
from types import ModuleType

import numpy as np
import torch

from .pq import encode_pq, pack_codes

LOG = logging.getLogger(__name__)

__all__ = ["new_ivf", "fill_lists", "build_ivf", "to_fast_scan", "search_preassigned", "list_sizes", "ivf_nbytes"]


def new_ivf(faiss: ModuleType, kind: str, centroids: torch.Tensor, *, m: int = 0, nbits: int = 8,
            pq_centroids: torch.Tensor | None = None, by_residual: bool = False):
    """An empty, trained CPU IndexIVFFlat ("ivf") or IndexIVFPQ ("ivfpq") over the given centroids.

    centroids: (L, D) float32 coarse centroids; pq_centroids: (m, 2**nbits, D // m) for "ivfpq".
    Returns (index, quantizer); keep the quantizer referenced as long as the index lives.
    """
    cent = np.ascontiguousarray(centroids.detach().cpu().numpy(), dtype=np.float32)
    nlist, d = cent.shape
    quantizer = faiss.IndexFlatL2(d)
    quantizer.add(cent)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_L2)
    elif kind == "ivfpq":
        index = faiss.IndexIVFPQ(quantizer, d, nlist, m, nbits)
        index.by_residual = by_residual
        faiss.copy_array_to_vector(
            np.ascontiguousarray(pq_centroids.detach().cpu().numpy(), dtype=np.float32).ravel(), index.pq.centroids)
        index.is_trained = True
        if by_residual:
            index.precompute_table()
    else:
        raise ValueError(f"not an IVF kind: {kind}")
    return index, quantizer


def fill_lists(faiss: ModuleType, index, vectors: torch.Tensor, list_no: torch.Tensor, ids: torch.Tensor,
               pq_centroids: torch.Tensor | None = None, centroids: torch.Tensor | None = None,
               codes: np.ndarray | None = None) -> None:
    """Write every vector into its list of an empty CPU IndexIVFFlat / IndexIVFPQ.

    vectors: (N, D) float32; list_no: (N,) int64 list of each vector; ids: (N,) int64 faiss ids.
    For IVF-PQ the codes are computed here (of the residual to ``centroids`` when by_residual),
    unless ``codes`` (N, code_size) uint8, already packed for these vectors, are given.
    """
    vectors = vectors.detach()
    order = torch.argsort(list_no.cpu(), stable=True)
    lists = list_no.cpu()[order]
    ids_np = np.ascontiguousarray(ids.cpu()[order].numpy(), dtype=np.int64)
    if codes is not None:
        codes = codes[order.numpy()]
    elif pq_centroids is None:
        codes = np.ascontiguousarray(vectors[order.to(vectors.device)].cpu().numpy(), dtype=np.float32).view(np.uint8)
    else:
        x = vectors[order.to(vectors.device)]
        if index.by_residual:
            x = x - centroids.to(x.device)[lists.to(x.device)]
        codes = pack_codes(encode_pq(x, pq_centroids.to(x.device)), index.pq.nbits)
    codes = np.ascontiguousarray(codes.reshape(len(ids_np), -1))
    assert codes.shape[1] == index.code_size, (codes.shape, index.code_size)
    counts = torch.bincount(lists, minlength=index.nlist).tolist()
    invlists = index.invlists
    start = 0
    for lno, cnt in enumerate(counts):
        if cnt:
            invlists.add_entries(lno, cnt, faiss.swig_ptr(ids_np[start:start + cnt]),
                                 faiss.swig_ptr(codes[start:start + cnt]))
            start += cnt
    index.ntotal = len(ids_np)


def build_ivf(faiss: ModuleType, kind: str, vectors: torch.Tensor, centroids: torch.Tensor, list_no: torch.Tensor,
              ids: torch.Tensor, *, m: int = 0, nbits: int = 8, pq_centroids: torch.Tensor | None = None,
              by_residual: bool = False, codes: np.ndarray | None = None, fast_scan: bool = False):
    """A filled CPU IVF index over vectors (N, D) float32 assigned to lists list_no (N,) int64 with faiss ids (N,).

    "ivfpq" takes pq_centroids (m, 2**nbits, D // m) and optionally precomputed packed codes;
    fast_scan repacks a 4-bit IVF-PQ for SIMD scanning. Returns (index, quantizer); keep the
    quantizer referenced as long as the index lives (a fast-scan index does not need it).
    """
    index, quantizer = new_ivf(faiss, kind, centroids, m=m, nbits=nbits, pq_centroids=pq_centroids,
                               by_residual=by_residual)
    fill_lists(faiss, index, vectors, list_no, ids, pq_centroids=pq_centroids, centroids=centroids, codes=codes)
    if fast_scan:
        index = to_fast_scan(faiss, index)
    return index, quantizer


def search_preassigned(faiss: ModuleType, index, xq: np.ndarray, k: int, list_ids: torch.Tensor,
                       list_dists: torch.Tensor, sel=None) -> tuple[np.ndarray, np.ndarray]:
    """Scan the given lists of a CPU IVF index for every query (the coarse step done by the caller).

    xq: (Q, D) float32 C-contiguous; list_ids / list_dists: (Q, nprobe) int64 lists (-1 = none) and
    their coarse distances; sel: optional faiss IDSelector. Returns D (Q, k) float32 squared
    distances and I (Q, k) int64 faiss ids, -1 where none.
    """
    nq = xq.shape[0]
    D = np.empty((nq, k), dtype=np.float32)
    I = np.empty((nq, k), dtype=np.int64)
    params = faiss.SearchParametersIVF()
    params.nprobe = list_ids.shape[1]
    if sel is not None:
        params.sel = sel
    ci_np = np.ascontiguousarray(list_ids.numpy())
    cd_np = np.ascontiguousarray(list_dists.numpy())
    index.search_preassigned_c(nq, faiss.swig_ptr(xq), k, faiss.swig_ptr(ci_np), faiss.swig_ptr(cd_np),
                               faiss.swig_ptr(D), faiss.swig_ptr(I), False, params)
    return D, I


def to_fast_scan(faiss: ModuleType, ivfpq, bbs: int = 32):
    """Repack a filled 4-bit CPU IndexIVFPQ into an IndexIVFPQFastScan (SIMD register LUT scan)."""
    return faiss.IndexIVFPQFastScan(ivfpq, bbs)


def list_sizes(faiss: ModuleType, index) -> torch.Tensor:
    """(nlist,) int64 number of entries of each inverted list."""
    inv = index.invlists
    return torch.tensor([inv.list_size(i) for i in range(index.nlist)], dtype=torch.int64)


def ivf_nbytes(index) -> int:
    """Approximate bytes of an IVF index: codes + ids + coarse centroids."""
    return int(index.ntotal) * (int(index.code_size) + 8) + int(index.nlist) * int(index.d) * 4
