"""A training run SIGKILLed mid-epoch and resumed ends exactly like an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nil.config import TrainConfig
from nil.errors import NilError
from nil.resume import FAULT_KILL_ENV, load_run_config
from nil.train import train

ROOT = Path(__file__).resolve().parents[1]
# tiny_npz: 96 training images; batch 16 -> 6 steps per epoch, 12 in a 2-epoch run
BASE = dict(model="small_cnn", epochs=2, batch_size=16, lr=3e-3, embed_dim=16, warmup_epochs=0,
            progress=False, device="cpu", seed=5, fresh_distractors=False)


def cli_args(cfg: dict) -> list[str]:
    args = []
    for k, v in cfg.items():
        if k == "progress":
            args.append("--no-progress")
        elif k == "fresh_distractors":
            args.append("--fresh-distractors" if v else "--stored-distractors")
        else:
            args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def run_cli(*args, kill_at: int | None = None) -> subprocess.CompletedProcess:
    # the same thread count as the in-process reference run: float sums depend on it
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(torch.get_num_threads()))
    env.pop(FAULT_KILL_ENV, None)
    if kill_at is not None:
        env[FAULT_KILL_ENV] = str(kill_at)
    return subprocess.run([sys.executable, "-m", "cli", "train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def epoch_lines(run: Path) -> list[dict]:
    drop = ("epoch_s", "mining")  # wall-clock timings differ between any two runs
    return [{k: v for k, v in json.loads(s).items() if k not in drop}
            for s in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kw, kill_at", [
    # killed at step 5: last.pt is from step 4, mid-epoch 1, so the resumed run redoes step 5,
    # finishes epoch 1 from its 5th batch, validates, and runs epoch 2
    (dict(ann="exact", checkpoint_every=4), 5),
    # the FAISS memory with its structure rebuilt every 5 upserts and a delta in flight at the kill
    (dict(ann="faiss", ann_index="flat", refresh_every=5, checkpoint_every=4, variant="triplet"), 11),
    # no step checkpoints: the resumed run redoes epoch 2 from the epoch-1 last.pt
    (dict(ann="exact"), 9),
    # distractor images re-embedded in the step (their random flips come from the restored RNG)
    (dict(ann="exact", fresh_distractors=True, checkpoint_every=4), 5),
    # nil train's defaults: the gradient distractor, no memory to restore
    (dict(checkpoint_every=4), 5),
    # a FAISS memory of pooled features, the term measured there (--term-space features)
    (dict(ann="faiss", ann_index="flat", refresh_every=5, fresh_distractors=True, term_space="features",
          checkpoint_every=4), 5),
])
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_npz, kw, kill_at):
    cfg = BASE | kw
    reference = train(TrainConfig(data=str(tiny_npz), out=str(tmp_path / "ref"), **cfg))

    run = tmp_path / "run"
    killed = run_cli("--data", str(tiny_npz), "--out", str(run), *cli_args(cfg), kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (run / "last.pt").exists() and not (run / "metrics.json").exists()
    done = torch.load(run / "last.pt", weights_only=False)["resume"]
    assert done["global_step"] < kill_at  # the kill really lost work
    assert done["step_in_epoch"] == (0 if "checkpoint_every" not in kw else 4 if kill_at == 5 else 2)

    resumed = run_cli("--resume", str(run), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr

    got = json.loads((run / "metrics.json").read_text())
    assert got["test"] == reference["test"] and got["val"] == reference["val"]
    assert got["best_epoch"] == reference["best_epoch"]
    assert epoch_lines(run) == epoch_lines(tmp_path / "ref")  # one line per epoch, no duplicate
    a = torch.load(run / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "ref" / "last.pt", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert all(torch.equal(a["optimizer"]["state"][i]["exp_avg"], b["optimizer"]["state"][i]["exp_avg"])
               for i in b["optimizer"]["state"])
    memories = sorted(p.name for p in run.iterdir() if p.name.startswith("memory-"))
    named = a["resume"]["memory"]  # None: a source with no memory (the gradient distractor)
    assert memories == ([named] if named is not None else [])  # the one last.pt names; older ones removed


def test_resume_refuses_a_finished_or_foreign_folder(tmp_path, tiny_npz):
    with pytest.raises(NilError, match="not a nil run folder"):
        load_run_config(tmp_path)
    train(TrainConfig(data=str(tiny_npz), out=str(tmp_path / "done"), **(BASE | dict(epochs=1))))
    with pytest.raises(NilError, match="already finished"):
        load_run_config(tmp_path / "done")


def test_resume_refuses_data_that_changed(tmp_path, tiny_npz):
    run = tmp_path / "run"
    train(TrainConfig(data=str(tiny_npz), out=str(run), **(BASE | dict(epochs=1))))
    (run / "metrics.json").unlink()  # as if killed after its last epoch
    splits = json.loads((run / "splits.json").read_text())
    splits["ids"]["train"] = splits["ids"]["train"][:-1]
    (run / "splits.json").write_text(json.dumps(splits))
    with pytest.raises(NilError, match="no longer gives the splits"):
        train(load_run_config(run), resume=True)


def test_resume_cli_refuses_options_that_would_change_the_run(tmp_path):
    r = run_cli("--resume", str(tmp_path), "--lr", "0.1")
    assert r.returncode != 0 and "drop --lr" in r.stderr and "Traceback" not in r.stderr
