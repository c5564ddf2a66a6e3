"""How many lists must a joint probe visit? Why trained embeddings cost the engine more than clusters.

    python -m benchmarks.probe_lists --n 1000000 --data trained:/tmp/tr/index --nlist 64,256,1024 \
        --out benchmarks/results/probe-lists.json

For each data kind and lists per class, the engine's own class-partitioned IVF ("ivf", the same
k-means and assignment as "ivfpq") is built over the data; then a seeded sample of stored rows is
searched exactly for its nearest other-class row, and the other-class lists are ranked by centroid
distance as the joint probe ranks them. For each list-hit target (the share of sampled rows whose true
row's list is probed) the table gives the lists, and the stored rows they hold, that the probe must
scan. It also gives how separated the classes are: the norm of the class means of the unit vectors,
the mean distance to the nearest other-class row, and to the row's own list centroid. No timing: the
rows scanned are what a search pays for (``nil bench stream`` times it).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

import faiss_index
from benchmarks.report import close_envelope, envelope, markdown_table, write_result
from benchmarks.stream import StreamBench, data_chunks
from faiss_index.engines.exact import knn_other_class
from faiss_index.quantizers.kmeans import seeded_sample

TARGETS = (0.9, 0.95, 0.97, 0.99)


def load(data: str, n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    parts = list(data_chunks(data, n, StreamBench(classes=classes, seed=seed)))
    return torch.from_numpy(np.concatenate([x for x, _ in parts])), torch.from_numpy(np.concatenate([y for _, y in parts]))


def probe_row(x: torch.Tensor, y: torch.Tensor, classes: int, nlist: int, sample: int, seed: int) -> dict:
    """Build the engine with ``nlist`` lists per class and measure what its joint probe must scan."""
    n = x.shape[0]
    index = faiss_index.make_index("ivf", x.shape[1], classes, device="cpu", nlist=nlist, refresh_every=10**9)
    index.reserve(n)
    index.upsert(torch.arange(n), x, y)
    t0 = time.perf_counter()
    index.refresh()
    build_s = time.perf_counter() - t0
    engine = index.engine
    list_no = torch.from_numpy(engine._lists.row_list[:n].astype(np.int64))
    sizes = engine.list_size.to(torch.float64)
    rows = seeded_sample(n, sample, seed + 11)  # not the calibration's own sample
    xq, yq = x[rows], y[rows]
    dist, near = knn_other_class(xq, yq, x, y, 1, qid=rows, bid=torch.arange(n))
    score = engine._list_scores(xq, yq, same_class=False)
    truth = score.gather(1, list_no[near[:, 0]].unsqueeze(1))
    needed = (score < truth).sum(1) + 1  # lists probed up to and including the true row's list
    order = score.argsort(1)
    scanned = sizes[order].cumsum(1).gather(1, (needed - 1).unsqueeze(1)).squeeze(1)
    other_lists = int(torch.isfinite(score).sum(1).double().mean())
    other_rows = float(torch.where(torch.isfinite(score), sizes.unsqueeze(0), 0.0).sum(1).mean())
    own = (x[rows] - engine.centroids[list_no[rows]]).norm(dim=1)
    means = torch.stack([x[y == c].mean(0) for c in range(classes) if bool((y == c).any())])
    row = {"nlist_per_class": nlist, "lists": int(engine.centroids.shape[0]), "sample": int(rows.numel()),
           "build_s": round(build_s, 1), "calibrated_nprobe": engine.resolved["nprobe"],
           "class_mean_norm": round(float(means.norm(dim=1).mean()), 3),
           "nearest_other_dist": round(float(dist[:, 0].mean()), 3),
           "own_centroid_dist": round(float(own.mean()), 3), "targets": {}}
    need_sorted, scanned_sorted = needed.sort().values, scanned.sort().values
    for t in TARGETS:
        k = math.ceil(t * needed.shape[0]) - 1
        row["targets"][str(t)] = {"lists": int(need_sorted[k]),
                                  "lists_share": round(int(need_sorted[k]) / other_lists, 4),
                                  "rows": int(scanned_sorted[k]),
                                  "rows_share": round(float(scanned_sorted[k]) / other_rows, 4)}
    return row


def markdown(result: dict) -> str:
    lines = [f"# Joint probe: lists and rows scanned to hold the nearest other-class row (n = {result['n']:,})", "",
             f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores. No timing; "
             "the rows scanned are what a search pays for.", "",
             "A seeded sample of stored rows is searched exactly; the other-class lists are ranked by "
             "centroid distance, as the engine's joint probe ranks them. \"lists / rows at t\": what the "
             "probe must scan for the true row's list to be probed for a share t of the sample (share of "
             "all other-class lists or rows in brackets). Separation: norm of the class means of the "
             "unit vectors (0 = classes centred alike), mean distance to the nearest other-class row and to "
             "the row's own list centroid.", ""]
    headers = ["data", "lists per class", "calibrated nprobe"] + [f"lists / rows at {t}" for t in TARGETS] + [
        "class-mean norm", "nearest other-class", "own centroid"]
    body = []
    for r in result["rows"]:
        cells = [f"{r['targets'][str(t)]['lists']:,} ({100 * r['targets'][str(t)]['lists_share']:.1f}%) / "
                 f"{r['targets'][str(t)]['rows']:,} ({100 * r['targets'][str(t)]['rows_share']:.1f}%)" for t in TARGETS]
        body.append([r["data"], r["nlist_per_class"], r["calibrated_nprobe"], *cells, r["class_mean_norm"],
                     r["nearest_other_dist"], r["own_centroid_dist"]])
    return "\n".join(lines + [markdown_table(headers, body), ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--data", default="clusters", help="comma-separated: clusters, class-pure, trained:INDEX_DIR")
    parser.add_argument("--nlist", default="256", help="lists per class, comma-separated")
    parser.add_argument("--classes", type=int, default=9)
    parser.add_argument("--sample", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/probe-lists.json")
    args = parser.parse_args()
    command = (f"python -m benchmarks.probe_lists --n {args.n} --data {args.data} --nlist {args.nlist} "
               f"--classes {args.classes} --sample {args.sample} --seed {args.seed} --out {args.out}")
    started = time.time()
    out = Path(args.out)
    result = envelope(command) | {"n": args.n, "rows": []}
    for data in args.data.split(","):
        x, y = load(data, args.n, args.classes, args.seed)
        for nlist in [int(v) for v in args.nlist.split(",")]:
            result["rows"].append({"data": data} | probe_row(x, y, args.classes, nlist, args.sample, args.seed))
            close_envelope(result, started)
            write_result(out, result, markdown(result))  # each finished row at once
        del x, y
    print(markdown(result))


if __name__ == "__main__":
    main()
