"""The index kinds and their parameters: which knobs each kind has and their automatic defaults.

Defaults scale with the shard size (rows of one class, or all rows for the global strategy) and
are resolved again at every build; the resolved values are what ``index.params`` reports.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import IndexInputError

LOG = logging.getLogger(__name__)

__all__ = ["KINDS", "FAISS_KINDS", "IVF_KINDS", "STRATEGIES", "IndexParams", "default_nlist",
           "GPU_PQ_M", "default_kind", "resolve_kind"]

KINDS = ("exact", "flat", "ivf", "ivfpq", "hnsw", "cagra")
FAISS_KINDS = KINDS[1:]
IVF_KINDS = ("ivf", "ivfpq")  # inverted lists over coarse centroids trained in torch
STRATEGIES = ("auto", "sharded", "global")
RETRAIN = ("drift", "always")

# Sub-quantizer counts accepted by faiss' GPU IVF-PQ.
GPU_PQ_M = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)
# Fewest points per coarse list by default (k-means runs in torch, not faiss' 39-point rule).
MIN_POINTS_PER_LIST = 8
# Classes at or below which "auto" shards by class; above, one global index with a label filter.
MAX_SHARDED_CLASSES = 32


def parse_value(text: str):
    """A NAME=VALUE index parameter's value from text: int, float, true/false, else the text itself."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def default_kind(device: str = "cpu") -> str:
    """The kind measured best for a device: "ivfpq" (fast-scan + exact re-rank) on CPU, "exact" on CUDA.

    On a GPU an exact scan of a million 128-d vectors takes about a millisecond, so approximate
    search only pays off far beyond that (see benchmarks/probe_mining.py for the CPU figures).
    """
    return "exact" if str(device).startswith("cuda") else "ivfpq"


def resolve_kind(kind: str, device: str = "cpu") -> str:
    """``kind`` itself, or for "auto" the device's :func:`default_kind`: the one place "auto" is resolved."""
    return default_kind(device) if kind == "auto" else kind


def default_nlist(n: int) -> int:
    """Coarse lists for n vectors: a power of two near max(sqrt(n), min(256, n / 16)), >= 8 points each.

    sqrt(n) is the usual rule; the second term keeps lists small (16-400 points) for shards up to
    a few hundred thousand vectors, which on clustered embeddings makes centroids follow the
    clusters. Measured with benchmarks/probe_mining.py (9 classes, 100 clusters per class, joint
    probing of 24 lists): recall@1 0.61 -> 0.96 at 20k vectors (nlist 56 -> 128 per class),
    0.970 -> 0.979 at 100k (128 -> 256), unchanged at 1M (256).
    """
    if n < 2 * MIN_POINTS_PER_LIST:
        return 1
    target = max(math.sqrt(n), min(256.0, n / 16))
    p = 2 ** round(math.log2(target))
    return int(max(1, min(p, n // MIN_POINTS_PER_LIST)))


@dataclass
class IndexParams:
    """User-settable parameters of a FaissIndex; ``None`` means "choose from the data"."""

    nlist: int | None = None        # coarse lists per shard (ivf, ivfpq)
    nprobe: int | None = None       # lists probed per query (joint total on CPU ivf/ivfpq; per shard else)
    m: int | None = None            # PQ sub-quantizers (ivfpq); CPU default dim (4-bit fast-scan)
    nbits: int | None = None        # bits per PQ code: 4 on CPU (fast-scan), 8 on GPU
    rerank: int | None = None       # candidates re-ranked exactly with fresh vectors per query
    efSearch: int | None = None     # hnsw: search beam width
    efConstruction: int = 64        # hnsw: build beam width
    hnsw_m: int = 32                # hnsw: graph degree
    graph_degree: int = 64          # cagra: output graph degree
    itopk_size: int = 128           # cagra: search buffer
    niter: int = 16                 # k-means iterations from scratch (warm-started refreshes: a third)
    max_points_per_centroid: int = 64   # training sample cap per coarse list
    seed: int = 0                   # seeds every sample and k-means initialisation
    strategy: str = "auto"          # "auto" | "sharded" | "global"
    multi_gpu: bool = True          # with device "cuda", spread class shards over all visible GPUs
    store_dtype: str = "float32"    # "float16" halves the stored vectors (re-ranking reads them back as float32)
    inplace: bool | None = None     # CPU ivf/ivfpq: write upserted rows into the lists at once (None: where supported)
    retrain: str = "drift"          # periodic refresh with in-place updates: "drift" (only when the centroids
                                    # no longer fit the data) or "always"
    probe_recall: float = 0.99      # CPU ivf/ivfpq without nprobe: each build raises nprobe until this share of
                                    # a sample of stored rows has its exact nearest other-class row in a probed
                                    # list (0: the fixed default nprobe)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_kwargs(cls, kind: str, **kw: Any) -> "IndexParams":
        names = {f.name for f in fields(cls)} - {"extra"}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise IndexInputError(
                f"unknown parameter(s) {', '.join(unknown)} for kind {kind!r}; known: {', '.join(sorted(names))}.")
        p = cls(**kw)
        for name in ("nlist", "nprobe", "m", "nbits", "rerank", "efSearch"):
            v = getattr(p, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise IndexInputError(f"{name} must be a positive integer, got {v!r}.")
        for name in ("efConstruction", "hnsw_m", "graph_degree", "itopk_size", "niter", "max_points_per_centroid"):
            v = getattr(p, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise IndexInputError(f"{name} must be a positive integer, got {v!r}.")
        if p.inplace is not None and not isinstance(p.inplace, bool):
            raise IndexInputError(f"inplace must be true or false, got {p.inplace!r}.")
        if isinstance(p.probe_recall, bool) or not isinstance(p.probe_recall, (int, float)) \
                or not 0 <= p.probe_recall <= 1:
            raise IndexInputError(f"probe_recall must be a number in [0, 1], got {p.probe_recall!r}.")
        if p.retrain not in RETRAIN:
            raise IndexInputError(f"retrain must be one of {', '.join(RETRAIN)}, got {p.retrain!r}.")
        if p.strategy not in STRATEGIES:
            raise IndexInputError(f"strategy must be one of {', '.join(STRATEGIES)}, got {p.strategy!r}.")
        if p.nbits is not None and p.nbits > 8:
            raise IndexInputError(f"nbits must be at most 8, got {p.nbits}.")
        return p

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return d
