"""`nil bench convergence`: the study's ce recipe, best.pt by validation AUC, held against the published accuracy."""

from __future__ import annotations

import json
import shutil
import statistics

from click.testing import CliRunner

from benchmarks.convergence import TOLERANCE
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


def test_convergence_trains_the_frozen_ce_choice_selects_on_auc_and_states_the_verdict(tiny_npz, tmp_path):
    results, args = _setup(tiny_npz, tmp_path)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    rows = [json.loads(s) for s in (results / "convergence-runs.jsonl").read_text().splitlines()]
    assert sorted(r["seed"] for r in rows) == [0, 1, 2]
    assert all(r["selected_by"] == "val auc" and r["arm"] == "ce" and r["model"] == "resnet18" for r in rows)
    assert all(r["arm_params"]["lr"] == 3e-3 and r["epochs"] == 1 for r in rows)  # the frozen choice, the epochs given
    assert not (results / "study-runs.jsonl").exists()  # the study's own runs are never touched
    out = json.loads((results / "convergence.json").read_text())
    (s,) = out["summary"]
    acc = statistics.fmean(r["test"]["accuracy"] for r in rows)
    assert abs(s["accuracy"] - acc) < 1e-9
    assert abs(s["accuracy_gap"] - (acc - PUBLISHED["retinamnist"]["accuracy"])) < 1e-9
    assert s["met"] == (acc >= PUBLISHED["retinamnist"]["accuracy"] - TOLERANCE)
    md = (results / "convergence.md").read_text()
    assert ("**met**" if s["met"] else "**not met**") in md and f"{acc:.3f}" in md
    assert s["study_ce"]["accuracy"] == 0.4321 and "0.432 / 0.765 / 0.346 (2 seeds)" in md
    # resumable: a rerun trains nothing
    before = (results / "convergence-runs.jsonl").read_text()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert (results / "convergence-runs.jsonl").read_text() == before


def test_convergence_without_a_frozen_study_choice_is_one_clear_error(tiny_npz, tmp_path):
    results, args = _setup(tiny_npz, tmp_path)
    (results / "study-choice.json").unlink()
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0 and "no frozen study choice" in res.output
    assert not (results / "convergence-runs.jsonl").exists()


def test_fewer_than_three_runs_give_no_verdict(tiny_npz, tmp_path):
    results, args = _setup(tiny_npz, tmp_path)
    res = CliRunner().invoke(main, [*args[:5], "0", *args[6:]])
    assert res.exit_code == 0, res.output
    (s,) = json.loads((results / "convergence.json").read_text())["summary"]
    assert s["met"] is False and "1 of the 3 runs a verdict needs" in (results / "convergence.md").read_text()
