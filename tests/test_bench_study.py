"""`nil bench study` on tiny data: tuning on validation only, a frozen choice, resumable final runs, paired figures."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict

import pytest
from click.testing import CliRunner

import benchmarks.study as study_module
from benchmarks.study import Study, goal, load_rows, paired, run_final, run_tuning, study_markdown
from cli.main import main


@pytest.fixture
def small_grid(monkeypatch):
    """Two settings per arm, so the test stays in seconds."""
    monkeypatch.setattr(study_module, "GRID", {
        "ce": {"lr": [1e-3, 3e-3]},
        "ce-matched": {"lr": [1e-3, 3e-3]},
        "nil-fresh": {"lam": [0.3, 1.0]},
        "nil-stored": {"lam": [0.3, 1.0]},
    })


@pytest.fixture
def study(tiny_npz, tmp_path, small_grid) -> Study:
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tiny_npz, data / "retinamnist.npz")
    return Study(datasets=["retinamnist"], models=["small_cnn"], arms=["ce", "ce-matched", "nil-fresh"],
                 seeds=[0, 1], tune_seeds=[100], tune_models=["small_cnn"], epochs={"small_cnn": 1}, batch_size=16,
                 data_dir=str(data), workdir=str(tmp_path / "runs"), out=str(tmp_path / "results" / "study.json"))


def test_tuning_reads_no_test_split_and_freezes_the_best_validation_setting(study):
    choices = run_tuning(study)
    rows = list(load_rows(study).values())
    assert len(rows) == 3 * 2 and all(r["stage"] == "tune" and r["test"] is None for r in rows)
    for arm in study.arms:
        mine = [r for r in rows if r["arm"] == arm]
        score = {json.dumps({k: r["arm_params"][k] for k in choices[arm]["params"]}):
                 (r["val"]["balanced_accuracy"] + r["val"]["auc"]) / 2 for r in mine}
        assert score[json.dumps(choices[arm]["params"])] == pytest.approx(max(score.values()))

    # a frozen choice is never changed, even when its runs are edited afterwards to make another setting best
    frozen = study.choice_file.read_text()

    def flipped(r):
        chosen = all(r["arm_params"][k] == v for k, v in choices[r["arm"]]["params"].items())
        return dict(r, val=dict(r["val"], balanced_accuracy=0.0 if chosen else 1.0, auc=0.0 if chosen else 1.0))

    edited = [flipped(r) for r in rows]
    study.runs_file.write_text("".join(json.dumps(r) + "\n" for r in edited))
    run_tuning(study)
    assert study.choice_file.read_text() == frozen


def test_final_refuses_to_start_before_tuning(study):
    with pytest.raises(ValueError, match="tune stage first"):
        run_final(study)


def test_final_runs_are_written_as_they_finish_and_a_rerun_skips_them(study):
    run_tuning(study)
    result = run_final(study, "nil bench study final")
    finals = [r for r in load_rows(study).values() if r["stage"] == "final"]
    assert result["finished_runs"] == len(finals) == result["planned_runs"] == 3 * 2
    assert all(r["test"] is not None and r["selected_by"] == "val balanced_accuracy" for r in finals)
    choices = json.loads(study.choice_file.read_text())
    for r in finals:
        assert all(r["arm_params"][k] == v for k, v in choices[r["arm"]]["params"].items())
    before = study.runs_file.read_text()
    run_final(study, "nil bench study final")  # nothing left to do: no run is trained again
    assert study.runs_file.read_text() == before

    md = study.choice_file.with_name("study.md").read_text()
    assert "Tuning (validation only" in md and "Paired differences" in md and "published" in md
    assert "plotted in study.png" in md
    assert study.choice_file.with_name("study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the forest plot


def test_continuing_a_study_with_a_subset_keeps_reporting_all_of_it(study):
    run_tuning(study)
    run_final(study, "nil bench study final")
    subset = Study(**(asdict(study) | {"arms": ["ce"], "seeds": [1]}))
    result = run_final(subset, "nil bench study final --arms ce --seeds 1")
    assert result["finished_runs"] == result["planned_runs"] == 3 * 2
    assert {r["arm"] for r in result["rows"]} == {"ce", "ce-matched", "nil-fresh"}
    assert json.loads(study.choice_file.with_name("study.json").read_text())["finished_runs"] == 6


def test_paired_differences_interval_and_wins():
    def row(arm, seed, bal):
        return {"dataset": "d", "model": "m", "arm": arm, "seed": seed,
                "test": {"balanced_accuracy": bal, "auc": bal, "macro_f1": bal, "accuracy": bal, "qwk": None}}

    rows = [row("ce", s, 0.5) for s in range(3)] + [row("nil", 2, 0.8), row("nil", 0, 0.6), row("nil", 1, 0.4)]
    (p,) = paired(rows, "ce")
    assert p["pairs"] == 3 and p["balanced_accuracy"] == pytest.approx(0.1)
    assert p["seeds"] == [0, 1, 2] and p["balanced_accuracy_diffs"] == pytest.approx([0.1, -0.1, 0.3])
    assert p["qwk_diffs"] == [None, None, None]
    assert p["balanced_accuracy_wins"] == 2 and p["qwk"] is None
    lo, hi = p["balanced_accuracy_ci95"]  # diffs 0.1, -0.1, 0.3: sd 0.2, t(2) = 4.303
    assert lo == pytest.approx(0.1 - 4.303 * 0.2 / 3 ** 0.5) and hi == pytest.approx(0.1 + 4.303 * 0.2 / 3 ** 0.5)


def test_the_goal_is_met_only_when_every_figure_meets_it():
    """Breast figures of the GPU study: nil-fresh beats ce-matched on every seed, but neither arm
    reaches the published accuracy 0.863, so the goal is not met and the report says which check fails."""
    def row(arm, seed, acc, auc):
        return {"dataset": "breastmnist", "model": "resnet18", "arm": arm, "seed": seed, "train_s": 1.0,
                "arm_params": {}, "test_recall_per_class": None,
                "test": {"balanced_accuracy": auc - 0.1, "auc": auc, "macro_f1": acc, "accuracy": acc, "qwk": None}}

    rows = ([row("ce-matched", s, 0.68, 0.70) for s in range(3)] + [row("nil-fresh", s, 0.83, 0.91) for s in range(3)]
            + [row("ce", s, 0.84, 0.88) for s in range(3)])
    pairs = paired(rows, "ce-matched") + paired(rows, "ce")
    (_, breast) = goal(study_module.summarise(rows), pairs)  # nil-gradient has no runs: no entry
    assert breast["met"] is False and breast["arm"] == "nil-fresh"
    assert breast["checks"]["beats ce-matched in mean AUC"] and breast["checks"]["nil-fresh beats published accuracy and AUC"] is False
    assert breast["checks"]["beats ce in mean balanced accuracy and AUC"]  # AUC 0.91 > 0.88 on every seed
    text = study_markdown({"command": "", "commit": "x", "settings": asdict(Study()), "choices": {}, "summary": [],
                           "paired": [], "goal": [breast], "planned_runs": 6, "finished_runs": 6,
                           "machine": {"cpu": "cpu", "cores": 2}})
    line = next(x for x in text.splitlines() if x.startswith("- breastmnist, nil-fresh"))
    assert "**not met**; fails: nil-fresh beats published accuracy and AUC" in line
    assert "Holds: beats ce-matched in mean balanced accuracy" in line


def test_the_report_shows_how_active_each_arms_term_was_at_the_end():
    """A distance term of 0.0001 at the last epoch means the margin was met: the report must show it."""
    def row(arm, seed, term):
        return {"dataset": "breastmnist", "model": "resnet18", "arm": arm, "seed": seed, "train_s": 1.0,
                "arm_params": {}, "test_recall_per_class": [0.7, 0.9], "distractor_term": term,
                "test": {"balanced_accuracy": 0.8, "auc": 0.9, "macro_f1": 0.8, "accuracy": 0.85, "qwk": None}}

    rows = [row("ce", s, 0.0) for s in range(2)] + [row("nil-fresh", 0, 0.0001), row("nil-fresh", 1, 0.0003),
                                                     row("nil-gradient", 0, 0.5), row("nil-gradient", 1, None)]
    summary = study_module.summarise(rows)
    term = {e["arm"]: e["distractor_term"] for e in summary}
    assert term["nil-fresh"] == pytest.approx(0.0002) and term["nil-gradient"] == pytest.approx(0.5)
    text = study_markdown({"command": "", "commit": "x", "settings": asdict(Study(datasets=["breastmnist"])),
                           "choices": {}, "summary": summary, "paired": [], "goal": [], "planned_runs": 6,
                           "finished_runs": 6, "machine": {"cpu": "cpu", "cores": 2}})
    table = [x for x in text.splitlines() if x.startswith("| resnet18 |")]
    cells = {x.split(" | ")[1]: x.split(" | ")[-2] for x in table}  # the column before train s/run
    assert cells == {"ce": "-", "nil-fresh": "0.0002", "nil-gradient": "0.5000"}
    assert "the margin was already met" in text


def test_study_command_rejects_an_unknown_arm(tmp_path):
    result = CliRunner().invoke(main, ["bench", "study", "tune", "--arms", "ce,magic", "--out", str(tmp_path / "s.json")])
    assert result.exit_code != 0 and "unknown arms ['magic']" in result.output


COMMITTED_ARMS = ("ce", "ce-matched", "nil-fresh", "nil-stored", "nil-gradient", "nil-balanced",
                  "nil-replay")  # all small-CNN finals


def test_the_committed_study_runs_keep_their_keys(tmp_path):
    """Every small-CNN final run the committed study planned is found under the key this code computes,
    so a TrainConfig change (a field added or retired) does not silently restart the study."""
    results = study_module.Path(study_module.__file__).parent / "results"
    rows = load_rows(Study(out=str(results / "study.json")))
    choices = json.loads((results / "study-choice.json").read_text())
    s = Study(out=str(results / "study.json"))
    planned = [study_module.run_key("final", study_module.run_config(
        s, dataset, "small_cnn", arm, seed, choices[arm]["params"], tmp_path / "run", evaluate_test=True))
        for dataset in s.datasets for arm in COMMITTED_ARMS for seed in s.seeds]
    assert len(planned) == 70  # 7 arms x 2 datasets x 5 seeds
    assert [k for k in planned if k not in rows] == []


def test_the_study_command_trains_the_batch_and_selection_it_is_given(tiny_npz, tmp_path, small_grid):
    data, results = tmp_path / "data", tmp_path / "results"
    data.mkdir(), results.mkdir()
    shutil.copy(tiny_npz, data / "retinamnist.npz")
    args = ["--datasets", "retinamnist", "--models", "small_cnn", "--tune-models", "small_cnn", "--arms", "ce",
            "--seeds", "0", "--epochs", "1", "--batch-size", "8", "--select-metric", "auc", "--data-dir", str(data),
            "--workdir", str(tmp_path / "runs"), "--out", str(results / "study.json")]
    for stage in ("tune", "final"):
        res = CliRunner().invoke(main, ["bench", "study", stage, *args])
        assert res.exit_code == 0, res.output
    rows = [json.loads(s) for s in (results / "study-runs.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["batch_size"] == 8 and r["selected_by"] == "val auc" for r in rows)
    configs = list((tmp_path / "runs").glob("*/retinamnist/small_cnn/ce/*/config.json"))
    assert len(configs) == 3 and all(json.loads(c.read_text())["batch_size"] == 8 for c in configs)  # what trained
    assert "batch 8" in (results / "study.md").read_text()
