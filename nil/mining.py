"""Glue between training and the distractor search: find each sample's distractor, keep the memory fresh.

Every training step the trainer calls :meth:`DistractorMiner.mine` with the batch's detached
embeddings (before they enter the memory, so a sample never meets its own stale copy), computes the
loss, then :meth:`DistractorMiner.update` streams the batch into the memory, keyed by sample id.

``ann`` chooses where distractors come from:

- ``none``: the current batch only (nearest other-class sample within the batch);
- ``exact``: a memory of every training sample's latest embedding, searched exactly in torch;
- ``faiss``: the same memory held in the FAISS engine of :mod:`faiss_index`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import faiss_index
from faiss_index import knn_other_class

LOG = logging.getLogger(__name__)


@dataclass
class Mined:
    distractor: torch.Tensor  # (B, D) stored embedding of each sample's distractor (zeros where none)
    valid: torch.Tensor  # (B,) bool, False where no other-class sample exists yet
    ids: torch.Tensor  # (B,) int64 distractor sample ids, -1 where none
    positive: torch.Tensor | None = None  # (B, D) nearest same-class stored embedding (triplet)
    positive_valid: torch.Tensor | None = None


class DistractorMiner:
    """Finds distractors for a batch and keeps the memory of training embeddings up to date."""

    def __init__(
        self,
        ann: str,
        num_classes: int,
        dim: int,
        device: torch.device | str = "cpu",
        kind: str = "ivfpq",
        refresh_every: int = 200,
        need_positive: bool = False,
        audit_every: int = 0,
        index=None,
        shard=None,
    ):
        self.ann, self.need_positive, self.audit_every = ann, need_positive, audit_every
        self.num_classes = num_classes
        self.index = index  # a prebuilt index (e.g. `nil train --index-from`), else made here
        if index is None and ann == "exact":
            self.index = faiss_index.ExactIndex(dim, num_classes, device=device)
        elif index is None and ann == "faiss":
            self.index = faiss_index.make_index(kind, dim, num_classes, device=device, refresh_every=refresh_every)
        # Several processes: `shard` (faiss_index.DistributedIndex) turns a local index into this
        # rank's shard of one index searched by all ranks; the memory and the batch are global.
        self.shard = shard
        if shard is not None and self.index is not None:
            self.index = shard(self.index)
        self.steps = 0
        self.timings = {"mining_ms": 0.0, "upsert_ms": 0.0, "refresh_s": 0.0, "audits": 0, "audit_hits": 0,
                        "comm_bytes": 0}

    def reset_timings(self) -> dict:
        """Return the timings gathered since the last reset, averaged per step."""
        t, steps = self.timings, max(self.steps, 1)
        out = {
            "mining_ms_per_step": t["mining_ms"] / steps,
            "upsert_ms_per_step": t["upsert_ms"] / steps,
            "refresh_s": t["refresh_s"],
        }
        if self.shard is not None:  # bytes this rank sent for the search (queries out, top-k back)
            sent = t["comm_bytes"] + (self.index.take_bytes_sent() if self.index is not None else 0)
            out["comm_bytes_per_step"] = sent / steps
        if t["audits"]:
            out["audit_recall_at_1"] = t["audit_hits"] / t["audits"]
        self.timings = {k: 0 for k in t}
        self.steps = 0
        return out

    @torch.no_grad()
    def mine(self, z: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> Mined:
        """Distractors for a batch. z: (B, D) float, detached; labels, ids: (B,) int64."""
        start = time.perf_counter()
        if self.index is None:
            mined = self._mine_in_batch(z, labels, ids)
        else:
            res = self.index.search_other_class(z, labels, 1, query_ids=ids, return_vectors=True)
            mined = Mined(res.vectors[:, 0].to(z.dtype), res.ids[:, 0] >= 0, res.ids[:, 0])
            if self.need_positive:
                pos = self.index.search_same_class(z, labels, 1, query_ids=ids, return_vectors=True)
                mined.positive, mined.positive_valid = pos.vectors[:, 0].to(z.dtype), pos.ids[:, 0] >= 0
            if self.ann == "faiss" and self.audit_every and self.steps % self.audit_every == 0:
                self._audit(z, labels, ids, res.ids[:, 0])
        self.timings["mining_ms"] += (time.perf_counter() - start) * 1e3
        return mined

    def _mine_in_batch(self, z: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> Mined:
        if self.shard is not None:
            return self._mine_in_global_batch(z, labels, ids)
        _, rows = knn_other_class(z, labels, z, labels, 1, qid=ids, bid=ids)
        rows = rows[:, 0]
        valid = rows >= 0
        safe = rows.clamp(min=0)
        mined = Mined(z[safe] * valid[:, None], valid, torch.where(valid, ids[safe], -1))
        if self.need_positive:
            _, prow = knn_other_class(z, labels, z, labels, 1, qid=ids, bid=ids, same_class=True)
            prow = prow[:, 0]
            mined.positive, mined.positive_valid = z[prow.clamp(min=0)], prow >= 0
        return mined

    def _mine_in_global_batch(self, z: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> Mined:
        """``--ann none`` with several processes: the batch is every rank's slice of the global batch."""
        batch = self.shard(faiss_index.ExactIndex(z.shape[1], self.num_classes, device=z.device))
        batch.upsert_local(ids, z, labels)
        res = batch.search_other_class(z, labels, 1, query_ids=ids, return_vectors=True)
        mined = Mined(res.vectors[:, 0].to(z.dtype), res.ids[:, 0] >= 0, res.ids[:, 0])
        if self.need_positive:
            pos = batch.search_same_class(z, labels, 1, query_ids=ids, return_vectors=True)
            mined.positive, mined.positive_valid = pos.vectors[:, 0].to(z.dtype), pos.ids[:, 0] >= 0
        self.timings["comm_bytes"] += batch.take_bytes_sent()
        return mined

    def _audit(self, z: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, found: torch.Tensor) -> None:
        """Recall@1 of the approximate answer against the exact engine over the same memory."""
        if hasattr(self.index, "exact_other_class"):  # sharded: the exact engine over every rank's shard
            truth = self.index.exact_other_class(z, labels, 1, query_ids=ids).ids[:, 0]
            has = truth >= 0
            self.timings["audits"] += int(has.sum())
            self.timings["audit_hits"] += int((found.to(truth.device)[has] == truth[has]).sum())
            return
        store = self.index.store
        n = len(store)
        if n == 0:
            return
        _, rows = knn_other_class(z, labels, store.vectors[:n], store.labels[:n], 1, qid=ids, bid=store.ids[:n])
        truth = torch.where(rows[:, 0] >= 0, store.ids[:n][rows[:, 0].clamp(min=0)], -1)
        has = truth >= 0
        self.timings["audits"] += int(has.sum())
        self.timings["audit_hits"] += int((found.to(truth.device)[has] == truth[has]).sum())

    @torch.no_grad()
    def update(self, z: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> None:
        """Stream the batch's detached embeddings into the memory (newer replaces older)."""
        self.steps += 1
        if self.index is None:
            return
        start = time.perf_counter()
        refresh_before = getattr(self.index, "last_refresh_s", 0.0)
        self.index.upsert(ids, z, labels)
        refreshed = getattr(self.index, "last_refresh_s", 0.0)
        if refreshed != refresh_before:
            self.timings["refresh_s"] += refreshed
        self.timings["upsert_ms"] += (time.perf_counter() - start) * 1e3


def gradient_distractor(model: torch.nn.Module, features: torch.Tensor, logits: torch.Tensor,
                        labels: torch.Tensor, step: float) -> Mined:
    """A feature-space distractor built from the network itself ("neuron" distractor).

    For each sample take the most confusing other class c (highest non-target logit), move the
    pooled features f a step along the gradient that raises logit c, f' = f + step * ||f|| * g/||g||,
    and embed f' with the same projection head. Returns the embeddings of f' (detached).
    """
    masked = logits.detach().float().clone()
    masked.scatter_(1, labels[:, None], float("-inf"))
    confusing = masked.argmax(dim=1)
    with torch.enable_grad():
        f = features.detach().float().requires_grad_(True)
        score = model.classifier(f).gather(1, confusing[:, None]).sum()
        (g,) = torch.autograd.grad(score, f)
    with torch.no_grad():
        direction = F.normalize(g, dim=1)
        moved = f.detach() + step * f.detach().norm(dim=1, keepdim=True) * direction
        z_adv = model.heads(moved).z.float()  # fp32 heads: outside autocast, bf16 features would not match them
    valid = torch.ones(len(labels), dtype=torch.bool, device=labels.device)
    return Mined(z_adv, valid, torch.full_like(labels, -1))


class FreshDistractors:
    """Re-embed each mined distractor's image with the current network (``--fresh-distractors``).

    The memory answers *which* sample is the distractor; its stored vector can be up to an epoch
    old. Pushing z_i away from stale vectors lets the network satisfy the loss by moving the whole
    cloud of embeddings away from where it used to be, instead of separating the classes (measured:
    the embeddings collapse into a cap, |mean z| ~ 0.99). Here the distractor's image goes through
    the network in the same step, so the distance is between current embeddings and the gradient
    flows into both sides, as in the paper's pairs of image and distractor.
    """

    def __init__(self, samples, transform):
        from nil.data.base import TorchSplit

        self.split = TorchSplit(samples, transform)
        self.row = {int(sid): i for i, sid in enumerate(samples.ids)}

    def refresh(self, model: torch.nn.Module, mined: Mined, autocast_ctx) -> Mined:
        """``mined`` with the distractor vectors of training samples replaced by fresh embeddings (with grad)."""
        rows = torch.tensor([self.row.get(int(i), -1) for i in mined.ids.tolist()], dtype=torch.int64)
        take = (rows >= 0) & mined.valid.cpu()
        if not bool(take.any()):
            return mined
        images = torch.stack([self.split[int(r)][0] for r in rows[take]]).to(mined.distractor.device)
        with autocast_ctx:
            z = model(images).z.float()
        where = take.nonzero().squeeze(1).to(mined.distractor.device)
        distractor = mined.distractor.detach().index_put((where,), z)
        return Mined(distractor, mined.valid, mined.ids, mined.positive, mined.positive_valid)
