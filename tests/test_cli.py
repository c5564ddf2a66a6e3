import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import main

COMMANDS = [[], ["demo"], ["train"], ["eval"], ["data"], ["data", "synth"], ["index"], ["index", "build"],
            ["index", "query"], ["index", "stats"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "nil")
def test_every_command_explains_itself(cmd):
    result = CliRunner().invoke(main, cmd + ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    body = result.output.split("Options:")[0]
    assert len(body.split("\n", 2)[-1].strip()) > 20  # a real description, not just the usage line


def test_python_dash_m_cli_runs_the_same_application():
    proc = subprocess.run([sys.executable, "-m", "cli", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "distractor" in proc.stdout and "train" in proc.stdout


def run(args):
    return CliRunner().invoke(main, args)


def assert_clear_error(result, *fragments):
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ")
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in result.output


def test_missing_data_is_one_clear_sentence(tmp_path):
    result = run(["train", "--data", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "run")])
    assert_clear_error(result, "nope.npz", "does not exist")
    assert not (tmp_path / "run").exists()


def test_corrupt_npz_is_refused_clearly(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip archive")
    result = run(["train", "--data", str(bad), "--out", str(tmp_path / "run")])
    assert_clear_error(result, "bad.npz")


def test_wrong_shapes_are_refused_clearly(tmp_path):
    bad = tmp_path / "shapes.npz"
    np.savez(bad, train_images=np.zeros((4, 8), np.uint8), train_labels=np.zeros(4, np.int64),
             val_images=np.zeros((2, 8, 8), np.uint8), val_labels=np.zeros(2, np.int64),
             test_images=np.zeros((2, 8, 8), np.uint8), test_labels=np.zeros(2, np.int64))
    assert_clear_error(run(["train", "--data", str(bad), "--out", str(tmp_path / "run")]), "train_images")


def test_unknown_option_value_is_a_usage_error(tmp_path):
    result = run(["train", "--data", "x.npz", "--out", str(tmp_path / "r"), "--ann", "annoy"])
    assert result.exit_code == 2
    assert "annoy" in result.output


def test_missing_checkpoint_is_refused(tmp_path):
    assert_clear_error(run(["eval", "--checkpoint", str(tmp_path / "best.pt")]), "does not exist")


def test_train_then_eval_json_through_the_cli(tmp_path, tiny_npz):
    out = tmp_path / "run"
    result = run(["train", "--data", str(tiny_npz), "--out", str(out), "--model", "small_cnn", "--epochs", "1",
                  "--batch-size", "32", "--embed-dim", "8", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "balanced_accuracy" in result.output and str(out) in result.output
    result = run(["eval", "--checkpoint", str(out / "best.pt"), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    m = json.loads(result.output)
    assert m["accuracy"] == pytest.approx(json.loads((out / "metrics.json").read_text())["test"]["accuracy"])


def test_data_synth_writes_a_store(tmp_path):
    result = run(["data", "synth", str(tmp_path / "s.zarr"), "--n", "64", "--size", "16", "--classes", "4"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s.zarr").is_dir()
    again = run(["data", "synth", str(tmp_path / "s.zarr"), "--n", "64"])
    assert_clear_error(again, "s.zarr")


def test_demo_end_to_end_at_a_reduced_size(tmp_path):
    out = tmp_path / "demo"
    result = run(["demo", "--out", str(out), "--n", "600", "--epochs", "2", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    header = result.output.splitlines()[0]
    assert "ce" in header and "nil-faiss" in header and " nil " in f" {header} "
    for name in ("ce", "nil", "nil-faiss"):
        test = json.loads((out / name / "metrics.json").read_text())["test"]
        assert f"{test['accuracy']:.4f}" in result.output
    nil_config = json.loads((out / "nil-faiss" / "config.json").read_text())
    assert nil_config["ann"] == "faiss" and nil_config["loss"] == "nil" and nil_config["distractor"] == "memory"
    default = json.loads((out / "nil" / "config.json").read_text())
    assert default["distractor"] == "gradient" and default["loss"] == "nil" and default["margin"] == 1.0


def test_options_come_from_a_yaml_file_and_the_command_line_wins(tmp_path, tiny_npz):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data: {tiny_npz}\nmodel: small_cnn\nepochs: 1\nbatch-size: 16\nbatch_size: 32\n"
                   "embed_dim: 8\nlambda: 0.7\ndevice: cpu\nprogress: false\nlr: 2e-3\nfresh-distractors: false\n")
    out = tmp_path / "a"
    result = run(["train", "--config", str(cfg), "--out", str(out), "--lr", "0.004"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["batch_size"] == 32 and saved["embed_dim"] == 8 and saved["lam"] == 0.7
    assert saved["lr"] == 0.004 and saved["fresh_distractors"] is False  # command line over file
    # the run folder's config.yaml repeats the run: same configuration, same metrics
    again = run(["train", "--config", str(out / "config.yaml"), "--out", str(tmp_path / "b")])
    assert again.exit_code == 0, again.output
    repeat = json.loads((tmp_path / "b" / "config.json").read_text())
    assert {k: v for k, v in repeat.items() if k not in ("out", "resolved")} == \
        {k: v for k, v in saved.items() if k not in ("out", "resolved")}
    assert (json.loads((tmp_path / "b" / "metrics.json").read_text())["test"]
            == json.loads((out / "metrics.json").read_text())["test"])


@pytest.mark.parametrize("content, message", [
    ("epochs: [1, 2\n", "not valid YAML at line"),
    ("- epochs\n", "mapping of option names"),
    ("epoch: 3\n", "unknown option 'epoch'"),
    ("epochs: many\n", "many"),
])
def test_a_bad_config_file_is_one_clear_usage_error(tmp_path, content, message):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(content)
    result = run(["train", "--config", str(cfg), "--data", "x.npz", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "r").exists()


def test_config_file_and_resume_do_not_mix(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("epochs: 2\n")
    result = run(["train", "--config", str(cfg), "--resume", str(tmp_path / "r")])
    assert result.exit_code == 2 and "--config" in result.output


@pytest.mark.parametrize("text, pair", [("nprobe=16", ("nprobe", 16)), ("store_dtype=float16", ("store_dtype", "float16")),
                                        ("inplace=false", ("inplace", False)), (" nlist = 4096", ("nlist", 4096))])
def test_index_parameters_are_typed_the_same_in_every_command(text, pair):
    """`nil train --ann-param`, `nil index build --param` and `nil bench stream --param` share one parser."""
    from cli.options import INDEX_PARAM

    assert INDEX_PARAM.convert(text, None, None) == pair
