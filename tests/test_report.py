import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from cli.main import main
from nil.config import TrainConfig
from nil.neighbours import find_suspects
from nil.train import train


@pytest.fixture
def run_dir(tmp_path, tiny_npz):
    out = tmp_path / "run"
    train(TrainConfig(data=str(tiny_npz), out=str(out), model="small_cnn", epochs=2, batch_size=32, embed_dim=8,
                      warmup_epochs=0, progress=False, device="cpu", ann="exact"))
    return out


def test_report_files_hold_the_runs_numbers(run_dir):
    result = CliRunner().invoke(main, ["report", str(run_dir), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rep = run_dir / "report"
    for name in ("curves.png", "confusion.png", "gallery.png"):
        with Image.open(rep / name) as im:
            im.verify()
    page = (rep / "index.html").read_text()
    test = pd.read_json(run_dir / "metrics.json", typ="series")["test"]
    assert f"{test['accuracy']:.4f}" in page and f"{test['qwk']:.4f}" in page
    assert page.count("data:image/png;base64,") >= 3  # pictures inlined: opens offline
    tables = pd.read_html(str(rep / "index.html"))
    per_class = next(t for t in tables if "precision" in t.columns)
    assert list(per_class["support"]) == [sum(r) for r in test["confusion_matrix"]]
    gallery = next(t for t in tables if "neighbor_id" in t.columns)
    assert (gallery["query_label"] != gallery["neighbor_label"]).all()
    suspects = pd.read_csv(rep / "suspects.csv")
    assert list(suspects.columns) == ["id", "key", "label", "suspected_class", "fraction", "raw_fraction",
                                        "mean_distance"]
    settings = page[page.index("<h2>Settings</h2>"):page.index("<h2>Training curves")]
    for words in ("distractor source", "memory (--ann exact)", "re-embedded in the step (fresh)", "lam", "margin",
                  "warmup_epochs"):
        assert words in settings


def test_find_suspects_flags_a_mislabelled_point():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.05, size=(20, 4)) + [1, 0, 0, 0]
    b = rng.normal(0, 0.05, size=(20, 4)) + [0, 1, 0, 0]
    z = np.vstack([a, b]).astype(np.float32)
    labels = np.array([0] * 20 + [1] * 20)
    labels[3] = 1  # a class-0 point labelled 1
    table = find_suspects(z, labels, k=10)
    assert table.iloc[0]["row"] == 3 and table.iloc[0]["suspected_class"] == 0
    assert table.iloc[0]["fraction"] == 1.0
    assert 3 in set(table["row"]) and len(table) <= 6  # the clean points of class 1 are not flagged en masse


def test_suspects_account_for_class_imbalance():
    """A minority sample whose neighbours are mostly majority-class only by prevalence is not a suspect;
    one surrounded by the other class alone is."""
    rng = np.random.default_rng(1)
    z = rng.normal(size=(400, 2)).astype(np.float32)  # one cloud: labels carry no geometry
    labels = (rng.random(400) < 0.15).astype(np.int64)  # 15% minority class 1
    z[:31] = [50.0, 50.0] + rng.normal(0, 0.01, size=(31, 2))  # a tight majority cluster ...
    labels[0], labels[1:31] = 1, 0  # ... holding one minority-labelled sample
    plain = 0  # what an unweighted 60% vote of the 20 nearest would list among the minority class
    for i in np.flatnonzero(labels == 1):
        near = np.argsort(((z - z[i]) ** 2).sum(1))[1:21]
        plain += (labels[near] == 0).mean() >= 0.6
    table = find_suspects(z, labels)
    flagged_minority = set(table.loc[table["label"] == 1, "row"])
    assert 0 in flagged_minority and table.set_index("row").loc[0, "fraction"] == 1.0
    assert plain > 40 and len(flagged_minority) <= 6


def test_majority_warning_only_when_not_above_the_majority_rate():
    from nil.report import majority_warning

    assert "not above the majority-class rate 0.750" in majority_warning(np.array([[75, 0], [25, 0]]))
    assert majority_warning(np.array([[70, 5], [5, 20]])) is None


def test_report_refuses_an_unfinished_run(tmp_path):
    (tmp_path / "half").mkdir()
    result = CliRunner().invoke(main, ["report", str(tmp_path / "half")])
    assert result.exit_code == 1 and "not a finished nil run" in result.output


def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed")
    CliRunner().invoke(main, ["report", str(run_dir), "--device", "cpu"])
    shot = tmp_path / "page.png"
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                           "--window-size=1200,2000", (run_dir / "report" / "index.html").as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with Image.open(shot) as im:
        arr = np.asarray(im.convert("L"))
    assert arr.std() > 10  # something was drawn, not a blank page
