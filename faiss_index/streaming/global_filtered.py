"""GlobalFiltered: one faiss index over all rows, restricted to the wanted labels per query group.

For many classes (``strategy="auto"`` above 32 classes) one shard per class is wasteful; a single
index is searched instead:

* CPU: per query-label group, faiss SearchParameters with an ``IDSelectorBitmap`` over the faiss
  ids (= store rows) of the allowed labels, so the scan itself skips excluded rows. Bitmaps are
  cached per label until the next build.
* GPU: faiss' classic GPU indexes ignore IDSelectors, so every query over-fetches, hits of the
  excluded labels are dropped, and queries left with fewer than k candidates are answered exactly
  by the index (``needs_fallback``).

With few, tight classes a query's neighbourhood is mostly its own class, which is why this is
not the default there (MINING-FACTS.md, fact 1).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ..engines.gpu import GpuContext
from ..engines.single_faiss import build_one, index_nbytes, load_one, resolve_kind_params, search_one
from .structure import Engine

LOG = logging.getLogger(__name__)

__all__ = ["GlobalFiltered"]

_BITMAP_CACHE = 64       # label bitmaps kept per build (each N/8 bytes)
_GPU_OVERFETCH = 8       # GPU: fetch this many times the candidates wanted
_GPU_MAX_K = 2048        # largest k faiss GPU search accepts


class GlobalFiltered(Engine):
    """One index over every row; label filtering by IDSelector (CPU) or over-fetch (GPU)."""

    def __init__(self, *args, gpus: GpuContext | None = None):
        super().__init__(*args)
        self.gpus = gpus
        self.needs_fallback = gpus is not None
        self.index = None
        self.labels = torch.empty(0, dtype=torch.int64)
        self._bitmaps: OrderedDict = OrderedDict()
        self._resolve(0)

    def _resolve(self, n: int) -> None:
        p = self.params
        r = resolve_kind_params(self.kind, n, self.dim, p, self.gpus is not None)
        r.update(rerank=p.rerank if p.rerank is not None else (8 if self.kind == "flat" else 32),
                 probe="global_filter")
        self.resolved = r

    def build(self, vectors: torch.Tensor, labels: torch.Tensor, changed: torch.Tensor | None = None) -> None:
        n = int(labels.shape[0])
        self._resolve(n)
        self._bitmaps.clear()
        if n == 0:
            self.index, self.built, self.ntotal = None, False, 0
            return
        gpu = self.gpus.place(0) if self.gpus is not None else -1
        self.index = build_one(self.faiss, self.kind, vectors.float(), self.resolved, self.gpus, gpu, self.params.seed)
        self._gpu = gpu
        self.labels = labels.clone()
        self.ntotal = n
        self.built = True

    def _selector(self, c: int, same_class: bool):
        key = (c, same_class)
        if key in self._bitmaps:
            self._bitmaps.move_to_end(key)
            return self._bitmaps[key][0]
        lab = self.labels.cpu().numpy()
        allowed = (lab == c) if same_class else (lab != c)
        bits = np.packbits(allowed, bitorder="little")  # faiss: bit (i & 7) of byte i >> 3
        sel = self.faiss.IDSelectorBitmap(len(lab), self.faiss.swig_ptr(bits))
        self._bitmaps[key] = (sel, bits)  # the selector reads the array: keep it alive
        if len(self._bitmaps) > _BITMAP_CACHE:
            self._bitmaps.popitem(last=False)
        return sel

    def candidates(self, xq, yq, same_class, k):
        nq = xq.shape[0]
        kp = max(self.resolved["rerank"], 2 * k)
        r = self.resolved
        if self.gpus is not None:
            fetch = min(_GPU_MAX_K, self.ntotal, kp * _GPU_OVERFETCH)
            D, I = search_one(self.faiss, self.kind, self.index, xq, fetch, r, self.gpus, self._gpu)
            lab = self.labels.to(I.device)[I.clamp_min(0)]
            ok = (I >= 0) & ((lab == yq.unsqueeze(1)) if same_class else (lab != yq.unsqueeze(1)))
            D = D.masked_fill(~ok, float("inf"))
            D, j = D.topk(min(kp, D.shape[1]), dim=1, largest=False)
            I = torch.where(torch.isfinite(D), I.gather(1, j), torch.full_like(j, -1))
            return D, I
        out_d = torch.full((nq, kp), float("inf"))
        out_r = torch.full((nq, kp), -1, dtype=torch.int64)
        yq_cpu = yq.cpu()
        for c in torch.unique(yq_cpu).tolist():
            qi = (yq_cpu == c).nonzero().squeeze(1)
            D, I = search_one(self.faiss, self.kind, self.index, xq[qi.to(xq.device)], kp, r, None, -1,
                              sel=self._selector(c, same_class))
            out_d[qi, : D.shape[1]] = D.cpu().masked_fill(I.cpu() < 0, float("inf"))
            out_r[qi, : I.shape[1]] = I.cpu()
        return out_d.to(self.device), out_r.to(self.device)

    def nbytes(self) -> int:
        if self.index is None:
            return 0
        return index_nbytes(self.faiss, self.kind, self.index, self.dim, self.resolved) + self.labels.numel() * 8

    def save(self, folder: Path) -> dict:
        if self.index is None:
            return {"files": [], "ntotal": 0}
        cpu_index = self.gpus.to_cpu(self.index.index) if self.gpus is not None else self.index.index
        self.faiss.write_index(cpu_index, str(folder / "global.faiss"))
        np.save(folder / "global.labels.npy", self.labels.cpu().numpy())
        return {"files": ["global.faiss", "global.labels.npy"], "ntotal": self.ntotal}

    def load(self, folder: Path, meta: dict) -> None:
        self._bitmaps.clear()
        if not meta["files"]:
            self.index, self.built, self.ntotal = None, False, 0
            return
        self.labels = torch.from_numpy(np.load(folder / "global.labels.npy"))
        self._resolve(int(self.labels.shape[0]))
        self._gpu = self.gpus.place(0) if self.gpus is not None else -1
        self.index = load_one(self.faiss, self.kind, str(folder / "global.faiss"), self.resolved, self.gpus, self._gpu)
        self.ntotal = int(meta["ntotal"])
        self.built = True
