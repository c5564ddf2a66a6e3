"""``nil bench alternatives``: what a user might pick instead of nil's engine, on the service's queries.

The service answers "the k nearest stored samples of another class than the query's" for requests
of 32 queries. A user without nil would reach for a vector library and a label filter. This
benchmark builds each of them over the same vectors, sends the same requests through each in one
process, one request at a time, and records per method:

- ``build_s``: time to build the structure from the vectors;
- ``p50_ms`` / ``p99_ms``: search time per request (what a server spends in the library; the HTTP
  layer would add the same to every method), and ``search_rate``: 1000 / p50, the requests per
  second one process could answer if it did nothing else;
- ``recall_at_1`` (the returned nearest other-class sample is the true one, or ties it in distance)
  and ``recall_at_k`` (share of the true k found), against exact-torch on the same requests.

Methods (all on ``threads`` threads):

- ``nil``: the engine as the service runs it (``make_index`` with the CPU default kind; per-class
  shards, so every query searches only other classes);
- ``exact-torch``: :func:`knn_other_class`, the reference;
- ``faiss-ivfflat-selector``: one global faiss ``IndexIVFFlat`` searched once per label present in
  the request, with an ``IDSelectorBitmap`` that excludes that label (the ten lines a faiss user
  would write);
- ``usearch-postfilter``: one usearch HNSW index over everything; fetch ``oversample`` neighbours
  and keep the first k of another class (usearch's Python API has no filter predicate);
- ``usearch-per-class``: one usearch index per class; a query searches every other class's index
  and the answers are merged;
- ``hnswlib-filter``: one hnswlib index with its ``filter`` callback rejecting the query's label.

Data: ``serve`` (exactly the service benchmark's index and requests: class-pure clusters, query
labels drawn at random), ``clusters`` and ``class-pure`` (the stream benchmark's sets, each query a
stored vector moved a little and keeping its own label: the nearest other-class sample is then a
look-alike cluster away, or for class-pure a whole cluster away). Each finished row is written at
once and a rerun skips it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import faiss_index
from benchmarks.measure import median
from benchmarks.report import close_envelope, envelope, fmt, machine_lines, markdown_head, markdown_table, write_result
from faiss_index.engines.exact import knn_other_class
from faiss_index.synthetic import ClusteredSpec, clustered, clustered_vectors, moved

METHODS = ("nil", "exact-torch", "faiss-ivfflat-selector", "usearch-postfilter", "usearch-per-class",
           "hnswlib-filter")
DATA = ("serve", "clusters", "class-pure")
LIBRARY = {"nil": "nil", "exact-torch": "torch", "faiss-ivfflat-selector": "faiss-cpu",
           "usearch-postfilter": "usearch", "usearch-per-class": "usearch", "hnswlib-filter": "hnswlib"}


@dataclass
class AltBench:
    n: int = 100_000
    dim: int = 128
    classes: int = 9
    k: int = 5
    batch: int = 32  # queries per request, as the service benchmark sends them
    requests: int = 200  # timed requests per method (after 5 untimed ones)
    data: tuple[str, ...] = DATA
    methods: tuple[str, ...] = METHODS
    oversample: int = 256  # usearch-postfilter: neighbours fetched before the label filter
    nlist: int = 1024  # faiss-ivfflat-selector
    nprobe: int = 32  # faiss-ivfflat-selector
    hnsw_m: int = 16  # usearch and hnswlib graph degree
    ef_construction: int = 128  # usearch and hnswlib build beam
    ef_search: int = 64  # usearch and hnswlib search beam (at least the candidates asked for)
    threads: int = 2
    seed: int = 0
    out: str = "benchmarks/results/alternatives.json"
    progress: bool = True


def make_data(spec: str, cfg: AltBench) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stored vectors x (n, d) float32 L2-normalised, labels y (n,), and the requests' queries
    xq (requests * batch, d) with their labels yq."""
    rng = np.random.default_rng(cfg.seed + 1)
    count = cfg.requests * cfg.batch
    if spec == "serve":  # as benchmarks/serve.py: perturbed stored vectors, labels at random
        x, y = (t.numpy() for t in clustered(cfg.n, cfg.dim, cfg.classes, seed=cfg.seed))
        rows = rng.integers(0, cfg.n, size=count)
        xq = x[rows] + 0.05 * rng.normal(size=(count, cfg.dim)).astype(np.float32) / cfg.dim ** 0.5
        xq /= np.linalg.norm(xq, axis=1, keepdims=True)
        return x, y, xq.astype(np.float32), rng.integers(0, cfg.classes, size=count)
    if spec == "clusters":
        clusters = ClusteredSpec(dim=cfg.dim, classes=cfg.classes, seed=cfg.seed)
    elif spec == "class-pure":  # as benchmarks/stream.py
        clusters = ClusteredSpec(dim=cfg.dim, classes=cfg.classes, clusters_per_class=30, classes_per_site=1,
                                 site_jitter=0.0, seed=cfg.seed)
    else:
        raise ValueError(f"unknown data {spec!r}: {', '.join(DATA)}")
    x, y = clustered_vectors(cfg.n, clusters)
    rows = rng.integers(0, cfg.n, size=count)
    return x, y, moved(x[rows], cfg.seed), y[rows]


Search = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (queries, labels) -> rows (q, k), -1 where none


def _by_label(xq: np.ndarray, yq: np.ndarray, k: int, search_label: Callable[[np.ndarray, int], np.ndarray]) -> np.ndarray:
    out = np.full((len(xq), k), -1, dtype=np.int64)
    for c in np.unique(yq):
        sel = np.flatnonzero(yq == c)
        out[sel] = search_label(xq[sel], int(c))
    return out


def _first_other(cand: np.ndarray, yq: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """The first k candidates (rows, -1 padded) of a label other than the query's."""
    out = np.full((len(cand), k), -1, dtype=np.int64)
    for i, (row, label) in enumerate(zip(cand, yq)):
        row = row[row >= 0]
        keep = row[y[row] != label][:k]
        out[i, :len(keep)] = keep
    return out


def build_method(method: str, x: np.ndarray, y: np.ndarray, cfg: AltBench) -> tuple[Search, dict]:
    """A method's structure over (x, y) and its search function; the parameters it ran with."""
    k, classes = cfg.k, cfg.classes
    if method == "exact-torch":
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        return (lambda q, l: knn_other_class(torch.from_numpy(q), torch.from_numpy(l), xt, yt, k)[1].numpy()), {}
    if method == "nil":
        kind = faiss_index.resolve_kind("auto", "cpu")
        index = faiss_index.make_index(kind, cfg.dim, classes)
        index.upsert(torch.arange(len(x)), torch.from_numpy(x), torch.from_numpy(y))
        index.build()
        return (lambda q, l: index.search_other_class(torch.from_numpy(q), torch.from_numpy(l), k).ids.numpy()), \
            {"kind": kind, **{p: index.params[p] for p in ("nprobe", "rerank") if p in index.params}}
    if method == "faiss-ivfflat-selector":
        import faiss

        quantizer = faiss.IndexFlatL2(cfg.dim)
        ivf = faiss.IndexIVFFlat(quantizer, cfg.dim, min(cfg.nlist, len(x) // 39 or 1))
        ivf.train(x)
        ivf.add(x)  # faiss ids = rows
        params = []
        for c in range(classes):
            bitmap = np.packbits(y != c, bitorder="little")
            sel = faiss.IDSelectorBitmap(len(x), faiss.swig_ptr(bitmap))
            params.append((faiss.SearchParametersIVF(sel=sel, nprobe=cfg.nprobe), bitmap, sel))  # keep alive

        def search_label(q, c):
            return ivf.search(q, k, params=params[c][0])[1]
        return (lambda q, l: _by_label(q, l, k, search_label)), {"nlist": ivf.nlist, "nprobe": cfg.nprobe}
    if method in ("usearch-postfilter", "usearch-per-class"):
        from usearch.index import Index

        def usearch_index(rows: np.ndarray) -> Index:
            index = Index(ndim=cfg.dim, metric="l2sq", dtype="f32", connectivity=cfg.hnsw_m,
                          expansion_add=cfg.ef_construction, expansion_search=max(cfg.ef_search, cfg.oversample))
            index.add(rows, x[rows], threads=cfg.threads)
            return index

        settings = {"connectivity": cfg.hnsw_m, "expansion_add": cfg.ef_construction}
        if method == "usearch-postfilter":
            index = usearch_index(np.arange(len(x)))

            def search(q, l):
                keys = index.search(q, cfg.oversample, threads=cfg.threads).keys.astype(np.int64)
                return _first_other(keys, l, y, k)
            return search, settings | {"expansion_search": max(cfg.ef_search, cfg.oversample),
                                       "oversample": cfg.oversample}
        shards = [usearch_index(np.flatnonzero(y == c)) for c in range(classes)]

        def search(q, l):
            keys = np.full((len(q), classes * k), -1, dtype=np.int64)
            dist = np.full((len(q), classes * k), np.inf, dtype=np.float32)
            for c, shard in enumerate(shards):
                sel = np.flatnonzero(l != c)
                if len(sel):
                    m = shard.search(q[sel], k, threads=cfg.threads)
                    keys[sel, c * k:(c + 1) * k] = m.keys.reshape(len(sel), k)
                    dist[sel, c * k:(c + 1) * k] = m.distances.reshape(len(sel), k)
            order = np.argsort(dist, axis=1, kind="stable")[:, :k]
            return np.take_along_axis(keys, order, axis=1)
        return search, settings | {"expansion_search": max(cfg.ef_search, k)}
    if method == "hnswlib-filter":
        import hnswlib

        index = hnswlib.Index(space="l2", dim=cfg.dim)
        index.init_index(max_elements=len(x), ef_construction=cfg.ef_construction, M=cfg.hnsw_m, random_seed=cfg.seed)
        index.add_items(x, np.arange(len(x)), num_threads=cfg.threads)
        index.set_ef(max(cfg.ef_search, k))
        labels = y.tolist()  # the filter runs in Python for every visited node: a list is its fastest lookup

        def search_label(q, c):
            return index.knn_query(q, k=k, num_threads=cfg.threads, filter=lambda row: labels[row] != c)[0]
        return (lambda q, l: _by_label(q, l, k, search_label)), {"M": cfg.hnsw_m, "ef_construction": cfg.ef_construction,
                                                                 "ef": max(cfg.ef_search, k)}
    raise ValueError(f"unknown method {method!r}: {', '.join(METHODS)}")


def recalls(found: np.ndarray, truth: np.ndarray, true_d: np.ndarray, xq: np.ndarray, x: np.ndarray) -> tuple[float, float]:
    """(recall@1, recall@k): the top answer is the true one or ties it in distance; share of the true k found."""
    top = found[:, 0]
    valid = top >= 0
    d_top = np.full(len(top), np.inf)
    d_top[valid] = np.sqrt(((xq[valid] - x[top[valid]]) ** 2).sum(1))  # Euclidean, as exact-torch's
    hit1 = (top == truth[:, 0]) | (valid & (d_top <= true_d[:, 0] + 1e-5))
    hitk = [len(set(f[f >= 0]) & set(t[t >= 0])) / max(1, (t >= 0).sum()) for f, t in zip(found, truth)]
    return float(hit1.mean()), float(np.mean(hitk))


def _version(method: str) -> str | None:
    try:
        return metadata.version(LIBRARY[method])
    except metadata.PackageNotFoundError:
        return None


def run_method(method: str, spec: str, x, y, xq, yq, truth, true_d, cfg: AltBench) -> dict:
    t0 = time.perf_counter()
    search, params = build_method(method, x, y, cfg)
    build_s = time.perf_counter() - t0
    requests = [(xq[i:i + cfg.batch], yq[i:i + cfg.batch]) for i in range(0, len(xq), cfg.batch)]
    for q, l in requests[:5]:  # untimed: first-call allocations
        search(q, l)
    times, found = [], []
    for q, l in requests:
        t = time.perf_counter()
        found.append(search(q, l))
        times.append((time.perf_counter() - t) * 1e3)
    r1, rk = recalls(np.concatenate(found), truth, true_d, xq, x)
    p50 = median(times)
    return {"method": method, "library": LIBRARY[method], "version": _version(method), "data": spec, "n": cfg.n,
            "k": cfg.k, "batch": cfg.batch, "requests": len(requests), "params": params,
            "build_s": round(build_s, 2), "p50_ms": round(p50, 3), "p99_ms": round(float(np.percentile(times, 99)), 3),
            "search_rate": round(1e3 / p50, 1), "recall_at_1": round(r1, 4), "recall_at_k": round(rk, 4)}


def _key(row: dict) -> tuple:
    return row["method"], row["data"], row["n"], row["k"], row["batch"], row["requests"]


def run_alternatives(cfg: AltBench, command: str) -> dict:
    """Every (data, method) row, each written to cfg.out as it finishes; rows already there are kept."""
    out = Path(cfg.out)
    old = {_key(r): r for r in json.loads(out.read_text()).get("rows", [])} if out.exists() else {}
    torch.set_num_threads(cfg.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(cfg.threads)
    except ImportError:  # pragma: no cover - faiss is a dependency of every install
        pass
    started = time.time()
    result = envelope(command, benchmark="alternatives", settings=asdict(cfg), rows=list(old.values()))
    for spec in cfg.data:
        todo = [m for m in cfg.methods
                if (m, spec, cfg.n, cfg.k, cfg.batch, cfg.requests) not in old]
        if not todo:
            continue
        x, y, xq, yq = make_data(spec, cfg)
        true_d, truth = knn_other_class(torch.from_numpy(xq), torch.from_numpy(yq), torch.from_numpy(x),
                                        torch.from_numpy(y), cfg.k)
        truth, true_d = truth.numpy(), true_d.numpy()
        for method in tqdm(todo, desc=f"alternatives {spec}", disable=not cfg.progress):
            row = run_method(method, spec, x, y, xq, yq, truth, true_d, cfg)
            result["rows"] = [r for r in result["rows"] if _key(r) != _key(row)] + [row]
            write_result(cfg.out, close_envelope(result, started), alternatives_markdown(result))
    close_envelope(result, started)
    write_result(cfg.out, result, alternatives_markdown(result))
    return result


def alternatives_markdown(result: dict) -> str:
    s = result["settings"]
    lines = markdown_head("What a user might pick instead: nearest other-class search with a label filter", result)
    lines += machine_lines(result) + [
        "",
        f"N = {s['n']:,} stored vectors, d = {s['dim']}, {s['classes']} classes; requests of {s['batch']} queries, "
        f"k = {s['k']}; {s['threads']} threads for every library. Search time per request inside one process "
        "(the service's HTTP layer adds the same to every method); `search rate` = 1000 / p50, the requests "
        "per second one process could answer doing nothing else. Recall against exact-torch on the same requests.",
        "",
    ]
    for spec in dict.fromkeys(r["data"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["data"] == spec]
        rows.sort(key=lambda r: METHODS.index(r["method"]) if r["method"] in METHODS else len(METHODS))
        lines += [f"## {spec}", "", markdown_table(
            ["method", "library", "params", "build s", "p50 ms", "p99 ms", "search rate /s", "recall@1",
             f"recall@{s['k']}"],
            [[r["method"], f"{r['library']} {r['version'] or ''}".strip(),
              ", ".join(f"{k}={v}" for k, v in r["params"].items()), fmt(r["build_s"], 2), fmt(r["p50_ms"], 2),
              fmt(r["p99_ms"], 2), fmt(r["search_rate"]), fmt(r["recall_at_1"], 3), fmt(r["recall_at_k"], 3)]
             for r in rows]), ""]
    return "\n".join(lines)
