"""``nil bench accuracy``: does distractor-aware training help on real medical data?

Trains every arm on the official MedMNIST splits with the same schedule, augmentation and seeds,
selects the model on the validation split, touches the test split once per run, and reports mean
and standard deviation per (dataset, model, arm) beside the published MedMNIST v2 figures.
"""

from __future__ import annotations

import itertools
import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.report import envelope, group_runs, markdown_head, markdown_table, mean_sd as _mean_std, write_result
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
    "nil-faiss": dict(loss="nil", ann="faiss", audit_every=10),  # recall@1 against exact, recorded per epoch
    "nil-triplet": dict(loss="nil", ann="exact", variant="triplet"),
    "nil-gradient": dict(loss="nil", distractor="gradient"),
    # not in the default set: the stored-vector arms above collapse the embeddings (see accuracy.md)
    "nil-fresh": dict(loss="nil", ann="exact", fresh_distractors=True),
}
DEFAULT_ARMS = ["ce", "nil-exact", "nil-faiss", "nil-triplet", "nil-gradient"]
REPORTED = ("accuracy", "balanced_accuracy", "macro_f1", "auc", "qwk")


# Tuning grid of the distractor term, searched on the validation split only (``--tune``).
TUNE_GRID = {"lam": [0.3, 1.0, 3.0], "margin": [0.5, 1.0], "warmup_epochs": [0, 2]}


def parse_grid(text: str) -> dict[str, list[float]]:
    """``"lam=0.3,1 margin=0.5,1 warmup_epochs=1"`` -> ``{"lam": [0.3, 1.0], ...}``; unknown names refused."""
    grid = {}
    for part in text.split():
        name, _, values = part.partition("=")
        if name not in TUNE_GRID or not values:
            raise ValueError(f"grid entries are NAME=V1,V2 with NAME one of {list(TUNE_GRID)}; got {part!r}")
        cast = int if name == "warmup_epochs" else float
        grid[name] = [cast(v) for v in values.split(",")]
    return grid


@dataclass
class AccuracyBench:
    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    models: list[str] = field(default_factory=lambda: ["small_cnn", "resnet18"])
    arms: list[str] = field(default_factory=lambda: list(DEFAULT_ARMS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # epochs per model: one schedule for every arm of a model; ResNet-18 at 28x28 costs ~15x the small CNN
    epochs: dict[str, int] = field(default_factory=lambda: {"small_cnn": 15, "resnet18": 6})
    precision: str = "bf16"  # bf16 autocast halves ResNet-18 steps on AMX CPUs (see nil.predict.autocast)
    batch_size: int = 64
    lr: float = 2e-3
    # distractor weight, margin and warm-up shared by every nil arm: chosen on the validation split
    # (results/accuracy-tuning-stage1.md: lambda x margin; -stage2.md: warm-up at the chosen pair)
    lam: float = 1.0
    margin: float = 1.0
    warmup_epochs: int = 0
    ann_index: str = "auto"  # kind of the nil-faiss arm: the engine's default
    workdir: str = "runs/bench-accuracy"
    out: str = "benchmarks/results/accuracy.json"
    device: str = "auto"
    data_dir: str | None = None  # folder with retinamnist.npz and breastmnist.npz [default: ../shared/data]


def model_epochs(bench: AccuracyBench, model: str) -> int:
    if model not in bench.epochs:
        raise ValueError(f"no epoch count for model {model!r}: give --epochs {model}=N")
    return bench.epochs[model]


def arm_config(bench: AccuracyBench, dataset: str, model: str, arm: str, seed: int, out: Path,
               **overrides) -> TrainConfig:
    data_dir = Path(bench.data_dir) if bench.data_dir else SHARED
    settings = dict(lam=bench.lam, margin=bench.margin, warmup_epochs=bench.warmup_epochs) | overrides
    return TrainConfig(data=str(data_dir / f"{dataset}.npz"), out=str(out), model=model,
                       epochs=model_epochs(bench, model), batch_size=bench.batch_size, lr=bench.lr,
                       ann_index=bench.ann_index, seed=seed, device=bench.device, precision=bench.precision,
                       progress=False, **settings, **ARMS[arm])


def _check(bench: AccuracyBench) -> None:
    unknown = [a for a in bench.arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}: choose from {list(ARMS)}")
    for model in bench.models:
        model_epochs(bench, model)


def _metrics(d: dict | None) -> dict | None:
    return None if d is None else {k: d[k] for k in REPORTED}


def run_accuracy_bench(bench: AccuracyBench, command: str = "") -> dict:
    """Train every (dataset, model, arm, seed); write accuracy.json and accuracy.md; return the result."""
    _check(bench)
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
                                 "test": _metrics(result["test"]), "val": _metrics(result["val"]),
                                 "best_epoch": result["best_epoch"], "epochs": result["epochs"],
                                 "train_s": round(result["train_s"], 1), "run_dir": str(run_dir),
                                 "diagnostics": run_diagnostics(run_dir, result)})
    result = envelope(command, settings=vars(bench).copy()) | {
              "total_s": round(time.perf_counter() - started, 1), "rows": rows, "summary": summarise(rows),
              "paired": paired_differences(rows)}
    out = Path(bench.out)
    write_result(out, result, accuracy_markdown(result))
    return result


def run_tuning(bench: AccuracyBench, grid: dict[str, list] | None = None, arm: str = "nil-exact",
               command: str = "", reference: bool = True, tag: str = "tuning") -> dict:
    """Search lambda, margin and warm-up for ``arm`` on the validation split only; CE runs beside as reference.

    Every run is trained with ``evaluate_test=False``: the test split is never read while tuning.
    The chosen setting maximises the mean of validation accuracy and AUC over datasets, models and
    seeds; settings the grid leaves out keep the bench's values. Writes ``<out>-<tag>.json`` and
    ``.md`` beside ``bench.out``; ``reference`` adds CE runs for comparison.
    """
    grid = grid or TUNE_GRID
    _check(bench)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    settings = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    candidates = ([("ce", {})] if reference else []) + [(arm, s) for s in settings]
    rows = []
    started = time.perf_counter()
    for i, (arm_name, setting) in enumerate(candidates):
        for dataset in bench.datasets:
            for model in bench.models:
                for seed in bench.seeds:
                    run_dir = Path(bench.workdir) / f"tune-{stamp}" / f"{i:02d}-{arm_name}" / dataset / model / f"seed{seed}"
                    cfg = arm_config(bench, dataset, model, arm_name, seed, run_dir, **setting)
                    cfg.evaluate_test = False
                    result = train(cfg)
                    rows.append({"arm": arm_name, "setting": setting, "dataset": dataset, "model": model,
                                 "seed": seed, "val": _metrics(result["val"]), "best_epoch": result["best_epoch"]})
    table = _tuning_table(rows)
    best = max((t for t in table if t["arm"] != "ce"), key=lambda t: t["score"])
    result = envelope(command, settings=vars(bench).copy()) | {"grid": grid,
              "arm": arm,
              "total_s": round(time.perf_counter() - started, 1), "rows": rows, "table": table,
              "chosen": best["setting"]}
    out = Path(bench.out)
    json_path = out.with_name(f"{out.stem}-{tag}.json")
    write_result(json_path, result, tuning_markdown(result))
    return result


def _tuning_table(rows: list[dict]) -> list[dict]:
    """Per (arm, setting): mean validation metrics per dataset and the selection score."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(json.dumps([r["arm"], r["setting"]], sort_keys=True), []).append(r)
    table = []
    for key, rs in groups.items():
        arm, setting = json.loads(key)
        entry = {"arm": arm, "setting": setting, "runs": len(rs)}
        for dataset in dict.fromkeys(r["dataset"] for r in rs):
            for k in ("accuracy", "auc"):
                entry[f"{dataset}_{k}"] = _mean_std([r["val"][k] for r in rs if r["dataset"] == dataset])[0]
        entry["score"] = statistics.fmean(
            statistics.fmean([r["val"]["accuracy"], r["val"]["auc"] if r["val"]["auc"] is not None else 0.0])
            for r in rs)
        table.append(entry)
    return sorted(table, key=lambda t: -t["score"])


def tuning_markdown(result: dict) -> str:
    s = result["settings"]
    datasets = list(dict.fromkeys(r["dataset"] for r in result["rows"]))
    headers = ["arm", "lambda", "margin", "warm-up"] + [f"{d} val {k}" for d in datasets for k in ("acc.", "AUC")]
    headers.append("score")
    rows = []
    for t in result["table"]:
        st = t["setting"]
        rows.append([t["arm"], st.get("lam", s["lam"]), st.get("margin", s["margin"]),
                     st.get("warmup_epochs", s["warmup_epochs"])]
                    + [f"{t[f'{d}_{k}']:.3f}" for d in datasets for k in ("accuracy", "auc")] + [f"{t['score']:.3f}"])
    return "\n".join([
        *markdown_head("Tuning the distractor term on the validation split", result),
        f"Models {s['models']}, seeds {s['seeds']}, epochs {s['epochs']}, batch {s['batch_size']}, lr {s['lr']}, "
        f"precision {s['precision']}. The test split was never read (evaluate_test=False). Score: mean of "
        f"validation accuracy and AUC over datasets, models and seeds. {len(result['rows'])} runs in "
        f"{result['total_s'] / 60:.1f} min on {result['machine']['cpu']} ({result['machine']['cores']} cores).",
        "",
        markdown_table(headers, rows),
        "",
        f"Chosen: {result['chosen']}",
        "",
    ])


def run_diagnostics(run_dir: Path, result: dict) -> dict:
    """What a run says about why the distractor term did or did not help, read from its own files.

    ``distractor_term``: the training distractor loss of the last epoch, mean of
    max(0, margin - d)^2, i.e. how far inside the margin the nearest other-class samples still sit;
    ``audit_recall_at_1``: the approximate search's recall against exact over the run (nil-faiss);
    ``test_recall_per_class``: the diagonal of the test confusion matrix over its row sums.
    """
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    audits = [line["mining"]["audit_recall_at_1"] for line in lines
              if "audit_recall_at_1" in line.get("mining", {})]
    confusion = (result["test"] or {}).get("confusion_matrix")
    per_class = None
    if confusion:
        per_class = [row[i] / max(sum(row), 1) for i, row in enumerate(confusion)]
    return {"distractor_term": lines[-1]["train"]["loss_distractor"],
            "audit_recall_at_1": statistics.fmean(audits) if audits else None,
            "test_recall_per_class": per_class}


def paired_differences(rows: list[dict]) -> list[dict]:
    """Per (dataset, model, arm): the mean and std over seeds of (arm - ce) on the same seed.

    Pairing by seed removes what the seeds share (initialisation, batch order, augmentation), so
    these are the fairest small-sample comparison the benchmark allows.
    """
    ce = {(r["dataset"], r["model"], r["seed"]): r for r in rows if r["arm"] == "ce"}
    groups: dict[tuple, list[tuple[dict, dict]]] = {}
    for r in rows:
        base = ce.get((r["dataset"], r["model"], r["seed"]))
        if r["arm"] != "ce" and base is not None:
            groups.setdefault((r["dataset"], r["model"], r["arm"]), []).append((r, base))
    out = []
    for (dataset, model, arm), pairs in groups.items():
        entry = {"dataset": dataset, "model": model, "arm": arm, "pairs": len(pairs)}
        for k in ("accuracy", "auc", "balanced_accuracy", "qwk"):
            diffs = [r["test"][k] - b["test"][k] for r, b in pairs
                     if r["test"][k] is not None and b["test"][k] is not None]
            entry[k], entry[f"{k}_std"] = _mean_std(diffs)
            entry[f"{k}_wins"] = sum(d > 0 for d in diffs)
        out.append(entry)
    return out


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation of each test metric per (dataset, model, arm)."""
    out = []
    for (dataset, model, arm), rs in group_runs(rows).items():
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
        *markdown_head("Accuracy: CE versus distractor-aware training on real medical data", result),
        f"Official MedMNIST splits at 28x28; epochs {s['epochs']}, batch {s['batch_size']}, AdamW lr {s['lr']} "
        f"with cosine decay, random flips, {s['precision']} autocast; model selection on validation accuracy; "
        f"test split used once per run. "
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
    lines += _diagnostics_markdown(result)
    return "\n".join(lines)


def _signed(mean, std) -> str:
    return "-" if mean is None else f"{mean:+.3f} ± {std:.3f}"


def _diagnostics_markdown(result: dict) -> list[str]:
    if not result.get("paired"):
        return []
    lines = ["## Paired with CE (same seed): arm minus ce", "",
             "Wins: seeds on which the arm scored higher than CE.", ""]
    table = [[p["dataset"], p["model"], p["arm"]]
             + [f"{_signed(p[k], p[f'{k}_std'])} ({p[f'{k}_wins']}/{p['pairs']})" for k in ("accuracy", "auc")]
             for p in result["paired"]]
    lines += [markdown_table(["dataset", "model", "arm", "Δ accuracy (wins)", "Δ AUC (wins)"], table), ""]
    groups: dict[tuple, list[dict]] = {}
    for r in result["rows"]:
        if r.get("diagnostics"):
            groups.setdefault((r["dataset"], r["model"], r["arm"]), []).append(r["diagnostics"])
    table = []
    for (dataset, model, arm), ds in groups.items():
        term = statistics.fmean(d["distractor_term"] for d in ds)
        audits = [d["audit_recall_at_1"] for d in ds if d["audit_recall_at_1"] is not None]
        recalls = [d["test_recall_per_class"] for d in ds if d["test_recall_per_class"]]
        per_class = " / ".join(f"{statistics.fmean(c):.2f}" for c in zip(*recalls)) if recalls else "-"
        table.append([dataset, model, arm, f"{term:.3f}" if arm != "ce" else "-",
                      f"{statistics.fmean(audits):.3f}" if audits else "-", per_class])
    lines += ["## Diagnostics", "",
              "Distractor term: last-epoch training mean of max(0, margin - d)^2 (0 when every nearest "
              "other-class sample is at least the margin away). Audit: recall@1 of the FAISS search against "
              "exact during training. Per-class recall: test recall of each class, mean over seeds.", "",
              markdown_table(["dataset", "model", "arm", "distractor term", "audit recall@1",
                              "test recall per class"], table), ""]
    return lines
