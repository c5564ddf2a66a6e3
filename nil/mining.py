"""Where each sample's distractor comes from: the distractor sources the trainer calls once per step.

A :class:`DistractorSource` embeds the batch and finds its distractors in ``step(model, x, y, ids,
active)``, and takes the batch into its memory in ``update`` after the optimiser step (so a sample
never meets its own stale copy). The sources:

- :class:`DistractorSource` itself: cross-entropy, the batch alone;
- :class:`SearchedDistractors`: the nearest other-class sample, searched by a :class:`DistractorMiner`
  in the current batch (``--ann none``) or in a memory of every training sample's latest embedding
  (``--ann exact``: exact search in torch; ``--ann faiss``: the FAISS engine of :mod:`faiss_index`);
  with ``--fresh-distractors`` each distractor's image is embedded again in the same step, and with
  ``--loss ce-replay`` those images get a cross-entropy term of their own (the compute-matched control;
  ``--replay`` adds that term beside the distractor term);
- :class:`GradientDistractors`: a feature-space distractor from the network's own neurons.

The trainer runs every forward pass of a step under :func:`nil.batchnorm.batch_statistics`, so
BatchNorm running statistics come from the training batch alone, whatever a source embeds besides.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import faiss_index
from faiss_index import knn_other_class
from nil import distributed
from nil.models import ModelOutput

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
        audit_queries: int = 32,
        index=None,
        shard=None,
        index_params: dict | None = None,
    ):
        self.ann, self.need_positive, self.audit_every = ann, need_positive, audit_every
        self.audit_queries = audit_queries  # the first rows of the (shuffled) batch: no random draw
        self.num_classes = num_classes
        self.index = index  # a prebuilt index (e.g. `nil train --index-from`), else made here
        if index is None and ann == "exact":
            self.index = faiss_index.make_index("exact", dim, num_classes, device=device, **(index_params or {}))
        elif index is None and ann == "faiss":
            self.index = faiss_index.make_index(kind, dim, num_classes, device=device, refresh_every=refresh_every,
                                                **(index_params or {}))
        # Several processes: `shard` (faiss_index.DistributedIndex) turns a local index into this
        # rank's shard of one index searched by all ranks; the memory and the batch are global.
        self.shard = shard
        if shard is not None and self.index is not None:
            self.index = shard(self.index)
        self.steps = 0
        self.timings = {"mining_ms": 0.0, "upsert_ms": 0.0, "refresh_s": 0.0, "audits": 0, "audit_hits": 0,
                        "comm_bytes": 0, "rebuilds": 0, "refreshes_skipped": 0}

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
        if hasattr(self.index, "refreshes_skipped"):  # an approximate index: did its periodic refreshes rebuild?
            out["rebuilds"], out["refreshes_skipped"] = t["rebuilds"], t["refreshes_skipped"]
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
            # every audit_every steps and at each epoch's second step (the memory of a first epoch is
            # empty at its first); the same steps on every rank, as a sharded audit is collective
            due = bool(self.audit_every) and (self.steps % self.audit_every == 0 or self.steps == 1)
            if self.ann == "faiss" and due:
                q = slice(0, self.audit_queries)
                self._audit(z[q], labels[q], ids[q], res.ids[:self.audit_queries, 0])
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
        built, skipped = getattr(self.index, "rebuilds", 0), getattr(self.index, "refreshes_skipped", 0)
        self.index.upsert(ids, z, labels)
        self.timings["rebuilds"] += getattr(self.index, "rebuilds", 0) - built
        self.timings["refreshes_skipped"] += getattr(self.index, "refreshes_skipped", 0) - skipped
        refreshed = getattr(self.index, "last_refresh_s", 0.0)
        if refreshed != refresh_before:
            self.timings["refresh_s"] += refreshed
        self.timings["upsert_ms"] += (time.perf_counter() - start) * 1e3


def gradient_distractor(model: torch.nn.Module, features: torch.Tensor, logits: torch.Tensor,
                        labels: torch.Tensor, step: float, space: str = "z") -> Mined:
    """A feature-space distractor built from the network itself ("neuron" distractor).

    For each sample take the most confusing other class c (highest non-target logit), move the
    pooled features f a step along the gradient that raises logit c, f' = f + step * ||f|| * g/||g||,
    and embed f' with the same projection head (``space`` "z") or L2-normalise it (``"features"``).
    Returns those vectors of f' (detached).
    """
    masked = logits.detach().float().clone()
    masked.scatter_(1, labels[:, None], float("-inf"))
    confusing = masked.argmax(dim=1)
    # fp32 heads, outside any autocast: bf16 features would not match them
    with torch.enable_grad(), torch.autocast(features.device.type, enabled=False):
        f = features.detach().float().requires_grad_(True)
        score = model.classifier(f).gather(1, confusing[:, None]).sum()
        (g,) = torch.autograd.grad(score, f)
    with torch.no_grad(), torch.autocast(features.device.type, enabled=False):
        direction = F.normalize(g, dim=1)
        moved = f.detach() + step * f.detach().norm(dim=1, keepdim=True) * direction
        z_adv = F.normalize(moved, dim=1) if space == "features" else model.heads(moved).z.float()
    valid = torch.ones(len(labels), dtype=torch.bool, device=labels.device)
    return Mined(z_adv, valid, torch.full_like(labels, -1))


class DistractorImages:
    """The training images behind sample ids, so a mined distractor can be embedded again in the step."""

    def __init__(self, samples, transform, cache_bytes: int = 1 << 30):
        self.samples, self.transform = samples.random_reader(cache_bytes), transform
        self.row = {int(sid): i for i, sid in enumerate(samples.ids)}

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Row of each id in the training split, -1 for ids it does not hold (-1 itself, or an --index-from id)."""
        return torch.tensor([self.row.get(int(i), -1) for i in ids.tolist()], dtype=torch.int64)

    def load(self, rows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, C, S, S) with the training transform, and their labels (N,)."""
        rows = np.asarray(rows, dtype=np.int64)
        x = torch.stack([self.transform(image) for image in self.samples.load_many(rows)]).to(device)
        return x, torch.as_tensor(self.samples.labels[rows], dtype=torch.int64, device=device)


# ------------------------------------------------------------------------------ distractor sources
@dataclass
class Step:
    """What one training step embedded: the batch, its distractors and any distractor images.

    ``out`` is the batch's output (with grad); ``pairs`` the distractor of each sample (None while
    the distractor term is off); ``replay``/``replay_labels`` the output of the distractor images
    embedded in this step and their labels (fresh re-embedding and hard-example replay), else None.
    """

    out: ModelOutput
    pairs: Mined | None = None
    replay: ModelOutput | None = None
    replay_labels: torch.Tensor | None = None


class EmbeddingsNotFinite(ValueError):
    """The batch's embeddings hold NaN or inf; raised before any search or memory sees them."""


def space_vectors(out: ModelOutput, space: str) -> torch.Tensor:
    """The vectors the term measures and a memory holds (with grad): z, or the L2-normalised pooled features."""
    return F.normalize(out.features.float(), dim=1) if space == "features" else out.z.float()


def embed(model, x: torch.Tensor) -> ModelOutput:
    """The batch's forward pass, refused when its embeddings are not finite."""
    out = model(x)
    if not bool(torch.isfinite(out.z).all()):
        raise EmbeddingsNotFinite("the embeddings became NaN or infinite")
    return out


class DistractorSource:
    """Where each sample's distractor comes from; the trainer calls it once per step.

    ``step(model, x, y, ids, active)`` embeds the batch (and whatever else the source needs) and
    returns a :class:`Step`; ``active`` is False during warm-up, when no search is spent.
    ``update(step, y, ids)`` runs after the optimiser step (a memory takes the batch in).
    The trainer wraps both calls' forward passes in :func:`nil.batchnorm.batch_statistics`.
    This base class is the cross-entropy source: the batch alone, no distractor.
    """

    miner: DistractorMiner | None = None  # the memory searched, saved in last.pt (None: nothing to save)

    def step(self, model, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, active: bool) -> Step:
        return Step(embed(model, x))

    def update(self, step: Step, y: torch.Tensor, ids: torch.Tensor) -> None:
        pass

    def reset_timings(self) -> dict:
        return self.miner.reset_timings() if self.miner is not None else {}


class SearchedDistractors(DistractorSource):
    """The nearest other-class sample, searched in the batch (``--ann none``) or a memory (``exact``, ``faiss``).

    ``images`` set: the distractor's image is embedded again with the current network in the same
    step (``--fresh-distractors``), so both sides of the distance are current embeddings and the
    gradient reaches both; a distractor that is in this batch already takes its embedding from the
    batch's own forward pass. ``replay``: every distractor image is embedded and its output is also
    returned for a cross-entropy term of its own (``--loss ce-replay``, the compute-matched control;
    ``--loss nil --replay W``, replay beside the term, which then measures those fresh embeddings).
    Without ``images`` the stored (detached) vector is used.

    ``space``: where the search and the term measure distances: ``"z"``, the projection head's
    embedding, or ``"features"``, the L2-normalised pooled features that cross-entropy trains
    (``--term-space features``; and the replay control, whose loss never reaches z: searched in z,
    an untrained random projection, its distractors are a few hub images).
    """

    def __init__(self, miner: DistractorMiner, images: DistractorImages | None = None, replay: bool = False,
                 space: str = "z"):
        if replay and images is None:
            raise ValueError("replay needs the distractor images")
        if space not in ("z", "features"):
            raise ValueError(f"space must be z or features, got {space!r}")
        self.miner, self.images, self.replay, self.space = miner, images, replay, space

    def vectors(self, out: ModelOutput) -> torch.Tensor:
        """The vectors of ``space`` (with grad): what the term measures and the memory holds."""
        return space_vectors(out, self.space)

    def key(self, out: ModelOutput) -> torch.Tensor:
        """The detached vectors the memory stores and is searched with."""
        return self.vectors(out).detach()

    def step(self, model, x, y, ids, active):
        out = embed(model, x)
        if not active:
            return Step(out)
        pairs = self.miner.mine(self.key(out), y, ids)
        if self.images is None:
            return Step(out, pairs)
        return self._embed_again(model, out, pairs, ids)

    def _embed_again(self, model, out: ModelOutput, pairs: Mined, ids: torch.Tensor) -> Step:
        device = out.z.device
        v = self.vectors(out)
        in_batch = (pairs.ids[:, None] == ids[None, :]) & pairs.valid[:, None]  # (B, B): distractor j is in the batch
        here = in_batch.any(1)
        rows = self.images.rows(pairs.ids.cpu()).to(device)
        elsewhere = pairs.valid & (rows >= 0)  # replay embeds every distractor image, fresh only the absent ones
        if not self.replay:
            elsewhere &= ~here
        distractor = pairs.distractor.detach().float()
        if not self.replay and bool(here.any()):
            distractor = torch.where(here[:, None], v[in_batch.float().argmax(1)], distractor)
        replay = labels = None
        if bool(elsewhere.any()):
            take = elsewhere.nonzero().squeeze(1)
            images, labels = self.images.load(rows[take].cpu(), device)
            replay = distributed.unwrap(model)(images)  # unwrapped: DDP sees one forward per step
            # the distractor is its fresh vector (for the replay control's search in features, unused)
            distractor = distractor.index_put((take,), self.vectors(replay))
            if not self.replay:
                replay = labels = None
        return Step(out, Mined(distractor, pairs.valid, pairs.ids, pairs.positive, pairs.positive_valid),
                    replay, labels)

    def update(self, step, y, ids):
        self.miner.update(self.key(step.out), y, ids)


class GradientDistractors(DistractorSource):
    """A feature-space distractor from the network's own neurons (:func:`gradient_distractor`); no memory."""

    def __init__(self, step_size: float, space: str = "z"):
        self.step_size, self.space = step_size, space

    def step(self, model, x, y, ids, active):
        out = embed(model, x)
        if not active:
            return Step(out)
        return Step(out, gradient_distractor(distributed.unwrap(model), out.features, out.logits, y, self.step_size,
                                             self.space))
