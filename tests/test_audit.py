"""nil audit: planted exact, flipped, noisy and cross-split duplicates and conflicting labels are found, nothing else."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from click.testing import CliRunner

from cli.main import main


def _planted(path):
    """A MedMNIST-style .npz of distinct random images with known duplicates planted in it."""
    rng = np.random.default_rng(0)
    n = {"train": 60, "val": 20, "test": 20}
    images = {s: rng.integers(0, 256, (k, 16, 16), dtype=np.uint8) for s, k in n.items()}
    labels = {s: (np.arange(k) % 3).astype(np.int64) for s, k in n.items()}
    # 1. exact copy across train/test, same label
    images["test"][0], labels["test"][0] = images["train"][5], labels["train"][5]
    # 2. exact copy across train/val with a different label (a leak and a conflict)
    images["val"][3], labels["val"][3] = images["train"][7], (labels["train"][7] + 1) % 3
    # 3. a horizontally flipped copy inside train
    images["train"][20] = images["train"][10][:, ::-1]
    labels["train"][20] = labels["train"][10]
    # 4. a slightly noisy copy across val/test
    noise = rng.integers(-2, 3, (16, 16))
    images["test"][9] = np.clip(images["val"][8].astype(int) + noise, 0, 255).astype(np.uint8)
    labels["test"][9] = labels["val"][8]
    np.savez(path, **{f"{s}_images": images[s] for s in n}, **{f"{s}_labels": labels[s] for s in n})


def test_audit_finds_every_planted_duplicate_and_nothing_else(tmp_path):
    _planted(tmp_path / "d.npz")
    result = CliRunner().invoke(main, ["audit", "--data", str(tmp_path / "d.npz"), "--out", str(tmp_path / "a"),
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    audit = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert audit["images"] == 100
    found = {(g["kind"], tuple(sorted((m["split"], m["key"]) for m in g["members"]))) for g in audit["groups"]}
    assert found == {
        ("exact", (("test", "test/0"), ("train", "train/5"))),
        ("exact", (("train", "train/7"), ("val", "val/3"))),
        ("near", (("train", "train/10"), ("train", "train/20"))),
        ("near", (("test", "test/9"), ("val", "val/8"))),
    }
    assert audit["cross_split"] == {"train/val": 1, "train/test": 1, "val/test": 1}
    assert [len(g["splits"]) for g in audit["groups"]][:3] == [2, 2, 2]  # across splits first
    conflict, = audit["label_conflicts"]
    assert {m["key"] for m in conflict["members"]} == {"train/7", "val/3"}
    csv = pd.read_csv(tmp_path / "a" / "duplicates.csv")
    assert len(csv) == 8 and csv["cross_split"].sum() == 6
    page = (tmp_path / "a" / "index.html").read_text()
    assert page.count("data:image/png;base64,") >= 8 and "ACROSS SPLITS" in page and "http" not in page
    with np.load(tmp_path / "d.npz") as npz:
        every = np.concatenate([npz[f"{s}_labels"] for s in ("train", "val", "test")])
    assert [c["count"] for c in audit["per_class"]] == np.bincount(every).tolist()
    assert all(c["most_confused_with"] != c["class"] for c in audit["per_class"])
    assert (tmp_path / "a" / "suspects.csv").exists()


def test_audit_refuses_missing_data_with_one_sentence(tmp_path):
    result = CliRunner().invoke(main, ["audit", "--data", str(tmp_path / "none.npz"), "--out", str(tmp_path / "a")])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "Traceback" not in result.output


def test_train_warns_once_about_identical_images_across_splits(tmp_path, tiny_npz, caplog):
    from nil.train import warn_cross_split_duplicates
    from nil.data import open_dataset

    _planted(tmp_path / "d.npz")
    with caplog.at_level("WARNING", logger="nil.train"):
        warn_cross_split_duplicates(open_dataset(tmp_path / "d.npz"))
        warn_cross_split_duplicates(open_dataset(tiny_npz))
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(lines) == 1 and "nil audit" in lines[0] and "train/val: 1" in lines[0] and "train/test: 1" in lines[0]


def test_audit_in_a_checkpoint_embedding_space(tmp_path, tiny_npz):
    from nil.config import TrainConfig
    from nil.train import train

    train(TrainConfig(data=str(tiny_npz), out=str(tmp_path / "run"), model="small_cnn", epochs=1, batch_size=32,
                      embed_dim=8, ann="none", device="cpu", progress=False))
    result = CliRunner().invoke(main, ["audit", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--out",
                                       str(tmp_path / "a"), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    audit = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert audit["space"] == "embedding" and audit["images"] == sum(c["count"] for c in audit["per_class"])


def test_the_confusions_from_shared_neighbours_equal_a_full_search():
    import torch

    from nil.audit import _per_class
    from nil.neighbours import knn_any_class

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 8)) * 4  # tight clusters of one class each: many rows see no other class in 20
    labels = np.repeat(np.arange(6) % 3, 50)
    feats = torch.from_numpy((centres[np.repeat(np.arange(6), 50)] + rng.normal(size=(300, 8))).astype(np.float32))
    classes = ["a", "b", "c"]
    assert _per_class(feats, labels, classes, knn_any_class(feats, 20)) == _per_class(feats, labels, classes)


def test_neighbour_search_excludes_the_query_and_the_ivf_path_finds_near_copies():
    import torch

    from nil.neighbours import APPROXIMATE_FROM, _knn_torch, knn

    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(2000, 16)).astype(np.float32))
    d, rows = knn(x[500:700], x, 5, self_offset=500)
    d_ref, rows_ref = _knn_torch(x[500:700], x, 5, 500, 4096)
    assert torch.equal(rows, rows_ref) and torch.allclose(d, d_ref, atol=1e-3)
    n = APPROXIMATE_FROM
    big = rng.normal(size=(n, 16)).astype(np.float32)
    planted = rng.choice(n, 200, replace=False)
    big[planted[100:]] = big[planted[:100]] + 1e-3 * rng.normal(size=(100, 16)).astype(np.float32)
    _, found = knn(torch.from_numpy(big), torch.from_numpy(big), 1, self_offset=0, approximate=True)
    assert all(int(found[a, 0]) == b for a, b in zip(planted[:100], planted[100:]))
