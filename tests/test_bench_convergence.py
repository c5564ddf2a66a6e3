"""`nil bench convergence`: the study's ce recipe, best.pt by validation AUC, held against the published accuracy."""

from __future__ import annotations

import json
import shutil
import statistics

from click.testing import CliRunner

from benchmarks.convergence import TOLERANCE, recipe_of, recipes
from benchmarks.study import PUBLISHED
from cli.main import main


def _setup(tiny_npz, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tiny_npz, data / "retinamnist.npz")
    results = tmp_path / "results"
    results.mkdir()
    (results / "study-choice.json").write_text(json.dumps({"ce": {"params": {"lr": 3e-3, "weight_decay": 1e-4}}}))
    (results / "study.json").write_text(json.dumps({"summary": [  # the study's own ce, for the table
        {"dataset": "retinamnist", "model": "resnet18", "arm": "ce", "seeds": [0, 1], "accuracy": 0.4321,
         "auc": 0.7654, "balanced_accuracy": 0.3456}]}))
    args = ["bench", "convergence", "--datasets", "retinamnist", "--seeds", "0,1,2", "--epochs", "1",
            "--data-dir", str(data), "--workdir", str(tmp_path / "runs"), "--study", str(results / "study.json"),
            "--out", str(results / "convergence.json")]
    return results, args


def _runs(results) -> list[dict]:
    return [json.loads(s) for s in (results / "convergence-runs.jsonl").read_text().splitlines()]


def test_convergence_chooses_a_recipe_on_validation_then_trains_it_and_states_the_verdict(tiny_npz, tmp_path):
    results, args = _setup(tiny_npz, tmp_path)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    rows = _runs(results)
    assert all(r["selected_by"] == "val auc" and r["arm"] == "ce" and r["model"] == "resnet18" for r in rows)
    assert all(r["arm_params"]["lr"] == 3e-3 and r["epochs"] == 1 for r in rows)  # the frozen choice, the epochs given
    # the grid: every recipe once on the tuning seed, validation only
    tune = [r for r in rows if r["stage"] == "tune"]
    assert sorted((recipe_of(r)["batch_size"], recipe_of(r)["weight_decay"]) for r in tune) == sorted(
        (g["batch_size"], g["weight_decay"]) for g in recipes())
    assert all(r["seed"] == 100 and r["test"] is None for r in tune)
    choice = json.loads((results / "convergence-choice.json").read_text())
    score = {json.dumps(recipe_of(r)): (r["val"]["accuracy"] + r["val"]["auc"]) / 2 for r in tune}
    assert json.dumps(choice["recipe"]) == max(score, key=score.get)  # the rule: validation (accuracy + AUC) / 2
    # the final runs: the chosen recipe on the final seeds, the test split read
    finals = [r for r in rows if r["stage"] == "final"]
    assert sorted(r["seed"] for r in finals) == [0, 1, 2]
    assert all(recipe_of(r) == choice["recipe"] and r["batch_size"] == choice["recipe"]["batch_size"]
               and r["test"] is not None for r in finals)
    assert not (results / "study-runs.jsonl").exists()  # the study's own runs are never touched
    out = json.loads((results / "convergence.json").read_text())
    assert out["recipe"] == choice["recipe"] and len(out["recipe_grid"]) == len(recipes())
    (s,) = out["summary"]
    acc = statistics.fmean(r["test"]["accuracy"] for r in finals)
    assert abs(s["accuracy"] - acc) < 1e-9
    assert abs(s["accuracy_gap"] - (acc - PUBLISHED["retinamnist"]["accuracy"])) < 1e-9
    assert s["met"] == (acc >= PUBLISHED["retinamnist"]["accuracy"] - TOLERANCE)
    md = (results / "convergence.md").read_text()
    assert ("**met**" if s["met"] else "**not met**") in md and f"{acc:.3f}" in md and "**chosen**" in md
    assert s["study_ce"]["accuracy"] == 0.4321 and "0.432 / 0.765 / 0.346 (2 seeds)" in md
    # resumable: a rerun trains nothing
    before = (results / "convergence-runs.jsonl").read_text()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert (results / "convergence-runs.jsonl").read_text() == before


def test_a_frozen_recipe_is_never_chosen_again_and_no_tune_trains_the_studys(tiny_npz, tmp_path):
    results, args = _setup(tiny_npz, tmp_path)
    assert CliRunner().invoke(main, args).exit_code == 0
    choice = json.loads((results / "convergence-choice.json").read_text())
    other = next(g for g in recipes() if g != choice["recipe"])
    (results / "convergence-choice.json").write_text(json.dumps(choice | {"recipe": other}))
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    finals = [r for r in _runs(results) if r["stage"] == "final"]
    assert sorted(r["seed"] for r in finals if recipe_of(r) == other) == [0, 1, 2]  # the frozen file rules
    out = json.loads((results / "convergence.json").read_text())
    assert out["recipe"] == other and [o["recipe"] for o in out["other_recipes"]] == [choice["recipe"]]
    assert "not the chosen recipe" in (results / "convergence.md").read_text()  # earlier finals stay reported
    res = CliRunner().invoke(main, [*args, "--no-tune", "--seeds", "0"])
    assert res.exit_code == 0, res.output
    (run,) = [r for r in _runs(results) if r["stage"] == "final" and recipe_of(r) == {"batch_size": 64,
                                                                                      "weight_decay": 1e-4}]
    assert run["seed"] == 0  # the study's batch and its ce weight decay


def test_the_grid_seeds_must_not_be_final_seeds(tiny_npz, tmp_path):
    results, args = _setup(tiny_npz, tmp_path)
    res = CliRunner().invoke(main, [*args, "--tune-seeds", "2"])
    assert res.exit_code != 0 and "must not be final seeds" in res.output
    assert not (results / "convergence-runs.jsonl").exists()


def test_convergence_without_a_frozen_study_choice_is_one_clear_error(tiny_npz, tmp_path):
    results, args = _setup(tiny_npz, tmp_path)
    (results / "study-choice.json").unlink()
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0 and "no frozen study choice" in res.output
    assert not (results / "convergence-runs.jsonl").exists()


def test_fewer_than_three_runs_give_no_verdict(tiny_npz, tmp_path):
    results, args = _setup(tiny_npz, tmp_path)
    res = CliRunner().invoke(main, [*args[:5], "0", *args[6:], "--no-tune"])
    assert res.exit_code == 0, res.output
    (s,) = json.loads((results / "convergence.json").read_text())["summary"]
    assert s["met"] is False and "1 of the 3 runs a verdict needs" in (results / "convergence.md").read_text()


def test_a_frozen_recipe_is_not_reused_for_other_epochs(tiny_npz, tmp_path):
    results, args = _setup(tiny_npz, tmp_path)
    (results / "convergence-choice.json").write_text(json.dumps(
        {"recipe": {"batch_size": 64, "weight_decay": 0.0}, "epochs": 30, "datasets": ["retinamnist"]}))
    res = CliRunner().invoke(main, args)  # --epochs 1
    assert res.exit_code != 0 and "frozen for 30 epochs" in res.output
    assert not any(json.loads(s)["stage"] == "final" for s in (results / "convergence-runs.jsonl").read_text().splitlines())
