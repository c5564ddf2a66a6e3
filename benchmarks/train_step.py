"""Benchmark of one training step of the real trainer, and the share distractor mining takes of it.

The step is nil's own (:func:`nil.train.train_epoch`: forward, cross-entropy, ``DistractorMiner.mine``,
the distractor loss, backward, optimiser step, ``DistractorMiner.update``), run on real batches of a
synthetic zarr patch store (:func:`nil.data.synth.write_synthetic`) with a small model, so the
figure shows what mining costs next to a cheap network.

A memory of 1M samples would take an epoch over 1M images to fill. Instead the miner's index is
prefilled with N seeded clustered unit embeddings (:mod:`faiss_index.synthetic`): the samples of the
timed batches first, under their own ids and labels, then distinct ids beyond the patch store's. So
the memory holds exactly N samples and every update replaces existing ids: the steady state of
training after the first epoch. Batches are loaded before timing: data loading is not in the figures.

Per-step times come from the batch iterator handed to the trainer: a step is the time from handing
out a batch to the trainer asking for the next; mining and upsert times are the growth of the
miner's own timers over the same step.
"""

from __future__ import annotations

import gc
import logging
import math
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import faiss_index
from benchmarks.measure import median, sync
from benchmarks.report import close_envelope, envelope
from faiss_index.synthetic import ClusteredSpec, iter_chunks, moved
from nil.config import TrainConfig
from nil.data import write_synthetic
from nil.errors import NilError
from nil.loaders import make_loader
from nil.mining import DistractorMiner
from nil.runtime import open_config_dataset, resolve_device, seed_everything
from nil.train import build_training, train_epoch

LOG = logging.getLogger(__name__)

ANNS = ("none", "exact", "faiss")


@dataclass
class TrainBench:
    # memory and search
    memory: tuple[int, ...] = (10_000, 100_000, 1_000_000)  # samples in the miner's memory
    anns: tuple[str, ...] = ANNS  # none: within the batch (no memory, run once); exact; faiss
    faiss_kinds: tuple[str, ...] | None = None  # kinds for --ann faiss ('auto': the engine's for the device)
    refresh_every: int = TrainConfig.refresh_every  # steps between rebuilds of an approximate index
    mid_refresh: bool = True  # time the steps halfway through a refresh cycle (False: right after a build)
    # steps
    steps: int = 20  # timed steps
    warmup: int = 3  # untimed steps first
    batch: int = 256
    model: str = "small_cnn"
    embed_dim: int = 128
    image_size: int = 32  # side of the synthetic patches
    classes: int = 9
    seed: int = 0
    device: str = "auto"
    # output
    out: str = "benchmarks/results/train.json"
    progress: bool = True

    def validate(self) -> None:
        if not self.memory or any(m < 1 for m in self.memory):
            raise NilError("--memory must list positive memory sizes, e.g. 10000,100000")
        bad = [a for a in self.anns if a not in ANNS]
        if bad or not self.anns:
            raise NilError(f"--ann must list some of {', '.join(ANNS)}, got {', '.join(bad) or 'nothing'}")
        if self.steps < 1 or self.warmup < 0 or self.batch < 2:
            raise NilError("--steps must be at least 1, --warmup non-negative and --batch at least 2")
        if not str(self.out).endswith(".json"):
            raise NilError(f"--out must name a .json file (the .md goes beside it), got {self.out}")


class _TimedBatches:
    """Hands preloaded batches to the trainer and records each step's wall time and miner timers."""

    def __init__(self, batches: list, miner: DistractorMiner | None, device: torch.device, progress: bool):
        self.batches, self.miner, self.device, self.progress = batches, miner, device, progress
        self.steps: list[dict] = []

    def _timers(self) -> tuple[float, float]:
        t = self.miner.timings if self.miner is not None else {}
        return t.get("mining_ms", 0.0), t.get("upsert_ms", 0.0)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in tqdm(self.batches, desc="steps", disable=not self.progress, leave=False):
            mining0, upsert0 = self._timers()
            sync(self.device)
            start = time.perf_counter()
            yield batch
            # The trainer asks for the next batch once this step is done (update included).
            sync(self.device)
            ms = (time.perf_counter() - start) * 1e3
            mining1, upsert1 = self._timers()
            self.steps.append({"step_ms": ms, "mining_ms": mining1 - mining0, "upsert_ms": upsert1 - upsert0})


def resolve_kinds(kinds: tuple[str, ...] | None, device: torch.device) -> tuple[str, ...]:
    """The kinds to time for --ann faiss: "auto" (and None) become the trainer's resolution for the device."""
    kinds = kinds or (TrainConfig.ann_index,)
    return tuple(dict.fromkeys(faiss_index.resolve_kind(k, str(device)) for k in kinds))


def run_train_bench(cfg: TrainBench, command: str | None = None) -> dict:
    """Time the trainer's step for every (memory, ann) and write ``cfg.out`` (JSON) and its .md."""
    cfg.validate()
    device = resolve_device(cfg.device)
    started = time.time()
    deterministic = torch.are_deterministic_algorithms_enabled()
    tmp = Path(tempfile.mkdtemp(prefix="nil-bench-train-"))
    try:
        if device.type == "cpu":  # as nil.train.train does on the CPU
            torch.use_deterministic_algorithms(True, warn_only=True)
        tcfg, ds, batches = _patch_batches(cfg, tmp, device)
        result = envelope(
            command or " ".join(shlex.quote(a) for a in sys.argv),
            device=str(device),
            settings={k: v for k, v in asdict(cfg).items() if k != "progress"},
            prefill=(f"The miner's memory was prefilled with N seeded clustered unit embeddings "
                        f"(faiss_index.synthetic, {cfg.embed_dim}-d, {ds.num_classes} classes) under distinct ids and "
                        "labels: the timed batches' samples first, under their own ids and labels, then ids "
                        "beyond the patch store's; no epoch over N images was trained."),
            rows=[],
        )
        kinds = resolve_kinds(cfg.faiss_kinds, device)
        result["settings"]["faiss_kinds"] = list(kinds)
        plan = [("none", None, None)] if "none" in cfg.anns else []
        for m in cfg.memory:
            if "exact" in cfg.anns:
                plan.append(("exact", None, m))
            if "faiss" in cfg.anns:
                plan += [("faiss", kind, m) for kind in kinds]
        for ann, kind, memory in plan:
            result["rows"].append(_run_row(cfg, tcfg, ds, batches, device, ann, kind, memory))
            gc.collect()
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        shutil.rmtree(tmp, ignore_errors=True)
    close_envelope(result, started)
    from benchmarks.report import train_goals, write_train_outputs

    result["goals"] = train_goals(result)
    write_train_outputs(result, Path(cfg.out))
    return result


def _patch_batches(cfg: TrainBench, tmp: Path, device: torch.device):
    """Write the synthetic patch store, open it as the trainer does, and load the batches to time."""
    tcfg = TrainConfig(model=cfg.model, embed_dim=cfg.embed_dim, batch_size=cfg.batch, seed=cfg.seed,
                       device=str(device), format="zarr", epochs=1, warmup_epochs=0, loss="nil", distractor="memory",
                       refresh_every=cfg.refresh_every, progress=False, out=str(tmp / "run"))
    need = cfg.batch * (cfg.steps + cfg.warmup)
    train_share = 1 - tcfg.val_fraction - tcfg.test_fraction
    n = math.ceil(need / train_share) + 2 * cfg.batch  # stratified splits round per class
    store = write_synthetic(tmp / "patches.zarr", n, size=cfg.image_size, classes=cfg.classes, seed=cfg.seed,
                            progress=cfg.progress)
    tcfg.data = str(store)
    seed_everything(cfg.seed)
    ds = open_config_dataset(tcfg)
    loader = make_loader(ds.train, train=True, cfg=tcfg, image_size=cfg.image_size, channels=ds.channels,
                         device=device)
    batches = []
    for x, y, sid in loader:
        batches.append((x, y, sid))
        if len(batches) == cfg.steps + cfg.warmup:
            break
    if len(batches) < cfg.steps + cfg.warmup:
        raise NilError(f"the patch store gave {len(batches)} batches, {cfg.steps + cfg.warmup} were needed")
    return tcfg, ds, batches


def _run_row(cfg: TrainBench, tcfg: TrainConfig, ds, batches: list, device: torch.device, ann: str,
             kind: str | None, memory: int | None) -> dict:
    row = {"memory": memory, "ann": ann, "ann_index": kind, "model": cfg.model, "batch": cfg.batch,
           "ms_per_step": None, "mining_ms": None, "upsert_ms": None, "share": None}
    label = f"ann={ann}" + (f" ({kind})" if kind else "") + (f" memory={memory:,}" if memory else "")
    try:
        row |= _time_steps(cfg, tcfg, ds, batches, device, ann, kind, memory, label)
    except MemoryError as exc:
        row["skipped"] = f"out of memory: {exc}"
    except Exception as exc:  # one broken configuration must not lose the other rows
        LOG.exception("%s failed", label)
        row["error"] = f"{type(exc).__name__}: {exc}"
    if row.get("ms_per_step") is not None:
        LOG.info("%s: %.1f ms/step, mining %.1f ms, upsert %.1f ms (%.1f%%)", label, row["ms_per_step"],
                 row["mining_ms"], row["upsert_ms"], 100 * row["share"])
    return row


def _time_steps(cfg: TrainBench, tcfg: TrainConfig, ds, batches: list, device: torch.device, ann: str,
                kind: str | None, memory: int | None, label: str) -> dict:
    seed_everything(cfg.seed)
    tcfg = TrainConfig.from_dict(tcfg.to_dict() | {"ann": ann, "ann_index": kind or tcfg.ann_index})
    training = build_training(tcfg, ds, cfg.image_size, device, len(batches), tcfg.ann_index)
    miner = training.source.miner
    figures: dict = {}
    if miner.index is not None:
        start = time.perf_counter()
        _prefill(miner.index, memory, batches, ds, cfg, device, label)
        figures["prefill_s"] = time.perf_counter() - start
        figures["memory_count"] = len(miner.index.store)
        if cfg.mid_refresh and isinstance(miner.index, faiss_index.FaissIndex):
            figures["aged_upserts"] = _age(miner.index, memory, cfg)
            figures["delta_rows_at_start"] = miner.index.delta_size
    timed = _TimedBatches(batches, miner, device, cfg.progress)
    stats = train_epoch(training.trainee, timed, training.optimizer, training.scheduler, training.criterion,
                        training.source, tcfg, device, True, 0)
    steps = timed.steps[cfg.warmup:]
    step, mining, upsert = (median([s[k] for s in steps]) for k in ("step_ms", "mining_ms", "upsert_ms"))
    figures |= {"ms_per_step": step, "mining_ms": mining, "upsert_ms": upsert, "share": (mining + upsert) / step,
                "step_ms_mean": sum(s["step_ms"] for s in steps) / len(steps),
                "distractor_rate": stats.as_dict()["distractor_rate"], "timed_steps": len(steps)}
    index = miner.index
    if isinstance(index, faiss_index.FaissIndex):  # exact search has nothing to rebuild
        start = time.perf_counter()
        index.refresh()
        sync(device)
        refresh_s = time.perf_counter() - start
        every = getattr(index, "refresh_every", None) or tcfg.refresh_every
        amortised = refresh_s * 1e3 / every
        figures |= {"refresh_s": refresh_s, "refresh_every": every,
                    "share_with_refresh": (mining + upsert + amortised) / (step + amortised)}
    if index is not None and hasattr(index, "params"):
        figures["params"] = dict(index.params)
    return figures


def _prefill(index, memory: int, batches: list, ds, cfg: TrainBench, device: torch.device, label: str) -> None:
    """Fill ``index`` with exactly ``memory`` samples: the batches' own samples first, then new ids."""
    own_ids = torch.cat([sid for _, _, sid in batches])
    own_labels = torch.cat([y for _, y, _ in batches])
    own_ids, first = _unique_first(own_ids)
    own_labels = own_labels[first]
    if len(own_ids) > memory:  # a memory smaller than the timed batches: keep what fits
        own_ids, own_labels = own_ids[:memory], own_labels[:memory]
    next_id = max(int(ds.train.ids.max()), int(ds.val.ids.max()), int(ds.test.ids.max())) + 1
    spec = ClusteredSpec(dim=cfg.embed_dim, classes=ds.num_classes, seed=cfg.seed)
    bar = tqdm(total=memory, desc=f"prefill {label}", unit="vec", unit_scale=True, disable=not cfg.progress,
               leave=False)
    for start, x, y in iter_chunks(memory, spec):
        rows = torch.arange(start, start + len(x))
        ids, labels = next_id + rows, torch.from_numpy(y)
        own = rows < len(own_ids)
        ids[own], labels[own] = own_ids[rows[own]], own_labels[rows[own]]
        index.upsert(ids.to(device), torch.from_numpy(x).to(device), labels.to(device))
        bar.update(len(x))
    bar.close()
    if hasattr(index, "build"):
        index.build()


def _age(index, memory: int, cfg: TrainBench) -> int:
    """Upsert moved vectors of random stored ids until the timed steps sit halfway through a refresh cycle.

    A FaissIndex searches the rows changed since its last rebuild exactly, so a step right after a
    build is its cheapest; halfway to the next rebuild is the average step of a long run."""
    every = getattr(index, "refresh_every", 0) or 0
    count = max(0, every // 2 - cfg.warmup - cfg.steps // 2)
    rng = torch.Generator().manual_seed(cfg.seed + 5)
    _, _, stored = index.store.view()
    for j in range(count):
        ids = stored[torch.randperm(len(stored), generator=rng)[: cfg.batch].to(stored.device)]
        v, y = index.store.get(ids)
        index.upsert(ids, torch.from_numpy(moved(v.cpu().numpy(), cfg.seed + 1000 + j)).to(v.device), y)
    return count


def _unique_first(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct ids in order of first appearance, and the position of each first appearance."""
    seen: dict[int, int] = {}
    for i, v in enumerate(ids.tolist()):
        seen.setdefault(v, i)
    first = torch.tensor(list(seen.values()), dtype=torch.int64)
    return ids[first], first
