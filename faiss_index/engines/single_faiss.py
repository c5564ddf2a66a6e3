"""Build and search one faiss index of a given kind over a set of vectors (CPU or one GPU).

Shared by the per-class shards (:mod:`faiss_index.streaming.class_shards`) and the global
label-filtered index (:mod:`faiss_index.streaming.global_filtered`). faiss ids are positions
0..n-1 in the given vectors; callers map them to rows.
Coarse quantizers and PQ codebooks are trained in torch (:mod:`faiss_index.quantizers`) and the IVF
lists filled directly, so the same build runs for CPU and GPU (GPU indexes are copied from CPU).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch

from ..kinds import GPU_PQ_M, IVF_KINDS, default_nlist
from ..quantizers.ivf import build_ivf, ivf_nbytes, search_preassigned
from ..quantizers.kmeans import assign, kmeans, seeded_sample
from ..quantizers.pq import train_pq
from .gpu import GpuContext

LOG = logging.getLogger(__name__)

__all__ = ["Handle", "resolve_kind_params", "build_one", "search_one", "index_nbytes", "load_one"]


@dataclass
class Handle:
    """A faiss index plus what Python must keep for it: the quantizer it does not own, and the
    coarse centroids as a torch tensor (CPU IVF: the coarse step runs in torch)."""

    index: Any
    centroids: torch.Tensor | None = None
    keep: tuple = ()


def resolve_kind_params(kind: str, n: int, dim: int, p, on_gpu: bool) -> dict:
    """Resolved parameters of one index over n vectors (nlist/nprobe/m/nbits/efSearch/...)."""
    r: dict = {"seed": p.seed}
    if kind in IVF_KINDS:
        nlist = min(p.nlist, max(n, 1)) if p.nlist is not None else default_nlist(n)
        r.update(nlist=nlist, nprobe=p.nprobe if p.nprobe is not None else max(1, -(-nlist // 16)),
                 niter=p.niter, max_points_per_centroid=p.max_points_per_centroid)
    if kind == "ivfpq":
        if on_gpu:
            # GPU IVF-PQ: 8-bit codes, sub-quantizer counts from a fixed list, residual encoding.
            m = p.m if p.m is not None else max([m for m in GPU_PQ_M if dim % m == 0 and m <= max(1, dim // 4)])
            r.update(m=m, nbits=p.nbits or 8, by_residual=True, fast_scan=False)
        else:
            m = p.m if p.m is not None else dim
            nbits = p.nbits or 4
            r.update(m=m, nbits=nbits, by_residual=False, fast_scan=nbits == 4)
    if kind == "hnsw":
        r.update(hnsw_m=p.hnsw_m, efConstruction=p.efConstruction,
                 efSearch=p.efSearch if p.efSearch is not None else 128)
    if kind == "cagra":
        r.update(graph_degree=p.graph_degree, itopk_size=p.itopk_size)
    return r


def build_one(faiss: ModuleType, kind: str, xs: torch.Tensor, r: dict, gpus: GpuContext | None, gpu: int,
              seed: int) -> Handle:
    """A faiss index of kind over xs (n, D) float32 (positions are ids). GPU when gpus is given."""
    n, d = xs.shape
    if kind == "flat":
        if gpus is not None:
            index = gpus.flat(d, gpu)
            gpus.add(index, xs, gpu)
            return Handle(index)
        index = faiss.IndexFlatL2(d)
        index.add(np.ascontiguousarray(xs.cpu().numpy(), dtype=np.float32))
        return Handle(index)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, r["hnsw_m"])
        index.hnsw.efConstruction = r["efConstruction"]
        index.hnsw.efSearch = r["efSearch"]
        index.add(np.ascontiguousarray(xs.cpu().numpy(), dtype=np.float32))
        return Handle(index)
    if kind == "cagra":
        if n <= r["graph_degree"] + 1:
            # CAGRA cannot build a graph over fewer points than its degree: exact search instead.
            index = gpus.flat(d, gpu)
            gpus.add(index, xs, gpu)
            return Handle(index)
        index = gpus.cagra(d, gpu, r["graph_degree"])
        gpus.train(index, xs, gpu)
        return Handle(index)
    # IVF kinds: train in torch on the data's device, fill lists on CPU, copy to GPU if needed.
    nlist = min(r["nlist"], n)
    sample = xs[seeded_sample(n, r["max_points_per_centroid"] * nlist, seed, xs.device)]
    cent = kmeans(sample, nlist, niter=r["niter"], seed=seed)
    list_no, _ = assign(xs, cent)
    ids = torch.arange(n, dtype=torch.int64)
    if kind == "ivf":
        index, quantizer = build_ivf(faiss, "ivf", xs, cent, list_no, ids)
    else:
        resid = r["by_residual"]
        pts = xs[seeded_sample(n, 16384, seed + 1, xs.device)]
        train_x = pts - cent[assign(pts, cent)[0]] if resid else pts
        pq_cent = train_pq(train_x, r["m"], r["nbits"], seed=seed)
        index, quantizer = build_ivf(faiss, "ivfpq", xs, cent, list_no, ids, m=r["m"], nbits=r["nbits"],
                                     pq_centroids=pq_cent, by_residual=resid,
                                     fast_scan=bool(r.get("fast_scan")) and gpus is None)
    index.nprobe = min(r["nprobe"], nlist)
    if gpus is not None:
        return Handle(_to_gpu(kind, index, r, gpus, gpu))
    return Handle(index, cent.cpu(), (quantizer,))


def _to_gpu(kind: str, cpu_index, r: dict, gpus: GpuContext, gpu: int):
    """A GPU copy of a CPU index, keeping its nprobe (IVF kinds)."""
    nprobe = cpu_index.nprobe if kind in IVF_KINDS else 0
    index = gpus.to_gpu(cpu_index, gpu, float16_luts=kind == "ivfpq" and r.get("m", 0) > 48)
    if nprobe:
        index.nprobe = nprobe
    return index


def load_one(faiss: ModuleType, kind: str, path: str, r: dict, gpus: GpuContext | None, gpu: int) -> Handle:
    """A Handle for an index read from ``path``: nprobe from r (IVF), copied to GPU gpu when gpus is
    given, else (CPU IVF) with its centroids recovered from its quantizer."""
    index = faiss.read_index(path)
    if kind in IVF_KINDS:
        index.nprobe = min(r["nprobe"], faiss.extract_index_ivf(index).nlist)
    if gpus is not None:
        return Handle(_to_gpu(kind, index, r, gpus, gpu))
    if kind in IVF_KINDS:
        ivf = faiss.extract_index_ivf(index)
        q = faiss.downcast_index(ivf.quantizer)
        return Handle(index, torch.from_numpy(q.reconstruct_n(0, q.ntotal).copy()))
    return Handle(index)


def search_one(faiss: ModuleType, kind: str, handle: Handle, xq: torch.Tensor, k: int, r: dict,
               gpus: GpuContext | None, gpu: int, sel=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(D (Q, k) float32 squared distances, I (Q, k) int64 positions, -1 = none), on xq's device.

    sel: optional faiss IDSelector (CPU only) restricting the positions that may be returned.
    """
    nq = xq.shape[0]
    index = handle.index
    k = max(1, min(k, max(int(index.ntotal), 1)))
    if gpus is not None:
        params = None
        if kind == "cagra" and hasattr(faiss, "SearchParametersCagra") and not isinstance(index, faiss.GpuIndexFlat):
            params = faiss.SearchParametersCagra()
            params.itopk_size = max(r["itopk_size"], k)
        return gpus.search(index, xq, k, gpu, params)
    x = np.ascontiguousarray(xq.detach().cpu().numpy(), dtype=np.float32)
    if kind in IVF_KINDS:
        # Coarse assignment with torch (faster than faiss' bundled BLAS here), then scan.
        cent = handle.centroids
        nprobe = min(r["nprobe"], cent.shape[0])
        score = torch.addmm((cent * cent).sum(1), torch.from_numpy(x), cent.T, alpha=-2.0)
        cd, ci = score.topk(nprobe, dim=1, largest=False)
        D, I = search_preassigned(faiss, index, x, k, ci, cd, sel)
    else:
        D = np.empty((nq, k), dtype=np.float32)
        I = np.empty((nq, k), dtype=np.int64)
        if kind == "hnsw":
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(r["efSearch"], k)
        else:
            params = faiss.SearchParameters()
        if sel is not None:
            params.sel = sel
        index.search_c(nq, faiss.swig_ptr(x), k, faiss.swig_ptr(D), faiss.swig_ptr(I), params)
    dev = xq.device
    return torch.from_numpy(D).to(dev), torch.from_numpy(I).to(dev)


def index_nbytes(faiss: ModuleType, kind: str, handle: Handle, dim: int, r: dict) -> int:
    """Approximate bytes of one index."""
    index = handle.index
    n = int(index.ntotal)
    if kind in IVF_KINDS and hasattr(index, "invlists") and index.invlists is not None:
        return ivf_nbytes(index)
    if kind in IVF_KINDS:
        code = dim * 4 if kind == "ivf" else (r["m"] * r["nbits"] + 7) // 8
        return n * (code + 8) + r["nlist"] * dim * 4
    if kind == "hnsw":
        return n * (dim * 4 + r["hnsw_m"] * 2 * 4 + 8)
    if kind == "cagra":
        return n * (dim * 4 + r["graph_degree"] * 4)
    return n * dim * 4
