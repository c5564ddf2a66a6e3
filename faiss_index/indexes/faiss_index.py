"""FaissIndex: a streaming approximate index = store + faiss structure + exact delta.

Every ``upsert`` writes the store, then brings the structure up to date in one of two ways:

* in place (the CPU IVF engine, kinds "ivf" and "ivfpq", the CPU default): each written row is
  assigned to the nearest list of its class and its one entry is rewritten there or moved there at
  once, so searches see it through the structure, nothing is searched exactly, and no older copy
  is left behind. A periodic refresh is then only needed when the centroids no longer fit the data
  (it is skipped otherwise).
* through the :class:`DeltaBuffer` (every other engine, GPU included): the written rows' entries
  in the structure are stale and skipped, and the rows are searched exactly
  (:func:`knn_other_class`) in the delta until the next rebuild.

Candidates from both are re-ranked with the freshest stored vectors, so a stale entry costs
recall, never correctness. Every ``refresh_every`` upserts (or on :meth:`refresh` / :meth:`build`)
the structure is rebuilt from the store (new centroids, no dead entries). The CPU IVF engine
rebuilds in a background thread, so no training step waits for it: searches use the current
structure until the new one is swapped in, ``refresh_every // 2`` upserts later. The thread runs at
a lower priority and, once built, writes the rows upserted meanwhile into the new structure itself,
so the swap finds it current: no step pays for a catch-up or searches those rows exactly.

Engines without in-place updates never change between refreshes, which sidesteps what GPU
faiss indexes cannot do (no ``remove_ids``, no ``add_with_ids`` on GpuIndexFlat).
"""
from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..engines.exact import knn_other_class
from ..engines.faiss_lib import follow_torch_threads, has_cuvs, import_faiss
from ..errors import FaissUnavailableError, IndexFormatError, IndexInputError
from ..kinds import FAISS_KINDS, IVF_KINDS, KINDS, MAX_SHARDED_CLASSES, IndexParams
from ..streaming.delta import DeltaBuffer
from ..streaming.rerank import rerank
from .base import BaseIndex

LOG = logging.getLogger(__name__)

__all__ = ["FaissIndex"]

# Rows moved from the delta into an in-place structure per upsert, at least (4x the batch otherwise).
_MIN_DRAIN = 1024


class FaissIndex(BaseIndex):
    """Approximate other-class / same-class search with faiss, exact on what changed since the last build.

    Args:
        dim: vector dimension D.
        num_classes: labels are 0..num_classes-1.
        kind: "flat", "ivf", "ivfpq", "hnsw" (CPU only) or "cagra" (CUDA with cuVS).
        device: "cpu" or "cuda[:N]"; "cuda" without an index spreads class shards over all GPUs.
        refresh_every: rebuild the structure after this many upsert calls (0 = only on request); with
            in-place updates the rebuild is skipped while the centroids still fit the data (unless
            the parameter ``retrain`` is "always").
        background: rebuild in a thread and swap the new structure in ``refresh_every // 2`` upserts
            later (None: wherever the engine supports it, i.e. ivf / ivfpq on CPU).
        **params: see :class:`IndexParams` (nlist, nprobe, m, nbits, rerank, inplace, strategy, ...).
    """

    def __init__(self, dim: int, num_classes: int, kind: str = "ivf", device: str | torch.device = "cpu",
                 refresh_every: int = 200, background: bool | None = None, **params: Any):
        if kind not in FAISS_KINDS:
            raise IndexInputError(f"unknown faiss kind {kind!r}; kinds are {', '.join(KINDS)}.")
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 0:
            raise IndexInputError(f"refresh_every must be a non-negative integer, got {refresh_every!r}.")
        raw_device = str(device)
        p = IndexParams.from_kwargs(kind, **params)
        super().__init__(dim, num_classes, device, p.store_dtype)
        self.kind = kind
        faiss = import_faiss(self.device)
        self._faiss = faiss
        on_gpu = self.device.type == "cuda"
        if kind == "hnsw" and on_gpu:
            raise IndexInputError("kind 'hnsw' runs on CPU only in faiss; use 'cagra', 'ivf' or 'exact' on CUDA.")
        if kind == "cagra" and not on_gpu:
            raise IndexInputError("kind 'cagra' needs device 'cuda'; on CPU use 'hnsw' or 'ivfpq'.")
        if kind == "cagra" and not has_cuvs(faiss):
            raise FaissUnavailableError(
                "kind 'cagra' needs a faiss GPU build with cuVS; install one (pip install \"nil[gpu]\") "
                "or use kind 'ivf' or 'exact'.")
        self.refresh_every = refresh_every
        strategy = p.strategy
        if strategy == "auto":
            strategy = "sharded" if num_classes <= MAX_SHARDED_CLASSES else "global"
        self.strategy = strategy
        gpus = None
        if on_gpu:
            from ..engines.gpu import GpuContext
            spread = p.multi_gpu and raw_device == "cuda"
            gpus = GpuContext(faiss, self.device, spread)
        args = (faiss, kind, dim, num_classes, self.device, p)
        if strategy == "global":
            from ..streaming.global_filtered import GlobalFiltered
            self.engine = GlobalFiltered(*args, gpus=gpus)
        elif not on_gpu and kind in IVF_KINDS:
            from ..streaming.partitioned_ivf import PartitionedIVF
            self.engine = PartitionedIVF(*args)
        else:
            from ..streaming.class_shards import ClassShards
            self.engine = ClassShards(*args, gpus=gpus)
        self._user_params = p
        self.delta = DeltaBuffer(dim, self.device)
        self._steps = 0
        self.last_refresh_s: float | None = None
        self.rebuilds = 0  # structures built (in this thread or swapped in from the background)
        self.refreshes_skipped = 0  # periodic refreshes skipped because the structure still fit the data
        # The CPU IVF engine rebuilds in a background thread (see _start_rebuild); others in the step.
        can = hasattr(self.engine, "build_prepared")
        if background and not can:
            raise IndexInputError(f"a background rebuild needs the CPU IVF engine (kind ivf or ivfpq on CPU); "
                                  f"this index uses {type(self.engine).__name__}.")
        self.background = can if background is None else bool(background)
        can = hasattr(self.engine, "update")
        if p.inplace and not can:
            raise IndexInputError(f"in-place updates need the CPU IVF engine (kind ivf or ivfpq on CPU); "
                                  f"this index uses {type(self.engine).__name__}.")
        self.inplace = can if p.inplace is None else p.inplace
        self._job: _Rebuild | None = None
        self._update_params()

    # ------------------------------------------------------------------ bookkeeping
    def _update_params(self) -> None:
        self.params = {"strategy": self.strategy, "refresh_every": self.refresh_every,
                       "store_dtype": self.store.dtype_name, "inplace": self.inplace,
                       "retrain": self._user_params.retrain, "probe_recall": self._user_params.probe_recall,
                       **self.engine.resolved}

    @property
    def delta_size(self) -> int:
        """Rows changed since the last build, searched exactly (before the first build: every row)."""
        return len(self.delta) if self.engine.built else len(self.store)

    def _changed(self) -> torch.Tensor | None:
        """Rows changed since the structure in use was built; None before the first build (all of them)."""
        return self.delta.changed(len(self.store)) if self.engine.built else None

    def upsert(self, ids: Any, vectors: Any, labels: Any) -> torch.Tensor:
        """Write samples to the store and the structure (in place, or the exact delta); refresh every
        ``refresh_every`` calls.

        ids (B,) int >= 0, vectors (B, D) float, labels (B,) int. Returns (U,) int64 rows written.
        """
        if self._job is not None:  # the rebuild reads the store as it was when it started
            self._job.snapshot.save(self.store.rows_of(ids))
        rows = self.store.upsert(ids, vectors, labels, self.num_classes)
        if self.engine.built:  # before the first build the store itself is searched: no second copy
            self._write(rows)
        if self._job is not None:
            s = self.store
            self._job.record(rows, s.vectors[rows], s.labels[rows], s.ids[rows])
        self._steps += 1
        if self._job is not None and self._steps >= self._job.swap_at:
            self._finish_rebuild()
        if self.inplace and self.engine.built and len(self.delta):
            # Rows in the delta of an in-place engine (loaded with a saved index, or whose class had no
            # lists): try a few into the structure per call.
            self._write(self.delta.pop(max(4 * rows.numel(), _MIN_DRAIN)))
        if self.refresh_every and self._steps >= self.refresh_every:
            if self._still_fits():
                self._steps = 0
                self.refreshes_skipped += 1
            elif self.background:
                self._start_rebuild()
            else:
                self.refresh()
        return rows

    def _still_fits(self) -> bool:
        """Whether a periodic rebuild would change nothing that matters: in-place updates kept the
        structure exact (one entry per row, nothing in the delta) and the engine says its centroids
        and codebook still fit the data."""
        if self._user_params.retrain == "always" or not (
                self.inplace and self.engine.built and len(self.delta) == 0 and hasattr(self.engine, "fits")):
            return False
        return self.engine.fits(self.store.view()[1])

    def _write(self, rows: torch.Tensor) -> None:
        """Bring the structure up to date with store rows just written: in place where the engine can,
        otherwise (or for rows it cannot place) into the exact delta."""
        s = self.store
        if self.inplace:
            _place(self.engine, self.delta, rows, s.vectors[rows], s.labels[rows], s.ids[rows])
        elif rows.numel():
            self.delta.write(rows, s.vectors[rows], s.labels[rows], s.ids[rows])

    # ------------------------------------------------------------------ background rebuild
    def _start_rebuild(self) -> None:
        """Rebuild a copy of the engine in a thread from the store as it is now; searches go on with
        the current structure. The copy is swapped in ``refresh_every // 2`` upserts later (waiting
        for it only if it is not done by then), at the same step whatever the timing, so a seeded
        run stays reproducible. Rows written meanwhile are written into the new structure by the
        thread once it is built (in-place updates), or go to its exact delta (see :class:`_Rebuild`)."""
        self._finish_rebuild()
        n = len(self.store)
        engine = copy.copy(self.engine)
        prepared = engine.prepare(self.store.vectors[:n], self.store.labels[:n], self._changed())
        job = _Rebuild(engine=engine, since=DeltaBuffer(self.dim, self.device), snapshot=prepared["snapshot"],
                       swap_at=max(1, self.refresh_every // 2), catch_up=self.inplace)
        follow_torch_threads(self._faiss)
        # not a daemon: the interpreter's exit waits for it (a daemon thread still inside faiss / OpenMP
        # when the process ends aborts it with "terminate called without an active exception")
        job.thread = threading.Thread(target=job.run, args=(prepared,), name="faiss-index-rebuild")
        self._job = job
        self._steps = 0
        job.thread.start()

    def _finish_rebuild(self) -> None:
        """Swap in the structure being built (waiting for it if needed); no-op without one."""
        job, self._job = self._job, None
        if job is None:
            return
        job.finish()
        if job.error is not None:
            raise job.error
        self.engine = job.engine
        self.delta = job.since
        self.last_refresh_s = job.seconds
        self.rebuilds += 1
        self._update_params()
        LOG.debug("swapped in the %s structure rebuilt in the background in %.3f s", self.kind, job.seconds)

    # ------------------------------------------------------------------ state
    def construct_args(self) -> dict:
        return {**self._user_params.as_dict(), "refresh_every": self.refresh_every}

    def state(self) -> dict:
        self._finish_rebuild()  # a saved index holds a finished structure and its delta
        return {**super().state(), "strategy": self.strategy, "steps_since_refresh": self._steps}

    def delta_rows(self) -> torch.Tensor:
        return self.delta.view()[0]

    def save_structure(self, folder: Path) -> dict:
        return {**self.engine.save(folder), "type": type(self.engine).__name__, "resolved": self.engine.resolved}

    def load_state(self, vectors, labels, ids, *, structure, folder, delta_rows, steps_since_refresh) -> None:
        super().load_state(vectors, labels, ids, structure=structure, folder=folder, delta_rows=delta_rows,
                           steps_since_refresh=steps_since_refresh)
        engine, n = self.engine, len(self.store)
        if structure.get("type") != type(engine).__name__:
            # Saved on another device (e.g. GPU shards, read on CPU): rebuild from the stored vectors.
            LOG.info("index in %s was saved with a %s structure; rebuilding it as %s for %s", folder.parent,
                     structure.get("type"), type(engine).__name__, self.device)
            if n:
                self.refresh()
            return
        try:
            engine.load(folder, structure)
        except (KeyError, RuntimeError, ValueError, OSError) as e:
            raise IndexFormatError(f"the faiss structure in {folder} cannot be loaded ({e}).") from e
        if engine.built and engine.ntotal > n:
            raise IndexFormatError(f"the faiss structure holds {engine.ntotal} rows but only {n} are stored.")
        engine.resolved = dict(structure.get("resolved", engine.resolved))
        # Rows changed since the saved structure was built are dirty again.
        rows = delta_rows.to(self.device, torch.int64)
        self.delta.clear()
        s = self.store
        self.delta.write(rows, s.vectors[rows], s.labels[rows], s.ids[rows])
        self._steps = int(steps_since_refresh)
        self._update_params()

    def refresh(self) -> None:
        """Rebuild the faiss structure from every stored row and empty the delta (now, in this thread)."""
        self._finish_rebuild()
        t0 = time.perf_counter()
        follow_torch_threads(self._faiss)
        vectors, labels, _ = self.store.view()
        self.engine.build(vectors, labels, changed=self._changed())
        self.delta.clear()
        self._steps = 0
        self.last_refresh_s = time.perf_counter() - t0
        self.rebuilds += 1
        self._update_params()
        LOG.debug("refreshed %s index of %d rows in %.3f s", self.kind, len(self), self.last_refresh_s)

    # ------------------------------------------------------------------ search
    def _search_rows(self, xq, yq, qid, k, same_class):
        vectors, labels, ids = self.store.view()
        nq = xq.shape[0]
        if not self.engine.built:  # nothing built yet (a bulk load before its first refresh): exact
            return knn_other_class(xq, yq, vectors, labels, k, qid=qid, bid=ids if qid is not None else None,
                                   same_class=same_class)
        parts = []
        if self.engine.built and nq:
            follow_torch_threads(self._faiss)
            dist, cand = self.engine.candidates(xq, yq, same_class, k)
            if cand.shape[1]:
                cand = cand.to(self.device)
                if len(self.delta):  # in-place updates keep it empty: then no entry is stale
                    stale = (cand >= 0) & self.delta.contains(cand.clamp_min(0))
                    cand = cand.masked_fill(stale, -1)
                keep = max(self.params.get("rerank", 0), 2 * k)  # as many as one engine call returns
                if cand.shape[1] > keep:
                    dist = dist.to(self.device).masked_fill(cand < 0, float("inf"))
                    j = dist.topk(keep, dim=1, largest=False).indices
                    cand = cand.gather(1, j)
                parts.append(cand)
        if len(self.delta) and nq:
            drows, dvec, dlab, did = self.delta.view()
            _, i = knn_other_class(xq, yq, dvec, dlab, k, qid=qid, bid=did if qid is not None else None,
                                   same_class=same_class)
            parts.append(torch.where(i >= 0, drows[i.clamp_min(0)], i))
        cand = torch.cat(parts, dim=1) if parts else torch.empty(nq, 0, dtype=torch.int64, device=self.device)
        dist, rows = rerank(xq, yq, qid, cand, vectors, labels, ids, k, same_class, faiss=self._faiss)
        if self.engine.needs_fallback and nq:
            starved = (rows[:, -1] < 0).nonzero().squeeze(1)
            if starved.numel():
                d2, r2 = knn_other_class(xq[starved], yq[starved], vectors, labels, k,
                                         qid=None if qid is None else qid[starved],
                                         bid=ids if qid is not None else None, same_class=same_class)
                dist[starved], rows[starved] = d2, r2
        return dist, rows

    def nbytes(self) -> int:
        return self.store.nbytes() + self.engine.nbytes() + self.delta.nbytes()

    def __repr__(self) -> str:
        return (f"FaissIndex(kind={self.kind!r}, strategy={self.strategy!r}, dim={self.dim}, "
                f"num_classes={self.num_classes}, device={str(self.device)!r}, n={len(self)}, "
                f"delta={len(self.delta)})")


def _place(engine, delta: DeltaBuffer, rows: torch.Tensor, vectors: torch.Tensor, labels: torch.Tensor,
           ids: torch.Tensor) -> None:
    """Write store rows in place into an in-place engine. Rows it cannot place (their class has no
    lists yet) go to the exact delta, and so do placed rows that already have a copy there (the
    delta's copy masks the structure's entries, so it must stay the freshest)."""
    left = engine.update(rows, vectors, labels)
    keep = torch.isin(rows, left)
    if len(delta):
        keep |= delta.contains(rows)
    if keep.any():
        delta.write(rows[keep], vectors[keep], labels[keep], ids[keep])


@dataclass
class _Rebuild:
    """A structure being rebuilt in a thread: the engine copy, the rows written since it started.

    With in-place updates (``catch_up``) every write made while the thread runs is queued, and the
    thread applies the queue to the new structure in order as soon as the build is done, so at the
    swap the new structure is already current and nothing is left for the training step to drain
    or to search exactly. The result does not depend on the timing: each write batch is applied
    once, in order, whether by the thread or (when the swap comes first) at the swap.
    Otherwise the writes go to ``since``, the new structure's exact delta.
    """

    engine: Any
    since: DeltaBuffer
    snapshot: Any  # streaming.snapshot.Snapshot the build reads; upserts save rows into it first
    swap_at: int
    catch_up: bool = False
    thread: threading.Thread | None = None
    error: BaseException | None = None
    seconds: float = 0.0
    pending: deque = field(default_factory=deque)
    cond: threading.Condition = field(default_factory=threading.Condition)
    closing: bool = False

    def record(self, rows: torch.Tensor, vectors: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> None:
        """A write made while the structure is being built: rows (U,) and copies of their new values."""
        if not self.catch_up:
            self.since.write(rows, vectors, labels, ids)
            return
        with self.cond:
            self.pending.append((rows, vectors, labels, ids))
            self.cond.notify()

    def finish(self) -> None:
        """Wait for the thread; it applies what is still queued first."""
        with self.cond:
            self.closing = True
            self.cond.notify()
        self.thread.join()

    def run(self, prepared: dict) -> None:
        _lower_priority()
        t0 = time.perf_counter()
        try:
            self.engine.build_prepared(prepared)
        except BaseException as e:  # re-raised in the training thread at the swap
            self.error = e
            return
        finally:
            self.seconds = time.perf_counter() - t0
        if not self.catch_up:
            return
        try:
            while True:
                with self.cond:
                    # wake now and then: an interpreter that ends without a swap must not wait here
                    while not self.pending and not self.closing and threading.main_thread().is_alive():
                        self.cond.wait(0.2)
                    if not self.pending:
                        return
                    batch = self.pending.popleft()
                _place(self.engine, self.since, *batch)
        except BaseException as e:
            self.error = e


# The rebuild thread runs at the lowest priority (nice 19; the OpenMP workers it starts inherit it
# on Linux), so on a machine whose cores the training step keeps busy it mostly takes idle time.
# Its thread count cannot be lowered on its own: OpenMP's setting outside a parallel region is
# process-wide. Raising one's own nice value needs no privilege.
_REBUILD_NICE = 19


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _REBUILD_NICE)
    except (AttributeError, OSError):  # not Linux, or not allowed: the rebuild runs at normal priority
        pass
