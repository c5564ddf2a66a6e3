"""save_index / load_index / index_stats: round trip, atomic writer, refusal of bad folders."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import zarr

import faiss_index.persistence.embeddings as zarr_store
import faiss_index.persistence.save as persist
from faiss_index import IndexFormatError, IndexInputError, index_stats, load_index, make_index, save_index
from faiss_index.fileio import sha256_file
from faiss_index.synthetic import clustered

CLASSES = ["benign", "malignant", "normal"]


def filled(kind, n=900, delta=True, sparse=False, **params):
    x, y = clustered(n, 16, 3, clusters_per_class=6, spread=0.5, seed=1)
    ids = torch.arange(n) * 2 + 100
    if sparse:  # hashed 62-bit sample keys
        ids = torch.randperm(n, generator=torch.Generator().manual_seed(0)) * (2**52 + 7) + 2**61
    index = make_index(kind, 16, 3, **params)
    index.upsert(ids, x, y)
    index.build()
    if delta:  # leave some changed rows in the delta, including a new id and a label change
        index.upsert(torch.tensor([int(ids[0]), int(ids[1]), 2**40 + 99999]), x[:3] * 0.5, torch.tensor([2, 0, 1]))
    return index, x, y, ids


def same_answers(a, b, x, y, ids):
    q = torch.arange(0, len(x), 9)
    for same in (False, True):
        ra = a._search(x[q], y[q], 3, ids[q], True, same)
        rb = b._search(x[q], y[q], 3, ids[q], True, same)
        assert torch.equal(ra.ids, rb.ids) and torch.equal(ra.labels, rb.labels)
        assert torch.equal(ra.distances, rb.distances) and torch.equal(ra.vectors, rb.vectors)


KIND_PARAMS = [("exact", {}), ("flat", {}), ("ivf", {}), ("ivfpq", {}), ("hnsw", {}),
               ("ivfpq", {"strategy": "global"}), ("ivfpq", {"sparse": True}), ("exact", {"sparse": True}),
               ("ivfpq", {"store_dtype": "float16"}), ("exact", {"store_dtype": "float16"})]


@pytest.mark.parametrize("kind, params", KIND_PARAMS)
def test_round_trip_gives_identical_results(tmp_path, kind, params):
    if kind != "exact":
        pytest.importorskip("faiss")
    index, x, y, ids = filled(kind, **params)
    keys = [f"img_{i}.png" for i in range(len(index))]
    out = save_index(index, tmp_path / "idx", classes=CLASSES, keys=keys, checkpoint_sha256="ab" * 32,
                     source="unit-test", extra={"checkpoint": "/runs/a/best.pt"})
    loaded, manifest = load_index(out)
    assert type(loaded) is type(index) and len(loaded) == len(index)
    assert loaded.store.vectors.dtype == index.store.vectors.dtype  # a float16 store is reloaded as one
    assert loaded.params == index.params and loaded.counts() == index.counts()
    assert getattr(loaded, "delta_size", 0) == getattr(index, "delta_size", 0)
    same_answers(index, loaded, x, y, ids)
    found = loaded.search_other_class(x[:50], y[:50], 1, query_ids=ids[:50]).ids[:, 0]
    stored = set(ids.tolist()) | {2**40 + 99999}
    assert set(found.tolist()) <= stored and not (found == ids[:50]).any()
    for key in ("format_version", "dim", "metric", "classes", "counts", "kind", "params", "checkpoint_sha256",
                "source", "created", "files"):
        assert key in manifest
    assert manifest["classes"] == CLASSES and manifest["dim"] == 16 and manifest["metric"] == "l2"
    assert manifest["checkpoint"] == "/runs/a/best.pt" and manifest["source"] == "unit-test"
    group = zarr.open_group(str(out / "embeddings.zarr"), mode="r")
    assert group["vectors"].shape == (len(index), 16) and group["vectors"].dtype == "float32"
    assert list(group["keys"][:3]) == keys[:3]
    assert group["ids"][:].tolist() == index.store.view()[2].tolist()
    stats = index_stats(out)
    assert stats["count"] == len(index) and stats["counts"] == index.counts()
    assert stats["kind"] == kind and stats["dim"] == 16 and stats["params"] == manifest["params"]
    assert stats["bytes"] == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


def test_keys_by_id_and_validation(tmp_path):
    index, *_ = filled("exact", n=30, delta=False)
    out = save_index(index, tmp_path / "a", classes=CLASSES, keys={100: "first"})
    keys = zarr.open_group(str(out / "embeddings.zarr"), mode="r")["keys"][:]
    assert keys[0] == "first" and keys[1] == ""
    with pytest.raises(IndexInputError, match="keys has 2 entries"):
        save_index(index, tmp_path / "b", classes=CLASSES, keys=["a", "b"])
    with pytest.raises(IndexInputError, match="classes has 2 names"):
        save_index(index, tmp_path / "b", classes=CLASSES[:2])
    with pytest.raises(IndexInputError, match="reserved manifest keys: dim"):
        save_index(index, tmp_path / "b", classes=CLASSES, extra={"dim": 3})
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "precious.txt").write_text("do not delete")
    with pytest.raises(IndexInputError, match="not an index folder"):
        save_index(index, tmp_path / "c", classes=CLASSES)
    assert (tmp_path / "c" / "precious.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("where", ["embeddings", "manifest", "swap"])
def test_crash_while_writing_keeps_the_previous_index(tmp_path, monkeypatch, where):
    index, x, y, ids = filled("exact", n=60, delta=False)
    out = save_index(index, tmp_path / "idx", classes=CLASSES)
    before = (out / "manifest.json").read_text()
    index.upsert([5000], torch.ones(1, 16), [0])  # the new save would differ

    def boom(*a, **k):
        raise OSError("disk full")

    if where == "embeddings":  # midway through writing the arrays
        real = zarr_store._array
        calls = []

        def second_array_fails(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                boom()
            return real(*a, **k)

        monkeypatch.setattr(zarr_store, "_array", second_array_fails)
    elif where == "manifest":
        monkeypatch.setattr(persist, "_write_json", boom)
    else:  # after the old folder was moved aside, before the new one is in place
        real_rename = os.rename

        def rename(src, dst):
            if ".tmp-" in str(src):
                boom()
            return real_rename(src, dst)

        monkeypatch.setattr(persist.os, "rename", rename)
    with pytest.raises(OSError, match="disk full"):
        save_index(index, out, classes=CLASSES)
    monkeypatch.undo()
    assert (out / "manifest.json").read_text() == before
    loaded, _ = load_index(out)
    assert len(loaded) == 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temp or backup folder left


def test_overwrite_replaces_the_index(tmp_path):
    index, *_ = filled("exact", n=40, delta=False)
    out = save_index(index, tmp_path / "idx", classes=CLASSES)
    index.upsert([7777], torch.zeros(1, 16), [2])
    save_index(index, out, classes=CLASSES)
    assert len(load_index(out)[0]) == 41
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    pytest.importorskip("faiss")
    index, *_ = filled("ivfpq", n=300)
    return save_index(index, tmp_path_factory.mktemp("pristine") / "idx", classes=CLASSES)


@pytest.fixture
def saved(pristine, tmp_path):
    return Path(shutil.copytree(pristine, tmp_path / "idx"))


def write_manifest_text(folder, text):
    """Replace manifest.json and re-seal it, so the checks behind its checksum are exercised."""
    (folder / "manifest.json").write_text(text)
    (folder / "manifest.sha256").write_text(sha256_file(folder / "manifest.json"))


def edit_manifest(folder, **changes):
    m = json.loads((folder / "manifest.json").read_text())
    m.update(changes)
    write_manifest_text(folder, json.dumps(m))


@pytest.mark.parametrize("damage, match", [
    (lambda f: (f / "manifest.json").unlink(), "manifest.json is missing"),
    (lambda f: write_manifest_text(f, "{not json"), "not valid JSON"),
    (lambda f: edit_manifest(f, format_version=99), "format_version 99"),
    (lambda f: edit_manifest(f, dim=32), "dim 32"),
    (lambda f: edit_manifest(f, counts=[1, 2, 3]), "counts sum to 6"),
    (lambda f: edit_manifest(f, classes=["a", "b"]), "counts has 3 entries for 2 classes"),
    (lambda f: (f / "structure" / "ivf.faiss").unlink(), "structure/ivf.faiss .*is missing"),
    (lambda f: (f / "embeddings.zarr" / "labels" / "zarr.json").unlink(), "labels/zarr.json .*is missing"),
])
def test_damaged_index_is_refused(saved, damage, match):
    damage(saved)
    with pytest.raises(IndexFormatError, match=match):
        load_index(saved)


@pytest.mark.parametrize("rel", ["structure/ivf.faiss", "embeddings.zarr/vectors/c/0/0"])
def test_flipped_byte_is_detected(saved, rel):
    path = saved / rel
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match=f"{rel} in .* is corrupt"):
        load_index(saved)


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(IndexFormatError, match="does not exist"):
        load_index(tmp_path / "nope")
    with pytest.raises(IndexFormatError, match="does not exist"):
        index_stats(tmp_path / "nope")
