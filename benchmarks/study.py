"""``nil bench study``: does distractor-aware training help, against a fair baseline, at convergence?

Two stages, both resumable (each finished run is appended to ``<out dir>/study-runs.jsonl`` the
moment it ends, under a key naming everything that defines it; a rerun skips every key present):

1. ``tune``: every arm gets the same budget - the same number of settings of its own knobs (its
   ``GRID``), on the same datasets, models and seeds - trained with the test split never read
   (``evaluate_test=False``). An arm's setting is the one with the highest mean validation score
   (mean of balanced accuracy and AUC over datasets, models and seeds). The choice is frozen in
   ``study-choice.json`` the first time every tuning run of the arm exists, and never changed by a
   later rerun, so no final (test) figure can feed back into it.
2. ``final``: every (model, seed, dataset, arm) with the frozen choice, the test split read once
   per run; ``study.json`` / ``study.md`` are rewritten from all finished rows after every run.

Every run: the official MedMNIST splits, the same schedule (AdamW, step decay x0.1 at 50% and 75%
of the steps, random flips), the same batch order per seed, best.pt chosen by validation balanced
accuracy (both data sets are imbalanced; accuracy rewards predicting the majority class).
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from benchmarks.machine import machine_info
from benchmarks.report import envelope, group_runs, markdown_head, markdown_table, mean_sd as _mean_sd, write_files, write_result
from nil.config import TrainConfig

LOG = logging.getLogger(__name__)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = ("retinamnist", "breastmnist")
# MedMNIST v2 (Yang et al., Scientific Data 10:41, 2023), ResNet-18 (28), official test splits
PUBLISHED = {"retinamnist": {"accuracy": 0.524, "auc": 0.717}, "breastmnist": {"accuracy": 0.863, "auc": 0.901}}
MAJORITY = {"retinamnist": 174 / 400, "breastmnist": 114 / 156}  # test majority-class rate

# What defines each arm, and the knobs its tuning budget explores (same number of settings each).
# Every arm names its distractor source: `nil train`'s default ("auto") resolves by --ann, and the run
# keys of the committed runs hold "memory".
ARMS = {
    "ce": dict(loss="ce", ann="none", fresh_distractors=False, distractor="memory"),
    # compute-matched control: the mined distractor images join the batch with their own CE term
    "ce-matched": dict(loss="ce-replay", ann="exact", fresh_distractors=False, distractor="memory"),
    # distractor-aware: distractor images re-embedded in the step, distance between current embeddings
    "nil-fresh": dict(loss="nil", ann="exact", fresh_distractors=True, distractor="memory"),
    # the stored (up to an epoch old) distractor vectors: documents the collapse
    "nil-stored": dict(loss="nil", ann="exact", fresh_distractors=False, distractor="memory"),
    # the paper's own distractor: pooled features moved along the most confusing class's gradient and
    # embedded by the same head; no memory, no search (added after the first final runs: tuned on
    # validation with the same budget before any of its test figures existed)
    "nil-gradient": dict(loss="nil", ann="none", distractor="gradient", fresh_distractors=False),
    # nil-gradient with the term weighted by inverse class frequency (--term-weighting balanced), for
    # the rare classes no arm recalls (RetinaMNIST grade 4, malignant BreastMNIST); added after the
    # other arms' final runs, so tuned on validation with the same budget before any test figure of it
    "nil-balanced": dict(loss="nil", ann="none", distractor="gradient", fresh_distractors=False,
                         term_weighting="balanced"),
    # hard-example replay and the distractor term together (--replay): the mined distractor images get
    # ce-matched's CE at its chosen weight 0.1 and the term measures their fresh embeddings; one extra
    # pass, the compute of ce-matched and nil-fresh. Separates "the term adds to replay" from "replay
    # helps". Added after every other arm's final runs (2026-12-06), tuned on validation with the same
    # budget (lambda x lr; margin 1.0 from nil-fresh's choice) before any test figure of it
    "nil-replay": dict(loss="nil", ann="exact", fresh_distractors=True, distractor="memory", replay=0.1),
    # nil-fresh with the term (and the memory) in the L2-normalised pooled features the classifier reads
    # (--term-space features). Added 2026-12-08 after every other arm's final runs, because the training
    # logs showed nil-fresh's term in z near 0 from the first epochs at every tuned margin (last epoch
    # 0.0001-0.018): the projection head alone can spread the classes on its sphere, so the push apart
    # never reaches the backbone. Tuned on validation with the same budget before any test figure of it
    "nil-features": dict(loss="nil", ann="exact", fresh_distractors=True, distractor="memory",
                         term_space="features"),
}
GRID = {
    "ce": {"lr": [5e-4, 1e-3, 2e-3], "weight_decay": [1e-4, 1e-3]},
    # the replay term's weight; a first grid (lr x weight decay, batch and replayed images in one
    # CE) trained to chance on validation (the replayed hard examples outweighed the batch)
    "ce-matched": {"lam": [0.1, 0.3, 1.0], "lr": [5e-4, 1e-3]},
    # margins on the unit sphere (distances in [0, 2], orthogonal classes at 1.41); margin 0.5 was
    # dropped after the first tuning run: fresh distractors sit further away, the term was ~0
    "nil-fresh": {"lam": [0.3, 1.0, 3.0], "margin": [1.0, 1.4]},
    "nil-stored": {"lam": [0.3, 1.0, 3.0], "margin": [1.0, 1.4]},
    "nil-gradient": {"lam": [0.3, 1.0, 3.0], "margin": [1.0, 1.4]},
    "nil-balanced": {"lam": [0.3, 1.0, 3.0], "margin": [1.0, 1.4]},
    # lambda 0.3 won every other distractor arm's grid, larger always lost: explore below it, and both
    # learning rates chosen so far (ce-matched 5e-4, the others 1e-3)
    "nil-replay": {"lam": [0.1, 0.3, 1.0], "lr": [5e-4, 1e-3]},
    # normalised pooled features are non-negative, so closer than on z's sphere: in a ResNet-18 trained
    # by nil-fresh (BreastMNIST training split) the nearest other-class sample lies 0.22 / 0.31 / 0.46 away
    # (10th / 50th / 90th percentile): margin 0.5 is active for most samples, 1.0 for all
    "nil-features": {"lam": [0.3, 1.0, 3.0], "margin": [0.5, 1.0]},
}
REPORTED = ("accuracy", "balanced_accuracy", "macro_f1", "auc", "qwk")
# two-sided 95% Student t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


@dataclass
class Study:
    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    models: list[str] = field(default_factory=lambda: ["small_cnn", "resnet18"])
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    tune_seeds: list[int] = field(default_factory=lambda: [100])  # never among the final seeds
    tune_models: list[str] = field(default_factory=lambda: ["small_cnn"])
    epochs: dict[str, int] = field(default_factory=lambda: {"small_cnn": 30, "resnet18": 30})
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "step"
    lam: float = 1.0
    margin: float = 1.0
    warmup_epochs: int = 0
    precision: str = "fp32"  # bf16 is emulated (20x slower) on CPUs without AVX-512 BF16 / AMX
    select_metric: str = "balanced_accuracy"
    device: str = "cpu"
    workdir: str = "runs/study"
    out: str = "benchmarks/results/study.json"
    data_dir: str | None = None

    @property
    def runs_file(self) -> Path:
        return Path(self.out).with_name("study-runs.jsonl")

    @property
    def choice_file(self) -> Path:
        return Path(self.out).with_name("study-choice.json")


def base_settings(study: Study) -> dict:
    return {"lr": study.lr, "weight_decay": study.weight_decay, "lam": study.lam, "margin": study.margin,
            "warmup_epochs": study.warmup_epochs, "audit_every": 0,  # no arm searches with faiss
            "normalize": "half"}  # the statistics every committed run used (mean and std 0.5)


def run_config(study: Study, dataset: str, model: str, arm: str, seed: int, params: dict, out: Path,
               evaluate_test: bool) -> TrainConfig:
    data_dir = Path(study.data_dir) if study.data_dir else SHARED
    return TrainConfig(data=str(data_dir / f"{dataset}.npz"), out=str(out), model=model,
                       epochs=study.epochs[model], batch_size=study.batch_size, schedule=study.schedule,
                       seed=seed, device=study.device, precision=study.precision,
                       select_metric=study.select_metric, evaluate_test=evaluate_test, progress=False,
                       **(base_settings(study) | params), **ARMS[arm])


RETIRED_FIELDS = {"extra": {}}  # TrainConfig fields removed after runs were written, with the value they had
ADDED_FIELDS = {"pretrained": False, "normalize": "half", "backbone_lr_scale": 1.0, "freeze_stem_epochs": 0,
                "ann_nprobe": None, "ann_rerank": None, "ann_params": {}, "term_weighting": "none", "replay": 0.0,
                "term_space": "z"}  # fields added after runs were written: left out of the key at this value


def run_key(stage: str, cfg: TrainConfig) -> str:
    """Everything that defines a run (not where it is written).

    Every field of the config is hashed, so a new field, or a changed default of a field the study
    does not set, starts the study afresh: the arms set every method option they depend on. A field
    removed from the config since keeps its last value in the key (:data:`RETIRED_FIELDS`), and a field
    added since is left out while it has the value the old runs implied (:data:`ADDED_FIELDS`), so
    the runs already written stay valid."""
    d = RETIRED_FIELDS | {k: v for k, v in cfg.to_dict().items() if k not in ADDED_FIELDS or ADDED_FIELDS[k] != v}
    d.pop("out"), d.pop("progress"), d.pop("log")  # where and how a run reports, not what it is
    d["data"] = Path(d["data"]).name
    blob = json.dumps([stage, d], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_rows(study: Study) -> dict[str, dict]:
    path = study.runs_file
    if not path.exists():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows[r["key"]] = r
    return rows


def _append(study: Study, row: dict) -> None:
    study.runs_file.parent.mkdir(parents=True, exist_ok=True)
    with open(study.runs_file, "a") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()


def _claim(study: Study, key: str) -> bool:
    """Take run ``key`` for this process unless a live process of the study holds it already."""
    claims = Path(study.workdir) / "claims"
    claims.mkdir(parents=True, exist_ok=True)
    path = claims / key
    try:
        holder = int(path.read_text() or 0)
        os.kill(holder, 0)  # raises if that process is gone
        return holder == os.getpid()
    except (FileNotFoundError, ValueError, ProcessLookupError):
        path.write_text(str(os.getpid()))  # free, or left by a process that died
        return True
    except PermissionError:  # alive, someone else's
        return False


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1], timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _metrics(d: dict | None) -> dict | None:
    return None if d is None else {k: d[k] for k in REPORTED}


def _per_class_recall(metrics: dict | None) -> list[float] | None:
    confusion = (metrics or {}).get("confusion_matrix")
    return [row[i] / max(sum(row), 1) for i, row in enumerate(confusion)] if confusion else None


def _train_one(study: Study, stage: str, dataset: str, model: str, arm: str, seed: int, params: dict,
               done: dict, machine: dict, commit: str) -> dict | None:
    from nil.train import train

    probe = run_config(study, dataset, model, arm, seed, params, Path("-"), stage == "final")
    key = run_key(stage, probe)
    done.update(load_rows(study))  # what other processes of the study finished meanwhile
    if key in done or not _claim(study, key):
        return None
    run_dir = Path(study.workdir) / stage / dataset / model / arm / f"seed{seed}-{key}"
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted earlier attempt
    cfg = run_config(study, dataset, model, arm, seed, params, run_dir, stage == "final")
    LOG.info("%s: %s %s %s seed %d %s", stage, dataset, model, arm, seed, params)
    result = train(cfg)
    lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines() if s.strip()]
    row = {"key": key, "stage": stage, "dataset": dataset, "model": model, "arm": arm, "seed": seed,
           "arm_params": base_settings(study) | params | ARMS[arm], "selected_by": f"val {study.select_metric}",
           "epochs": cfg.epochs, "batch_size": cfg.batch_size, "best_epoch": result["best_epoch"],
           "train_s": round(result["train_s"], 1),
           "val": _metrics(result["val"]), "test": _metrics(result["test"]),
           "test_recall_per_class": _per_class_recall(result["test"]),
           "val_recall_per_class": _per_class_recall(result["val"]),
           "distractor_term": lines[-1]["train"]["loss_distractor"],
           "distractor_rate": lines[-1]["train"]["distractor_rate"],
           "commit": commit, "machine": machine["cpu"], "threads": machine["torch_threads"]}
    _append(study, row)
    done[key] = row
    return row


# --------------------------------------------------------------------------------------- tuning
def settings_of(arm: str) -> list[dict]:
    grid = GRID[arm]
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def run_tuning(study: Study) -> dict:
    """Every arm's grid on the tuning seeds and models, validation only; freezes each arm's choice."""
    done, machine, commit = load_rows(study), machine_info(), _commit()
    for arm in study.arms:
        for params in settings_of(arm):
            for model in study.tune_models:
                for seed in study.tune_seeds:
                    for dataset in study.datasets:
                        _train_one(study, "tune", dataset, model, arm, seed, params, done, machine, commit)
        freeze_choice(study, arm, done)
    return json.loads(study.choice_file.read_text()) if study.choice_file.exists() else {}


def tuning_table(study: Study, rows: dict[str, dict], arm: str) -> list[dict]:
    table = []
    for params in settings_of(arm):
        rs = [r for r in rows.values() if r["stage"] == "tune" and r["arm"] == arm
              and all(r["arm_params"].get(k) == v for k, v in params.items())
              and r["model"] in study.tune_models and r["seed"] in study.tune_seeds
              and r["dataset"] in study.datasets]
        entry = {"arm": arm, "params": params, "runs": len(rs)}
        for d in study.datasets:
            for k in ("balanced_accuracy", "auc"):
                vals = [r["val"][k] for r in rs if r["dataset"] == d and r["val"][k] is not None]
                entry[f"{d}_{k}"] = statistics.fmean(vals) if vals else None
        scores = [statistics.fmean([r["val"]["balanced_accuracy"], r["val"]["auc"] or 0.0]) for r in rs]
        entry["score"] = statistics.fmean(scores) if scores else None
        table.append(entry)
    return table


def freeze_choice(study: Study, arm: str, rows: dict[str, dict]) -> None:
    """Record ``arm``'s chosen setting once all its tuning runs exist; an existing choice is kept.

    Under an exclusive lock, so tuning processes that share the study (one per arm) never drop
    each other's choice."""
    study.choice_file.parent.mkdir(parents=True, exist_ok=True)
    with open(study.choice_file.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _freeze(study, arm, rows)


def _freeze(study: Study, arm: str, rows: dict[str, dict]) -> None:
    choices = json.loads(study.choice_file.read_text()) if study.choice_file.exists() else {}
    if arm in choices:
        return
    table = tuning_table(study, rows, arm)
    expected = len(study.tune_models) * len(study.tune_seeds) * len(study.datasets)
    if any(t["runs"] < expected for t in table):
        return
    best = max(table, key=lambda t: t["score"])
    choices[arm] = {"params": best["params"], "score": best["score"], "table": table,
                    "rule": "max mean of validation balanced accuracy and AUC",
                    "tune_models": study.tune_models, "tune_seeds": study.tune_seeds,
                    "frozen_at": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": _commit()}
    write_files({study.choice_file: json.dumps(choices, indent=1) + "\n"})


# --------------------------------------------------------------------------------------- final
def run_final(study: Study, command: str = "") -> dict:
    """Every (model, seed, dataset, arm) with its frozen setting; study.json/.md after every run."""
    if not study.choice_file.exists():
        raise ValueError(f"no tuning choice yet ({study.choice_file}): run the tune stage first")
    choices = json.loads(study.choice_file.read_text())
    missing = [a for a in study.arms if a not in choices]
    if missing:
        raise ValueError(f"arms {missing} have no frozen tuning choice: run the tune stage for them first")
    done, machine, commit = load_rows(study), machine_info(), _commit()
    result = write_report(_with_finished(study, done), command)
    for model in study.models:
        for seed in study.seeds:
            for dataset in study.datasets:
                for arm in study.arms:
                    if _train_one(study, "final", dataset, model, arm, seed, choices[arm]["params"], done,
                                  machine, commit):
                        result = write_report(_with_finished(study, done), command)
    return result


def _with_finished(study: Study, rows: dict[str, dict]) -> Study:
    """The study widened by every dataset, model, arm and seed of the final runs already finished, so
    that continuing a study with a subset (``--seeds 3``) keeps reporting all of it."""
    finals = [r for r in rows.values() if r["stage"] == "final"]

    def union(given: list, name: str) -> list:
        return list(given) + sorted({r[name] for r in finals} - set(given))

    return replace(study, datasets=union(study.datasets, "dataset"), models=union(study.models, "model"),
                   arms=union(study.arms, "arm"), seeds=sorted(set(union(study.seeds, "seed"))))


# --------------------------------------------------------------------------------------- report
def _ci95(values: list[float]) -> tuple[float | None, float | None]:
    """Student-t 95% interval of the mean of paired differences."""
    if len(values) < 2:
        return None, None
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    half = T95.get(len(values) - 1, 1.96) * sd / math.sqrt(len(values))
    return mean - half, mean + half


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for (dataset, model, arm), rs in group_runs(rows).items():
        e = {"dataset": dataset, "model": model, "arm": arm, "seeds": sorted(r["seed"] for r in rs),
             "arm_params": rs[0]["arm_params"], "train_s": statistics.fmean(r["train_s"] for r in rs)}
        for k in REPORTED:
            e[k], e[f"{k}_sd"] = _mean_sd([r["test"][k] for r in rs])
        recalls = [r["test_recall_per_class"] for r in rs if r["test_recall_per_class"]]
        e["recall_per_class"] = [statistics.fmean(c) for c in zip(*recalls)] if recalls else None
        terms = [r["distractor_term"] for r in rs if r.get("distractor_term") is not None]
        e["distractor_term"] = statistics.fmean(terms) if terms else None  # the last epoch's, see the report
        out.append(e)
    return out


def paired(rows: list[dict], baseline: str) -> list[dict]:
    """Per (dataset, model, arm): arm minus ``baseline`` on the same seed, mean, 95% CI and wins."""
    base = {(r["dataset"], r["model"], r["seed"]): r for r in rows if r["arm"] == baseline}
    groups: dict[tuple, list[tuple[dict, dict]]] = {}
    for r in rows:
        b = base.get((r["dataset"], r["model"], r["seed"]))
        if r["arm"] != baseline and b is not None:
            groups.setdefault((r["dataset"], r["model"], r["arm"]), []).append((r, b))
    out = []
    for (dataset, model, arm), pairs in groups.items():
        pairs.sort(key=lambda rb: rb[0]["seed"])
        e = {"dataset": dataset, "model": model, "arm": arm, "baseline": baseline, "pairs": len(pairs),
             "seeds": [r["seed"] for r, _ in pairs]}
        for k in ("balanced_accuracy", "auc", "macro_f1", "accuracy", "qwk"):
            diffs = [None if r["test"][k] is None or b["test"][k] is None else r["test"][k] - b["test"][k]
                     for r, b in pairs]
            e[f"{k}_diffs"] = diffs  # per seed, in the order of "seeds"
            diffs = [d for d in diffs if d is not None]
            e[k] = statistics.fmean(diffs) if diffs else None
            e[f"{k}_ci95"] = _ci95(diffs)
            e[f"{k}_wins"] = sum(d > 0 for d in diffs)
        out.append(e)
    return out


def study_plot_png(result: dict) -> bytes:
    """Forest plot of the paired differences: for each baseline (rows) and metric (columns), one line per
    dataset, model and arm with every seed's difference (dots), the mean (diamond) and its 95% interval."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baselines = [b for b in ("ce-matched", "ce") if any(p["baseline"] == b for p in result["paired"])]
    metrics = (("balanced_accuracy", "balanced accuracy"), ("auc", "AUC"))

    def order(p):
        return (p["dataset"], p["model"], list(ARMS).index(p["arm"]) if p["arm"] in ARMS else len(ARMS), p["arm"])

    per = {b: sorted((p for p in result["paired"] if p["baseline"] == b), key=order) for b in baselines}
    height = max([len(v) for v in per.values()] + [1])
    fig, axes = plt.subplots(len(baselines), len(metrics), figsize=(11, 1.2 + 0.27 * height * len(baselines)),
                             squeeze=False)
    for row, b in enumerate(baselines):
        ps = per[b]
        for col, (k, name) in enumerate(metrics):
            ax = axes[row][col]
            for y, p in enumerate(ps):
                diffs = [d for d in p[f"{k}_diffs"] if d is not None]
                ax.plot(diffs, [y] * len(diffs), "o", ms=3, color="0.6", zorder=2)
                if p[k] is None:
                    continue
                lo, hi = p[f"{k}_ci95"]
                if lo is not None:
                    ax.plot([lo, hi], [y, y], color="C1" if lo > 0 or hi < 0 else "k", lw=2.5 if lo > 0 or hi < 0 else 1.2,
                            zorder=3)
                ax.plot([p[k]], [y], "D", ms=5, color="C3" if p[k] > 0 else "C0", zorder=4)
            ax.axvline(0, color="k", lw=0.6, ls=":")
            ax.set_yticks(range(len(ps)))
            ax.set_yticklabels([f"{p['dataset'][:6]} {p['model']} {p['arm']} ({p['pairs']})" for p in ps]
                               if col == 0 else [], fontsize=7)
            ax.set_ylim(len(ps) - 0.5, -0.5)
            ax.set_title(f"{name}: arm minus {b}", fontsize=9)
            ax.tick_params(axis="x", labelsize=7)
    fig.text(0.5, 0.005, "test-split difference per seed (grey dots), mean (diamond: red above 0, blue below) and "
             "Student-t 95% interval (thick orange where it excludes 0); (n) = paired seeds", ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


DISTRACTOR_ARMS = ("nil-fresh", "nil-gradient", "nil-balanced", "nil-replay", "nil-features")  # the distractor-aware arms the goal is held against


def goal(summary: list[dict], pairs: list[dict], arms: tuple[str, ...] = DISTRACTOR_ARMS) -> list[dict]:
    """The issue's goal per dataset and distractor arm with ResNet-18: the arm beats ce-matched in mean
    test balanced accuracy and AUC, wins on most seeds, both beat the published ResNet-18 (28) rows
    (accuracy and AUC), and - what a user of `nil train` needs - the arm beats plain ce in mean balanced
    accuracy and AUC. An arm with no runs at all is left out; one without paired ResNet-18 runs is
    reported as not measured."""
    out = []
    present = {e["arm"] for e in summary}
    for arm in (a for a in arms if a in present):
        for dataset in DATASETS:
            out.append(_goal_one(summary, pairs, arm, dataset))
    return out


def _goal_one(summary: list[dict], pairs: list[dict], arm: str, dataset: str) -> dict:
    def pair(baseline):
        return next((p for p in pairs if p["dataset"] == dataset and p["model"] == "resnet18" and p["arm"] == arm
                     and p["baseline"] == baseline), None)

    p, vs_ce = pair("ce-matched"), pair("ce")
    s = {e["arm"]: e for e in summary if e["dataset"] == dataset and e["model"] == "resnet18"}
    if p is None or vs_ce is None or arm not in s or "ce-matched" not in s:
        return {"dataset": dataset, "arm": arm, "met": None, "why": "no paired ResNet-18 runs yet"}
    pub = PUBLISHED[dataset]
    checks = {
        "beats ce-matched in mean balanced accuracy": p["balanced_accuracy"] > 0,
        "beats ce-matched in mean AUC": p["auc"] > 0,
        "wins most seeds (balanced accuracy)": p["balanced_accuracy_wins"] > p["pairs"] / 2,
        "wins most seeds (AUC)": p["auc_wins"] > p["pairs"] / 2,
        f"{arm} beats published accuracy and AUC": s[arm]["accuracy"] > pub["accuracy"] and s[arm]["auc"] > pub["auc"],
        "ce-matched beats published accuracy and AUC": (s["ce-matched"]["accuracy"] > pub["accuracy"]
                                                       and s["ce-matched"]["auc"] > pub["auc"]),
        "beats ce in mean balanced accuracy and AUC": vs_ce["balanced_accuracy"] > 0 and vs_ce["auc"] > 0,
    }
    return {"dataset": dataset, "arm": arm, "pairs": p["pairs"], "checks": checks, "met": all(checks.values())}


def write_report(study: Study, command: str = "") -> dict:
    rows = [r for r in load_rows(study).values() if r["stage"] == "final" and r["seed"] in study.seeds
            and r["dataset"] in study.datasets and r["model"] in study.models and r["arm"] in study.arms]
    choices = json.loads(study.choice_file.read_text()) if study.choice_file.exists() else {}
    summary = summarise(rows)
    pairs = paired(rows, "ce") + paired(rows, "ce-matched")
    result = envelope(command, commit=_commit(), settings=asdict(study)) | {
              "choices": choices, "rows": rows, "summary": summary, "paired": pairs,
              "goal": goal(summary, pairs), "planned_runs": len(study.models) * len(study.seeds)
              * len(study.datasets) * len(study.arms), "finished_runs": len(rows)}
    out = Path(study.out)
    write_result(out, result, study_markdown(result), **({".png": study_plot_png(result)} if pairs else {}))
    return result


def _cell(m, sd) -> str:
    return "-" if m is None else f"{m:.3f} ± {sd:.3f}"


def _diff(p: dict, k: str) -> str:
    if p[k] is None:
        return "-"
    lo, hi = p[f"{k}_ci95"]
    ci = f" [{lo:+.3f}, {hi:+.3f}]" if lo is not None else ""
    return f"{p[k]:+.3f}{ci} ({p[f'{k}_wins']}/{p['pairs']})"


def study_markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        *markdown_head("Study: distractor-aware training against a fair, converged baseline", result),
        f"Finished {result['finished_runs']} of {result['planned_runs']} planned final runs (the study is "
        f"resumable: rerunning the command continues it). Commit {result['commit']}; machine "
        f"{result['machine']['cpu']}, {result['machine']['cores']} cores; torch threads per run: "
        f"{', '.join(str(t) for t in sorted({r['threads'] for r in result.get('rows', []) if r.get('threads')})) or '-'} "
        "(a run may have shared the cores with another, so train s/run compares arms only roughly).",
        "",
        f"Recipe for every arm: official MedMNIST splits at 28x28, epochs {s['epochs']}, batch {s['batch_size']}, "
        f"AdamW, {s['schedule']} schedule (x0.1 at 50% and 75% of the steps), random flips, {s['precision']}; "
        f"best.pt chosen by validation {s['select_metric']} (both sets are imbalanced: accuracy rewards the "
        "majority class); the test split read once per run. Seeds " + ", ".join(map(str, s["seeds"])) + ".",
        "",
        "## Tuning (validation only, decided before any final run)",
        "",
        f"Each arm: a grid of {len(settings_of('ce'))} settings of its own knobs on models {s['tune_models']}, "
        f"seed(s) {s['tune_seeds']}, both datasets, test never read; score = mean of validation balanced "
        "accuracy and AUC. Base values of knobs an arm does not tune: " + json.dumps({k: s[k] for k in (
            "lr", "weight_decay", "lam", "margin", "warmup_epochs")}) + ".",
        "",
    ]
    rows = []
    for arm, c in result["choices"].items():
        for t in c["table"]:
            chosen = "**chosen**" if t["params"] == c["params"] else ""
            rows.append([arm, json.dumps(t["params"])] + [
                "-" if t.get(f"{d}_{k}") is None else f"{t[f'{d}_{k}']:.3f}"
                for d in s["datasets"] for k in ("balanced_accuracy", "auc")] + [f"{t['score']:.3f}", chosen])
    headers = ["arm", "setting"] + [f"{d[:6]} val {k}" for d in s["datasets"] for k in ("bal. acc.", "AUC")]
    lines += [markdown_table(headers + ["score", ""], rows), ""]
    for dataset in s["datasets"]:
        es = [e for e in result["summary"] if e["dataset"] == dataset]
        if not es:
            continue
        lines += [f"## {dataset}: test, mean ± sd over seeds", ""]
        headers = ["model", "arm", "seeds", "balanced acc.", "macro-F1", "AUC", "accuracy"]
        if dataset == "retinamnist":
            headers.append("QWK")
        headers += ["recall per class", "aux. loss, last epoch", "train s/run"]
        table = []
        for e in sorted(es, key=lambda e: (e["model"], list(ARMS).index(e["arm"]) if e["arm"] in ARMS else 9)):
            row = [e["model"], e["arm"], len(e["seeds"])] + [_cell(e[k], e[f"{k}_sd"]) for k in (
                "balanced_accuracy", "macro_f1", "auc", "accuracy")]
            if dataset == "retinamnist":
                row.append(_cell(e["qwk"], e["qwk_sd"]))
            row += [" / ".join(f"{v:.2f}" for v in e["recall_per_class"]) if e["recall_per_class"] else "-",
                    "-" if e["arm"] == "ce" or e.get("distractor_term") is None else f"{e['distractor_term']:.4f}",
                    f"{e['train_s']:.0f}"]
            table.append(row)
        pub = PUBLISHED[dataset]
        table.append(["ResNet-18 (28), published", "MedMNIST v2", "-", "-", "-", f"{pub['auc']:.3f}",
                      f"{pub['accuracy']:.3f}"] + (["-"] if dataset == "retinamnist" else []) + ["-", "-", "-"])
        chance = 1 / len(es[0]["recall_per_class"] or [1, 1])
        table.append(["always the majority class", "-", "-", f"{chance:.3f}", "-", "0.500",
                      f"{MAJORITY[dataset]:.3f}"] + (["-"] if dataset == "retinamnist" else []) + ["-", "-", "-"])
        lines += [markdown_table(headers, table), ""]
    if any(e.get("distractor_term") is not None and e["arm"] != "ce" for e in result["summary"]):
        lines += ["Aux. loss, last epoch: the mean over the last epoch's training batches of the term an arm adds "
                  "to cross-entropy, before its weight lambda: the distance term for the nil arms, the replayed "
                  "images' cross-entropy for ce-matched. A distance term near 0 means the margin was already met "
                  "for almost every sample: the arm then trained as plain cross-entropy did.", ""]
    if result["paired"]:
        lines += ["## Paired differences (same seed): arm minus baseline", "",
                  "Mean difference, Student-t 95% interval over seeds, and (wins / pairs); every seed's "
                  f"difference is plotted in {Path(result['settings']['out']).with_suffix('.png').name}.", ""]
        table = [[p["dataset"], p["model"], p["arm"], p["baseline"]]
                 + [_diff(p, k) for k in ("balanced_accuracy", "auc", "macro_f1", "accuracy")]
                 for p in result["paired"]]
        lines += [markdown_table(["dataset", "model", "arm", "baseline", "Δ balanced acc.", "Δ AUC", "Δ macro-F1",
                                  "Δ accuracy"], table), ""]
    lines += ["## Goal", "",
              "On both datasets with ResNet-18, for each distractor-aware arm: it beats ce-matched in mean test "
              "balanced accuracy and AUC, wins on most seeds, both beat the published ResNet-18 (28) rows, and it "
              "beats plain ce in mean balanced accuracy and AUC.", ""]
    for g in result["goal"]:
        name = f"{g['dataset']}, {g['arm']}" if "arm" in g else g["dataset"]
        if g["met"] is None:
            lines.append(f"- {name}: not measured yet ({g['why']}).")
        else:
            held = [k for k, ok in g["checks"].items() if ok]
            failed = [k for k, ok in g["checks"].items() if not ok]
            verdict = "**met**" if g["met"] else "**not met**; fails: " + "; ".join(failed)
            lines.append(f"- {name} ({g['pairs']} paired seeds): {verdict}"
                         + (f". Holds: {'; '.join(held)}" if held else "") + ".")
    lines.append("")
    return "\n".join(lines)
