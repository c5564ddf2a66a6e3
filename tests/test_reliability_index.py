"""Index folders: every kind of file, truncated or bit-flipped, is refused on load and by `nil index verify`."""

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import faiss_index.persistence.save as persist
from faiss_index import IndexFormatError, IndexWriteError, load_index, make_index, save_index, verify_index
from faiss_index.synthetic import clustered

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    pytest.importorskip("faiss")
    x, y = clustered(300, 8, 3, clusters_per_class=2, spread=0.5, seed=2)
    index = make_index("ivf", 8, 3, nlist=4, inplace=False)  # upserted rows wait in the delta
    index.upsert(torch.arange(300), x, y)
    index.build()
    index.upsert(torch.tensor([1, 400]), x[:2] * 0.5, torch.tensor([2, 0]))  # a delta in flight
    return save_index(index, tmp_path_factory.mktemp("p") / "idx", classes=CLASSES, keys=[f"k{i}" for i in range(301)])


def all_files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def kinds_of_file(folder):
    """One file of each kind: manifest, its checksum, zarr metadata, each array's chunks, faiss structure."""
    files = all_files(folder)
    picks = ["manifest.json", "manifest.sha256", "embeddings.zarr/zarr.json"]
    for array in ("vectors", "labels", "ids", "keys", "delta_rows"):
        picks.append(f"embeddings.zarr/{array}/zarr.json")
        picks.append(next(f for f in files if f.startswith(f"embeddings.zarr/{array}/c")))
    picks += [f for f in files if f.startswith("structure/")]
    assert set(picks) <= set(files) and any(f.startswith("structure/") for f in picks)
    return picks


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))


def test_every_kind_of_file_truncated_or_flipped_is_refused(pristine, tmp_path):
    load_index(pristine)  # sound to start with
    assert verify_index(pristine)["ok"]
    for rel in kinds_of_file(pristine):
        for how in ("truncate", "flip"):
            folder = Path(shutil.copytree(pristine, tmp_path / f"{rel.replace('/', '_')}-{how}"))
            damage(folder / rel, how)
            with pytest.raises(IndexFormatError, match="corrupt"):
                load_index(folder)
            report = verify_index(folder)
            assert not report["ok"] and report["error"]
            status = {f["path"]: f["status"] for f in report["files"]}
            if rel == "manifest.sha256":
                assert status["manifest.json"] == "corrupt"
            else:
                assert status[rel] == "corrupt", (rel, how, status)


def test_a_missing_or_unlisted_file_is_refused(pristine, tmp_path):
    folder = Path(shutil.copytree(pristine, tmp_path / "extra"))
    (folder / "embeddings.zarr" / "vectors" / "c" / "9").mkdir(parents=True)
    (folder / "embeddings.zarr" / "vectors" / "c" / "9" / "0").write_bytes(b"\0" * 64)
    with pytest.raises(IndexFormatError, match="does not list"):
        load_index(folder)
    assert {"path": "embeddings.zarr/vectors/c/9/0", "status": "unlisted"} in verify_index(folder)["files"]
    folder = Path(shutil.copytree(pristine, tmp_path / "gone"))
    gone = next(f for f in all_files(folder) if f.startswith("structure/"))
    (folder / gone).unlink()
    assert {"path": gone, "status": "missing"} in verify_index(folder)["files"]


def verify_cli(folder):
    return subprocess.run([sys.executable, "-m", "cli", "index", "verify", str(folder)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_index_verify_command_prints_each_file_and_exits_non_zero_on_damage(pristine, tmp_path):
    ok = verify_cli(pristine)
    assert ok.returncode == 0, ok.stderr
    assert "ok  manifest.json" in ok.stdout and ok.stdout.strip().endswith("ok")
    assert len(ok.stdout.splitlines()) == len(all_files(pristine)) - 1 + 1  # sha256 sidecar is not a line; + verdict
    folder = Path(shutil.copytree(pristine, tmp_path / "bad"))
    damage(folder / "embeddings.zarr" / "ids" / "zarr.json", "flip")
    bad = verify_cli(folder)
    assert bad.returncode == 1 and "corrupt  embeddings.zarr/ids/zarr.json" in bad.stdout and "FAILED" in bad.stdout
    missing = verify_cli(tmp_path / "nothing-here")
    assert missing.returncode == 1 and "does not exist" in missing.stdout


def test_disk_full_while_saving_keeps_the_previous_index(pristine, tmp_path, monkeypatch):
    folder = Path(shutil.copytree(pristine, tmp_path / "idx"))
    before = {rel: (folder / rel).read_bytes() for rel in all_files(folder)}
    index, _ = load_index(folder)
    index.upsert(torch.tensor([999]), torch.ones(1, 8), torch.tensor([1]))

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(persist.os, "fsync", no_space)
    with pytest.raises(IndexWriteError, match="No space left on device.*previous index is unchanged"):
        save_index(index, folder, classes=CLASSES)
    monkeypatch.undo()
    assert {rel: (folder / rel).read_bytes() for rel in all_files(folder)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temp folder left
    assert len(load_index(folder)[0]) == 301
