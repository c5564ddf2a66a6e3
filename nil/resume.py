"""Resuming a run: what ``last.pt`` holds beyond the model, and how an interrupted epoch is replayed.

A run killed at any moment (SIGKILL, power loss, a full disk) continues with
``nil train --resume RUN_DIR`` and ends with the same weights and metrics as an uninterrupted
run with the same seed (on the CPU, with ``--workers 0``, bit for bit). ``last.pt`` is written at
the end of every epoch and, with ``--checkpoint-every N``, every N optimiser steps; besides the
model it holds:

- the optimiser and scheduler states (there is no GradScaler: CUDA runs use bf16 autocast);
- the Python, numpy, torch CPU and CUDA RNG states at the moment it was written;
- the epoch, the batches of that epoch already done, and the partial epoch statistics;
- the training sampler's generator state at the start of that epoch, so the epoch's sample order
  is rebuilt exactly and the loader resumes at the next batch without reading the done ones;
- the distractor memory (``--ann exact|faiss``): saved with :func:`faiss_index.save_index` into
  ``RUN_DIR/memory-<step>/`` just before ``last.pt`` names it, so a crash between the two writes
  leaves ``last.pt`` pointing at its own, complete memory;
- the best validation score so far and the miner's per-epoch counters.

Every write is atomic (temp file, fsync, rename, fsync of the folder): a crash leaves the previous
``last.pt`` or the new one. Weights that became NaN or infinite are never written.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

import faiss_index
from nil.checkpoint import _atomic_write, load_checkpoint, save_json, save_text, save_torch
from nil.config import TrainConfig
from nil.errors import NilError

LOG = logging.getLogger(__name__)

RESUME_FORMAT = 1
MEMORY_PREFIX = "memory-"
# Test hook: SIGKILL this process right after the given global step (and its checkpoint, if due).
FAULT_KILL_ENV = "NIL_FAULT_KILL_AT_STEP"


# ------------------------------------------------------------------------------------ RNG states
def rng_state() -> dict:
    """Every RNG the training loop draws from: Python, numpy, torch CPU and each CUDA device."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def sampler_state(sampler: Any) -> torch.Tensor | None:
    """The state of a sampler's own torch.Generator (RandomSampler), or None for samplers whose
    order is a function of their seed and ``set_epoch`` alone (ChunkShuffleSampler, DistributedSampler)."""
    generator = getattr(sampler, "generator", None)
    return generator.get_state() if isinstance(generator, torch.Generator) else None


def set_sampler_state(sampler: Any, state: torch.Tensor | None) -> None:
    if state is not None:
        sampler.generator.set_state(state)


# ------------------------------------------------------------------------------------ progress
@dataclass
class RunProgress:
    """Where the loop stands: the first epoch to run and what is already done of it."""

    epoch: int = 0  # 0-based epoch to run next (or to finish)
    step_in_epoch: int = 0  # batches of that epoch already trained on
    best_score: float = -float("inf")
    best_epoch: int = -1
    history: list = field(default_factory=list)  # metrics.jsonl lines of finished epochs
    stats: dict | None = None  # partial-epoch statistics (the trainer's _StepStats fields)
    epoch_s: float = 0.0  # seconds already spent in the unfinished epoch
    rng: dict | None = None  # RNG states when last.pt was written
    sampler: torch.Tensor | None = None  # sampler generator state at the start of ``epoch``
    resumed: bool = False


class Checkpointer:
    """Writes resumable ``last.pt`` files for one run and replays an interrupted epoch.

    The trainer calls :meth:`begin_epoch` before iterating an epoch, :meth:`batches` for what to
    iterate, :meth:`after_step` after every optimiser step and :meth:`end_epoch` after validation.
    """

    def __init__(self, out: Path, cfg: TrainConfig, model, optimizer, scheduler, miner, base_state: dict,
                 steps_per_epoch: int, classes: list[str]):
        self.out, self.cfg, self.model, self.optimizer, self.scheduler = Path(out), cfg, model, optimizer, scheduler
        self.miner, self.base_state, self.steps_per_epoch, self.classes = miner, base_state, steps_per_epoch, classes
        self.progress = RunProgress()
        self._sampler: Any = None
        self._epoch_sampler: torch.Tensor | None = None
        self._epoch_started = time.perf_counter()
        self._kill_at = int(os.environ.get(FAULT_KILL_ENV, "0") or 0)

    # -- the loop's hooks -------------------------------------------------------------------
    def begin_epoch(self, epoch: int, loader: DataLoader) -> None:
        """Remember the sampler state before the epoch draws its order (restored first on resume)."""
        if self.progress.resumed and epoch == self.progress.epoch:
            set_sampler_state(loader.sampler, self.progress.sampler)
        self._sampler = loader.sampler
        self._epoch_sampler = sampler_state(loader.sampler)
        self._epoch_started = time.perf_counter()

    def batches(self, loader: DataLoader, epoch: int) -> Iterable:
        """The loader itself, or for the epoch a resumed run stopped in, the batches it had left."""
        p = self.progress
        if not p.resumed or epoch != p.epoch or p.step_in_epoch == 0:
            return loader
        rng, p.rng = p.rng, None
        return _RestOfEpoch(loader, p.step_in_epoch, rng)

    def epoch_stats(self, epoch: int) -> dict | None:
        """Statistics the resumed epoch had gathered before the interruption, else None."""
        p = self.progress
        return p.stats if p.resumed and epoch == p.epoch else None

    def epoch_seconds(self, epoch: int) -> float:
        p = self.progress
        before = p.epoch_s if p.resumed and epoch == p.epoch else 0.0
        return before + time.perf_counter() - self._epoch_started

    def after_step(self, epoch: int, stats: Any) -> None:
        """A step checkpoint every ``--checkpoint-every`` steps; the fault-injection hook for tests."""
        step = epoch * self.steps_per_epoch + stats.steps
        every = self.cfg.checkpoint_every
        if every and step % every == 0:
            self._save(epoch=epoch, step_in_epoch=stats.steps, stats=asdict(stats), epoch_s=self.epoch_seconds(epoch),
                       extra={"epoch": epoch})
        if self._kill_at and step == self._kill_at:
            LOG.warning("%s=%d: killing this process with SIGKILL", FAULT_KILL_ENV, step)
            os.kill(os.getpid(), signal.SIGKILL)

    def end_epoch(self, epoch: int, state: dict, best_score: float, best_epoch: int) -> None:
        """``last.pt`` for a finished epoch (``state``: model, model_spec, val, ... as in best.pt)."""
        self.progress.best_score, self.progress.best_epoch = best_score, best_epoch
        self._epoch_sampler = sampler_state(self._sampler)  # the order the next epoch starts from
        self._save(epoch=epoch + 1, step_in_epoch=0, stats=None, epoch_s=0.0, extra=state)
        self.progress.resumed = False

    # -- writing ----------------------------------------------------------------------------
    def _save(self, *, epoch: int, step_in_epoch: int, stats: dict | None, epoch_s: float, extra: dict) -> None:
        step = int(self.scheduler.last_epoch)
        bad = [name for name, t in self.model.state_dict().items()
               if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise NilError(f"the weights became NaN or infinite by step {step} (e.g. {bad[0]}); "
                           f"{self.out / 'last.pt'} is kept from before")
        memory = self._save_memory(step)
        resume = {"format": RESUME_FORMAT, "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": step,
                  "stats": stats, "epoch_s": epoch_s, "rng": rng_state(), "sampler": self._epoch_sampler,
                  "best_score": self.progress.best_score, "best_epoch": self.progress.best_epoch,
                  "memory": memory, "miner": _miner_state(self.miner)}
        state = self.base_state | extra | {"model": self.model.state_dict(), "epoch": epoch,
                                           "optimizer": self.optimizer.state_dict(),
                                           "scheduler": self.scheduler.state_dict(), "scaler": None,
                                           "resume": resume}
        save_torch(state, self.out / "last.pt")
        _remove_memories(self.out, keep=memory)

    def _save_memory(self, step: int) -> str | None:
        index = getattr(self.miner, "index", None)
        if index is None:
            return None
        name = f"{MEMORY_PREFIX}{step:09d}"
        faiss_index.save_index(index, self.out / name, classes=self.classes, source="nil train memory",
                               extra={"global_step": step})
        return name

    # -- reading ----------------------------------------------------------------------------
    def restore(self, device: torch.device) -> RunProgress:
        """Load ``last.pt`` of this run into the model, optimiser, scheduler and miner."""
        path = self.out / "last.pt"
        ckpt = load_checkpoint(path)
        r = ckpt.get("resume")
        if not r or r.get("format") != RESUME_FORMAT:
            raise NilError(f"{path} holds no resume state (written by an older nil); the run cannot be resumed")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if r["memory"] is not None:
            if self.miner is None or getattr(self.miner, "index", None) is None:
                raise NilError(f"{path} holds a distractor memory but this configuration uses none")
            index, _ = faiss_index.load_index(self.out / r["memory"], device=str(device))
            self.miner.index = index
        _set_miner_state(self.miner, r["miner"])
        _remove_memories(self.out, keep=r["memory"])
        history = _truncate_history(self.out / "metrics.jsonl", r["epoch"])  # epochs finished
        self.progress = RunProgress(epoch=r["epoch"], step_in_epoch=r["step_in_epoch"], best_score=r["best_score"],
                                    best_epoch=r["best_epoch"], history=history, stats=r["stats"],
                                    epoch_s=r["epoch_s"], rng=r["rng"], sampler=r["sampler"], resumed=True)
        if r["step_in_epoch"] == 0:  # an epoch boundary: nothing to replay, only the RNG to restore
            set_rng_state(r["rng"])
            self.progress.rng = None
        LOG.info("resuming %s at epoch %d, step %d of it (global step %d)", self.out, r["epoch"] + 1,
                 r["step_in_epoch"], r["global_step"])
        return self.progress


def _miner_state(miner) -> dict | None:
    if miner is None:
        return None
    return {"steps": miner.steps, "timings": dict(miner.timings)}


def _set_miner_state(miner, state: dict | None) -> None:
    if miner is not None and state is not None:
        miner.steps, miner.timings = state["steps"], dict(state["timings"])


def _remove_memories(out: Path, keep: str | None) -> None:
    """Delete memory folders other than ``keep`` (older ones, or one a crash left unreferenced)."""
    for p in out.glob(f"{MEMORY_PREFIX}*"):
        if p.name != keep and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    for p in out.glob(f".{MEMORY_PREFIX}*"):  # temp folders of an interrupted save_index
        shutil.rmtree(p, ignore_errors=True)


def _truncate_history(path: Path, epochs_done: int) -> list[dict]:
    """The metrics.jsonl lines of the epochs last.pt covers; later ones (written before a crash) go."""
    if not path.exists():
        return []
    lines = []
    for raw in path.read_text().splitlines():
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:  # a line cut short by the crash
            continue
        if line.get("epoch", 0) <= epochs_done:
            lines.append(line)
    text = "".join(json.dumps(line) + "\n" for line in lines)
    _atomic_write(path, lambda fh: fh.write(text), "w")
    return lines


class _RestOfEpoch:
    """The batches of an epoch after the first ``skip``, with the RNG states of the moment it stopped.

    The epoch's sample order is drawn from the (restored) sampler exactly as the interrupted run
    drew it; a loader over the remaining indices then yields the same batches without reading the
    skipped images. The RNG states are restored after the loader's iterator is made (which draws
    its base seed) and before the first batch is read (whose random flips must match).
    """

    def __init__(self, loader: DataLoader, skip: int, rng: dict | None):
        self.loader, self.skip, self.rng = loader, skip, rng

    def __len__(self) -> int:
        return max(len(self.loader) - self.skip, 0)

    def __iter__(self) -> Iterator:
        order = list(iter(self.loader.sampler)) if self.loader.sampler is not None else list(
            range(len(self.loader.dataset)))
        rest = order[self.skip * self.loader.batch_size:]
        loader = DataLoader(self.loader.dataset, batch_size=self.loader.batch_size, sampler=rest, shuffle=False,
                            drop_last=self.loader.drop_last, num_workers=self.loader.num_workers,
                            collate_fn=self.loader.collate_fn, pin_memory=self.loader.pin_memory,
                            worker_init_fn=self.loader.worker_init_fn)
        it = iter(loader)
        if self.rng is not None:
            set_rng_state(self.rng)
        yield from it


# ------------------------------------------------------------------------------------ run folder
def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The configuration of the run in ``run_dir`` (its config.json), to resume it exactly."""
    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise NilError(f"{run} is not a nil run folder (no config.json); nothing to resume")
    if not (run / "last.pt").is_file():
        raise NilError(f"{run} has no last.pt yet: the run stopped before its first checkpoint; start it again")
    if (run / "metrics.json").is_file():
        raise NilError(f"the run in {run} already finished (metrics.json exists); nothing to resume")
    try:
        saved = json.loads((run / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise NilError(f"cannot read {run / 'config.json'}: {exc}") from None
    cfg = TrainConfig.from_dict(saved)
    cfg.out = str(run)
    return cfg


def check_same_data(run_dir: Path, split_record: dict) -> None:
    """Refuse to resume on data whose splits differ from the run's (files added, removed or skipped)."""
    path = Path(run_dir) / "splits.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise NilError(f"cannot read {path}: {exc}") from None
    if saved.get("ids") != split_record["ids"]:
        raise NilError(f"the data no longer gives the splits recorded in {path} (samples were added, removed or "
                       "skipped since the run started); resuming would not continue the same run")


def write_run_config(out: Path, resolved: dict, split_record: dict, options: dict) -> None:
    """config.json (every field and what was resolved), config.yaml (the `nil train` options, for
    ``--config``) and splits.json (the sample ids of each split)."""
    save_json(resolved, out / "config.json")
    save_text(yaml.safe_dump(options, sort_keys=False), out / "config.yaml")
    save_json(split_record, out / "splits.json")
