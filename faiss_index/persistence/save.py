"""Saving and loading an index folder, atomically and verified.

Layout of ``out_dir``::

    manifest.json        format_version, dim, metric, classes, counts, kind, params, files{path: sha256}, ...
    manifest.sha256      sha256 of manifest.json's bytes (a bit flip in the manifest is caught too)
    embeddings.zarr/     vectors (N, D) float32, labels (N,), ids (N,), keys (N,) str, delta_rows
    structure/           faiss files of the approximate structure (CPU copies of GPU indexes)

Rows are saved in store order, so faiss ids (store rows) stay valid and a loaded index answers
exactly like the saved one, delta included. The writer builds everything in a temporary folder
beside ``out_dir``, fsyncs it, then swaps it in with renames: a crash leaves the previous index or
none, never a half one; a failed write (a full disk) raises :class:`IndexWriteError` and leaves
the previous index as it was. The reader checks the manifest's own checksum, every file's
checksum, that no file is present that the manifest does not list, and the array shapes, and
refuses anything else with :class:`IndexFormatError`. :func:`verify_index` reports per file.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..indexes.base import BaseIndex
from ..errors import IndexFormatError, IndexInputError, IndexWriteError

LOG = logging.getLogger(__name__)

__all__ = ["save_index", "load_index", "index_stats", "verify_index", "FORMAT_VERSION", "staging_folder",
           "create_embeddings"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_SUM = "manifest.sha256"
EMBEDDINGS = "embeddings.zarr"
STRUCTURE = "structure"
REQUIRED_KEYS = ("format_version", "dim", "metric", "classes", "counts", "count", "kind", "params",
                 "construct", "engine", "checkpoint_sha256", "source", "created", "files")


# ---------------------------------------------------------------------------------------- save
def save_index(index: BaseIndex, out_dir: str | Path, *, classes: list[str], keys: list[str] | dict | None = None,
               checkpoint_sha256: str | None = None, source: str | None = None,
               extra: dict | None = None, staged: str | Path | None = None) -> Path:
    """Write index to out_dir atomically; return out_dir as a Path.

    classes: one name per class (len == num_classes). keys: one string per stored sample in store
    order (the order ids were first upserted), or a dict {sample id: key}; None stores "".
    extra: more JSON-serialisable manifest entries (top level; may not replace required keys).
    staged: a folder from :func:`staging_folder` whose ``embeddings.zarr`` (:func:`create_embeddings`)
    the caller has filled (e.g. several processes, each its own rows) with the index's rows in
    store order: adopted instead of written; the structure and the manifest are written here, last.
    """
    out = Path(out_dir)
    classes = [str(c) for c in classes]
    if len(classes) != index.num_classes:
        raise IndexInputError(f"classes has {len(classes)} names but the index has {index.num_classes} classes.")
    vectors, labels, ids = (t.detach().cpu() for t in index.store.view())
    n = int(ids.shape[0])
    key_arr = _keys_array(keys, ids)
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(REQUIRED_KEYS))
    if clash:
        raise IndexInputError(f"extra may not set reserved manifest keys: {', '.join(clash)}.")
    if out.exists() and not out.is_dir():
        raise IndexInputError(f"{out} exists and is not a folder.")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise IndexInputError(f"{out} exists, is not empty and is not an index folder; refusing to replace it.")

    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    tmp = Path(staged) if staged is not None else out.parent / f".{out.name}.tmp-{tag}"
    old = out.parent / f".{out.name}.old-{tag}"
    moved_old = False
    try:
        if staged is None:
            tmp.mkdir()
            _write_embeddings(tmp / EMBEDDINGS, vectors.numpy(), labels.numpy(), ids.numpy(), key_arr,
                              _delta_rows(index))
        else:
            _adopt_embeddings(tmp / EMBEDDINGS, ids.numpy(), _delta_rows(index))
        (tmp / STRUCTURE).mkdir()
        engine = getattr(index, "engine", None)
        engine_meta = {"files": []}
        if engine is not None:
            engine_meta = {**engine.save(tmp / STRUCTURE), "type": type(engine).__name__,
                           "resolved": engine.resolved}
        manifest = {
            "format_version": FORMAT_VERSION,
            "dim": index.dim,
            "metric": "l2",
            "num_classes": index.num_classes,
            "classes": classes,
            "counts": torch.bincount(labels, minlength=index.num_classes).tolist(),
            "count": n,
            "kind": index.kind,
            "strategy": getattr(index, "strategy", None),
            "params": _jsonable(index.params),
            "construct": _construct_args(index),
            "engine": _jsonable(engine_meta),
            "steps_since_refresh": int(getattr(index, "_steps", 0)),
            "checkpoint_sha256": checkpoint_sha256,
            "source": source,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **_jsonable(extra),
        }
        manifest["files"] = {rel: _sha256(tmp / rel) for rel in _files_under(tmp)}
        _write_json(tmp / MANIFEST, manifest)
        (tmp / MANIFEST_SUM).write_text(_sha256(tmp / MANIFEST) + "\n", encoding="utf-8")
        _fsync_tree(tmp)
        if out.exists():
            os.rename(out, old)
            moved_old = True
        os.rename(tmp, out)
        fsync_dir(out.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved_old and not out.exists():
            os.rename(old, out)
        if isinstance(exc, OSError):
            kept = "the previous index is unchanged" if out.exists() else "nothing was written"
            raise IndexWriteError(f"cannot write the index to {out} ({exc.strerror or exc}); {kept}.") from exc
        raise
    if moved_old:
        shutil.rmtree(old, ignore_errors=True)
    LOG.info("saved %s index of %d vectors to %s", index.kind, n, out)
    return out


def _delta_rows(index: BaseIndex) -> np.ndarray:
    rows = index._delta_rows() if hasattr(index, "_delta_rows") else torch.empty(0, dtype=torch.int64)
    return rows.detach().cpu().numpy().astype(np.int64)


def _construct_args(index: BaseIndex) -> dict:
    if index.kind == "exact":
        return {"chunk": index.chunk}
    args = index._user_params.as_dict()
    args["refresh_every"] = index.refresh_every
    return args


def _keys_array(keys, ids: torch.Tensor) -> np.ndarray:
    n = int(ids.shape[0])
    if keys is None:
        return np.array([""] * n, dtype=object)
    if isinstance(keys, dict):
        return np.array([str(keys.get(i, "")) for i in ids.tolist()], dtype=object)
    keys = list(keys)
    if len(keys) != n:
        raise IndexInputError(f"keys has {len(keys)} entries but the index stores {n} samples.")
    return np.array([str(k) for k in keys], dtype=object)


def staging_folder(out_dir: str | Path) -> Path:
    """A fresh temporary folder name beside ``out_dir`` for :func:`save_index` ``staged`` (not created)."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"


def create_embeddings(folder: str | Path, n: int, dim: int, rows_per_chunk: int) -> Path:
    """Create ``folder/embeddings.zarr`` with empty (n, dim) vectors and (n,) labels, ids, keys.

    Writers then fill disjoint row ranges; ranges that start and end on multiples of
    ``rows_per_chunk`` touch disjoint chunk files, so several processes can write at once.
    """
    import zarr  # noqa: PLC0415

    path = Path(folder) / EMBEDDINGS
    path.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(str(path), mode="w")
    c = max(1, min(n, rows_per_chunk))
    _array(group, "vectors", np.zeros((0, dim), np.float32), chunks=(c, dim), shape=(n, dim))
    _array(group, "labels", np.zeros(0, np.int64), chunks=(c,), shape=(n,))
    _array(group, "ids", np.zeros(0, np.int64), chunks=(c,), shape=(n,))
    _array(group, "keys", np.array([], dtype=object), chunks=(c,), text=True, shape=(n,))
    return path


def _adopt_embeddings(path: Path, ids: np.ndarray, delta: np.ndarray) -> None:
    """Check that a staged embeddings.zarr holds the index's rows; add the delta rows."""
    import zarr  # noqa: PLC0415

    group = zarr.open_group(str(path), mode="r+")
    if not np.array_equal(np.asarray(group["ids"][:]), ids):
        raise IndexInputError(f"the staged {path} does not hold the index's samples in store order.")
    _array(group, "delta_rows", delta, chunks=(max(1, min(len(delta), 1 << 20)),))


def _write_embeddings(path: Path, vectors, labels, ids, keys, delta) -> None:
    import zarr  # noqa: PLC0415

    group = zarr.open_group(str(path), mode="w")
    n, d = vectors.shape
    _array(group, "vectors", np.ascontiguousarray(vectors, dtype=np.float32), chunks=(max(1, min(n, 65536)), d))
    _array(group, "labels", labels.astype(np.int64), chunks=(max(1, min(n, 1 << 20)),))
    _array(group, "ids", ids.astype(np.int64), chunks=(max(1, min(n, 1 << 20)),))
    _array(group, "keys", keys, chunks=(max(1, min(n, 1 << 18)),), text=True)
    _array(group, "delta_rows", delta, chunks=(max(1, min(len(delta), 1 << 20)),))


def _array(group, name: str, data: np.ndarray, chunks, text: bool = False, shape: tuple | None = None) -> None:
    shape = data.shape if shape is None else shape  # a larger shape leaves the array to be filled later
    if hasattr(group, "create_array"):  # zarr >= 3
        arr = group.create_array(name, shape=shape, dtype=str if text else data.dtype, chunks=chunks,
                                 compressors=None if not text else "auto")
    else:  # zarr 2
        kw = {}
        if text:
            import numcodecs  # noqa: PLC0415

            kw = {"dtype": object, "object_codec": numcodecs.VLenUTF8()}
        arr = group.create_dataset(name, shape=shape, chunks=chunks, dtype=kw.pop("dtype", data.dtype), **kw)
    if data.size:
        arr[...] = data


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


def _files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        else:
            fsync_dir(p)
    fsync_dir(root)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------- load
def _read_manifest(folder: Path) -> dict:
    if not folder.is_dir():
        raise IndexFormatError(f"index folder {folder} does not exist.")
    path = folder / MANIFEST
    if not path.is_file():
        raise IndexFormatError(f"{folder} is not an index folder: {MANIFEST} is missing.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFormatError(f"{path} is not valid JSON ({e}).") from e
    if not isinstance(manifest, dict):
        raise IndexFormatError(f"{path} does not hold a JSON object.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexFormatError(
            f"{path} has format_version {manifest.get('format_version')!r}; this version reads {FORMAT_VERSION}.")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise IndexFormatError(f"{path} lacks required key(s): {', '.join(missing)}.")
    return manifest


def _check_manifest_sum(folder: Path) -> str:
    """'ok', or 'unchecked' for a folder written before manifest.sha256 existed; raises if it differs."""
    sum_path = folder / MANIFEST_SUM
    if not sum_path.is_file():
        LOG.warning("%s has no %s (written by an older nil): the manifest itself is not checksummed",
                    folder, MANIFEST_SUM)
        return "unchecked"
    try:
        expected = sum_path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        expected = ""
    if _sha256(folder / MANIFEST) != expected:
        raise IndexFormatError(f"{folder / MANIFEST} is corrupt (it does not match {MANIFEST_SUM}).")
    return "ok"


def _file_statuses(folder: Path, manifest: dict) -> list[tuple[str, str]]:
    """(path, status) for every listed file (ok, missing, corrupt) and every unlisted one (unlisted)."""
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise IndexFormatError(f"{folder / MANIFEST} lists no files.")
    out = []
    for rel, digest in sorted(files.items()):
        p = folder / rel
        if ".." in Path(rel).parts or not p.is_file():
            out.append((rel, "missing"))
        else:
            out.append((rel, "ok" if _sha256(p) == digest else "corrupt"))
    # An extra file can change what zarr or faiss read (e.g. a chunk zarr skipped as all-fill).
    for rel in _files_under(folder):
        if rel not in files and rel not in (MANIFEST, MANIFEST_SUM):
            out.append((rel, "unlisted"))
    return out


def _verify_files(folder: Path, manifest: dict) -> None:
    for rel, status in _file_statuses(folder, manifest):
        if status == "missing":
            raise IndexFormatError(f"index file {rel} listed in the manifest is missing from {folder}.")
        if status == "corrupt":
            raise IndexFormatError(f"index file {rel} in {folder} is corrupt (checksum mismatch).")
        if status == "unlisted":
            raise IndexFormatError(f"{folder} holds {rel}, which its manifest does not list; "
                                   "the folder was altered after it was written.")


def verify_index(index_dir: str | Path) -> dict:
    """Check an index folder without trusting any of it; never raises for a bad folder.

    Returns ``{"ok": bool, "files": [{"path", "status"}], "error": str | None}``: status is ok,
    missing, corrupt or unlisted per file (manifest.json: ok, corrupt or unchecked), then, when
    every file is sound, the result of a full :func:`load_index` (shapes, counts, structure).
    """
    folder = Path(index_dir)
    report: dict = {"ok": False, "files": [], "error": None}
    manifest_path = folder / MANIFEST
    try:
        status = _check_manifest_sum(folder) if manifest_path.is_file() else "missing"
    except IndexFormatError as e:
        status, report["error"] = "corrupt", str(e)
    report["files"].append({"path": MANIFEST, "status": status})
    if status in ("missing", "corrupt"):
        report["error"] = report["error"] or (f"index folder {folder} does not exist." if not folder.is_dir()
                                              else f"{folder} is not an index folder: {MANIFEST} is missing.")
        return report
    try:
        manifest = _read_manifest(folder)
        statuses = _file_statuses(folder, manifest)
    except IndexFormatError as e:
        report["error"] = str(e)
        return report
    report["files"] += [{"path": rel, "status": st} for rel, st in statuses]
    bad = [f for f in report["files"] if f["status"] not in ("ok", "unchecked")]
    if bad:
        report["error"] = f"{len(bad)} file(s) of {folder} are {', '.join(sorted({f['status'] for f in bad}))}."
        return report
    try:
        load_index(folder)
    except (IndexFormatError, IndexInputError) as e:
        report["error"] = str(e)
        return report
    report["ok"] = True
    return report


def load_index(index_dir: str | Path, device: str | torch.device = "cpu") -> tuple[BaseIndex, dict]:
    """Load a saved index onto device; return (index, manifest).

    Raises IndexFormatError naming the problem if the folder is missing, the manifest is
    invalid, a file is missing or corrupt, or the arrays disagree with the manifest.
    """
    import zarr  # noqa: PLC0415

    from ..indexes.factory import make_index  # noqa: PLC0415 - avoids an import cycle

    folder = Path(index_dir)
    if folder.is_dir() and (folder / MANIFEST).is_file():
        _check_manifest_sum(folder)
    manifest = _read_manifest(folder)
    _verify_files(folder, manifest)
    dim, counts, n = manifest["dim"], manifest["counts"], manifest["count"]
    classes = manifest["classes"]
    if not isinstance(dim, int) or dim <= 0:
        raise IndexFormatError(f"{folder / MANIFEST} has an invalid dim {dim!r}.")
    if not isinstance(classes, list) or not classes or len(counts) != len(classes):
        raise IndexFormatError(f"{folder / MANIFEST}: counts has {len(counts)} entries for {len(classes)} classes.")
    if sum(counts) != n:
        raise IndexFormatError(f"{folder / MANIFEST}: counts sum to {sum(counts)} but count is {n}.")
    try:
        group = zarr.open_group(str(folder / EMBEDDINGS), mode="r")
        vectors = np.asarray(group["vectors"][...])
        labels = np.asarray(group["labels"][...])
        ids = np.asarray(group["ids"][...])
        keys_shape = group["keys"].shape
        delta = np.asarray(group["delta_rows"][...])
    except Exception as e:  # zarr raises many types for broken stores
        raise IndexFormatError(f"{folder / EMBEDDINGS} cannot be read ({type(e).__name__}: {e}).") from e
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise IndexFormatError(f"stored vectors have shape {vectors.shape} but the manifest says dim {dim}.")
    for name, shape in (("vectors", vectors.shape[:1]), ("labels", labels.shape), ("ids", ids.shape),
                        ("keys", tuple(keys_shape))):
        if tuple(shape) != (n,):
            raise IndexFormatError(f"stored {name} hold {shape[0] if shape else '?'} rows but the manifest says {n}.")
    if n and (labels.min() < 0 or labels.max() >= len(classes)):
        raise IndexFormatError("stored labels fall outside the manifest's classes.")
    if np.bincount(labels, minlength=len(classes)).tolist() != list(counts):
        raise IndexFormatError("stored labels disagree with the manifest's per-class counts.")
    if delta.size and (delta.min() < 0 or delta.max() >= n):
        raise IndexFormatError("stored delta rows fall outside the stored rows.")

    kind = manifest["kind"]
    try:
        index = make_index(kind, dim, len(classes), device, **manifest["construct"])
    except IndexInputError as e:
        raise IndexFormatError(f"{folder / MANIFEST} describes an index that cannot be made: {e}") from e
    index.store.load_rows(torch.from_numpy(vectors), torch.from_numpy(labels), torch.from_numpy(ids))
    engine = getattr(index, "engine", None)
    meta = manifest["engine"]
    if engine is not None and meta.get("type") != type(engine).__name__:
        # Saved on another device (e.g. GPU shards, read on CPU): rebuild from the stored vectors.
        LOG.info("index in %s was saved with a %s structure; rebuilding it as %s for %s", folder,
                 meta.get("type"), type(engine).__name__, index.device)
        if n:
            index.refresh()
    elif engine is not None:
        try:
            engine.load(folder / STRUCTURE, meta)
        except (KeyError, RuntimeError, ValueError, OSError) as e:
            raise IndexFormatError(f"the faiss structure in {folder / STRUCTURE} cannot be loaded ({e}).") from e
        if engine.built and engine.ntotal > n:
            raise IndexFormatError(f"the faiss structure holds {engine.ntotal} rows but only {n} are stored.")
        engine.resolved = dict(meta.get("resolved", engine.resolved))
        index._restore_delta(torch.from_numpy(delta), int(manifest.get("steps_since_refresh", 0)))
    return index, manifest


def index_stats(index_dir: str | Path) -> dict:
    """Summary of a saved index from its manifest: count, counts, kind, params, dim, bytes, ..."""
    folder = Path(index_dir)
    manifest = _read_manifest(folder)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return {
        "count": manifest["count"], "counts": manifest["counts"], "kind": manifest["kind"],
        "params": manifest["params"], "dim": manifest["dim"], "bytes": size,
        "classes": manifest["classes"], "strategy": manifest.get("strategy"), "created": manifest["created"],
        "checkpoint_sha256": manifest["checkpoint_sha256"], "source": manifest["source"],
        "format_version": manifest["format_version"],
    }
