"""Benchmark of distractor mining: nearest other-class neighbour search over a memory of N embeddings.

For every N the same seeded clustered vectors (:mod:`faiss_index.synthetic`) are stored in each method
and the same query batches, drawn from the stored vectors with their ids (so a sample never finds
itself), are searched. Methods:

- ``exact-torch``: the engine's exact kind (masked matrix products in torch), checked against the
  reference function :func:`faiss_index.knn_other_class`;
- ``exact-faiss-flat``: exact search in FAISS flat shards;
- every approximate kind the engine offers on the device, with its default parameters and a small
  sweep of its recall/speed knob (nprobe, efSearch, ...);
- ``pml-xbm-batchhard``: the usual peer, pytorch-metric-learning's CrossBatchMemory with
  BatchHardMiner at memory size N (exact within its memory; a dense batch x N distance matrix).

Each row: recall@1 of the nearest other-class neighbour against the reference, median ms per batch
(after warm-up), queries per second, build time, median time of one batch's streaming update of
existing ids, peak memory. Rows too slow or too big to run are kept with ``"skipped": reason``.
"""

from __future__ import annotations

import gc
import logging
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

import faiss_index
from benchmarks.measure import (KNOBS, PeakMemory, available_memory_gb, current_rss_mb, median,
                                timed_ms)
from benchmarks.report import close_envelope, envelope
from faiss_index.synthetic import CHUNK, ClusteredSpec, clustered_vectors, iter_chunks, moved, query_rows
from nil.errors import NilError
from nil.runtime import resolve_device

LOG = logging.getLogger(__name__)

EXACT_TORCH, EXACT_FLAT, PEER = "exact-torch", "exact-faiss-flat", "pml-xbm-batchhard"
EXACT_KINDS = {EXACT_TORCH: "exact", EXACT_FLAT: "flat"}
SWEEP = (0.5, 2.0, 4.0)  # knob values tried besides the default, as multiples of the default
COMPRESSED = ("ivfpq",)  # kinds whose memory per vector is a short code: the only ones run at --large sizes
LARGE_N = 10_000_000  # the size --large adds
ID_OFFSET = 10_000  # stored ids are ID_OFFSET + row (small, like real sample ids), so a row/id mix-up shows
MEMORY_SHARE = 0.85  # skip a row whose estimated memory exceeds this share of what is available
TIE = 1e-6  # a found neighbour at most this much farther than the true one is a tie, counted as a hit


@dataclass
class MiningBench:
    # data
    ns: tuple[int, ...] = (10_000, 100_000, 1_000_000)  # memory sizes N
    dim: int = 128  # embedding width d
    classes: int = 9
    seed: int = 0
    # search
    batch: int = 256  # queries per batch (one training batch)
    batches: int = 10  # timed batches per row, after the warm-up
    warmup: int = 2  # untimed batches first (allocations, caches, lazy builds)
    device: str = "auto"  # auto | cpu | cuda
    sweep: bool = True  # also run each approximate kind at SWEEP multiples of its knob
    large: bool = False  # add N = 10M for compressed approximate kinds
    methods: tuple[str, ...] | None = None  # restrict to these method names (None: all)
    row_budget_s: float = 300.0  # skip a row whose time, extrapolated from the previous N, exceeds this
    # output
    out: str = "benchmarks/results/mining.json"
    progress: bool = True
    spec: ClusteredSpec = field(init=False)

    def __post_init__(self) -> None:
        self.spec = ClusteredSpec(dim=self.dim, classes=self.classes, seed=self.seed)

    def validate(self) -> None:
        if not self.ns or any(n < 2 for n in self.ns):
            raise NilError("--n must list memory sizes of at least 2, e.g. 10000,100000")
        if self.batch < 1 or self.batch > min(self.ns):
            raise NilError(f"--batch must lie between 1 and the smallest --n ({min(self.ns)}), got {self.batch}")
        if self.dim < 2 or self.classes < 2:
            raise NilError("--dim and --classes must be at least 2")
        if self.batches < 1 or self.warmup < 0:
            raise NilError("--batches must be at least 1 and --warmup non-negative")
        if not str(self.out).endswith(".json"):
            raise NilError(f"--out must name a .json file (the .md and .png go beside it), got {self.out}")

    def sizes(self) -> list[int]:
        return sorted(set(self.ns) | ({LARGE_N} if self.large else set()))


@dataclass
class Method:
    name: str  # row name: exact-torch, exact-faiss-flat, ivf, ..., pml-xbm-batchhard
    kind: str | None  # make_index kind; None for the peer
    overrides: dict = field(default_factory=dict)  # parameters passed to make_index
    default: bool = True  # the kind's default configuration (not a sweep point)

    @property
    def exact(self) -> bool:
        return self.name in (EXACT_TORCH, EXACT_FLAT, PEER)

    @property
    def key(self) -> str:
        return self.name + "".join(f" {k}={v}" for k, v in sorted(self.overrides.items()))


@dataclass
class _Data:
    """One N: the stored vectors, and the query batches with their true distractors.

    At the --large size the N vectors are not held (they would double the memory the index
    needs): ``x`` is None and they are regenerated chunk by chunk from their seed when needed.
    """

    y: torch.Tensor  # (N,) int64
    ids: torch.Tensor  # (N,) int64, ID_OFFSET + row
    qrows: torch.Tensor  # (warmup + batches, batch) int64 rows used as queries
    xq: torch.Tensor  # (warmup + batches, batch, d) float32 their vectors
    spec: ClusteredSpec
    x: torch.Tensor | None = None  # (N, d) float32, L2-normalised; None when streamed
    truth: torch.Tensor | None = None  # (warmup + batches, batch) int64 row of each true distractor, -1: none
    truth_d: torch.Tensor | None = None  # same shape, float32 Euclidean distance to it
    reference_ms: float | None = None  # median ms per batch of the reference knn_other_class

    def __len__(self) -> int:
        return len(self.y)

    def chunks(self):
        """``(start, vectors (rows, d))`` over all N rows in order."""
        if self.x is not None:
            for start in range(0, len(self), CHUNK):
                yield start, self.x[start:start + CHUNK]
            return
        for start, xc, _ in iter_chunks(len(self), self.spec):
            yield start, torch.from_numpy(xc).to(self.y.device)

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Vectors of ``rows`` (any shape of int64 rows >= 0) -> ``(*rows.shape, d)``."""
        if self.x is not None:
            return self.x[rows]
        out = torch.empty(*rows.shape, self.spec.dim, device=self.y.device)
        flat, dest = rows.reshape(-1), out.view(-1, self.spec.dim)
        for start, xc in self.chunks():
            inside = (flat >= start) & (flat < start + len(xc))
            dest[inside] = xc[flat[inside] - start]
        return out


def approximate_kinds() -> list[str]:
    """The engine's kinds other than the two exact ones, in its own order."""
    return [k for k in faiss_index.KINDS if k not in EXACT_KINDS.values()]


def default_approximate_kind(device: torch.device) -> str | None:
    """The kind the engine recommends for the device, when it is an approximate one (the goals' subject)."""
    kind = faiss_index.default_kind(str(device)) if hasattr(faiss_index, "default_kind") else None
    return kind if kind in approximate_kinds() else None


def run_mining_bench(cfg: MiningBench, command: str | None = None) -> dict:
    """Run every method at every N; write ``cfg.out`` (JSON), its .md and .png; return the result."""
    cfg.validate()
    device = resolve_device(cfg.device)
    _methods(cfg)  # unknown method names fail before any work
    torch.manual_seed(cfg.seed)
    started = time.time()
    result = envelope(
        command or " ".join(shlex.quote(a) for a in sys.argv),
        device=str(device),
        data={"generator": "faiss_index.synthetic.clustered_vectors", **cfg.spec.as_dict(),
              "ids": f"{ID_OFFSET} + row", "queries": "rows of the data, distinct within a batch, "
              "searched with their own ids", "upsert": "the batch's ids with moved vectors (vectors.moved)"},
        settings={k: v for k, v in asdict(cfg).items() if k not in ("spec", "progress")},
        default_approximate=default_approximate_kind(device),
        rows=[],
    )
    history: dict[str, dict] = {}  # method key -> figures at the previous N, for the skip estimates
    for n in cfg.sizes():
        data = _make_data(n, cfg, device)
        for method in _methods(cfg):
            result["rows"].extend(_run_method(method, data, n, cfg, device, history))
        del data
        gc.collect()
    close_envelope(result, started)
    from benchmarks.report import mining_goals, write_mining_outputs

    result["goals"] = mining_goals(result)
    write_mining_outputs(result, Path(cfg.out))
    return result


def _methods(cfg: MiningBench) -> list[Method]:
    """The default configuration of every method; sweep points are added after each default runs."""
    methods = [Method(EXACT_TORCH, "exact"), Method(EXACT_FLAT, "flat")]
    methods += [Method(kind, kind) for kind in approximate_kinds()]
    methods.append(Method(PEER, None))
    if cfg.methods:
        unknown = sorted(set(cfg.methods) - {m.name for m in methods})
        if unknown:
            raise NilError(f"unknown method {', '.join(unknown)}: choose from {', '.join(m.name for m in methods)}")
        methods = [m for m in methods if m.name in cfg.methods]
    return methods


def _make_data(n: int, cfg: MiningBench, device: torch.device) -> _Data:
    rows = torch.from_numpy(query_rows(n, cfg.batch, cfg.warmup + cfg.batches, cfg.seed)).to(device)
    ids = torch.arange(n, dtype=torch.int64, device=device) + ID_OFFSET
    if n > max(cfg.ns):  # --large: labels only, vectors regenerated from their seed when needed
        LOG.info("N=%d: streaming %d x %d clustered vectors (not held in memory)", n, n, cfg.dim)
        y = torch.cat([torch.from_numpy(yc) for _, _, yc in iter_chunks(n, cfg.spec)]).to(device)
        data = _Data(y, ids, rows, torch.empty(0), cfg.spec)
        data.xq = data.rows(rows)
    else:
        LOG.info("N=%d: generating %d x %d clustered vectors", n, n, cfg.dim)
        x, y = (torch.from_numpy(a).to(device) for a in clustered_vectors(n, cfg.spec, progress=cfg.progress))
        data = _Data(y, ids, rows, x[rows], cfg.spec, x=x)
    _reference(data, cfg, device)
    return data


def _reference(data: _Data, cfg: MiningBench, device: torch.device) -> None:
    """True distractor rows and distances of every query, from the reference exact function."""
    n = len(data)
    if data.x is not None:
        truth, times = [], []
        for b in tqdm(range(len(data.qrows)), desc=f"reference N={n:,}", disable=not cfg.progress, leave=False):
            q = data.qrows[b]
            ms, (_, rows) = timed_ms(lambda: faiss_index.knn_other_class(
                data.xq[b], data.y[q], data.x, data.y, 1, qid=data.ids[q], bid=data.ids), device)
            truth.append(rows[:, 0].to(device))
            if b >= cfg.warmup:
                times.append(ms)
        data.truth = torch.stack(truth)
        data.reference_ms = median(times)
    else:  # all query batches against one chunk at a time, keeping the nearest so far
        xq, yq, qid = data.xq.reshape(-1, cfg.dim), data.y[data.qrows].reshape(-1), data.ids[data.qrows].reshape(-1)
        best_d = torch.full((len(xq),), float("inf"), device=device)
        best = torch.full((len(xq),), -1, dtype=torch.int64, device=device)
        start_t = time.perf_counter()
        for start, xc in tqdm(data.chunks(), total=math.ceil(n / CHUNK), desc=f"reference N={n:,}",
                              disable=not cfg.progress, leave=False):
            sl = slice(start, start + len(xc))
            d, r = faiss_index.knn_other_class(xq, yq, xc, data.y[sl], 1, qid=qid, bid=data.ids[sl])
            better = (r[:, 0] >= 0) & (d[:, 0] < best_d)
            best_d = torch.where(better, d[:, 0], best_d)
            best = torch.where(better, r[:, 0] + start, best)
        data.truth = best.reshape(data.qrows.shape)
        data.reference_ms = (time.perf_counter() - start_t) * 1e3 / len(data.qrows)  # incl. regenerating
    data.truth_d = _distances(data, data.truth)
    LOG.info("N=%d: reference knn_other_class %.1f ms per batch", n, data.reference_ms)


def _distances(data: _Data, found_rows: torch.Tensor) -> torch.Tensor:
    """Exact Euclidean distance from each query to the stored vector at ``found_rows`` (inf where -1)."""
    d = (data.xq - data.rows(found_rows.clamp(min=0))).norm(dim=-1)
    return torch.where(found_rows >= 0, d, torch.full_like(d, float("inf")))


def recall_at_1(data: _Data, found_rows: torch.Tensor) -> float:
    """Fraction of queries (with a true distractor) whose found neighbour is it, or ties with it."""
    has = data.truth >= 0
    d = _distances(data, found_rows)
    hit = (found_rows == data.truth) | (d <= data.truth_d + TIE)
    return float((hit & has).sum()) / max(int(has.sum()), 1)


# -- one method at one N ---------------------------------------------------------------------------


def _base_row(method: Method, n: int, cfg: MiningBench, device: torch.device) -> dict:
    return {"method": method.name, "n": n, "dim": cfg.dim, "batch": cfg.batch, "classes": cfg.classes,
            "params": dict(method.overrides), "overrides": dict(method.overrides), "default": method.default, "exact": method.exact,
            "device": str(device), "recall_at_1": None, "ms_per_batch": None, "queries_per_s": None,
            "build_s": None, "upsert_ms": None, "peak_mem_mb": None}


def _run_method(method: Method, data: _Data, n: int, cfg: MiningBench, device: torch.device,
                history: dict[str, dict]) -> list[dict]:
    """The method's row at this N, then (for a default approximate kind) its sweep rows."""
    rows = [_run_one(method, data, n, cfg, device, history)]
    knob = KNOBS.get(method.kind or "")
    first = rows[0]
    if cfg.sweep and method.default and knob and "skipped" not in first and "error" not in first \
            and knob in first["params"] and n <= max(cfg.ns):
        value = first["params"][knob]
        for m in SWEEP:
            v = max(1, int(round(value * m)))
            if v != value:
                point = Method(method.name, method.kind, {knob: v}, default=False)
                rows.append(_run_one(point, data, n, cfg, device, history))
    return rows


def _run_one(method: Method, data: _Data, n: int, cfg: MiningBench, device: torch.device,
             history: dict[str, dict]) -> dict:
    row = _base_row(method, n, cfg, device)
    reason = _skip_reason(method, n, cfg, history)
    if reason:
        LOG.info("N=%d %s: skipped (%s)", n, method.key, reason)
        return row | {"skipped": reason}
    started = time.perf_counter()
    rss_before = current_rss_mb() or 0.0
    try:
        if method.kind is None:
            row |= _run_peer(data, cfg, device)
        else:
            row |= _run_index(method, data, cfg, device)
    except MemoryError as exc:
        row["skipped"] = f"out of memory: {exc}"
    except Exception as exc:  # a broken method must not lose the other rows of a long run
        LOG.exception("N=%d %s failed", n, method.key)
        row["error"] = f"{type(exc).__name__}: {exc}"
    wall = time.perf_counter() - started
    gc.collect()
    if "skipped" not in row and "error" not in row:
        history[method.key] = {"n": n, "wall_s": wall, "mem_mb": (row["peak_mem_mb"] or 0) - rss_before,
                               "index_mb": row.get("index_mb")}
        row["queries_per_s"] = cfg.batch / (row["ms_per_batch"] / 1e3)
        LOG.info("N=%d %s: recall@1 %.3f, %.1f ms/batch, build %.1f s, upsert %.1f ms, peak %.0f MB",
                 n, method.key, row["recall_at_1"], row["ms_per_batch"], row["build_s"] or 0.0,
                 row["upsert_ms"] or 0.0, row["peak_mem_mb"] or 0.0)
    return row


def _skip_reason(method: Method, n: int, cfg: MiningBench, history: dict[str, dict]) -> str | None:
    """Why a row is not run: --large sizes are for compressed kinds; too slow or too big by extrapolation."""
    if n > max(cfg.ns):
        if method.exact:
            return f"exact methods are measured up to N={max(cfg.ns):,}; --large adds N={n:,} for compressed approximate kinds"
        if method.kind not in COMPRESSED:
            prev = history.get(method.key)
            size = f" (its index would take about {prev['index_mb'] * n / prev['n'] / 1024:.1f} GiB)" \
                if prev and prev.get("index_mb") else ""
            return f"not a compressed kind{size}: only {', '.join(COMPRESSED)} run at N={n:,} on this machine"
    prev = history.get(method.key)
    if prev is None:
        return None
    scale = n / prev["n"]
    est_s = prev["wall_s"] * scale
    if est_s > cfg.row_budget_s:
        return (f"estimated {est_s:.0f} s for this row (from {prev['wall_s']:.0f} s at N={prev['n']:,}, "
                f"linear in N) is over the row budget of {cfg.row_budget_s:.0f} s")
    avail = available_memory_gb()
    est_gb = max(prev["mem_mb"], 0) * scale / 1024
    if avail is not None and est_gb > MEMORY_SHARE * avail:
        return (f"estimated {est_gb:.1f} GiB (linear in N) is over {MEMORY_SHARE:.0%} of the {avail:.1f} GiB "
                "available")
    return None


def _batches(data: _Data, cfg: MiningBench, what: str):
    return tqdm(range(len(data.qrows)), desc=what, disable=not cfg.progress, leave=False)


def _run_index(method: Method, data: _Data, cfg: MiningBench, device: torch.device) -> dict:
    n = len(data)
    with PeakMemory(device) as mem:
        try:
            index = faiss_index.make_index(method.kind, cfg.dim, cfg.classes, device=str(device), **method.overrides)
        except (faiss_index.FaissUnavailableError, faiss_index.IndexInputError) as exc:  # cagra on a CPU, ...
            return {"skipped": f"not offered on {device}: {exc}"}
        build_ms, index = timed_ms(lambda: _fill(index, method, data, cfg), device)
        found, times = [], []
        for b in _batches(data, cfg, f"{method.key} N={n:,}"):
            q = data.qrows[b]
            ms, res = timed_ms(lambda: index.search_other_class(data.xq[b], data.y[q], 1, query_ids=data.ids[q]),
                               device)
            got = torch.as_tensor(res.ids)[:, 0].to(device)
            found.append(torch.where(got >= 0, got - ID_OFFSET, got))
            if b >= cfg.warmup:
                times.append(ms)
    row = {"params": dict(index.params), "recall_at_1": recall_at_1(data, torch.stack(found)),
           "ms_per_batch": median(times), "build_s": build_ms / 1e3, "peak_mem_mb": mem.peak_mb,
           "peak_mem_scope": mem.scope}
    row["index_mb"] = index.nbytes() / 2**20 if hasattr(index, "nbytes") else None
    row["upsert_ms"] = _upsert_ms(lambda ids, v, y: index.upsert(ids, v, y), data, cfg, device)
    if isinstance(index, faiss_index.FaissIndex):
        row |= _mid_refresh(index, data, cfg, device)
        ms, _ = timed_ms(index.refresh, device)  # the periodic rebuild an approximate index needs
        row["refresh_s"] = ms / 1e3
        row["refresh_every"] = getattr(index, "refresh_every", None)
    if method.name == EXACT_TORCH:
        row["reference_ms_per_batch"] = data.reference_ms
    del index
    return row


def _fill(index, method: Method, data: _Data, cfg: MiningBench):
    """Upsert all N vectors in chunks, then the bulk build where the kind has one; returns the index."""
    n = len(data)
    for start, xc in tqdm(data.chunks(), total=math.ceil(n / CHUNK), desc=f"build {method.key}",
                          disable=not cfg.progress, leave=False):
        sl = slice(start, start + len(xc))
        index.upsert(data.ids[sl], xc, data.y[sl])
    if hasattr(index, "build"):
        index.build()
    return index


def _upsert_ms(upsert, data: _Data, cfg: MiningBench, device: torch.device) -> float | None:
    """Median ms of one batch's streaming update: the batch's existing ids get slightly moved vectors."""
    times = []
    for b in range(cfg.warmup, len(data.qrows)):
        q = data.qrows[b]
        new = torch.from_numpy(moved(data.xq[b].cpu().numpy(), cfg.seed + b)).to(device)
        ms, _ = timed_ms(lambda: upsert(data.ids[q], new, data.y[q]), device)
        times.append(ms)
    return median(times)


def _mid_refresh(index, data: _Data, cfg: MiningBench, device: torch.device) -> dict:
    """Search time halfway through a refresh cycle, the average state during training.

    Between rebuilds a FaissIndex searches every row changed since the last build exactly (its
    delta); ``ms_per_batch`` is measured right after a build, with an empty delta. Here batches of
    existing ids are re-upserted until ``refresh_every / 2`` upserts have happened since the build,
    then the query batches are timed again."""
    every = getattr(index, "refresh_every", 0) or 0
    done = len(data.qrows) - cfg.warmup  # the upserts timed just before
    rng = torch.Generator().manual_seed(cfg.seed + 4)
    n = len(data)
    for j in range(max(0, every // 2 - done)):
        rows = torch.randperm(n, generator=rng)[: cfg.batch].to(device)
        current, _ = index.get(data.ids[rows])  # the workload only: recall is not measured here
        new = torch.from_numpy(moved(current.cpu().numpy(), cfg.seed + 1000 + j)).to(device)
        index.upsert(data.ids[rows], new, data.y[rows])
    times = []
    for b in range(len(data.qrows)):
        q = data.qrows[b]
        ms, _ = timed_ms(lambda: index.search_other_class(data.xq[b], data.y[q], 1, query_ids=data.ids[q]), device)
        if b >= cfg.warmup:
            times.append(ms)
    return {"ms_per_batch_mid_refresh": median(times), "delta_rows_mid_refresh": getattr(index, "delta_size", None)}


def _run_peer(data: _Data, cfg: MiningBench, device: torch.device) -> dict:
    """CrossBatchMemory + BatchHardMiner holding all N vectors: time the mining call of each batch.

    CrossBatchMemory.forward enqueues the batch and then calls its miner with the batch against the
    whole memory; that miner call is what is timed (the loss is not). The memory is filled directly
    with the N stored vectors, so it answers over the same set as every other method. Its hardest
    negative is the nearest other-class neighbour; anchors it returns no triplet for count as misses.
    """
    try:
        from pytorch_metric_learning.losses import CrossBatchMemory, TripletMarginLoss
        from pytorch_metric_learning.miners import BatchHardMiner
    except ImportError:
        return {"skipped": "pytorch-metric-learning is not installed (pip install 'nil[test]')"}
    n = len(data)
    if data.x is None:
        return {"skipped": "the peer needs all N vectors in one dense memory"}
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        xbm = CrossBatchMemory(TripletMarginLoss(), cfg.dim, memory_size=n, miner=BatchHardMiner()).to(device)
        xbm.embedding_memory.copy_(data.x)
        xbm.label_memory.copy_(data.y)
        xbm.has_been_filled, xbm.queue_idx = True, 0
        build_s = time.perf_counter() - start
        found, times = [], []
        for b in _batches(data, cfg, f"{PEER} N={n:,}"):
            q = data.qrows[b]
            ms, mined = timed_ms(
                lambda: xbm.miner(data.xq[b], data.y[q], xbm.embedding_memory, xbm.label_memory), device)
            # BatchHardMiner gives triplets (anchor, positive, negative); pair miners give four tensors
            anchors, negatives = (mined[0], mined[2]) if len(mined) == 3 else (mined[2], mined[3])
            rows = torch.full((len(q),), -1, dtype=torch.int64, device=device)
            rows[anchors] = negatives  # memory row == data row: the memory was filled in row order
            found.append(rows)
            if b >= cfg.warmup:
                times.append(ms)
    row = {"params": {"memory_size": n, "miner": "BatchHardMiner", "distance": "LpDistance (normalised)"},
           "recall_at_1": recall_at_1(data, torch.stack(found)), "ms_per_batch": median(times),
           "build_s": build_s, "peak_mem_mb": mem.peak_mb, "peak_mem_scope": mem.scope,
           "index_mb": (xbm.embedding_memory.nbytes + xbm.label_memory.nbytes) / 2**20}
    # Its update is a FIFO ring write of the batch (not keyed by id): what CrossBatchMemory does per step.
    row["upsert_ms"] = _upsert_ms(lambda ids, v, y: xbm.add_to_memory(v, y, len(v)), data, cfg, device)
    del xbm
    return row
