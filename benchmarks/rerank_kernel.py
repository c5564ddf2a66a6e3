"""Exact re-ranking of a batch's candidates: the torch path against faiss' in-place kernel, side by side.

    python -m benchmarks.rerank_kernel --n 1000000 --out benchmarks/results/rerank-kernel.json

Both paths are ``faiss_index.streaming.rerank.rerank`` on the same store, queries and candidates:
without ``faiss`` the candidate rows are gathered into a (Q, K, D) copy and differenced in torch
(what every search did before, and still does on GPU or for a float16 store); with it,
``fvec_L2sqr_by_idx`` reads each row in place. Timed alternately, batch after batch, so both see
the same load; the answers are checked to be identical.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.report import close_envelope, envelope, markdown_table, write_result
from faiss_index.engines.faiss_lib import follow_torch_threads, import_faiss
from faiss_index.streaming.rerank import candidate_distances, rerank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--candidates", type=int, default=192, help="re-rank depth (the ivfpq default)")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/rerank-kernel.json")
    args = parser.parse_args()
    command = (f"python -m benchmarks.rerank_kernel --n {args.n} --dim {args.dim} --batch {args.batch} "
               f"--candidates {args.candidates} --batches {args.batches} --seed {args.seed} --out {args.out}")
    started = time.time()
    faiss = import_faiss()
    follow_torch_threads(faiss)
    g = torch.Generator().manual_seed(args.seed)
    vectors = torch.nn.functional.normalize(torch.randn(args.n, args.dim, generator=g), dim=1)
    labels = torch.randint(0, 9, (args.n,), generator=g)
    ids = torch.arange(args.n)
    paths = {"torch gather (before)": {}, "faiss fvec_L2sqr_by_idx": {"faiss": faiss}}
    times = {name: {"rerank": [], "distances": []} for name in paths}
    for b in range(args.batches + 2):  # the first two are warm-up
        rows = torch.randint(0, args.n, (args.batch,), generator=g)
        cand = torch.randint(0, args.n, (args.batch, args.candidates), generator=g)
        xq, yq = vectors[rows], labels[rows]
        answers = []
        for name, kw in paths.items():
            t0 = time.perf_counter()
            candidate_distances(xq, vectors, cand, **kw)
            t1 = time.perf_counter()
            answers.append(rerank(xq, yq, rows, cand, vectors, labels, ids, 1, False, **kw))
            t2 = time.perf_counter()
            if b >= 2:
                times[name]["distances"].append((t1 - t0) * 1e3)
                times[name]["rerank"].append((t2 - t1) * 1e3)
        if not torch.equal(answers[0][1], answers[1][1]):
            raise SystemExit("the two paths returned different rows")
    rows_out = [{"method": name, "distances_p50_ms": round(statistics.median(t["distances"]), 2),
                 "rerank_p50_ms": round(statistics.median(t["rerank"]), 2),
                 "rerank_max_ms": round(max(t["rerank"]), 2)} for name, t in times.items()]
    result = envelope(command) | {"n": args.n, "dim": args.dim, "batch": args.batch,
                                  "candidates": args.candidates, "rows": rows_out}
    close_envelope(result, started)
    before, after = rows_out
    md = "\n".join([
        f"# Re-ranking {args.batch} queries x {args.candidates} candidates over {args.n:,} x {args.dim} "
        "float32 rows", "", f"Command: `{command}`", "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; load average (1/5/15 min) "
        f"at start {result['load_avg_start']}, at end {result['load_avg_end']}. Both paths timed alternately "
        f"over the same {args.batches} batches; identical answers.", "",
        markdown_table(["method", "distances p50 ms", "whole re-rank p50 ms", "whole re-rank max ms"],
                       [[r["method"], r["distances_p50_ms"], r["rerank_p50_ms"], r["rerank_max_ms"]]
                        for r in rows_out]), "",
        f"faiss kernel: distances {before['distances_p50_ms'] / after['distances_p50_ms']:.2f}x, whole re-rank "
        f"(label and id checks, top-k included) {before['rerank_p50_ms'] / after['rerank_p50_ms']:.2f}x faster at p50.",
        ""])
    write_result(Path(args.out), result, md)
    print(md)


if __name__ == "__main__":
    main()
