"""The trainer: data -> model -> embeddings -> distractor search -> loss -> update.

One function, :func:`train`, runs a whole job from a :class:`~nil.config.TrainConfig` and writes a
run folder that reproduces it:

    RUN_DIR/config.json    the full resolved configuration
    RUN_DIR/splits.json    the sample ids of each split
    RUN_DIR/metrics.jsonl  one line per epoch: loss parts, validation metrics, mining timings
    RUN_DIR/metrics.csv    the same as a table (--log csv; --log tensorboard: RUN_DIR/tensorboard/)
    RUN_DIR/last.pt        the latest model, optimiser, scheduler, RNG and loop state (resumable, nil.resume)
    RUN_DIR/memory-<step>/ the distractor memory last.pt was written with (--ann exact|faiss)
    RUN_DIR/best.pt        the epoch with the best validation metric
    RUN_DIR/metrics.json   best epoch, its validation metrics and the test metrics of best.pt
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import faiss_index
from nil import distributed, runlog
from nil.checkpoint import save_json, save_torch
from nil.config import TrainConfig
from nil.data import make_transform
from nil.data.transforms import data_statistics
from nil.data.base import Dataset
from nil.data.screen import screen_images
from nil.errors import NilError
from nil.losses import DistractorLoss, balanced_class_weights
from nil.loaders import make_loader
from nil.metrics import classification_metrics, summary
from nil.batchnorm import batch_statistics
from nil.mining import (DistractorImages, DistractorMiner, DistractorSource, EmbeddingsNotFinite, GradientDistractors,
                        SearchedDistractors, Step, space_vectors)
from nil.models import build_model, is_timm, normalization, stem, timm_normalization
from nil.predict import autocast, predict
from nil.resume import Checkpointer, check_same_data, write_run_config
from nil.runtime import open_config_dataset, resolve_device, seed_everything

LOG = logging.getLogger(__name__)


def input_normalization(cfg: TrainConfig, ds: Dataset, image_size: int) -> dict:
    """The input mean and std of this run, resolved once: ``auto`` follows the weights (ImageNet's
    with ``--pretrained``, a timm model's own, else the training split's own statistics)."""
    kind = cfg.normalize
    if kind == "auto":
        kind = "data" if not cfg.pretrained else "weights" if is_timm(cfg.model) else "imagenet"
    if kind == "data":
        stats = data_statistics(ds.train, image_size, ds.channels, seed=cfg.seed)
    elif kind == "weights":  # a timm model's weights name their own statistics
        stats = timm_normalization(cfg.model, ds.channels)
    else:
        stats = normalization(kind, ds.channels)
    return {"kind": kind, **stats}


def model_spec(cfg: TrainConfig, ds: Dataset, image_size: int, normalize: dict) -> dict:
    """What :func:`nil.models.build_model` needs to rebuild the model from a checkpoint, and the input
    normalisation (:func:`input_normalization`) every later reader of the checkpoint applies."""
    return {"name": cfg.model, "num_classes": ds.num_classes, "in_channels": ds.channels,
            "image_size": image_size, "embed_dim": cfg.embed_dim, "normalize": normalize}


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
                "distractor_rate": self.with_distractor / n, "accuracy": self.correct / n, "samples": self.seen}


def _prepare_out(out: Path) -> None:
    taken = out.exists() and any(out.iterdir())
    distributed.barrier()  # every rank has looked before rank 0 creates the folder
    if taken:
        raise NilError(f"run folder {out} already exists and is not empty; choose another --out")
    distributed.on_main(out.mkdir, parents=True, exist_ok=True)


LEAK_CHECK_MAX = 200_000  # images; the identical-images check reads every image once


def warn_cross_split_duplicates(ds: Dataset) -> None:
    """One warning line when identical images sit in two splits (a leak that inflates test figures)."""
    from nil.audit import cross_split_exact_duplicates

    n = sum(len(ds.split(s)) for s in ("train", "val", "test"))
    if n > LEAK_CHECK_MAX:
        LOG.info("%d images: the check for identical images across splits is left to `nil audit`", n)
        return
    leaks = {pair: count for pair, count in cross_split_exact_duplicates(ds).items() if count}
    if leaks:
        LOG.warning("identical images sit in two splits (%s groups); test figures may be inflated: run "
                    "`nil audit --data %s --out AUDIT_DIR` to list them",
                    ", ".join(f"{pair}: {count}" for pair, count in leaks.items()), ds.source)


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train, validate every epoch, test ``best.pt`` once; returns the content of ``metrics.json``.

    resume: continue the run in ``cfg.out`` from its ``last.pt`` (cfg from
    :func:`nil.resume.load_run_config`); see :mod:`nil.resume`.
    """
    cfg.validate()
    runlog.require(cfg.log)
    device = resolve_device(cfg.device)
    ctx, device = distributed.setup(device)  # torchrun: join the process group, take cuda:LOCAL_RANK
    distributed.per_rank_batch(cfg.batch_size, ctx.world_size)
    if resume and ctx.distributed:
        raise NilError("--resume runs in one process for now; resume without torchrun")
    seed_everything(cfg.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    ds = open_config_dataset(cfg)  # all data errors surface before anything is written
    ds = screen_images(ds, cfg.on_bad_image, progress=cfg.progress)
    if not resume and ctx.is_main:
        warn_cross_split_duplicates(ds)
    image_size = cfg.image_size or ds.image_size or 224
    if cfg.ann != "none" and not cfg.index_from:  # the memory's index parameters, before anything is written
        faiss_index.check_params("exact" if cfg.ann == "exact" else faiss_index.resolve_kind(cfg.ann_index, str(device)),
                                 cfg.index_params())
    out = Path(cfg.out)
    if resume:
        check_same_data(out, ds.split_record())
    else:
        _prepare_out(out)
    try:
        return _train(cfg, ds, image_size, device, out, resume)
    except BaseException:
        if not (out / "last.pt").exists():  # nothing worth keeping: leave no half-made run folder
            shutil.rmtree(out, ignore_errors=True)
        raise


def _train(cfg: TrainConfig, ds: Dataset, image_size: int, device: torch.device, out: Path,
           resume: bool = False) -> dict:
    spec = model_spec(cfg, ds, image_size, input_normalization(cfg, ds, image_size))
    kind = faiss_index.resolve_kind(cfg.ann_index, str(device))
    resolved = cfg.to_dict() | {"resolved": {"device": str(device), "image_size": image_size, "ann_index": kind,
                                             "normalize": spec["normalize"],
                                             "classes": ds.classes, "format": ds.format,
                                             "split_origin": ds.split_origin, "torch": torch.__version__}}
    ctx = distributed.context()
    resolved["resolved"] |= {"world_size": ctx.world_size,
                             "batch_per_rank": distributed.per_rank_batch(cfg.batch_size, ctx.world_size)}
    if not resume and ctx.is_main:
        write_run_config(out, resolved, ds.split_record(), cfg.to_options())
        if "skipped_images" in ds.info:
            save_json(ds.info["skipped_images"], out / "skipped_images.json")

    common = dict(cfg=cfg, image_size=image_size, channels=ds.channels, device=device, normalize=spec["normalize"])
    train_loader = make_loader(ds.train, train=True, rank=ctx.rank, world_size=ctx.world_size, **common)
    val_loader = make_loader(ds.val, train=False, **common)
    test_loader = make_loader(ds.test, train=False, **common)
    training = build_training(cfg, ds, image_size, device, cfg.epochs * len(train_loader), kind, spec["normalize"])
    model, trainee, optimizer, scheduler = training.model, training.trainee, training.optimizer, training.scheduler
    criterion, source = training.criterion, training.source

    miner = source.miner
    ckpt = Checkpointer(out, cfg, model, optimizer, scheduler, None if ctx.distributed else miner, {"model_spec": spec, "classes": ds.classes,
                        "config": cfg.to_dict()}, len(train_loader), ds.classes)
    run = ckpt.restore(device) if resume else ckpt.progress
    log = runlog.open_log(cfg.log, out) if ctx.is_main else runlog.RunLog()
    best_score, best_epoch, history = run.best_score, run.best_epoch, run.history
    for epoch in range(run.epoch, cfg.epochs):
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        ckpt.begin_epoch(epoch, train_loader)
        distractor_on = cfg.loss != "ce" and epoch >= cfg.warmup_epochs
        stats = train_epoch(trainee, ckpt.batches(train_loader, epoch), optimizer, scheduler, criterion, source, cfg,
                             device, distractor_on, epoch, ckpt.epoch_stats(epoch),
                             ckpt.after_step if ctx.is_main else None)
        distributed.sum_fields(stats, ("loss", "loss_ce", "loss_distractor", "with_distractor", "correct", "seen"),
                               device)  # the epoch's figures over every rank's share
        val = classification_metrics(*_labels_probs(predict(model, val_loader, device)))
        line = {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[-1], "train": stats.as_dict(),  # the heads' rate
                "val": summary(val), "distractor_on": distractor_on}
        if miner is not None:
            line["mining"] = source.reset_timings()
        line["epoch_s"] = ckpt.epoch_seconds(epoch)
        history.append(line)
        if ctx.is_main:
            with open(out / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(line) + "\n")
            log.epoch(history)
        state = {"model": model.state_dict(), "model_spec": spec, "classes": ds.classes, "config": cfg.to_dict(),
                 "epoch": epoch + 1, "val": val}
        score = val[cfg.select_metric] if val[cfg.select_metric] is not None else -1.0
        if score > best_score:  # best.pt before last.pt: a last.pt never names a best epoch not yet saved
            best_score, best_epoch = score, epoch + 1
            distributed.on_main(save_torch, state, out / "best.pt")
        distributed.on_main(ckpt.end_epoch, epoch, state, best_score, best_epoch)
        LOG.info("epoch %d/%d %s val %s", epoch + 1, cfg.epochs, stats.as_dict(), summary(val))

    distributed.barrier()  # rank 0 has written best.pt (--out must be on a filesystem every node sees)
    best = torch.load(out / "best.pt", map_location=device, weights_only=False)
    model.load_state_dict(best["model"])
    log.embeddings(model, ds.val, ds.classes, make_transform(False, image_size, ds.channels, spec["normalize"]),
                   device)
    log.close()
    test = None  # tuning runs (evaluate_test=False) never read the test split
    if cfg.evaluate_test:
        test = classification_metrics(*_labels_probs(predict(model, test_loader, device)))
    result = {"best_epoch": best_epoch, "select_metric": cfg.select_metric, "val": best["val"], "test": test,
              "classes": ds.classes, "epochs": cfg.epochs,
              "skipped_images": len(ds.info.get("skipped_images", [])),
              "train_s": sum(h["epoch_s"] for h in history)}
    distributed.on_main(save_json, result, out / "metrics.json")
    return result


@dataclass
class Training:
    """Everything one training step uses: :func:`train` builds it once, benchmarks time its steps."""

    model: torch.nn.Module  # the network (its state is what best.pt saves)
    trainee: torch.nn.Module  # the network as trained: DistributedDataParallel under torchrun, else model
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: DistractorLoss
    source: DistractorSource


def build_training(cfg: TrainConfig, ds: Dataset, image_size: int, device: torch.device, total_steps: int,
                   kind: str = "auto", normalize: dict | None = None) -> Training:
    """Model, optimiser, per-step schedule over ``total_steps``, loss and distractor source of a config;
    then call :func:`train_epoch` with them. ``normalize``: the input statistics of the run's loaders
    (:func:`input_normalization`), which re-embedded distractor images must share."""
    model = build_model(cfg.model, ds.num_classes, ds.channels, image_size, cfg.embed_dim, cfg.weights,
                        cfg.pretrained).to(device)
    # every parameter takes part in every step (the loss always reaches z): DDP needs no unused-parameter scan
    trainee = distributed.wrap_model(model, device, find_unused=False)
    groups = parameter_groups(model, cfg.lr, cfg.backbone_lr_scale)
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay)
    frozen_steps = cfg.freeze_stem_epochs * total_steps // cfg.epochs
    class_weight = (balanced_class_weights(ds.train.labels, ds.num_classes)
                    if cfg.term_weighting == "balanced" else None)
    return Training(model, trainee, optimizer, make_scheduler(optimizer, cfg.schedule, total_steps, frozen_steps),
                    DistractorLoss(cfg.margin, cfg.variant, class_weight).to(device),
                    make_source(cfg, ds, image_size, device, kind, feature_dim=model.classifier.in_features,
                                normalize=normalize))


def parameter_groups(model: torch.nn.Module, lr: float, backbone_lr_scale: float = 1.0) -> list[dict]:
    """The optimiser's groups: ``stem`` (:func:`nil.models.stem`) and the rest of the ``backbone`` at
    ``lr * backbone_lr_scale``, the ``heads`` (classifier, projection) at ``lr``."""
    stem_ids = {id(p) for p in stem(model).parameters()}
    backbone = [p for p in model.backbone.parameters() if id(p) not in stem_ids]
    heads = [p for name, p in model.named_parameters() if not name.startswith("backbone.")]
    return [{"name": "stem", "params": list(stem(model).parameters()), "lr": lr * backbone_lr_scale},
            {"name": "backbone", "params": backbone, "lr": lr * backbone_lr_scale},
            {"name": "heads", "params": heads, "lr": lr}]


def _start_index(cfg: TrainConfig, ds: Dataset, device: torch.device):
    """The index given by ``--index-from``, checked against this run, or None."""
    if not cfg.index_from:
        return None
    index, _ = faiss_index.load_index(cfg.index_from, device=str(device))
    if index.dim != cfg.embed_dim or index.num_classes != ds.num_classes:
        raise NilError(f"index {cfg.index_from} holds {index.dim}-d vectors of {index.num_classes} classes; "
                       f"this run has --embed-dim {cfg.embed_dim} and {ds.num_classes} classes")
    if distributed.context().distributed:  # each rank keeps its shard of the loaded index
        index = faiss_index.owned_share(index, index.construct_args())
    return index


def _labels_probs(p) -> tuple[np.ndarray, np.ndarray]:
    return p.labels, p.probs


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, frozen_steps: int = 0):
    """Per-step learning-rate schedule of every group: ``cosine`` decays to 0 over all steps; ``step``
    multiplies the rate by 0.1 at 50% and 75% of the steps (the MedMNIST v2 recipe). The group named
    ``stem`` learns at rate 0 for its first ``frozen_steps`` steps (AdamW then changes nothing, weight
    decay included)."""
    milestones = [max(total_steps // 2, 1), max(total_steps * 3 // 4, 1)]

    def factor(step: int) -> float:
        if schedule == "step":
            return 0.1 ** sum(step >= m for m in milestones)
        return 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))

    def frozen(step: int) -> float:
        return 0.0 if step < frozen_steps else factor(step)

    lambdas = [frozen if g.get("name") == "stem" else factor for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def make_source(cfg: TrainConfig, ds: Dataset, image_size: int, device: torch.device,
                kind: str = "auto", feature_dim: int | None = None, normalize: dict | None = None) -> DistractorSource:
    """The distractor source the configuration asks for (see :mod:`nil.mining`).

    ``--loss ce-replay`` searches the model's pooled features (``feature_dim`` wide): its loss
    never trains z; ``--term-space features`` searches them too, as its term measures them."""
    if cfg.loss == "ce":
        return DistractorSource()
    if cfg.distractor == "gradient":
        return GradientDistractors(cfg.gradient_step, cfg.term_space)
    kind = faiss_index.resolve_kind(kind, str(device))
    space = "features" if cfg.loss == "ce-replay" else cfg.term_space
    dim = feature_dim if space == "features" else cfg.embed_dim
    if dim is None:
        raise ValueError("a memory of pooled features (--loss ce-replay, --term-space features) needs feature_dim")
    miner = DistractorMiner(cfg.ann, ds.num_classes, dim, device, kind=kind,
                            refresh_every=cfg.refresh_every, need_positive=cfg.variant == "triplet",
                            audit_every=cfg.audit_every, index=_start_index(cfg, ds, device),
                            index_params=cfg.index_params(),
                            shard=faiss_index.DistributedIndex if distributed.context().distributed else None)
    replay = cfg.loss == "ce-replay" or cfg.replay > 0  # the distractor images get a CE term of their own
    images = None
    if cfg.fresh_distractors or replay:
        images = DistractorImages(ds.train, make_transform(True, image_size, ds.channels, normalize))
    return SearchedDistractors(miner, images, replay=replay, space=space)


def step_loss(step: Step, y: torch.Tensor, criterion: DistractorLoss, cfg: TrainConfig) -> tuple[torch.Tensor, ...]:
    """(total, cross-entropy, second term) of one step.

    ``nil``: CE + lambda * distractor term (+ replay * the mean cross-entropy of the distractor
    images with ``--replay``); ``ce-replay``: CE + lambda * that replayed images' cross-entropy
    (their own term, so lambda sets how much the hard examples weigh against the batch); ``ce``:
    CE. The second term is built from z in every step (zero while there is nothing to add), so the
    projection head takes part in every step on every rank.
    """
    ce = F.cross_entropy(step.out.logits.float(), y)
    z = step.out.z.float()
    second = z.sum() * 0.0  # adding it changes no value and keeps the projection head in every step's graph
    replayed = (F.cross_entropy(step.replay.logits.float(), step.replay_labels)
                if step.replay is not None else None)
    if cfg.loss == "nil" and step.pairs is not None:
        p = step.pairs
        second = second + criterion(space_vectors(step.out, cfg.term_space), p.distractor, p.valid, p.positive, p.positive_valid, labels=y)
    elif replayed is not None:
        second = second + replayed
    total = ce + cfg.lam * second
    if cfg.loss == "nil" and replayed is not None:
        total = total + cfg.replay * replayed
    return total, ce, second


def train_epoch(model, loader, optimizer, scheduler, criterion, source: DistractorSource, cfg: TrainConfig,
                 device: torch.device, distractor_on: bool, epoch: int, resumed_stats: dict | None = None,
                 after_step=None) -> _StepStats:
    """One epoch over ``loader`` (or the rest of one: ``resumed_stats`` holds what was done);
    ``after_step(epoch, stats)`` runs after every optimiser step (step checkpoints).

    The step: ``source`` embeds the batch and finds its distractors (every forward pass of the
    step under :func:`~nil.batchnorm.batch_statistics`), the loss, the update, then the source
    takes the batch in (its memory)."""
    model.train()
    network = distributed.unwrap(model)
    stats = _StepStats(**resumed_stats) if resumed_stats else _StepStats()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress, leave=False)
    for x, y, sid in bar:
        x, y, sid = x.to(device, non_blocking=True), y.to(device), sid.to(device)
        with batch_statistics(network), autocast(device, cfg.precision):
            try:
                step = source.step(model, x, y, sid, distractor_on)
            except EmbeddingsNotFinite:  # raised before any search or memory saw them
                raise NilError(f"the embeddings became NaN or infinite at epoch {epoch + 1}, step {stats.steps + 1} "
                               f"(global step {scheduler.last_epoch + 1}); nothing of this step was stored and the "
                               "last good last.pt is kept; lower --lr or check the data") from None
            loss, ce, dist = step_loss(step, y, criterion, cfg)
        if not torch.isfinite(loss):
            raise NilError(f"the loss became {loss.item()} at epoch {epoch + 1}, step {stats.steps + 1} "
                           f"(global step {scheduler.last_epoch + 1}); the last good last.pt is kept; "
                           "lower --lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        source.update(step, y, sid)
        with_d = float(step.pairs.valid.sum()) if step.pairs is not None else 0.0
        correct = float((step.out.logits.argmax(1) == y).sum())
        stats.add(len(y), loss.item(), ce.item(), dist.item(), with_d, correct)
        bar.set_postfix(loss=f"{stats.loss / stats.seen:.3f}")
        if after_step is not None:
            after_step(epoch, stats)
    return stats
