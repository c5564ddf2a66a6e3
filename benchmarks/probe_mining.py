"""Probe nearest-other-class search: exact engine vs a FaissIndex configuration, on this machine.

Data: seeded clustered synthetic vectors (faiss_index.synthetic.clustered), classes interleaved.
Queries: batches drawn from the stored data, searched with their own ids excluded.
Reports per-batch milliseconds (median and best over batches) of the exact engine
(knn_other_class over the store) and of the index, recall@1 of the index against exact, the
cost of a streaming upsert of one batch, and of a search once a delta has built up.

    python benchmarks/probe_mining.py --n 1000000 --kind ivfpq
    python benchmarks/probe_mining.py --n 100000 --kind ivfpq --param nprobe=24 --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from faiss_index import knn_other_class, make_index  # noqa: E402
from faiss_index.synthetic import clustered  # noqa: E402
from faiss_index.kinds import parse_value  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("data")
    g.add_argument("--n", type=int, default=1_000_000)
    g.add_argument("--dim", type=int, default=128)
    g.add_argument("--classes", type=int, default=9)
    g.add_argument("--clusters-per-class", type=int, default=100)
    g.add_argument("--spread", type=float, default=0.6)
    g.add_argument("--seed", type=int, default=0)
    g = ap.add_argument_group("index")
    g.add_argument("--kind", default="ivfpq")
    g.add_argument("--device", default="cpu", help="cpu or cuda (the store, queries and structure live there)")
    g.add_argument("--param", action="append", default=[], help="key=value index parameter (repeatable)")
    g = ap.add_argument_group("search")
    g.add_argument("--batch", type=int, default=256)
    g.add_argument("--batches", type=int, default=12)
    g.add_argument("--k", type=int, default=1)
    g.add_argument("--upserts", type=int, default=50, help="streaming upserts timed (and then searched with the delta)")
    g.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave default)")
    g.add_argument("--train-steps", type=int, default=0,
                   help="then simulate training: this many steps of search + upsert with --train-refresh-every")
    g.add_argument("--train-refresh-every", type=int, default=200)
    g = ap.add_argument_group("output")
    g.add_argument("--json", type=Path, default=None)
    return ap.parse_args(argv)


def _value(s: str):
    return parse_value(s)


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    params = dict(p.split("=", 1) for p in a.param)
    params = {k: _value(v) for k, v in params.items()}
    t0 = time.perf_counter()
    x, y = clustered(a.n, a.dim, a.classes, clusters_per_class=a.clusters_per_class, spread=a.spread, seed=a.seed)
    x, y = x.to(a.device), y.to(a.device)
    ids = torch.arange(a.n, device=a.device)
    sync = torch.cuda.synchronize if str(a.device).startswith("cuda") else (lambda: None)
    t_data = time.perf_counter() - t0

    if a.kind != "exact":
        params.setdefault("refresh_every", 0)
    index = make_index(a.kind, a.dim, a.classes, device=a.device, **params)
    t0 = time.perf_counter()
    index.upsert(ids, x, y)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    index.build()
    t_build = time.perf_counter() - t0
    vectors, labels, bids = index.store.view()

    g = torch.Generator().manual_seed(a.seed + 1)
    exact_ms, approx_ms, hits = [], [], 0
    for b in range(a.batches + 1):
        qi = torch.randint(0, a.n, (a.batch,), generator=g).to(a.device)
        xq, yq = x[qi], y[qi]
        sync()
        t0 = time.perf_counter()
        De, Ie = knn_other_class(xq, yq, vectors, labels, a.k, qid=qi, bid=bids)
        sync()
        te = time.perf_counter() - t0
        t0 = time.perf_counter()
        r = index.search_other_class(xq, yq, a.k, query_ids=qi)
        sync()
        ta = time.perf_counter() - t0
        if b == 0:  # warm-up
            continue
        exact_ms.append(te * 1e3)
        approx_ms.append(ta * 1e3)
        # A hit: the exact nearest id, or a tie at the same distance.
        same = (r.ids[:, 0] == bids[Ie[:, 0]]) | (r.distances[:, 0] <= De[:, 0] * (1 + 1e-6))
        hits += int(same.sum())
    recall = hits / (a.batches * a.batch)

    # Streaming: re-upsert batches of existing samples with moved vectors (as in training).
    up_ms = []
    def moved_batch() -> tuple[torch.Tensor, torch.Tensor]:
        """A random batch of stored ids with their vectors moved a little, as after a training step."""
        qi = torch.randint(0, a.n, (a.batch,), generator=g).to(a.device)
        v = x[qi] + 0.01 * torch.randn(a.batch, a.dim, generator=g).to(a.device)
        return qi, v / v.norm(dim=1, keepdim=True)

    for _ in range(a.upserts):
        qi, v = moved_batch()
        sync()
        t0 = time.perf_counter()
        index.upsert(qi, v, y[qi])
        sync()
        up_ms.append((time.perf_counter() - t0) * 1e3)
    delta = getattr(index, "delta_size", 0)
    delta_ms = []
    for _ in range(3):
        qi = torch.randint(0, a.n, (a.batch,), generator=g).to(a.device)
        sync()
        t0 = time.perf_counter()
        index.search_other_class(x[qi], y[qi], a.k, query_ids=qi)
        sync()
        delta_ms.append((time.perf_counter() - t0) * 1e3)
    t0 = time.perf_counter()
    index.refresh()
    t_refresh = time.perf_counter() - t0

    train = {}
    if a.train_steps and a.kind != "exact":
        # Steady state: every step searches a batch and upserts it with moved vectors; the index
        # refreshes itself every --train-refresh-every steps (its cost lands in that step's upsert).
        index.refresh_every = a.train_refresh_every
        index.refresh()
        step_ms, refreshes = [], 0
        for _ in range(a.train_steps):
            qi, v = moved_batch()
            sync()
            t0 = time.perf_counter()
            index.search_other_class(v, y[qi], a.k, query_ids=qi)
            before = index.last_refresh_s
            index.upsert(qi, v, y[qi])
            sync()
            step_ms.append((time.perf_counter() - t0) * 1e3)
            refreshes += index.last_refresh_s != before
        train = {"train_steps": a.train_steps, "train_refresh_every": a.train_refresh_every,
                 "train_refreshes": refreshes, "train_step_ms_mean": round(statistics.mean(step_ms), 1),
                 "train_step_ms_median": round(statistics.median(step_ms), 1)}

    med_e, med_a = statistics.median(exact_ms), statistics.median(approx_ms)
    out = {
        "n": a.n, "dim": a.dim, "classes": a.classes, "kind": a.kind, "params": index.params,
        "threads": torch.get_num_threads(), "batch": a.batch, "batches": a.batches, "k": a.k,
        "exact_ms_median": round(med_e, 1), "exact_ms_best": round(min(exact_ms), 1),
        "index_ms_median": round(med_a, 1), "index_ms_best": round(min(approx_ms), 1),
        "speedup_median": round(med_e / med_a, 2), "speedup_best": round(min(exact_ms) / min(approx_ms), 2),
        "recall_at_1": round(recall, 4),
        "device": a.device,
        "upsert_ms_median": round(statistics.median(up_ms), 3) if up_ms else None,
        "upsert_ms_max": round(max(up_ms), 3) if up_ms else None,
        "delta_rows": delta, "search_with_delta_ms_median": round(statistics.median(delta_ms), 1),
        "data_s": round(t_data, 2), "load_s": round(t_load, 2), "build_s": round(t_build, 2),
        "refresh_s": round(t_refresh, 2), "index_mb": round(index.nbytes() / 2**20, 1),
        **train,
    }
    print(json.dumps(out, indent=1))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
