"""``nil audit``: duplicates, cross-split leaks, conflicting labels and label-noise suspects in a data set.

Public medical image sets hold exact and near duplicates, sometimes across train / validation / test
(a leaked duplicate inflates every test figure), and look-alike images with different labels (the
distractors this project is about). Before anyone trains, the audit finds them:

- exact duplicates: identical pixels (a hash of shape and bytes);
- near duplicates: an image whose nearest neighbour of any class, itself flipped or not, lies within
  ``threshold`` (root-mean-square pixel difference on a 0..1 scale, images compared as 32x32 gray by
  default; Euclidean distance of the embeddings z with a checkpoint), grouped transitively;
- for every group, the splits it spans (each group counted once per split pair) and whether its
  members disagree on the label;
- label-noise suspects, class-balanced (:func:`nil.neighbours.find_suspects`);
- per class: count, share and the class its samples' nearest other-class neighbours belong to most.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import itertools
import json
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from faiss_index import knn_other_class
from nil.data import SPLITS, Dataset
from nil.neighbours import find_suspects, knn, knn_any_class

LOG = logging.getLogger(__name__)

PIXEL_SIDE = 32  # images are compared as PIXEL_SIDE x PIXEL_SIDE gray
PIXEL_THRESHOLD = 0.02  # RMS difference (0..1) below which two images are near duplicates
EMBEDDING_THRESHOLD = 0.05  # distance of unit embeddings below which two images are near duplicates


def _rows(ds: Dataset) -> list[tuple[str, int]]:
    """Every sample as (split, position in that split), in split order."""
    return [(s, i) for s in SPLITS for i in range(len(ds.split(s)))]


def _pixels(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W[, C]) -> float32 (PIXEL_SIDE, PIXEL_SIDE) gray in 0..1."""
    x = torch.from_numpy(np.ascontiguousarray(image)).float() / 255.0
    x = x.reshape(x.shape[0], x.shape[1], -1).mean(2)
    return F.interpolate(x[None, None], size=(PIXEL_SIDE, PIXEL_SIDE), mode="area")[0, 0]


def content_hash(image: np.ndarray) -> str:
    """Identical pixels (and shape) give the same hash."""
    return hashlib.blake2b(repr(image.shape).encode() + image.tobytes(), digest_size=16).hexdigest()


def scan(ds: Dataset, progress: bool = False) -> tuple[list[str], torch.Tensor, np.ndarray]:
    """One pass over every image: content hashes, pixel features (N, PIXEL_SIDE^2) and labels."""
    hashes, feats, labels = [], [], []
    for s in SPLITS:
        part = ds.split(s)
        for i in tqdm(range(len(part)), desc=f"read {s}", disable=not progress, leave=False):
            image = part.load(i)
            hashes.append(content_hash(image))
            feats.append(_pixels(image))
        labels.append(part.labels)
    x = torch.stack(feats).flatten(1) if feats else torch.empty(0, PIXEL_SIDE * PIXEL_SIDE)
    return hashes, x, np.concatenate(labels) if labels else np.empty(0, np.int64)


def cross_split_exact_duplicates(ds: Dataset) -> dict[str, int]:
    """Groups of identical images spanning two splits, per split pair: the cheap check `nil train` runs."""
    groups: dict[str, set[str]] = {}
    for s in SPLITS:
        part = ds.split(s)
        for i in range(len(part)):
            image = part.load(i)
            groups.setdefault(content_hash(image), set()).add(s)
    return _pair_counts([sorted(v) for v in groups.values() if len(v) > 1])


def _pair_counts(split_sets: list[list[str]]) -> dict[str, int]:
    counts = {f"{a}/{b}": 0 for a, b in itertools.combinations(SPLITS, 2)}
    for splits in split_sets:
        for a, b in itertools.combinations(sorted(set(splits), key=SPLITS.index), 2):
            counts[f"{a}/{b}"] += 1
    return counts


COARSE_SIDE = 8  # candidate search on 8x8 gray; candidates are then measured at PIXEL_SIDE
CANDIDATES = 16  # nearest coarse neighbours checked per image (and per flip of it)


def _near_pairs(x: torch.Tensor, threshold: float, pixel: bool) -> list[tuple[int, int, float]]:
    """Pairs (i, j, distance), i < j, within ``threshold``.

    Pixel space: x holds PIXEL_SIDE^2 gray values in 0..1, the distance is the RMS difference and an
    image is also compared flipped left-right and upside down; candidates come from an exact search
    of the 8x8 averages (an IVF search from 20,000 images: a near duplicate is nearly the same
    vector, which an IVF structure finds as surely as a flat one). Embedding space: the Euclidean
    distance of the rows."""
    n = x.shape[0]
    if n < 2:
        return []
    if pixel:
        side = PIXEL_SIDE
        grid = x.view(n, side, side)
        variants = [grid, grid.flip(2), grid.flip(1)]
        coarse = [F.avg_pool2d(v[:, None], side // COARSE_SIDE).flatten(1) for v in variants]
        scale = float(side)  # RMS = Euclidean / sqrt(side * side)
    else:
        variants, coarse, scale = [x], [x], 1.0
    pairs: dict[tuple[int, int], float] = {}
    for v, c in zip(variants, coarse):
        _, cand = knn(c, coarse[0], CANDIDATES, self_offset=0, approximate=True)
        flat = v.reshape(n, -1)
        for start in range(0, n, 2048):  # the fine check in chunks: memory O(chunk * candidates * pixels)
            cs = cand[start:start + 2048]
            i = torch.arange(start, start + len(cs))[:, None].expand_as(cs)
            fine = (flat[i.reshape(-1)] - x[cs.reshape(-1)]).norm(dim=1).view_as(cs) / scale
            hit = fine <= threshold
            for a, b, d in zip(i[hit].tolist(), cs[hit].tolist(), fine[hit].tolist()):
                key = (min(a, b), max(a, b))
                pairs[key] = min(d, pairs.get(key, float("inf")))
    return [(a, b, d) for (a, b), d in sorted(pairs.items())]


def _union(n: int, pairs) -> list[list[int]]:
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i, j, *_ in pairs:
        parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def run_audit(ds: Dataset, out: str | Path, *, embeddings: np.ndarray | None = None, threshold: float | None = None,
              progress: bool = False, source: str = "") -> dict:
    """Audit ``ds`` and write ``out``/audit.json, duplicates.csv, suspects.csv and index.html."""
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = _rows(ds)
    hashes, pixels, labels = scan(ds, progress)
    n = len(rows)
    by_hash: dict[str, list[int]] = {}
    for i, h in enumerate(hashes):
        by_hash.setdefault(h, []).append(i)
    exact = [g for g in by_hash.values() if len(g) > 1]
    in_exact = {i: g[0] for g in exact for i in g}
    space = "embedding" if embeddings is not None else "pixels"
    if embeddings is not None:
        feats, limit = torch.from_numpy(np.asarray(embeddings, np.float32)), threshold or EMBEDDING_THRESHOLD
    else:
        feats, limit = pixels, threshold or PIXEL_THRESHOLD
    # one representative per exact group, so identical copies do not crowd each other's neighbours
    keep = [i for i in range(n) if in_exact.get(i, i) == i]
    pairs = [(keep[a], keep[b], d) for a, b, d in _near_pairs(feats[keep], limit, pixel=embeddings is None)]
    near_dist = {}
    for i, j, d in pairs:
        near_dist.setdefault(i, []).append(d)
        near_dist.setdefault(j, []).append(d)
    groups = [{"kind": "exact", "rows": g, "max_distance": 0.0} for g in exact]
    for g in _union(n, pairs):
        members = sorted(set(itertools.chain.from_iterable(by_hash[hashes[i]] for i in g)))
        groups.append({"kind": "near", "rows": members,
                       "max_distance": round(max(max(near_dist.get(i, [0.0])) for i in g), 6)})

    def member(i):
        s, pos = rows[i]
        part = ds.split(s)
        return {"id": int(part.ids[pos]), "key": str(part.keys[pos]), "split": s, "label": ds.classes[labels[i]]}

    out_groups = []
    for gid, g in enumerate(sorted(groups, key=lambda g: (-len({rows[i][0] for i in g["rows"]}), g["kind"],
                                                          g["rows"][0]))):
        members = [member(i) for i in g["rows"]]
        out_groups.append({"group": gid, "kind": g["kind"], "members": members, "max_distance": g["max_distance"],
                           "splits": sorted({m["split"] for m in members}, key=SPLITS.index),
                           "labels": sorted({m["label"] for m in members})})
    cross = [g for g in out_groups if len(g["splits"]) > 1]
    conflicts = [g for g in out_groups if len(g["labels"]) > 1]
    # neighbour votes and confusions: on the 8x8 averages in pixel space (the full 32x32 costs 16x more)
    vote_space = feats if embeddings is not None else F.avg_pool2d(
        feats.view(n, 1, PIXEL_SIDE, PIXEL_SIDE), PIXEL_SIDE // COARSE_SIDE).flatten(1)
    neighbours = knn_any_class(vote_space, 20) if n > 2 else None  # exact: shared by the vote and the confusions
    suspects = find_suspects(vote_space.numpy(), labels, neighbours=neighbours) if n > 2 else pd.DataFrame(
        columns=["row", "label", "suspected_class", "fraction", "raw_fraction", "mean_distance"])
    suspect_rows = [member(int(r.row)) | {"suspected_class": ds.classes[int(r.suspected_class)],
                                          "fraction": round(float(r.fraction), 4)} for r in suspects.itertuples()]
    per_class = _per_class(vote_space, labels, ds.classes, neighbours)
    result = {"source": source or ds.source, "format": ds.format, "images": n, "space": space,
              "threshold": limit, "exact_groups": len(exact),
              "near_groups": len(out_groups) - len(exact),
              "groups": out_groups, "cross_split": _pair_counts([g["splits"] for g in cross]),
              "cross_split_groups": [g["group"] for g in cross], "label_conflicts": conflicts,
              "suspects": suspect_rows, "per_class": per_class,
              "seconds": round(time.perf_counter() - started, 2)}
    (out / "audit.json").write_text(json.dumps(result, indent=1) + "\n")
    pd.DataFrame([{"group": g["group"], "kind": g["kind"], "max_distance": g["max_distance"],
                   "cross_split": len(g["splits"]) > 1, "label_conflict": len(g["labels"]) > 1, **m}
                  for g in out_groups for m in g["members"]],
                 columns=["group", "kind", "max_distance", "cross_split", "label_conflict", "id", "key", "split",
                          "label"]).to_csv(out / "duplicates.csv", index=False)
    pd.DataFrame(suspect_rows, columns=["id", "key", "split", "label", "suspected_class", "fraction"]).to_csv(
        out / "suspects.csv", index=False)
    (out / "index.html").write_text(_html(ds, rows, result), encoding="utf-8")
    return result


def _per_class(feats: torch.Tensor, labels: np.ndarray, classes: list[str],
               neighbours: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[dict]:
    """Count, share and most confused class, from each sample's nearest other-class neighbour: the first
    other-class row among ``neighbours`` (sorted rows of :func:`knn_any_class`), searched only where
    none of them is of another class."""
    n = len(labels)
    confused: dict[int, Counter] = {c: Counter() for c in range(len(classes))}
    if n > 1 and len(set(labels.tolist())) > 1:
        y = torch.from_numpy(labels)
        nearest = torch.full((n,), -1, dtype=torch.int64)
        if neighbours is not None:
            rows = neighbours[1]
            other = y[rows] != y[:, None]
            found = other.any(1)
            nearest[found] = rows[found, other[found].int().argmax(1)]  # argmax: the first True
        rest = (nearest < 0).nonzero().squeeze(1)
        if len(rest):
            _, far = knn_other_class(feats[rest], y[rest], feats, y, 1)
            nearest[rest] = far[:, 0]
        for lab, j in zip(labels.tolist(), nearest.tolist()):
            if j >= 0:
                confused[lab][int(labels[j])] += 1
    counts = np.bincount(labels, minlength=len(classes))
    return [{"class": name, "count": int(counts[c]), "share": round(float(counts[c]) / max(n, 1), 4),
             "most_confused_with": classes[confused[c].most_common(1)[0][0]] if confused[c] else None}
            for c, name in enumerate(classes)]


def _thumb(image: np.ndarray) -> str:
    from PIL import Image

    im = Image.fromarray(image.squeeze() if image.ndim == 3 and image.shape[2] == 1 else image)
    im.thumbnail((96, 96))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _html(ds: Dataset, rows: list[tuple[str, int]], result: dict, max_groups: int = 60) -> str:
    index = {(ds.split(s).keys[i], s): (s, i) for s, i in rows}

    def cell(m):
        s, i = index[(m["key"], m["split"])]
        return (f'<figure><img src="data:image/png;base64,{_thumb(ds.split(s).load(i))}" alt="{html.escape(m["key"])}">'
                f'<figcaption>{html.escape(m["split"])} · {html.escape(m["label"])}<br>{html.escape(m["key"])}'
                '</figcaption></figure>')

    cross = ", ".join(f"{k}: {v}" for k, v in result["cross_split"].items())
    parts = [f"<h1>Data audit: {html.escape(str(result['source']))}</h1>",
             f"<p>{result['images']} images; {result['exact_groups']} exact and {result['near_groups']} near-duplicate "
             f"groups ({result['space']} space, threshold {result['threshold']}); groups across splits: "
             f"{html.escape(cross)}; label conflicts: {len(result['label_conflicts'])}; suspects: "
             f"{len(result['suspects'])}.</p>", "<h2>Duplicate groups (across splits first)</h2>"]
    for g in result["groups"][:max_groups]:
        flag = " — ACROSS SPLITS" if len(g["splits"]) > 1 else ""
        flag += " — LABELS DISAGREE" if len(g["labels"]) > 1 else ""
        parts.append(f"<h3>group {g['group']}: {g['kind']}, max distance {g['max_distance']}{flag}</h3>"
                     f"<div class=row>{''.join(cell(m) for m in g['members'][:8])}</div>")
    parts.append("<h2>Per class</h2><table><tr><th>class</th><th>count</th><th>share</th><th>most confused with</th></tr>"
                 + "".join(f"<tr><td>{html.escape(c['class'])}</td><td>{c['count']}</td><td>{c['share']:.3f}</td>"
                           f"<td>{html.escape(str(c['most_confused_with']))}</td></tr>" for c in result["per_class"])
                 + "</table>")
    style = ("body{font-family:sans-serif;margin:2em}.row{display:flex;gap:8px;flex-wrap:wrap}figure{margin:0;"
             "font-size:11px;max-width:110px}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px}")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>nil audit</title><style>{style}</style></head>"
            f"<body>{''.join(parts)}</body></html>\n")


def audit(data: str | None, out: str | Path, *, fmt: str | None = None, checkpoint: str | None = None,
          threshold: float | None = None, device: str = "auto", progress: bool = True, csv=None) -> dict:
    """Open ``data`` (or a checkpoint's own data), embed it with ``checkpoint`` if given, and audit it."""
    from nil.data import open_dataset

    if checkpoint is None:
        if data is None:
            from nil.errors import NilError

            raise NilError("--data is required (or --checkpoint, to audit the data its run was trained on)")
        ds = open_dataset(data, fmt, csv=csv) if csv is not None else open_dataset(data, fmt)
        return run_audit(ds, out, threshold=threshold, progress=progress, source=str(data))
    from nil.evaluate import open_with_checkpoint
    from nil.loaders import checkpoint_loader
    from nil.predict import predict
    from nil.runtime import resolve_device

    dev = resolve_device(device)
    model, ckpt, cfg, ds = open_with_checkpoint(checkpoint, data, fmt, dev)
    z = [predict(model, checkpoint_loader(ds.split(s), ckpt, cfg=cfg, channels=ds.channels, device=dev), dev,
                 progress=progress, desc=f"embed {s}").z for s in SPLITS]
    return run_audit(ds, out, embeddings=np.concatenate(z), threshold=threshold, progress=progress,
                     source=str(cfg.data))
