"""IndexService: the index behind the HTTP layer, and the limits one request may ask for."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import IndexInputError
from ..indexes.base import BaseIndex
from ..persistence import carried_entries, read_manifest, save_index

LOG = logging.getLogger(__name__)

__all__ = ["IndexService", "ServiceLimits", "Embedder"]

# (image bytes) -> (embedding (D,) float32, predicted class or None); raises ValueError for a bad image
Embedder = Callable[[bytes], "tuple[np.ndarray, int | None]"]


@dataclass
class ServiceLimits:
    """What one request may ask for; more is refused with 413 (size) or 422 (k)."""

    max_batch: int = 1024               # query vectors per search, rows per upsert
    max_k: int = 100                    # neighbours per query
    max_body_bytes: int = 32 << 20      # request body, JSON or image upload
    search_threads: int = 4             # searches run at once (each also uses torch's intra-op threads)
    coalesce: int = 1024                # queued /v1/search requests searched as one call, up to this many
                                        # query vectors (0: every request on its own)


class IndexService:
    """The index behind the HTTP layer: validated numpy in, numpy out (blocking calls)."""

    def __init__(self, index: BaseIndex, manifest: dict, folder: Path, keys: np.ndarray | None,
                 embed: Embedder | None, writable: bool):
        self.index = index
        self.manifest = dict(manifest)
        self.folder = Path(folder)
        n = len(index)
        self.keys = np.full(max(n, 1024), "", dtype=object)
        if keys is not None:
            if len(keys) != n:
                raise IndexInputError(f"keys has {len(keys)} entries but the index stores {n} samples.")
            self.keys[:n] = keys
        self.embed = embed
        self.writable = writable
        self.upserts_since_snapshot = 0

    # ----------------------------------------------------------------- reads
    def search(self, xq: np.ndarray, yq: np.ndarray, k: int) -> dict[str, np.ndarray]:
        """xq (Q, D) float32, yq (Q,) int64 -> {"ids", "labels": (Q, k) int64 (-1 where there is no
        neighbour), "distances": (Q, k) float32 (inf where none), "keys": (Q, k) str ("" where none)}."""
        res = self.index.search_other_class(torch.from_numpy(xq), torch.from_numpy(yq), k)
        ids = res.ids.cpu().numpy()
        found = ids >= 0
        rows = self.index.store.rows_of(torch.from_numpy(ids).clamp_min(0).reshape(-1)).cpu().numpy()
        keys = np.where(found.reshape(-1), self.keys[rows], "").reshape(ids.shape)
        dist = res.distances.cpu().numpy().astype(np.float32, copy=False)
        return {"ids": ids, "labels": res.labels.cpu().numpy(), "distances": dist, "keys": keys}

    def info(self) -> dict:
        m = self.manifest
        return {
            "index": self.folder.name, "kind": self.index.kind, "dim": self.index.dim, "metric": m.get("metric", "l2"),
            "classes": m["classes"], "count": len(self.index), "counts": self.index.counts(),
            "params": m.get("params", {}), "source": m.get("source"), "created": m.get("created"),
            "checkpoint_sha256": m.get("checkpoint_sha256"), "device": str(self.index.device),
            "image_search": self.embed is not None, "writable": self.writable,
            "upserts_since_snapshot": self.upserts_since_snapshot,
        }

    # ----------------------------------------------------------------- writes
    def upsert(self, ids: np.ndarray, xb: np.ndarray, yb: np.ndarray, keys: list[str] | None) -> dict:
        """ids (B,) int64 >= 0, xb (B, D) float32, yb (B,) int64; a known id's vector is replaced."""
        t_ids = torch.from_numpy(ids)
        self.index.upsert(t_ids, torch.from_numpy(xb), torch.from_numpy(yb))
        rows = self.index.store.rows_of(t_ids).cpu().numpy()
        n = len(self.index)
        if n > len(self.keys):
            grown = np.full(max(n, 2 * len(self.keys)), "", dtype=object)
            grown[: len(self.keys)] = self.keys
            self.keys = grown
        if keys is not None:
            for r, key in zip(rows.tolist(), keys):  # in order, so the last duplicate wins like the vectors
                self.keys[r] = key
        self.upserts_since_snapshot += 1
        return {"upserted": int(np.unique(ids).size), "count": n}

    def snapshot(self) -> dict:
        m = self.manifest
        n = len(self.index)
        save_index(self.index, self.folder, classes=m["classes"], keys=self.keys[:n].tolist(),
                   checkpoint_sha256=m.get("checkpoint_sha256"), source=m.get("source"), extra=carried_entries(m))
        self.manifest = read_manifest(self.folder)
        self.upserts_since_snapshot = 0
        return {"count": n, "created": self.manifest["created"], "files": len(self.manifest["files"])}
