"""``nil bench accuracy``: does distractor-aware training help on real medical data?

Trains every arm on the official MedMNIST splits with the same schedule, augmentation and seeds,
selects the model on the validation split, touches the test split once per run, and reports mean
and standard deviation per (dataset, model, arm) beside the published MedMNIST v2 figures.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.machine import machine_info
from benchmarks.report import markdown_table, to_json, write_files
from nil.config import TrainConfig
from nil.train import train

LOG = logging.getLogger(__name__)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = {"retinamnist": SHARED / "retinamnist.npz", "breastmnist": SHARED / "breastmnist.npz"}
# MedMNIST v2 (Yang et al., Scientific Data 10:41, 2023), ResNet-18 (28), official test splits
PUBLISHED = {"retinamnist": {"accuracy": 0.524, "auc": 0.717}, "breastmnist": {"accuracy": 0.863, "auc": 0.901}}
ARMS = {
    "ce": dict(loss="ce", ann="none"),
    "nil-exact": dict(loss="nil", ann="exact"),
    "nil-faiss": dict(loss="nil", ann="faiss"),
    "nil-triplet": dict(loss="nil", ann="exact", variant="triplet"),
    "nil-gradient": dict(loss="nil", distractor="gradient"),
}
REPORTED = ("accuracy", "balanced_accuracy", "macro_f1", "auc", "qwk")


@dataclass
class AccuracyBench:
    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    models: list[str] = field(default_factory=lambda: ["small_cnn", "resnet18"])
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    lam: float = 0.5  # distractor weight, margin and warm-up shared by every nil arm (tuned on val)
    margin: float = 0.5
    warmup_epochs: int = 1
    ann_index: str = "auto"  # kind of the nil-faiss arm: the engine's default
    workdir: str = "runs/bench-accuracy"
    out: str = "benchmarks/results/accuracy.json"
    device: str = "auto"
    data_dir: str | None = None  # folder with retinamnist.npz and breastmnist.npz [default: ../shared/data]


def arm_config(bench: AccuracyBench, dataset: str, model: str, arm: str, seed: int, out: Path) -> TrainConfig:
    data_dir = Path(bench.data_dir) if bench.data_dir else SHARED
    return TrainConfig(data=str(data_dir / f"{dataset}.npz"), out=str(out), model=model, epochs=bench.epochs,
                       batch_size=bench.batch_size, lr=bench.lr, lam=bench.lam, margin=bench.margin,
                       warmup_epochs=bench.warmup_epochs, ann_index=bench.ann_index, seed=seed,
                       device=bench.device, progress=False, **ARMS[arm])


def run_accuracy_bench(bench: AccuracyBench, command: str = "") -> dict:
    """Train every (dataset, model, arm, seed); write accuracy.json and accuracy.md; return the result."""
    unknown = [a for a in bench.arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}: choose from {list(ARMS)}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    started = time.perf_counter()
    for dataset in bench.datasets:
        for model in bench.models:
            for arm in bench.arms:
                for seed in bench.seeds:
                    run_dir = Path(bench.workdir) / stamp / dataset / model / arm / f"seed{seed}"
                    LOG.info("training %s %s %s seed %d", dataset, model, arm, seed)
                    result = train(arm_config(bench, dataset, model, arm, seed, run_dir))
                    rows.append({"dataset": dataset, "arm": arm, "model": model, "seed": seed,
                                 "test": {k: result["test"][k] for k in REPORTED},
                                 "val": {k: result["val"][k] for k in REPORTED},
                                 "best_epoch": result["best_epoch"], "epochs": bench.epochs,
                                 "train_s": round(result["train_s"], 1), "run_dir": str(run_dir)})
    result = {"command": command, "machine": machine_info(), "settings": vars(bench).copy(),
              "total_s": round(time.perf_counter() - started, 1), "rows": rows, "summary": summarise(rows)}
    out = Path(bench.out)
    write_files({out: to_json(result), out.with_suffix(".md"): accuracy_markdown(result)})
    return result


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation of each test metric per (dataset, model, arm)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["model"], r["arm"]), []).append(r)
    out = []
    for (dataset, model, arm), rs in groups.items():
        entry = {"dataset": dataset, "model": model, "arm": arm, "seeds": len(rs)}
        for k in REPORTED:
            entry[k], entry[f"{k}_std"] = _mean_std([r["test"][k] for r in rs])
        out.append(entry)
    return out


def _cell(mean, std) -> str:
    return "-" if mean is None else f"{mean:.3f} ± {std:.3f}"


def accuracy_markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# Accuracy: CE versus distractor-aware training on real medical data",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Official MedMNIST splits at 28x28; {s['epochs']} epochs, batch {s['batch_size']}, AdamW lr {s['lr']} "
        f"with cosine decay, random flips; model selection on validation accuracy; test split used once per run. "
        f"nil arms: lambda {s['lam']}, margin {s['margin']}, warm-up {s['warmup_epochs']} epoch(s). "
        f"Seeds {s['seeds']}. Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; "
        f"total {result['total_s'] / 60:.1f} min.",
        "",
    ]
    for dataset in dict.fromkeys(r["dataset"] for r in result["summary"]):
        lines += [f"## {dataset}", ""]
        headers = ["model", "arm", "accuracy", "balanced acc.", "macro-F1", "AUC"]
        if dataset == "retinamnist":
            headers.append("QWK")
        table = []
        for e in (e for e in result["summary"] if e["dataset"] == dataset):
            row = [e["model"], e["arm"]] + [_cell(e[k], e[f"{k}_std"]) for k in ("accuracy", "balanced_accuracy",
                                                                                  "macro_f1", "auc")]
            if dataset == "retinamnist":
                row.append(_cell(e["qwk"], e["qwk_std"]))
            table.append(row)
        pub = PUBLISHED.get(dataset)
        if pub:
            row = ["ResNet-18 (28), published", "MedMNIST v2", f"{pub['accuracy']:.3f}", "-", "-", f"{pub['auc']:.3f}"]
            table.append(row + (["-"] if dataset == "retinamnist" else []))
        lines += [markdown_table(headers, table), ""]
    return "\n".join(lines)
