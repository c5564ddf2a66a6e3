"""Build and query distractor indexes from a trained model (the model side of ``nil index``).

The search engine itself lives in :mod:`faiss_index`; this module embeds data with a checkpoint
and hands vectors, labels, sample ids and keys to it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import torch
import zarr
from PIL import Image, UnidentifiedImageError

import faiss_index
from faiss_index.fileio import sha256_file
from nil import distributed
from nil.embedding import ImageEmbedder, embed_split
from nil.errors import NilError
from nil.evaluate import open_with_checkpoint
from nil.loaders import checkpoint_loader
from nil.predict import predict
from nil.runtime import resolve_device

LOG = logging.getLogger(__name__)


def read_embeddings(path: str | Path) -> dict:
    """Precomputed embeddings from a zarr group with ``vectors`` (N, D), ``labels`` (N,), ``ids`` (N,)."""
    path = Path(path)
    if not path.exists():
        raise NilError(f"embeddings store {path} does not exist")
    try:
        group = zarr.open_group(str(path), mode="r")
        vectors = np.asarray(group["vectors"][:], dtype=np.float32)
        labels = np.asarray(group["labels"][:], dtype=np.int64)
        ids = np.asarray(group["ids"][:])
        keys = [str(k) for k in group["keys"][:]] if "keys" in group else [str(i) for i in ids]
        classes = list(group.attrs.get("classes", []))
    except KeyError as exc:
        raise NilError(f"embeddings store {path} lacks the array {exc}; it needs vectors, labels and ids") from None
    except Exception as exc:
        raise NilError(f"cannot read embeddings store {path}: {exc}") from None
    if vectors.ndim != 2 or labels.shape != (len(vectors),) or ids.shape != (len(vectors),):
        raise NilError(f"{path}: vectors must be (N, D) and labels, ids (N,); got {vectors.shape}, "
                       f"{labels.shape}, {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise NilError(f"{path}: ids must be integers, not {ids.dtype}")
    if len(labels) and labels.min() < 0:
        raise NilError(f"{path}: labels must be non-negative")
    classes = classes or [str(c) for c in range(int(labels.max()) + 1 if len(labels) else 0)]
    return {"vectors": vectors, "labels": labels, "ids": ids.astype(np.int64), "keys": keys, "classes": classes,
            "source": str(path)}


def build_index(out: str | Path, *, checkpoint: str | Path | None = None, data: str | None = None,
                embeddings: str | Path | None = None, kind: str = "flat", split: str = "train",
                fmt: str | None = None, batch_size: int = 256, device: str = "auto", progress: bool = True,
                params: dict | None = None) -> dict:
    """Embed (or read) vectors and write a distractor index folder atomically. Returns its stats."""
    if (embeddings is None) == (checkpoint is None):
        raise NilError("give either --checkpoint (with --data) or --embeddings")
    if checkpoint is not None and distributed.launched():
        return _build_index_parallel(out, checkpoint, data, kind, split, fmt, batch_size, device, progress, params)
    if embeddings is not None:
        emb, ckpt_sha = read_embeddings(embeddings), None
    else:
        emb = embed_split(checkpoint, data, split, fmt, batch_size, device, progress)
        ckpt_sha = sha256_file(checkpoint)
    dev = resolve_device(device)
    vectors, labels = emb["vectors"], emb["labels"]
    index = faiss_index.make_index(kind, vectors.shape[1], len(emb["classes"]), device=str(dev), **(params or {}))
    index.upsert(emb["ids"], vectors, labels)
    if hasattr(index, "build"):
        index.build()
    extra = {"checkpoint": str(Path(checkpoint).resolve())} if checkpoint is not None else {}
    faiss_index.save_index(index, out, classes=emb["classes"], keys=emb["keys"], checkpoint_sha256=ckpt_sha,
                           source=emb["source"], extra=extra)
    return faiss_index.index_stats(out)


def _build_index_parallel(out, checkpoint, data, kind, split, fmt, batch_size, device, progress, params) -> dict:
    """``torchrun ... -m cli index build``: each rank embeds a block of rows into one embeddings.zarr.

    Rank r embeds rows ``[r*R, (r+1)*R)`` of the split (R a multiple of the zarr chunk, so the
    ranks write disjoint chunk files); rank 0 then reads the vectors back, builds the structure
    and writes it and the manifest last (:func:`faiss_index.save_index` with ``staged``), so the
    folder appears whole or not at all. Same content as a one-process build.
    """
    ctx, dev = distributed.setup(resolve_device(device))
    model, ckpt, cfg, ds = open_with_checkpoint(checkpoint, data, fmt, dev)
    samples = ds.split(split)
    n, dim = len(samples), ckpt["model_spec"]["embed_dim"]
    chunk = max(1, min(65536, -(-n // ctx.world_size)))
    per = -(-(-(-n // ctx.world_size)) // chunk) * chunk  # rows per rank, whole chunks
    lo, hi = min(n, ctx.rank * per), min(n, (ctx.rank + 1) * per)
    staging = distributed.broadcast_object(faiss_index.staging_folder(out) if ctx.is_main else None)
    try:
        if ctx.is_main:
            faiss_index.create_embeddings(staging, n, dim, chunk)
        distributed.barrier()
        if hi > lo:
            part = samples.subset(np.arange(lo, hi))
            loader = checkpoint_loader(part, ckpt, cfg=cfg, channels=ds.channels, device=dev, batch_size=batch_size)
            p = predict(model, loader, dev, progress=progress and ctx.is_main, desc=f"embed {split}")
            faiss_index.write_embedding_rows(staging, lo, p.z, p.labels, p.ids, [str(k) for k in part.keys])
        distributed.barrier()
        if ctx.is_main:
            index = faiss_index.make_index(kind, dim, len(ds.classes), device=str(dev), **(params or {}))
            index.upsert(*faiss_index.read_embedding_rows(staging))
            if hasattr(index, "build"):
                index.build()
            faiss_index.save_index(index, out, classes=ds.classes, checkpoint_sha256=sha256_file(checkpoint),
                                   source=f"{cfg.data}:{split}", staged=staging,
                                   extra={"checkpoint": str(Path(checkpoint).resolve()),
                                          "world_size": ctx.world_size})
    except BaseException:
        if ctx.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    distributed.barrier()
    return faiss_index.index_stats(out)


def embed_image(image_path: str | Path, checkpoint: str | Path, device: torch.device) -> tuple[np.ndarray, int]:
    """Embed one image file with a checkpoint; returns z (1, D) and the predicted class."""
    embedder = ImageEmbedder(checkpoint, device)
    try:
        with Image.open(image_path) as im:
            arr = embedder.pixels(im)
    except FileNotFoundError:
        raise NilError(f"image {image_path} does not exist") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise NilError(f"cannot read image {image_path}: {exc}") from None
    z, predicted = embedder(arr)
    return z[None], predicted


def query_index(index_dir: str | Path, k: int = 5, *, ids: list[int] | None = None, image: str | Path | None = None,
                label: int | None = None, checkpoint: str | Path | None = None, device: str = "auto") -> dict:
    """Nearest other-class neighbours of stored samples (``ids``) or of an image file.

    Returns ``{"results": [{"query_id", "query_label", "neighbors": [{"id", "label", "distance", "key"}]}]}``.
    """
    index_dir = Path(index_dir)
    if (ids is None) == (image is None):
        raise NilError("give either --ids or --image")
    if k < 1:
        raise NilError("--k must be at least 1")
    dev = resolve_device(device)
    index, manifest = faiss_index.load_index(index_dir, device=str(dev))
    if ids is not None:
        qids = np.asarray(ids, dtype=np.int64)
        rows = index.store.rows_of(qids)
        missing = qids[np.asarray(rows.cpu()) < 0]
        if len(missing):
            raise NilError(f"sample ids not in the index: {', '.join(map(str, missing[:10]))}")
        vectors, labels = index.get(qids)
        query_ids = torch.as_tensor(qids)
    else:
        checkpoint = checkpoint or manifest.get("checkpoint")
        if checkpoint is None:
            raise NilError("--image needs --checkpoint (the index records none)")
        if manifest.get("checkpoint_sha256") and sha256_file(checkpoint) != manifest["checkpoint_sha256"]:
            raise NilError(f"checkpoint {checkpoint} is not the one this index was built with")
        z, predicted = embed_image(image, checkpoint, dev)
        if label is not None and not 0 <= label < index.num_classes:
            raise NilError(f"--label must lie in 0..{index.num_classes - 1}")
        vectors, labels = torch.as_tensor(z), torch.tensor([predicted if label is None else label])
        query_ids = None
    res = index.search_other_class(vectors, labels, k, query_ids=query_ids)
    keys = faiss_index.keys_by_id(index_dir)
    results = []
    for q in range(len(labels)):
        neighbors = [
            {"id": int(i), "label": int(lab), "distance": float(d), "key": keys.get(int(i), "")}
            for i, lab, d in zip(res.ids[q].tolist(), res.labels[q].tolist(), res.distances[q].tolist())
            if i >= 0
        ]
        results.append({"query_id": int(query_ids[q]) if query_ids is not None else None,
                        "query_label": int(labels[q]), "neighbors": neighbors})
    return {"results": results}
