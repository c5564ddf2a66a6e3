"""`nil bench alternatives`: every method answers the same question (k nearest of another class),
recall is scored against exact search, and a rerun keeps finished rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import benchmarks.alternatives as alt
from cli.main import main


def _cfg(tmp_path, **kw) -> alt.AltBench:
    base = dict(n=2000, requests=4, batch=16, k=3, nlist=16, nprobe=16, data=("class-pure",),
                out=str(tmp_path / "alt.json"), progress=False)
    return alt.AltBench(**(base | kw))


@pytest.mark.parametrize("method", alt.METHODS)
def test_every_method_returns_only_other_class_rows_and_exhaustive_ones_are_exact(tmp_path, method):
    if alt.LIBRARY[method] in ("usearch", "hnswlib"):
        pytest.importorskip(alt.LIBRARY[method])
    cfg = _cfg(tmp_path)
    x, y, xq, yq = alt.make_data("class-pure", cfg)
    search, _ = alt.build_method(method, x, y, cfg)
    found = search(xq[:32], yq[:32])
    assert found.shape == (32, cfg.k)
    assert (found >= 0).all() and (y[found] != yq[:32, None]).all()
    if method in ("exact-torch", "faiss-ivfflat-selector"):  # nprobe = nlist: an exhaustive scan
        truth = alt.build_method("exact-torch", x, y, cfg)[0](xq[:32], yq[:32])
        assert (np.sort(found, 1) == np.sort(truth, 1)).all()


def test_recall_counts_a_tie_in_distance_as_a_hit_and_a_farther_row_as_a_miss():
    x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [3.0, 0.0]], dtype=np.float32)  # rows 1 and 2 tie
    xq = np.zeros((3, 2), dtype=np.float32)
    truth, true_d = np.array([[1, 3]] * 3), np.array([[1.0, 3.0]] * 3)
    found = np.array([[1, 3], [2, 3], [3, -1]])
    r1, rk = alt.recalls(found, truth, true_d, xq, x)
    assert r1 == pytest.approx(2 / 3) and rk == pytest.approx((1 + 0.5 + 0.5) / 3)


def test_a_rerun_keeps_finished_rows_and_measures_only_new_ones(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, methods=("exact-torch",))
    first = alt.run_alternatives(cfg, "first")
    row = first["rows"][0]
    assert row["recall_at_1"] == 1.0 and row["recall_at_k"] == 1.0 and row["requests"] == 4
    assert row["p50_ms"] > 0 and row["search_rate"] > 0
    built = []
    real = alt.build_method
    monkeypatch.setattr(alt, "build_method", lambda m, *a: built.append(m) or real(m, *a))
    again = alt.run_alternatives(_cfg(tmp_path, methods=("exact-torch", "faiss-ivfflat-selector")), "second")
    assert built == ["faiss-ivfflat-selector"]
    assert again["rows"][0] == row and len(again["rows"]) == 2
    saved = json.loads((tmp_path / "alt.json").read_text())
    assert saved["rows"] == again["rows"] and "faiss-ivfflat-selector" in (tmp_path / "alt.md").read_text()


@pytest.mark.parametrize("args, fragment", [
    (["--methods", "milvus"], "give one or more of nil, exact-torch"),
    (["--data", "trained"], "give one or more of serve, clusters, class-pure"),
    (["--n", "100", "--requests", "200", "--methods", "exact-torch"], "lower --requests"),
])
def test_bad_options_are_one_sentence(tmp_path, args, fragment):
    result = CliRunner().invoke(main, ["bench", "alternatives", "--out", str(tmp_path / "a.json"), *args])
    assert result.exit_code == 2 and fragment in result.output and not (tmp_path / "a.json").exists()


def test_a_missing_library_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setattr("cli.bench_serve._importable", lambda name: name != "hnswlib")
    result = CliRunner().invoke(main, ["bench", "alternatives", "--out", str(tmp_path / "a.json")])
    assert result.exit_code == 2 and "hnswlib not installed: pip install 'nil[alternatives]'" in result.output
