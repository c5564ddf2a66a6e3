"""`nil index build/query/stats` and `nil train --ann faiss --index-from`, end to end on tiny data."""

import json

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from PIL import Image

from cli.main import main


def run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def trained(tmp_path, tiny_npz):
    out = tmp_path / "run"
    result = run(["train", "--data", tiny_npz, "--out", out, "--model", "small_cnn", "--epochs", "1",
                  "--batch-size", "32", "--embed-dim", "8", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    return out / "best.pt"


def test_build_query_stats_from_a_checkpoint(tmp_path, trained, tiny_npz):
    idx = tmp_path / "idx"
    result = run(["index", "build", "--checkpoint", trained, "--out", idx, "--index", "flat", "--device", "cpu",
                  "--no-progress"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((idx / "manifest.json").read_text())
    for key in ("format_version", "dim", "metric", "classes", "counts", "kind", "params", "checkpoint_sha256",
                "source", "created"):
        assert key in manifest
    assert manifest["dim"] == 8 and sum(manifest["counts"]) == 96 and manifest["kind"] == "flat"

    stats = json.loads(run(["index", "stats", idx, "--json"]).output)
    assert stats["count"] == 96 and stats["counts"] == [32, 32, 32] and stats["dim"] == 8 and stats["bytes"] > 0

    result = run(["index", "query", "--index", idx, "--ids", "3,17", "--k", "4", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    res = json.loads(result.output)["results"]
    assert [r["query_id"] for r in res] == [3, 17]
    group = zarr.open_group(str(idx / "embeddings.zarr"), mode="r")
    vectors, labels, ids = group["vectors"][:], group["labels"][:], group["ids"][:]
    for r in res:
        q = vectors[ids == r["query_id"]][0]
        assert r["query_label"] == labels[ids == r["query_id"]][0]
        other = labels != r["query_label"]
        d = np.linalg.norm(vectors[other] - q, axis=1)
        assert [n["id"] for n in r["neighbors"]] == list(ids[other][np.argsort(d, kind="stable")[:4]])
        assert [n["distance"] for n in r["neighbors"]] == pytest.approx(np.sort(d)[:4], abs=1e-4)
        assert all(n["label"] != r["query_label"] and n["key"].startswith("train/") for n in r["neighbors"])

    image = tmp_path / "q.png"
    Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).save(image)
    result = run(["index", "query", "--index", idx, "--image", image, "--label", "1", "--k", "2", "--json",
                  "--device", "cpu"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.output)["results"][0]
    assert r["query_label"] == 1 and len(r["neighbors"]) == 2 and all(n["label"] != 1 for n in r["neighbors"])


def test_build_from_precomputed_embeddings_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    store = zarr.open_group(str(tmp_path / "e.zarr"), mode="w")
    vectors = rng.normal(size=(50, 6)).astype(np.float32)
    for name, arr in (("vectors", vectors), ("labels", np.arange(50) % 2), ("ids", np.arange(100, 150))):
        store.create_array(name, shape=arr.shape, dtype=arr.dtype)[:] = arr
    idx = tmp_path / "idx"
    result = run(["index", "build", "--embeddings", tmp_path / "e.zarr", "--out", idx, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    result = run(["index", "query", "--index", idx, "--ids", "100", "--k", "1", "--json", "--device", "cpu"])
    hit = json.loads(result.output)["results"][0]["neighbors"][0]
    d = np.linalg.norm(vectors[1::2] - vectors[0], axis=1)
    assert hit["id"] == 101 + 2 * int(np.argmin(d)) and hit["label"] == 1

    bad = run(["index", "query", "--index", idx, "--ids", "7", "--device", "cpu"])
    assert bad.exit_code == 1 and "not in the index" in bad.output
    missing = run(["index", "stats", tmp_path / "nowhere"])
    assert missing.exit_code == 1 and "Traceback" not in missing.output
    both = run(["index", "build", "--embeddings", tmp_path / "e.zarr", "--checkpoint", "x.pt", "--out", tmp_path / "j"])
    assert both.exit_code == 1 and "either" in both.output


def test_train_starts_its_memory_from_a_built_index(tmp_path, trained, tiny_npz):
    idx = tmp_path / "idx"
    assert run(["index", "build", "--checkpoint", trained, "--out", idx, "--device", "cpu", "--no-progress"]).exit_code == 0
    out = tmp_path / "resumed"
    result = run(["train", "--data", tiny_npz, "--out", out, "--model", "small_cnn", "--epochs", "1", "--batch-size",
                  "32", "--embed-dim", "8", "--device", "cpu", "--no-progress", "--ann", "faiss", "--index-from", idx,
                  "--warmup-epochs", "0"])
    assert result.exit_code == 0, result.output
    line = json.loads((out / "metrics.jsonl").read_text())
    # the memory starts full, so even the first batch of the first epoch finds a distractor for every sample
    assert line["train"]["distractor_rate"] == pytest.approx(1.0)
    wrong = run(["train", "--data", tiny_npz, "--out", tmp_path / "w", "--model", "small_cnn", "--epochs", "1",
                 "--embed-dim", "16", "--device", "cpu", "--ann", "faiss", "--index-from", idx])
    assert wrong.exit_code == 1 and "--embed-dim" in wrong.output
    assert not (tmp_path / "w").exists()
