"""Nearest neighbours of any class and the class-balanced suspect-label vote (report and audit)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

__all__ = ["knn_any_class", "find_suspects"]


def knn_any_class(x: torch.Tensor, k: int, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest rows of ``x`` (N, D) for every row, itself excluded: distances and rows (N, k)."""
    norms = (x * x).sum(1)
    out_d, out_i = [], []
    for start in range(0, len(x), chunk):
        q = x[start:start + chunk]
        d2 = (q * q).sum(1, keepdim=True) + norms[None] - 2 * q @ x.T
        d2[torch.arange(len(q)), torch.arange(start, start + len(q))] = float("inf")
        d, i = d2.topk(min(k, len(x) - 1), dim=1, largest=False)
        out_d.append(d.clamp(min=0).sqrt())
        out_i.append(i)
    return torch.cat(out_d), torch.cat(out_i)


def find_suspects(z: np.ndarray, labels: np.ndarray, k: int = 20, min_fraction: float = 0.8) -> pd.DataFrame:
    """Training samples whose k nearest neighbours vote, class-balanced, for one other class (>= min_fraction).

    Each neighbour's vote is weighted by the inverse frequency of its class in ``labels``, so a
    minority-class sample is not a suspect merely because most of its neighbours are of the majority
    class, as they are by chance in an imbalanced set. ``fraction`` is that balanced share of the
    suspected class; ``raw_fraction`` the plain share. Rows ranked by ``fraction``, then by the mean
    distance to the suspected class's neighbours.
    """
    d, rows = knn_any_class(torch.from_numpy(z), k)
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
