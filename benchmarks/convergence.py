"""``nil bench convergence``: can the study's CE baseline reach the published MedMNIST v2 accuracy?

Issue 13 asks that the ``ce`` arm with ResNet-18 reach the published MedMNIST v2 ResNet-18 (28)
test accuracy within 0.015. The study's arms keep best.pt by validation *balanced accuracy* (both
sets are imbalanced), which trades majority-class accuracy for minority recall, so its ``ce`` rows
cannot say whether the recipe trains far enough. This check trains ``ce`` runs (the study's
recipe, epochs and frozen tuning choice, the same seeds' batch order) keeping best.pt by
validation AUC, as the MedMNIST v2 baselines select, in two stages:

1. ``tune``: a small recipe grid (:data:`RECIPE_GRID`: batch size x weight decay; the published
   protocol trains Adam at batch 128 without weight decay, the study AdamW at 64 with 1e-3) on
   the tuning seed, validation only, the test split never read. The recipe with the highest mean
   over datasets of validation (accuracy + AUC) / 2 - the two figures the published table reports
   - is frozen in ``convergence-choice.json`` once every grid run exists, and never changed after.
2. ``final``: the frozen recipe on the final seeds, the test split read once per run.

It is a check of the baseline's training, not an arm: it reads no arm's figures and changes no
choice of the study. Runs are written as they finish (``convergence-runs.jsonl``, never the
study's runs) and a rerun skips them.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.report import (close_envelope, envelope, machine_lines, markdown_head, markdown_table, write_files,
                               write_result)
from benchmarks.study import PUBLISHED, Study, _commit, _train_one, load_rows, machine_info
from benchmarks.study import summarise as study_summarise

TOLERANCE = 0.015  # issue 13: ce within 0.015 of the published test accuracy
METRICS = ("accuracy", "auc", "balanced_accuracy")
# The recipe knobs the tune stage explores, each setting on every dataset; the first is the study's own.
RECIPE_GRID = {"batch_size": [64, 128], "weight_decay": [1e-3, 0.0]}
RECIPE_RULE = "max mean over datasets of validation (accuracy + AUC) / 2, best.pt by validation AUC"
STUDY_BATCH = Study.batch_size  # the batch of runs written before rows recorded theirs


@dataclass
class _CheckStudy(Study):
    """The study's recipe, writing its runs beside this check's report, never into study-runs.jsonl."""

    @property
    def runs_file(self) -> Path:
        return Path(self.out).with_name(Path(self.out).stem + "-runs.jsonl")

    @property
    def choice_file(self) -> Path:
        return Path(self.out).with_name(Path(self.out).stem + "-choice.json")


@dataclass
class Convergence:
    datasets: list[str] = field(default_factory=lambda: ["retinamnist", "breastmnist"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    tune_seeds: list[int] = field(default_factory=lambda: [100])  # the study's tuning seed, never a final one
    tune: bool = True  # False: the final runs use the study's recipe, no grid
    model: str = "resnet18"
    epochs: int = 30
    select_metric: str = "auc"
    study_out: str = "benchmarks/results/study.json"  # whose frozen ce choice and recipe are used
    out: str = "benchmarks/results/convergence.json"
    workdir: str = "runs/convergence"
    data_dir: str | None = None
    device: str = "cpu"

    def study(self, recipe: dict | None = None) -> _CheckStudy:
        """The study's recipe (``recipe``'s batch size) with this check's datasets, seeds, selection and files."""
        return _CheckStudy(datasets=list(self.datasets), models=[self.model], arms=["ce"], seeds=list(self.seeds),
                           tune_seeds=list(self.tune_seeds), epochs={self.model: self.epochs},
                           batch_size=(recipe or {}).get("batch_size", STUDY_BATCH),
                           select_metric=self.select_metric, device=self.device, workdir=self.workdir,
                           out=self.out, data_dir=self.data_dir)


def ce_choice(cfg: Convergence) -> dict:
    path = Study(out=cfg.study_out).choice_file
    if not path.exists():
        raise ValueError(f"no frozen study choice at {path}: run `nil bench study tune` first")
    choices = json.loads(path.read_text())
    if "ce" not in choices:
        raise ValueError(f"{path} has no frozen choice for ce: run `nil bench study tune --arms ce` first")
    return choices["ce"]["params"]


def recipes() -> list[dict]:
    return [dict(zip(RECIPE_GRID, values)) for values in itertools.product(*RECIPE_GRID.values())]


def study_recipe(params: dict) -> dict:
    """The recipe the study trains with: its batch size and ce's frozen weight decay."""
    return {"batch_size": STUDY_BATCH, "weight_decay": params["weight_decay"]}


def recipe_of(row: dict) -> dict:
    return {"batch_size": row.get("batch_size", STUDY_BATCH), "weight_decay": row["arm_params"]["weight_decay"]}


def _train(cfg: Convergence, stage: str, recipe: dict, seed: int, dataset: str, params: dict, done: dict,
           machine: dict, commit: str) -> dict | None:
    run_params = params | {k: v for k, v in recipe.items() if k != "batch_size"}
    return _train_one(cfg.study(recipe), stage, dataset, cfg.model, "ce", seed, run_params, done, machine, commit)


def recipe_table(cfg: Convergence, rows: list[dict]) -> list[dict]:
    """Per grid setting: mean validation accuracy and AUC per dataset over the tuning seeds, and the score."""
    table = []
    for recipe in recipes():
        rs = [r for r in rows if r["stage"] == "tune" and recipe_of(r) == recipe and r["seed"] in cfg.tune_seeds
              and r["dataset"] in cfg.datasets and r["model"] == cfg.model and r["epochs"] == cfg.epochs]
        entry = {"recipe": recipe, "runs": len(rs)}
        for d in cfg.datasets:
            for k in ("accuracy", "auc"):
                vals = [r["val"][k] for r in rs if r["dataset"] == d]
                entry[f"{d}_{k}"] = statistics.fmean(vals) if vals else None
        per_dataset = [(entry[f"{d}_accuracy"] + entry[f"{d}_auc"]) / 2 for d in cfg.datasets
                       if entry[f"{d}_accuracy"] is not None]
        entry["score"] = statistics.fmean(per_dataset) if len(per_dataset) == len(cfg.datasets) else None
        table.append(entry)
    return table


def freeze_recipe(cfg: Convergence, rows: list[dict]) -> dict | None:
    """The frozen recipe; frozen now if every grid run exists and none was frozen before."""
    path = cfg.study().choice_file
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            choice = json.loads(path.read_text())
            if choice["epochs"] != cfg.epochs or sorted(choice["datasets"]) != sorted(cfg.datasets):
                raise ValueError(f"{path} was frozen for {choice['epochs']} epochs on {choice['datasets']}: give this "
                                 "check its own --out")
            return choice
        table = recipe_table(cfg, rows)
        if any(t["runs"] < len(cfg.tune_seeds) * len(cfg.datasets) for t in table):
            return None
        best = max(table, key=lambda t: t["score"])
        choice = {"recipe": best["recipe"], "score": best["score"], "table": table, "rule": RECIPE_RULE,
                  "datasets": cfg.datasets, "tune_seeds": cfg.tune_seeds, "epochs": cfg.epochs,
                  "frozen_at": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": _commit()}
        write_files({path: json.dumps(choice, indent=1) + "\n"})
        return choice


def run_convergence(cfg: Convergence, command: str = "") -> dict:
    params = ce_choice(cfg)
    done, machine, commit = load_rows(cfg.study()), machine_info(), _commit()
    started = time.time()
    recipe = study_recipe(params)
    if cfg.tune:
        for setting in recipes():
            for seed in cfg.tune_seeds:
                for dataset in cfg.datasets:
                    if _train(cfg, "tune", setting, seed, dataset, params, done, machine, commit):
                        write_convergence(cfg, command, params, None, started)
        choice = freeze_recipe(cfg, list(done.values()))
        if choice is None:
            raise ValueError("the recipe grid is not complete (another process is training part of it?): "
                             "rerun when it ends")
        recipe = choice["recipe"]
    result = write_convergence(cfg, command, params, recipe, started)
    for seed in cfg.seeds:
        for dataset in cfg.datasets:
            if _train(cfg, "final", recipe, seed, dataset, params, done, machine, commit):
                result = write_convergence(cfg, command, params, recipe, started)
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


def write_convergence(cfg: Convergence, command: str, params: dict, recipe: dict | None, started: float) -> dict:
    rows = [r for r in load_rows(cfg.study()).values() if r["model"] == cfg.model and r["arm"] == "ce"
            and r["epochs"] == cfg.epochs and r["dataset"] in cfg.datasets]
    finals = [r for r in rows if r["stage"] == "final" and r["seed"] in cfg.seeds]
    chosen = [r for r in finals if recipe_of(r) == recipe]
    other_recipes = []  # final runs of a recipe not chosen (run before the grid existed) stay reported
    for r in finals:
        if recipe_of(r) != recipe and recipe_of(r) not in other_recipes:
            other_recipes.append(recipe_of(r))
    others = [{"recipe": o, "summary": summarise(cfg, [r for r in finals if recipe_of(r) == o])} for o in other_recipes]
    result = envelope(command, commit=_commit(), settings=asdict(cfg) | {"ce_params": params}) | {
        "recipe_grid": recipe_table(cfg, rows) if cfg.tune else [], "recipe_rule": RECIPE_RULE, "recipe": recipe,
        "rows": chosen, "summary": summarise(cfg, chosen) if recipe else [], "other_recipes": others,
        "planned_runs": len(cfg.datasets) * len(cfg.seeds), "finished_runs": len(chosen)}
    close_envelope(result, started)
    write_result(Path(cfg.out), result, convergence_markdown(result))
    return result


def _cell(e: dict, m: str) -> str:
    return "-" if e[m] is None else f"{e[m]:.3f} ± {e[f'{m}_sd']:.3f}"


def _recipe(recipe: dict) -> str:
    return f"batch {recipe['batch_size']}, weight decay {recipe['weight_decay']:g}"


def _final_table(summary: list[dict]) -> str:
    table = []
    for e in summary:
        pub = e["published"] or {}
        table.append([e["dataset"], str(len(e["seeds"])), _cell(e, "accuracy"), _cell(e, "auc"),
                      _cell(e, "balanced_accuracy"), ", ".join(str(b) for b in e["best_epochs"]) or "-",
                      f"{pub.get('accuracy', float('nan')):.3f} / {pub.get('auc', float('nan')):.3f}",
                      "-" if e["accuracy_gap"] is None else f"{e['accuracy_gap']:+.3f}",
                      "-" if e["study_ce"] is None else
                      "{accuracy:.3f} / {auc:.3f} / {balanced_accuracy:.3f} ({seeds} seeds)".format(**e["study_ce"])])
    return markdown_table(["dataset", "seeds", "test accuracy", "test AUC", "test balanced acc.", "best epochs",
                           "published acc. / AUC", "acc. - published",
                           "study's ce, by val. balanced acc.: acc. / AUC / bal. acc."], table)


def _grid_lines(result: dict) -> list[str]:
    s, grid = result["settings"], result["recipe_grid"]
    if not grid:
        return ["No recipe grid (`--no-tune`): the final runs use the study's recipe.", ""]
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    table = [[_recipe(t["recipe"]), str(t["runs"]), *(f(t[f"{d}_{k}"]) for d in s["datasets"] for k in ("accuracy", "auc")),
              f(t["score"]), "**chosen**" if t["recipe"] == result["recipe"] else ""] for t in grid]
    return ["## Recipe grid (validation only, the test split never read)", "",
            f"Seeds {s['tune_seeds']}; rule: {result['recipe_rule']}. The choice is frozen in "
            "`convergence-choice.json` the first time every grid run exists and is never changed after.", "",
            markdown_table(["recipe", "runs", *(f"{d} val. {k}" for d in s["datasets"] for k in ("acc.", "AUC")),
                            "score", ""], table), ""]


def convergence_markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        *markdown_head("Convergence of the study's CE baseline (ResNet-18)", result),
        *machine_lines(result), "",
        f"The study's `ce` recipe and frozen choice ({json.dumps(s['ce_params'])}), {s['model']}, {s['epochs']} epochs "
        "(AdamW, x0.1 at 50% and 75% of the steps, random flips); best.pt chosen by validation "
        f"{s['select_metric']}{' (as the MedMNIST v2 baselines select)' if s['select_metric'] == 'auc' else ''} "
        "instead of the study's balanced accuracy; the test split read once per final run. A check of the "
        "baseline's training only: no arm of the study is compared here.", "",
        *_grid_lines(result),
    ]
    if result["recipe"] is None:
        return "\n".join(lines + ["The recipe grid is not finished: no final runs yet."]) + "\n"
    lines += [f"## Final runs: {_recipe(result['recipe'])}", "",
              f"Finished {result['finished_runs']} of {result['planned_runs']} runs (resumable), seeds {s['seeds']}.", "",
              _final_table(result["summary"]), ""]
    for other in result["other_recipes"]:
        lines += [f"Final runs with {_recipe(other['recipe'])} (not the chosen recipe; kept, every run is reported):",
                  "", _final_table(other["summary"]), ""]
    lines += ["## Goal", ""]
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
