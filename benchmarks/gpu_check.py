"""The GPU path, proven in one short run: GPU tests, GPU mining at 1M and 10M, a ResNet-50 step.

Run on a CUDA machine with ``bash benchmarks/gpu_check.sh`` (under 8 minutes on one H200). The
same code runs on the CPU at toy sizes with ``--dry-run``, which the test suite does, so that GPU
time is never spent discovering a typo. Writes ``gpu.json`` with the mining benchmark's row schema
plus the GPU's name and memory, and the exact-search bandwidth arithmetic.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import faiss_index
from benchmarks.measure import median
from benchmarks.mining import MiningBench, run_mining_bench
from benchmarks.report import envelope, to_json, write_files
from faiss_index.synthetic import ClusteredSpec, clustered_vectors
from nil.config import TrainConfig
from nil.data.synth import write_synthetic
from nil.train import train

H200_BANDWIDTH_GBS = 4800.0  # HBM3e peak, GB/s (NVIDIA H200 datasheet)


def exact_bandwidth(n: int, dim: int, batch: int, dtype: torch.dtype, device: torch.device, reps: int) -> dict:
    """Exact nearest other-class search over n half-precision vectors: ms per batch and GB/s read."""
    x, y = clustered_vectors(n, ClusteredSpec(dim=dim, classes=9, seed=0))
    xb = torch.from_numpy(x).to(device=device, dtype=dtype)
    yb = torch.from_numpy(y).to(device)
    del x
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:batch].to(device)
    times = []
    for i in range(reps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        faiss_index.knn_other_class(xb[rows], yb[rows], xb, yb, 1, qid=rows, bid=torch.arange(n, device=device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append((time.perf_counter() - start) * 1e3)
    ms = median(times)
    read_gb = n * dim * xb.element_size() / 1e9
    return {"method": f"exact-torch-{str(dtype).split('.')[-1]}", "n": n, "dim": dim, "batch": batch,
            "ms_per_batch": ms, "queries_per_s": batch / ms * 1e3, "recall_at_1": 1.0,
            "bytes_read_gb": read_gb, "achieved_gb_per_s": read_gb / (ms / 1e3),
            "arithmetic": f"{n} x {dim} x {xb.element_size()} B = {read_gb:.3f} GB read per batch in {ms:.3f} ms"}


def train_step_rows(dry: bool, device: str, workdir: Path) -> list[dict]:
    """One epoch of ResNet-50 at 224x224 (small_cnn at 32 in a dry run): ms per step, mining share."""
    size, n, model = (32, 256, "small_cnn") if dry else (224, 4096, "resnet50")
    data = write_synthetic(workdir / "patches.zarr", n=n, size=size, classes=4, seed=0)
    anns = ["none", "exact", "faiss"]
    rows = []
    for ann in anns:
        cfg = TrainConfig(data=str(data), out=str(workdir / f"run-{ann}"), model=model, epochs=1, batch_size=64,
                          loss="ce" if ann == "none" else "nil", ann=ann, ann_index="flat", warmup_epochs=0,
                          device=device, progress=False, image_size=size)
        try:
            train(cfg)
        except Exception as exc:  # faiss GPU missing on the device machine, say: record, go on
            rows.append({"method": f"train-{model}-{ann}", "skipped": f"{type(exc).__name__}: {exc}"})
            continue
        line = json.loads((Path(cfg.out) / "metrics.jsonl").read_text().splitlines()[-1])
        steps = max(1, int(0.7 * n) // 64)
        step_ms = line["epoch_s"] * 1e3 / steps
        mining = line.get("mining", {})
        mine_ms = mining.get("mining_ms_per_step", 0.0) + mining.get("upsert_ms_per_step", 0.0)
        rows.append({"method": f"train-{model}-{ann}", "image_size": size, "batch": 64, "steps": steps,
                     "ms_per_step": step_ms, "mining_ms_per_step": mine_ms,
                     "mining_share": mine_ms / step_ms if step_ms else None})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: check that everything runs")
    ap.add_argument("--out", default="benchmarks/results/gpu.json")
    args = ap.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    device = torch.device("cpu" if dry else "cuda")
    started = time.time()
    command = "python -m benchmarks.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv)
    result = envelope(command.strip(), dry_run=dry, rows=[], checks={})
    if result["machine"]["gpu"]:
        result["gpu"] = result["machine"]["gpu"]
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/"], capture_output=True,
                           text=True)
    result["checks"]["gpu_tests"] = {"returncode": tests.returncode, "tail": tests.stdout[-1500:]}

    dtype = torch.float32 if dry else torch.float16
    for n in ((2000,) if dry else (1_000_000, 10_000_000)):
        result["rows"].append(exact_bandwidth(n, 16 if dry else 128, 32 if dry else 256, dtype, device, 2 if dry else 10))
    if not dry:
        for row in result["rows"]:
            row["bandwidth_fraction_of_h200"] = row["achieved_gb_per_s"] / H200_BANDWIDTH_GBS

    with tempfile.TemporaryDirectory() as tmp:
        bench = MiningBench(ns=(2000,) if dry else (1_000_000,), dim=16 if dry else 128, batch=32 if dry else 256,
                            batches=2 if dry else 10, warmup=1, device=str(device), large=not dry, sweep=False,
                            out=str(Path(tmp) / "mining.json"), progress=False)
        mining = run_mining_bench(bench, command="benchmarks/gpu_check.py")
        result["rows"].extend(mining["rows"])
        result["rows"].extend(train_step_rows(dry, str(device), Path(tmp)))
    result["total_s"] = time.time() - started
    out = Path(args.out)
    write_files({out: to_json(result)})
    print(f"gpu_check: wrote {out} in {result['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
