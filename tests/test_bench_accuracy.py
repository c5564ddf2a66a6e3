"""`nil bench accuracy` end to end on tiny data: the results have the promised shape and hold the runs' numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import main

TEST_KEYS = {"accuracy", "balanced_accuracy", "macro_f1", "auc", "qwk"}


@pytest.fixture
def data_dir(tiny_npz, tmp_path):
    """A folder holding the tiny set under the name the benchmark reads."""
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(tiny_npz, folder / "retinamnist.npz")
    return folder


def _bench(args: list[str]):
    result = CliRunner().invoke(main, ["bench", "accuracy", "--datasets", "retinamnist", "--models", "small_cnn",
                                       "--epochs", "2", "--batch-size", "16", "--precision", "fp32", *args])
    assert result.exit_code == 0, result.output
    return result


def test_bench_accuracy_writes_rows_summary_and_table(data_dir, tmp_path):
    out = tmp_path / "accuracy.json"
    # margin 2 (the sphere's diameter): every distractor sits inside it, so the nil arms' term is > 0
    result = _bench(["--arms", "ce,nil-exact,nil-gradient", "--seeds", "0,1", "--margin", "2", "--data-dir", str(data_dir),
                     "--workdir", str(tmp_path / "runs"), "--out", str(out)])
    doc = json.loads(out.read_text())
    assert {"machine", "rows", "summary", "command"} <= set(doc)
    assert len(doc["rows"]) == 6
    for row in doc["rows"]:
        assert {"dataset", "arm", "model", "seed", "test", "epochs", "train_s"} <= set(row)
        assert set(row["test"]) == TEST_KEYS and row["epochs"] == 2
        # each row is the run's own metrics.json, test split read once by the trainer
        saved = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())
        assert row["test"]["accuracy"] == pytest.approx(saved["test"]["accuracy"])
    ce = [r["test"]["accuracy"] for r in doc["rows"] if r["arm"] == "ce"]
    entry = next(e for e in doc["summary"] if e["arm"] == "ce")
    assert entry["seeds"] == 2 and entry["accuracy"] == pytest.approx(sum(ce) / 2)
    pair = next(p for p in doc["paired"] if p["arm"] == "nil-exact")
    by = {(r["arm"], r["seed"]): r["test"]["accuracy"] for r in doc["rows"]}
    diffs = [by["nil-exact", s] - by["ce", s] for s in (0, 1)]
    assert pair["pairs"] == 2 and pair["accuracy"] == pytest.approx(sum(diffs) / 2)
    assert pair["accuracy_wins"] == sum(d > 0 for d in diffs)
    for row in doc["rows"]:
        diag = row["diagnostics"]
        assert len(diag["test_recall_per_class"]) == 3 and diag["audit_recall_at_1"] is None  # no faiss arm here
        assert (diag["distractor_term"] > 0.0) == (row["arm"] != "ce")
    md = out.with_suffix(".md").read_text()
    assert "Paired with CE" in md and "Diagnostics" in md
    assert "nil-gradient" in md and "0.524" in md and f"{entry['accuracy']:.3f}" in md  # published figure beside
    assert "QWK" in md and md in result.output


def test_bench_accuracy_tuning_never_reads_test(data_dir, tmp_path):
    out = tmp_path / "accuracy.json"
    result = _bench(["--tune", "--grid", "lam=0.5,2 margin=1", "--seeds", "0,1", "--data-dir", str(data_dir),
                     "--workdir", str(tmp_path / "runs"), "--out", str(out)])
    doc = json.loads((tmp_path / "accuracy-tuning.json").read_text())
    assert len(doc["rows"]) == (1 + 2) * 2  # (ce reference + 2 settings) x 2 seeds
    assert {json.dumps(r["setting"], sort_keys=True) for r in doc["rows"] if r["arm"] == "nil-exact"} == {
        '{"lam": 0.5, "margin": 1.0}', '{"lam": 2.0, "margin": 1.0}'}
    for t in doc["table"]:  # the table's means are the rows' means
        accs = [r["val"]["accuracy"] for r in doc["rows"] if r["arm"] == t["arm"] and r["setting"] == t["setting"]]
        assert t["retinamnist_accuracy"] == pytest.approx(sum(accs) / len(accs))
    for metrics in (tmp_path / "runs").rglob("metrics.json"):
        assert json.loads(metrics.read_text())["test"] is None
    best = max((t for t in doc["table"] if t["arm"] != "ce"), key=lambda t: t["score"])
    assert doc["chosen"] == best["setting"] and str(doc["chosen"]) in result.output
    assert not out.exists()  # tuning does not write the benchmark's result


def test_bench_accuracy_refuses_unknown_arm_and_bad_epochs(data_dir, tmp_path):
    bad_arm = CliRunner().invoke(main, ["bench", "accuracy", "--arms", "ce,nil-magic", "--data-dir", str(data_dir)])
    assert bad_arm.exit_code != 0 and "nil-magic" in bad_arm.output
    bad_epochs = CliRunner().invoke(main, ["bench", "accuracy", "--epochs", "resnet18=x", "--data-dir", str(data_dir)])
    assert bad_epochs.exit_code != 0 and "--epochs" in bad_epochs.output
    missing = CliRunner().invoke(main, ["bench", "accuracy", "--epochs", "resnet18=2", "--models", "small_cnn",
                                        "--data-dir", str(data_dir)])
    assert missing.exit_code != 0 and "small_cnn" in missing.output


def test_tuning_grid_parsing():
    from benchmarks.accuracy import TUNE_GRID, parse_grid

    assert parse_grid("lam=0.3,1 warmup_epochs=0,2") == {"lam": [0.3, 1.0], "warmup_epochs": [0, 2]}
    assert len(TUNE_GRID["lam"]) * len(TUNE_GRID["margin"]) * len(TUNE_GRID["warmup_epochs"]) == 12
    with pytest.raises(ValueError, match="temperature"):
        parse_grid("temperature=1")


def test_embedding_geometry_of_a_run(tiny_npz, tmp_path):
    import numpy as np

    from benchmarks.embedding_geometry import geometry
    from nil.config import TrainConfig
    from nil.embedding import embed_split
    from nil.train import train

    run = tmp_path / "run"
    train(TrainConfig(data=str(tiny_npz), out=str(run), model="small_cnn", epochs=1, batch_size=32, embed_dim=8,
                      progress=False, device="cpu"))
    g = geometry(run)
    z = embed_split(run / "best.pt", device="cpu", progress=False)["vectors"]
    assert g["n"] == len(z) == 96
    assert g["mean_z_norm"] == pytest.approx(float(np.linalg.norm(z.mean(0))), abs=1e-5)
    pair = np.sqrt(np.clip(((z[:, None] - z[None]) ** 2).sum(-1), 0, None))
    assert g["mean_pairwise"] == pytest.approx(pair.sum() / (96 * 95), abs=1e-4)
    assert 0 <= g["nearest_same_median"] <= 2 and 0 <= g["nearest_other_median"] <= 2
