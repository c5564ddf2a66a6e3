"""The trainer: data -> model -> embeddings -> distractor search -> loss -> update.

One function, :func:`train`, runs a whole job from a :class:`~nil.config.TrainConfig` and writes a
run folder that reproduces it:

    RUN_DIR/config.json    the full resolved configuration
    RUN_DIR/splits.json    the sample ids of each split
    RUN_DIR/metrics.jsonl  one line per epoch: loss parts, validation metrics, mining timings
    RUN_DIR/last.pt        the latest model and optimiser state
    RUN_DIR/best.pt        the epoch with the best validation metric
    RUN_DIR/metrics.json   best epoch, its validation metrics and the test metrics of best.pt
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import faiss_index
from nil.checkpoint import save_json, save_torch
from nil.config import TrainConfig
from nil.data import CsvOptions, open_dataset
from nil.data.base import Dataset
from nil.errors import NilError
from nil.losses import DistractorLoss
from nil.loaders import make_loader
from nil.metrics import classification_metrics, summary
from nil.mining import DistractorMiner, gradient_distractor
from nil.models import build_model
from nil.predict import autocast, predict

LOG = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise NilError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def open_config_dataset(cfg: TrainConfig) -> Dataset:
    """The dataset a config names, with the same splits every time for the same config."""
    csv = CsvOptions(cfg.csv_path_col, cfg.csv_label_col, cfg.csv_label_cols, cfg.image_root, cfg.image_suffix)
    return open_dataset(cfg.data, cfg.format, seed=cfg.seed, val_fraction=cfg.val_fraction,
                        test_fraction=cfg.test_fraction, csv=csv)


def model_spec(cfg: TrainConfig, ds: Dataset, image_size: int) -> dict:
    """What :func:`nil.models.build_model` needs to rebuild the model from a checkpoint."""
    return {"name": cfg.model, "num_classes": ds.num_classes, "in_channels": ds.channels,
            "image_size": image_size, "embed_dim": cfg.embed_dim}


@dataclass
class _StepStats:
    loss: float = 0.0
    loss_ce: float = 0.0
    loss_distractor: float = 0.0
    with_distractor: float = 0.0
    correct: float = 0.0
    seen: int = 0
    steps: int = 0

    def add(self, n: int, loss: float, ce: float, dist: float, with_d: float, correct: float) -> None:
        self.loss += loss * n
        self.loss_ce += ce * n
        self.loss_distractor += dist * n
        self.with_distractor += with_d
        self.correct += correct
        self.seen += n
        self.steps += 1

    def as_dict(self) -> dict:
        n = max(self.seen, 1)
        return {"loss": self.loss / n, "loss_ce": self.loss_ce / n, "loss_distractor": self.loss_distractor / n,
                "distractor_rate": self.with_distractor / n, "accuracy": self.correct / n}


def _prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise NilError(f"run folder {out} already exists and is not empty; choose another --out")
    out.mkdir(parents=True, exist_ok=True)


def train(cfg: TrainConfig) -> dict:
    """Train, validate every epoch, test ``best.pt`` once; returns the content of ``metrics.json``."""
    cfg.validate()
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    ds = open_config_dataset(cfg)  # all data errors surface before anything is written
    image_size = cfg.image_size or ds.image_size or 224
    out = Path(cfg.out)
    _prepare_out(out)
    try:
        return _train(cfg, ds, image_size, device, out)
    except BaseException:
        if not (out / "last.pt").exists():  # nothing worth keeping: leave no half-made run folder
            shutil.rmtree(out, ignore_errors=True)
        raise


def _train(cfg: TrainConfig, ds: Dataset, image_size: int, device: torch.device, out: Path) -> dict:
    spec = model_spec(cfg, ds, image_size)
    kind = faiss_index.default_kind(str(device)) if cfg.ann_index == "auto" else cfg.ann_index
    resolved = cfg.to_dict() | {"resolved": {"device": str(device), "image_size": image_size, "ann_index": kind,
                                             "classes": ds.classes, "format": ds.format,
                                             "split_origin": ds.split_origin, "torch": torch.__version__}}
    save_json(resolved, out / "config.json")
    save_json(ds.split_record(), out / "splits.json")

    model = build_model(cfg.model, ds.num_classes, ds.channels, image_size, cfg.embed_dim, cfg.weights).to(device)
    train_loader = make_loader(ds.train, train=True, cfg=cfg, image_size=image_size, channels=ds.channels, device=device)
    val_loader = make_loader(ds.val, train=False, cfg=cfg, image_size=image_size, channels=ds.channels, device=device)
    test_loader = make_loader(ds.test, train=False, cfg=cfg, image_size=image_size, channels=ds.channels, device=device)

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    use_nil = cfg.loss == "nil"
    criterion = DistractorLoss(cfg.margin, cfg.variant)
    miner = None
    if use_nil and cfg.distractor == "memory":
        miner = DistractorMiner(cfg.ann, ds.num_classes, cfg.embed_dim, device, kind=kind,
                                refresh_every=cfg.refresh_every, need_positive=cfg.variant == "triplet",
                                audit_every=cfg.audit_every, index=_start_index(cfg, ds, device))

    best_score, best_epoch, history = -float("inf"), -1, []
    for epoch in range(cfg.epochs):
        started = time.perf_counter()
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        distractor_on = use_nil and epoch >= cfg.warmup_epochs
        stats = _train_epoch(model, train_loader, optimizer, scheduler, criterion, miner, cfg, device,
                             distractor_on, epoch)
        val = classification_metrics(*_labels_probs(predict(model, val_loader, device)))
        line = {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[0], "train": stats.as_dict(),
                "val": summary(val), "distractor_on": distractor_on}
        if miner is not None:
            line["mining"] = miner.reset_timings()
        line["epoch_s"] = time.perf_counter() - started
        history.append(line)
        with open(out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(line) + "\n")
        state = {"model": model.state_dict(), "model_spec": spec, "classes": ds.classes, "config": cfg.to_dict(),
                 "epoch": epoch + 1, "val": val}
        save_torch(state | {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, out / "last.pt")
        score = val[cfg.select_metric] if val[cfg.select_metric] is not None else -1.0
        if score > best_score:
            best_score, best_epoch = score, epoch + 1
            save_torch(state, out / "best.pt")
        LOG.info("epoch %d/%d %s val %s", epoch + 1, cfg.epochs, stats.as_dict(), summary(val))

    best = torch.load(out / "best.pt", map_location=device, weights_only=False)
    model.load_state_dict(best["model"])
    test = None  # tuning runs (evaluate_test=False) never read the test split
    if cfg.evaluate_test:
        test = classification_metrics(*_labels_probs(predict(model, test_loader, device)))
    result = {"best_epoch": best_epoch, "select_metric": cfg.select_metric, "val": best["val"], "test": test,
              "classes": ds.classes, "epochs": cfg.epochs,
              "train_s": sum(h["epoch_s"] for h in history)}
    save_json(result, out / "metrics.json")
    return result


def _start_index(cfg: TrainConfig, ds: Dataset, device: torch.device):
    """The index given by ``--index-from``, checked against this run, or None."""
    if not cfg.index_from:
        return None
    index, _ = faiss_index.load_index(cfg.index_from, device=str(device))
    if index.dim != cfg.embed_dim or index.num_classes != ds.num_classes:
        raise NilError(f"index {cfg.index_from} holds {index.dim}-d vectors of {index.num_classes} classes; "
                       f"this run has --embed-dim {cfg.embed_dim} and {ds.num_classes} classes")
    return index


def _labels_probs(p) -> tuple[np.ndarray, np.ndarray]:
    return p.labels, p.probs


def _train_epoch(model, loader, optimizer, scheduler, criterion, miner, cfg: TrainConfig, device: torch.device,
                 distractor_on: bool, epoch: int) -> _StepStats:
    model.train()
    stats = _StepStats()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress, leave=False)
    for x, y, sid in bar:
        x, y, sid = x.to(device, non_blocking=True), y.to(device), sid.to(device)
        with autocast(device, cfg.precision):
            out = model(x)
            ce = F.cross_entropy(out.logits.float(), y)
        z = out.z.float()
        dist = torch.zeros((), device=device)
        with_d = 0.0
        if cfg.loss == "nil":
            if miner is not None:
                mined = miner.mine(z.detach(), y, sid)
            else:
                mined = gradient_distractor(model, out.features, out.logits, y, cfg.gradient_step)
            if distractor_on:
                dist = criterion(z, mined.distractor, mined.valid, mined.positive, mined.positive_valid)
                with_d = float(mined.valid.sum())
        loss = ce + cfg.lam * dist
        if not torch.isfinite(loss):
            raise NilError(f"the loss became {loss.item()} at epoch {epoch + 1}, step {stats.steps + 1}; "
                           "lower --lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if miner is not None:
            miner.update(z.detach(), y, sid)
        correct = float((out.logits.argmax(1) == y).sum())
        stats.add(len(y), loss.item(), ce.item(), dist.item(), with_d, correct)
        bar.set_postfix(loss=f"{stats.loss / stats.seen:.3f}")
    return stats
