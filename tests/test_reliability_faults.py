"""Numerical and disk faults: a NaN stops the run naming the step, a full disk never costs the last checkpoint."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import faiss_index
import nil.train as trainer
from faiss_index import IndexInputError, load_index
from nil.checkpoint import save_torch
from nil.config import TrainConfig
from nil.errors import NilError
from nil.train import train

ROOT = Path(__file__).resolve().parents[1]


def quick(tmp_path, data, **kw) -> TrainConfig:
    return TrainConfig(**(dict(data=str(data), out=str(tmp_path / "run"), model="small_cnn", epochs=2,
                               batch_size=32, lr=3e-3, embed_dim=16, warmup_epochs=0, progress=False,
                               device="cpu", fresh_distractors=False, ann="exact") | kw))  # one forward per step: the poison counts steps


def poison_at(monkeypatch, call: int, field: str):
    """Make the model's ``field`` output NaN from its ``call``-th training forward on."""
    real = trainer.build_model
    calls = []

    def build(*a, **k):
        model = real(*a, **k)
        forward = model.forward

        def poisoned(x):
            out = forward(x)
            if model.training:
                calls.append(1)
                if len(calls) >= call:
                    setattr(out, field, getattr(out, field) * float("nan"))
            return out

        model.forward = poisoned
        return model

    monkeypatch.setattr(trainer, "build_model", build)


@pytest.mark.parametrize("field, match", [("logits", "the loss became nan"),
                                          ("z", "the embeddings became NaN or infinite")])
def test_nan_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_npz, monkeypatch,
                                                                                field, match):
    poison_at(monkeypatch, call=5, field=field)  # 3 steps per epoch: the 5th is epoch 2, step 2
    with pytest.raises(NilError, match=f"{match} at epoch 2, step 2 \\(global step 5\\).*last good last.pt is kept"):
        train(quick(tmp_path, tiny_npz))
    run = tmp_path / "run"
    last = torch.load(run / "last.pt", weights_only=False)
    assert last["epoch"] == 1 and last["resume"]["global_step"] == 3
    assert all(torch.isfinite(t).all() for t in last["model"].values() if t.is_floating_point())
    memory, _ = load_index(run / last["resume"]["memory"])
    vectors, _, _ = memory.store.view()
    assert len(memory) == 96 and torch.isfinite(vectors).all()


@pytest.mark.parametrize("kind", ["exact", "flat"])
def test_nan_embeddings_are_never_inserted_into_an_index(kind):
    if kind != "exact":
        pytest.importorskip("faiss")
    index = faiss_index.make_index(kind, 4, 2, refresh_every=2)
    index.upsert(torch.arange(4), torch.eye(4), torch.tensor([0, 1, 0, 1]))
    before = [t.clone() for t in index.store.view()]
    for bad in (float("nan"), float("inf")):
        vectors = torch.ones(3, 4)
        vectors[1, 2] = bad
        with pytest.raises(IndexInputError, match="NaN or infinite"):
            index.upsert(torch.tensor([0, 9, 10]), vectors, torch.tensor([1, 1, 0]))
    after = index.store.view()
    assert len(index) == 4 and all(torch.equal(a, b) for a, b in zip(before, after))
    assert int(index.search_other_class(torch.eye(4)[:1], torch.tensor([0]), 1).ids[0, 0]) == 1


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_torch({"step": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(NilError, match=r"cannot write .*last.pt \(No space left on device\); the previous file is"):
        save_torch({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before and torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left


def test_nan_weights_are_never_written_as_last_pt(tmp_path, tiny_npz, monkeypatch):
    real = trainer.Checkpointer.end_epoch

    def poison_then_save(self, epoch, state, *a):
        if epoch == 1:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        return real(self, epoch, state, *a)

    monkeypatch.setattr(trainer.Checkpointer, "end_epoch", poison_then_save)
    with pytest.raises(NilError, match="weights became NaN or infinite by step 6 .*is kept"):
        train(quick(tmp_path, tiny_npz))
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=False)["epoch"] == 1


SIZE_LIMITED = r'''
import json, resource, signal, sys, torch, faiss_index
from pathlib import Path
from nil.checkpoint import save_torch
from nil.errors import NilError
out = Path(sys.argv[1])
save_torch({"w": torch.ones(10)}, out / "last.pt")
index = faiss_index.make_index("exact", 16, 2)
index.upsert(torch.arange(10), torch.randn(10, 16), torch.arange(10) % 2)
faiss_index.save_index(index, out / "idx", classes=["a", "b"])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
errors = {}
try:
    save_torch({"w": torch.ones(100_000)}, out / "last.pt")
except NilError as e:
    errors["checkpoint"] = str(e)
index.upsert(torch.arange(10, 4000), torch.randn(3990, 16), torch.arange(10, 4000) % 2)
try:
    faiss_index.save_index(index, out / "idx", classes=["a", "b"])
except faiss_index.IndexWriteError as e:
    errors["index"] = str(e)
print(json.dumps(errors))
'''


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE semantics checked on Linux")
def test_a_real_size_limited_write_keeps_the_previous_checkpoint_and_index(tmp_path):
    """Not an injected error: the kernel refuses writes past RLIMIT_FSIZE (EFBIG), as a full disk would."""
    r = subprocess.run([sys.executable, "-c", SIZE_LIMITED, str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    errors = json.loads(r.stdout.strip().splitlines()[-1])
    assert "File too large" in errors["checkpoint"] and "previous file is unchanged" in errors["checkpoint"]
    assert "previous index is unchanged" in errors["index"]
    assert torch.equal(torch.load(tmp_path / "last.pt")["w"], torch.ones(10))
    assert len(load_index(tmp_path / "idx")[0]) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "last.pt"]
