"""Reading a step's fresh distractor images from a zarr store: per image through the loader's cache
against grouped by chunk through their own cache (`nil.mining.DistractorImages`).

    python -m benchmarks.distractor_reads --store /tmp/tr/small.zarr --steps 16 \
        --out benchmarks/results/distractor-reads.json

Each step the loader reads its next image in order and ``--batch`` scattered training rows are read
as distractors (seeded uniform rows: a mined distractor can be any training sample). "per image" is
how the trainer read them before: one ``load`` each through the loader's LRU of decoded chunks, which
the scattered rows also evict. "grouped" is ``random_reader(cache).load_many``. Both see the same rows.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.measure import load_average
from benchmarks.report import envelope, markdown_table, write_result
from nil.data import open_dataset


def stream(train, reader, steps: list[np.ndarray]) -> tuple[list[float], int]:
    """ms per step and chunks decoded over the stream; ``reader`` None reads per image."""
    loader = train.parent
    loader._cache.clear()
    decodes = loader.decodes + (reader.parent.decodes if reader else 0)
    times = []
    for k, rows in enumerate(steps):
        start = time.perf_counter()
        train.load(k % len(train))  # the loader's own sequential read shares its cache
        if reader is None:
            [train.load(int(r)) for r in rows]
        else:
            reader.load_many(rows)
        times.append((time.perf_counter() - start) * 1e3)
    return times, loader.decodes + (reader.parent.decodes if reader else 0) - decodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="a zarr store (nil data synth OUT.zarr --n 100000)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--cache-mb", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/distractor-reads.json")
    args = parser.parse_args()
    load_start = load_average()
    ds = open_dataset(args.store, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    steps = [rng.integers(0, len(ds.train), args.batch) for _ in range(args.steps)]
    rows = []
    for name, reader in (("per image (before)", None),
                         ("grouped, own cache", ds.train.random_reader(args.cache_mb << 20))):
        times, decodes = stream(ds.train, reader, steps)
        half = times[len(times) // 2:]
        rows.append({"method": name, "ms_per_step": round(statistics.mean(times), 1),
                     "ms_per_step_second_half": round(statistics.mean(half), 1),
                     "decodes_per_step": round(decodes / len(steps), 1)})
    chunk = ds.train.chunk_size()
    command = (f"python -m benchmarks.distractor_reads --store {args.store} --steps {args.steps} --batch {args.batch} "
               f"--cache-mb {args.cache_mb} --seed {args.seed} --out {args.out}")
    result = envelope(command) | {"store": args.store, "train_rows": len(ds.train), "chunk": chunk,
                                  "rows": rows, "load_avg_end": load_average()}
    ratio = rows[0]["ms_per_step"] / max(rows[1]["ms_per_step"], 1e-9)
    md = "\n".join([
        f"# Fresh distractor images from a zarr store ({len(ds.train):,} training rows, chunks of {chunk}, "
        f"{args.batch} per step)", "", f"Command: `{command}`", "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; "
        f"load average (1/5/15 min) at start {load_start}, at end {result['load_avg_end']}.", "",
        markdown_table(["method", "ms per step", "ms per step, second half", "chunks decoded per step"],
                       [[r["method"], r["ms_per_step"], r["ms_per_step_second_half"], r["decodes_per_step"]]
                        for r in rows]), "",
        f"Grouped reads are {ratio:.0f}x faster over the {args.steps} steps (first steps included, "
        f"while the cache fills).", ""])
    write_result(Path(args.out), result, md)
    print(md)


if __name__ == "__main__":
    main()
