"""``nil bench convergence``: is the study's CE baseline converged, or only selected differently?

Issue 13 asks that the ``ce`` arm with ResNet-18 reach the published MedMNIST v2 ResNet-18 (28)
test accuracy within 0.015. The study's arms keep best.pt by validation *balanced accuracy* (both
sets are imbalanced), which trades majority-class accuracy for minority recall, so its ``ce`` rows
cannot say whether the recipe trains far enough. This diagnostic trains the same ``ce`` runs - the
study's recipe, epochs and frozen tuning choice, the same seeds' batch order - and keeps best.pt by
validation AUC, as the MedMNIST v2 baselines select, then reads the test split once per run.

It is a check of the baseline's training, not an arm: it reads no arm's figures and changes no
choice of the study. Runs are written as they finish (``convergence-runs.jsonl``) and a rerun skips
them.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.report import close_envelope, envelope, machine_lines, markdown_head, markdown_table, write_result
from benchmarks.study import PUBLISHED, Study, _commit, _train_one, load_rows, machine_info
from benchmarks.study import summarise as study_summarise

TOLERANCE = 0.015  # issue 13: ce within 0.015 of the published test accuracy
METRICS = ("accuracy", "auc", "balanced_accuracy")


@dataclass
class _CheckStudy(Study):
    """The study's recipe, writing its runs beside this check's report, never into study-runs.jsonl."""

    @property
    def runs_file(self) -> Path:
        return Path(self.out).with_name(Path(self.out).stem + "-runs.jsonl")


@dataclass
class Convergence:
    datasets: list[str] = field(default_factory=lambda: ["retinamnist", "breastmnist"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    model: str = "resnet18"
    epochs: int = 30
    select_metric: str = "auc"
    study_out: str = "benchmarks/results/study.json"  # whose frozen ce choice and recipe are used
    out: str = "benchmarks/results/convergence.json"
    workdir: str = "runs/convergence"
    data_dir: str | None = None
    device: str = "cpu"

    def study(self) -> Study:
        """The study's recipe with this check's datasets, seeds, selection and files."""
        return _CheckStudy(datasets=list(self.datasets), models=[self.model], arms=["ce"], seeds=list(self.seeds),
                           epochs={self.model: self.epochs}, select_metric=self.select_metric, device=self.device,
                           workdir=self.workdir, out=self.out, data_dir=self.data_dir)


def ce_choice(cfg: Convergence) -> dict:
    path = Study(out=cfg.study_out).choice_file
    if not path.exists():
        raise ValueError(f"no frozen study choice at {path}: run `nil bench study tune` first")
    choices = json.loads(path.read_text())
    if "ce" not in choices:
        raise ValueError(f"{path} has no frozen choice for ce: run `nil bench study tune --arms ce` first")
    return choices["ce"]["params"]


def run_convergence(cfg: Convergence, command: str = "") -> dict:
    study, params = cfg.study(), ce_choice(cfg)
    done, machine, commit = load_rows(study), machine_info(), _commit()
    started = time.time()
    result = write_convergence(cfg, command, params, started)
    for seed in cfg.seeds:
        for dataset in cfg.datasets:
            if _train_one(study, "final", dataset, cfg.model, "ce", seed, params, done, machine, commit):
                result = write_convergence(cfg, command, params, started)
    return result


def _study_ce(cfg: Convergence) -> dict:
    """The study's own ce rows (best.pt by validation balanced accuracy), per dataset, for the table."""
    path = Path(cfg.study_out)
    if not path.exists():
        return {}
    return {e["dataset"]: e for e in json.loads(path.read_text()).get("summary", [])
            if e["arm"] == "ce" and e["model"] == cfg.model}


def summarise(cfg: Convergence, rows: list[dict]) -> list[dict]:
    """The study's per-dataset mean and sd of the test metrics, with the best epochs and the verdict."""
    by_dataset, study_ce = {e["dataset"]: e for e in study_summarise(rows)}, _study_ce(cfg)
    out = []
    for dataset in cfg.datasets:
        e = by_dataset.get(dataset) or {"dataset": dataset, "seeds": [],
                                         **{k: None for m in METRICS for k in (m, f"{m}_sd")}}
        pub = PUBLISHED.get(dataset)
        gap = None if e["accuracy"] is None or pub is None else e["accuracy"] - pub["accuracy"]
        ce = study_ce.get(dataset)
        out.append({**e, "published": pub, "accuracy_gap": gap,
                    "best_epochs": [r["best_epoch"] for r in sorted(rows, key=lambda r: r["seed"])
                                    if r["dataset"] == dataset],
                    "met": gap is not None and len(e["seeds"]) >= 3 and gap >= -TOLERANCE,
                    "study_ce": None if ce is None else {"seeds": len(ce["seeds"]), "accuracy": ce["accuracy"],
                                                         "auc": ce["auc"],
                                                         "balanced_accuracy": ce["balanced_accuracy"]}})
    return out


def write_convergence(cfg: Convergence, command: str, params: dict, started: float) -> dict:
    study = cfg.study()
    rows = [r for r in load_rows(study).values() if r["dataset"] in cfg.datasets and r["seed"] in cfg.seeds
            and r["model"] == cfg.model and r["arm"] == "ce"]
    summary = summarise(cfg, rows)
    result = envelope(command, commit=_commit(), settings=asdict(cfg) | {"ce_params": params}) | {
        "rows": rows, "summary": summary, "planned_runs": len(cfg.datasets) * len(cfg.seeds),
        "finished_runs": len(rows)}
    close_envelope(result, started)
    write_result(Path(cfg.out), result, convergence_markdown(result))
    return result


def _cell(e: dict, m: str) -> str:
    return "-" if e[m] is None else f"{e[m]:.3f} ± {e[f'{m}_sd']:.3f}"


def convergence_markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        *markdown_head("Convergence of the study's CE baseline (ResNet-18)", result),
        *machine_lines(result), "",
        f"Finished {result['finished_runs']} of {result['planned_runs']} runs (resumable). Commit "
        f"{result['commit']}.", "",
        f"The study's `ce` recipe and frozen choice ({json.dumps(s['ce_params'])}), {s['model']}, {s['epochs']} epochs, "
        f"seeds {s['seeds']}; best.pt chosen by validation {s['select_metric']}"
        f"{' (as the MedMNIST v2 baselines select)' if s['select_metric'] == 'auc' else ''} instead of the "
        "study's balanced accuracy; the test split read once per run. A check of the baseline's training only: "
        "no arm of the study is compared here.", "",
    ]
    table = []
    for e in result["summary"]:
        pub = e["published"] or {}
        table.append([e["dataset"], str(len(e["seeds"])), _cell(e, "accuracy"), _cell(e, "auc"),
                      _cell(e, "balanced_accuracy"), ", ".join(str(b) for b in e["best_epochs"]) or "-",
                      f"{pub.get('accuracy', float('nan')):.3f} / {pub.get('auc', float('nan')):.3f}",
                      "-" if e["accuracy_gap"] is None else f"{e['accuracy_gap']:+.3f}",
                      "-" if e["study_ce"] is None else
                      "{accuracy:.3f} / {auc:.3f} / {balanced_accuracy:.3f} ({seeds} seeds)".format(**e["study_ce"])])
    lines.append(markdown_table(["dataset", "seeds", "test accuracy", "test AUC", "test balanced acc.", "best epochs",
                                 "published acc. / AUC", "acc. - published",
                                 "study's ce, by val. balanced acc.: acc. / AUC / bal. acc."], table))
    lines += ["", "## Goal", ""]
    for e in result["summary"]:
        if e["accuracy"] is None or e["published"] is None:
            why = "no runs" if e["accuracy"] is None else "no published figure"
        elif len(e["seeds"]) < 3:
            why = f"{len(e['seeds'])} of the 3 runs a verdict needs"
        else:
            why = f"{e['accuracy']:.3f} against {e['published']['accuracy']:.3f}"
        lines.append(f"- {e['dataset']}: `ce` test accuracy within {TOLERANCE} of the published ResNet-18 (28): "
                     f"{'**met**' if e['met'] else '**not met**'} ({why}).")
    return "\n".join(lines) + "\n"
