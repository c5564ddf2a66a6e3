"""Nearest neighbours of any class and the class-balanced suspect-label vote (report and audit)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from faiss_index import FaissUnavailableError
from faiss_index.engines.faiss_lib import import_faiss

__all__ = ["knn", "knn_any_class", "find_suspects"]

APPROXIMATE_FROM = 20_000  # rows from which knn(approximate=True) searches an IVF structure
NPROBE = 16


def _faiss():
    """The faiss module (the nil[cpu] / nil[gpu] extra), or None: the search then runs in torch."""
    try:
        return import_faiss()
    except FaissUnavailableError:
        return None


def knn(q: torch.Tensor, x: torch.Tensor, k: int, self_offset: int | None = None, approximate: bool = False,
        chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest rows of ``x`` (N, D) for each row of ``q``: squared distances and rows, (len(q), k).

    ``self_offset``: ``q[i]`` is ``x[self_offset + i]``, which is never its own neighbour. Exact
    (faiss' flat search where faiss is installed, torch otherwise), unless ``approximate`` and
    ``x`` has at least :data:`APPROXIMATE_FROM` rows: then an IVF structure (4 sqrt(N) lists, 16
    probed) answers, which misses a true neighbour now and then but finds near-identical rows, the
    audit's use, at a fraction of the cost.
    """
    n = len(x)
    k = min(k, n - (self_offset is not None))
    faiss = _faiss()
    if k <= 0:
        return torch.empty(len(q), 0), torch.empty(len(q), 0, dtype=torch.int64)
    if faiss is None:
        return _knn_torch(q, x, k, self_offset, chunk)
    xs = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    if approximate and n >= APPROXIMATE_FROM:
        nlist = int(4 * n ** 0.5)
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(xs.shape[1]), xs.shape[1], nlist)
        index.cp.min_points_per_centroid = 1  # a sample of 64 per list trains well enough; no warning
        index.train(xs[np.random.default_rng(0).permutation(n)[:64 * nlist]])
        index.nprobe = NPROBE
    else:
        index = faiss.IndexFlatL2(xs.shape[1])
    index.add(xs)
    extra = int(self_offset is not None)
    d, rows = index.search(np.ascontiguousarray(q.numpy(), dtype=np.float32), k + extra)
    d, rows = torch.from_numpy(d), torch.from_numpy(rows)
    if self_offset is not None:  # drop the query's own row (or, where it is not among them, the farthest)
        own = rows == (torch.arange(len(q)) + self_offset)[:, None]
        own[:, -1] |= ~own.any(1)
        order = own.to(torch.int8).argsort(dim=1, stable=True)[:, :k]
        d, rows = d.gather(1, order), rows.gather(1, order)
    return d, rows


def _knn_torch(q, x, k, self_offset, chunk):
    norms = (x * x).sum(1)
    out_d, out_i = [], []
    for start in range(0, len(q), chunk):
        qs = q[start:start + chunk]
        d2 = (qs * qs).sum(1, keepdim=True) + norms[None] - 2 * qs @ x.T
        if self_offset is not None:
            d2[torch.arange(len(qs)), torch.arange(start, start + len(qs)) + self_offset] = float("inf")
        d, i = d2.topk(k, dim=1, largest=False)
        out_d.append(d)
        out_i.append(i)
    return torch.cat(out_d), torch.cat(out_i)


def knn_any_class(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest rows of ``x`` (N, D) for every row, itself excluded: distances and rows (N, k)."""
    d2, rows = knn(x, x, k, self_offset=0)
    return d2.clamp(min=0).sqrt(), rows


def find_suspects(z: np.ndarray, labels: np.ndarray, k: int = 20, min_fraction: float = 0.8,
                  neighbours: tuple[torch.Tensor, torch.Tensor] | None = None) -> pd.DataFrame:
    """Training samples whose k nearest neighbours vote, class-balanced, for one other class (>= min_fraction).

    Each neighbour's vote is weighted by the inverse frequency of its class in ``labels``, so a
    minority-class sample is not a suspect merely because most of its neighbours are of the majority
    class, as they are by chance in an imbalanced set. ``fraction`` is that balanced share of the
    suspected class; ``raw_fraction`` the plain share. Rows ranked by ``fraction``, then by the mean
    distance to the suspected class's neighbours. ``neighbours``: the (distances, rows) of
    :func:`knn_any_class` where the caller has them already.
    """
    d, rows = neighbours if neighbours is not None else knn_any_class(torch.from_numpy(z), k)
    neighbour_labels = labels[rows.numpy()]
    counts = np.bincount(labels, minlength=int(labels.max()) + 1).astype(float)
    weight = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)
    found = []
    for i, (lab, nl) in enumerate(zip(labels, neighbour_labels)):
        votes = np.bincount(nl, weights=weight[nl], minlength=len(counts))
        votes = votes / votes.sum()
        votes[lab] = -1.0
        cls = int(votes.argmax())
        if votes[cls] >= min_fraction:
            found.append((i, int(lab), cls, float(votes[cls]), float((nl == cls).mean()),
                          float(d[i][nl == cls].mean())))
    table = pd.DataFrame(found, columns=["row", "label", "suspected_class", "fraction", "raw_fraction",
                                         "mean_distance"])
    return table.sort_values(["fraction", "mean_distance"], ascending=[False, True], kind="stable")
