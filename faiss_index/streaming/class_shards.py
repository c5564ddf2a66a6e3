"""ClassShards: one faiss index per class; a query of class c searches every shard except c.

The general sharded engine: any kind (flat, ivf, ivfpq, hnsw, cagra) on CPU or GPU, shards
spread over GPUs when several are used (shard of the i-th class on GPU i % ngpu). Each shard
over-fetches and the index merges and re-ranks the candidates. On CPU the IVF kinds use the
joint-probing :class:`PartitionedIVF` instead, which is faster; this engine serves them on GPU.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..engines.gpu import GpuContext
from ..engines.single_faiss import build_one, index_nbytes, load_one, resolve_kind_params, search_one
from ..kinds import IVF_KINDS
from .structure import Engine

LOG = logging.getLogger(__name__)

__all__ = ["ClassShards"]


class ClassShards(Engine):
    """Per-class faiss shards (faiss ids = positions in the shard, mapped to store rows)."""

    def __init__(self, *args, gpus: GpuContext | None = None):
        super().__init__(*args)
        self.gpus = gpus
        # class -> (Handle, rows (n_c,) int64 on the index device, gpu id, resolved params)
        self.shards: dict[int, tuple] = {}
        self._resolve([0] * self.num_classes)

    def _resolve(self, counts: list[int]) -> None:
        p = self.params
        biggest = max(counts) if counts else 0
        r = resolve_kind_params(self.kind, biggest, self.dim, p, self.gpus is not None)
        exact_kind = self.kind == "flat"
        rerank = p.rerank if p.rerank is not None else (8 if exact_kind else 32)
        r.update(rerank=rerank, probe="per_shard")
        if self.kind in IVF_KINDS:
            r["nlist_per_class"] = [resolve_kind_params(self.kind, n, self.dim, p, self.gpus is not None)["nlist"]
                                    if n else 0 for n in counts]
        if self.gpus is not None:
            r["gpus"] = list(self.gpus.gpus)
        self.resolved = r

    def build(self, vectors: torch.Tensor, labels: torch.Tensor, changed: torch.Tensor | None = None) -> None:
        counts = torch.bincount(labels, minlength=self.num_classes).tolist()
        self._resolve(counts)
        shards = {}
        for c in range(self.num_classes):
            if counts[c] == 0:
                continue
            rows = (labels == c).nonzero().squeeze(1)
            xs = vectors[rows].float()
            gpu = self.gpus.place(len(shards)) if self.gpus is not None else -1
            r = resolve_kind_params(self.kind, counts[c], self.dim, self.params, self.gpus is not None)
            index = build_one(self.faiss, self.kind, xs, r, self.gpus, gpu, self.params.seed + 7919 * c)
            shards[c] = (index, rows.to(self.device), gpu, r)
        self.shards = shards
        self.ntotal = int(labels.shape[0])
        self.built = bool(shards)

    def candidates(self, xq, yq, same_class, k):
        nq = xq.shape[0]
        kp = max(self.resolved["rerank"], 2 * k)
        width = kp * len(self.shards)
        out_d = torch.full((nq, width), float("inf"), device=self.device)
        out_r = torch.full((nq, width), -1, dtype=torch.int64, device=self.device)
        for slot, (c, (index, rows, gpu, r)) in enumerate(sorted(self.shards.items())):
            qi = ((yq == c) if same_class else (yq != c)).nonzero().squeeze(1)
            if qi.numel() == 0:
                continue
            kk = min(kp, rows.shape[0])
            D, I = search_one(self.faiss, self.kind, index, xq[qi], kk, r, self.gpus, gpu)
            found = I >= 0
            got = torch.where(found, rows[I.clamp_min(0)], torch.full_like(I, -1))
            cols = slice(slot * kp, slot * kp + I.shape[1])
            out_r[qi, cols] = got
            out_d[qi, cols] = D.masked_fill(~found, float("inf"))
        return out_d, out_r

    def nbytes(self) -> int:
        return sum(index_nbytes(self.faiss, self.kind, ix, self.dim, r) + rows.numel() * 8
                   for ix, rows, _, r in self.shards.values())

    def save(self, folder: Path) -> dict:
        files, classes = [], []
        for c, (index, rows, gpu, r) in sorted(self.shards.items()):
            name = f"shard_{c:05d}"
            cpu_index = self.gpus.to_cpu(index.index) if self.gpus is not None else index.index
            self.faiss.write_index(cpu_index, str(folder / f"{name}.faiss"))
            np.save(folder / f"{name}.rows.npy", rows.cpu().numpy())
            files += [f"{name}.faiss", f"{name}.rows.npy"]
            classes.append(c)
        return {"files": files, "classes": classes, "ntotal": self.ntotal}

    def load(self, folder: Path, meta: dict) -> None:
        shards = {}
        counts = [0] * self.num_classes
        for c in meta["classes"]:
            name = f"shard_{c:05d}"
            rows = torch.from_numpy(np.load(folder / f"{name}.rows.npy"))
            counts[c] = rows.shape[0]
            r = resolve_kind_params(self.kind, rows.shape[0], self.dim, self.params, self.gpus is not None)
            gpu = self.gpus.place(len(shards)) if self.gpus is not None else -1
            index = load_one(self.faiss, self.kind, str(folder / f"{name}.faiss"), r, self.gpus, gpu)
            shards[c] = (index, rows.to(self.device), gpu, r)
        self._resolve(counts)
        self.shards = shards
        self.ntotal = int(meta["ntotal"])
        self.built = bool(shards)
