"""Seeded clustered synthetic embeddings: the distractor case for nearest-other-class search.

The one generator of test and benchmark vectors (``nil bench mining|train|serve|stream`` and the
index tests).

Trained embeddings of a medical classifier are not uniform on the sphere: each class is a union of
tight clusters (sub-types, stains, scanners), and the hard cases are clusters of *different* classes
that sit next to each other. The generator builds exactly that:

- ``sites``: random unit directions, the look-alike regions of the space;
- each class has ``clusters_per_class`` clusters; consecutive clusters of all classes are dealt to
  the sites ``classes_per_site`` at a time, so every site holds clusters of that many classes;
- a cluster centre is its site plus ``site_jitter`` (relative) Gaussian noise, renormalised;
- a vector is its cluster centre plus ``spread`` (relative) Gaussian noise, renormalised.

So a vector's nearest other-class neighbour lies in a neighbouring cluster of the same site, about
as close as its own cluster's members: a global index over-fetching k neighbours and dropping the
same class finds nothing there, and a per-class index sees the query as out of its distribution.

Vectors are generated in chunks of :data:`CHUNK` rows, each from its own seeded stream, so the
first n rows of any larger set are the same vectors (N = 10k is a prefix of N = 1M), any chunk can
be regenerated alone, and memory stays bounded by one chunk of temporaries.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

LOG = logging.getLogger(__name__)

CHUNK = 1 << 16  # rows per seeded chunk; part of the definition of the data, do not change lightly


@dataclass(frozen=True)
class ClusteredSpec:
    dim: int = 128  # width of each vector
    classes: int = 9  # number of classes
    clusters_per_class: int = 16  # tight clusters making up each class
    classes_per_site: int = 3  # classes whose clusters share one look-alike site
    site_jitter: float = 0.35  # distance of a cluster centre from its site, relative to the unit sphere
    spread: float = 0.25  # distance of a vector from its cluster centre, relative
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def _normalise(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def cluster_centres(spec: ClusteredSpec) -> tuple[np.ndarray, np.ndarray]:
    """Cluster centres float32 ``(classes * clusters_per_class, dim)`` (unit norm) and their labels int64.

    Cluster m belongs to class ``m % classes`` and to site ``m // classes_per_site``, so one site
    holds consecutive clusters, i.e. clusters of ``classes_per_site`` different classes.
    """
    rng = np.random.default_rng([spec.seed, 0])
    m = spec.classes * spec.clusters_per_class
    n_sites = math.ceil(m / spec.classes_per_site)
    sites = _normalise(rng.standard_normal((n_sites, spec.dim), dtype=np.float32))
    site_of = np.arange(m) // spec.classes_per_site
    noise = rng.standard_normal((m, spec.dim), dtype=np.float32) * (spec.site_jitter / math.sqrt(spec.dim))
    centres = _normalise(sites[site_of] + noise)
    return centres.astype(np.float32), (np.arange(m) % spec.classes).astype(np.int64)


def chunk(spec: ClusteredSpec, c: int, centres: tuple[np.ndarray, np.ndarray] | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
    """Chunk ``c``: vectors float32 ``(CHUNK, dim)`` L2-normalised, labels int64 ``(CHUNK,)``."""
    mu, mu_labels = centres if centres is not None else cluster_centres(spec)
    rng = np.random.default_rng([spec.seed, 1, c])
    which = rng.integers(0, len(mu), CHUNK)
    x = rng.standard_normal((CHUNK, spec.dim), dtype=np.float32)
    x *= spec.spread / math.sqrt(spec.dim)
    x += mu[which]
    return _normalise(x), mu_labels[which]


def iter_chunks(n: int, spec: ClusteredSpec) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(start, vectors, labels)`` covering rows ``0..n`` in order, the last chunk cut to size."""
    centres = cluster_centres(spec)
    for c in range(math.ceil(n / CHUNK)):
        x, y = chunk(spec, c, centres)
        rows = min(CHUNK, n - c * CHUNK)
        yield c * CHUNK, x[:rows], y[:rows]


def clustered_vectors(n: int, spec: ClusteredSpec, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """All ``n`` vectors float32 ``(n, dim)`` (L2-normalised) and labels int64 ``(n,)``."""
    x = np.empty((n, spec.dim), np.float32)
    y = np.empty(n, np.int64)
    with tqdm(total=n, desc=f"vectors {n:,}", unit="vec", unit_scale=True, disable=not progress, leave=False) as bar:
        for start, xc, yc in iter_chunks(n, spec):
            x[start:start + len(xc)], y[start:start + len(yc)] = xc, yc
            bar.update(len(xc))
    LOG.debug("generated %d clustered vectors of dimension %d", n, spec.dim)
    return x, y


def query_rows(n: int, batch: int, batches: int, seed: int) -> np.ndarray:
    """Rows of the data used as query batches: int64 ``(batches, batch)``, distinct within a batch."""
    if batch > n:
        raise ValueError(f"a batch of {batch} queries needs at least {batch} vectors, got {n}")
    rng = np.random.default_rng([seed, 2, n])
    return np.stack([rng.choice(n, size=batch, replace=False) for _ in range(batches)]).astype(np.int64)


def moved(x: np.ndarray, seed: int, step: float = 0.05) -> np.ndarray:
    """The same vectors after a small training step: ``x`` plus ``step`` relative noise, renormalised.

    Used for the streaming-update timings (new vectors for existing ids)."""
    rng = np.random.default_rng([seed, 3])
    noise = rng.standard_normal(x.shape, dtype=np.float32) * (step / math.sqrt(x.shape[1]))
    return _normalise(x + noise)


def clustered(n: int, dim: int = 128, num_classes: int = 9, *, clusters_per_class: int = 100,
              spread: float = 0.6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-pure clusters with centres uniform on the sphere, as torch tensors (the tests' data).

    Every cluster is its own site (``classes_per_site=1``, no site jitter), so clusters of all
    classes interleave at random: x float32 ``(n, dim)`` L2-normalised, y int64 ``(n,)``.
    """
    spec = ClusteredSpec(dim=dim, classes=num_classes, clusters_per_class=clusters_per_class, classes_per_site=1,
                         site_jitter=0.0, spread=spread, seed=seed)
    x, y = clustered_vectors(n, spec)
    return torch.from_numpy(x), torch.from_numpy(y)
