"""One training step of a model in fp32 and in bf16 autocast on this machine (`--precision`).

    python -m benchmarks.precision_step --model resnet18 --image-size 28 --batch 64 \
        --out benchmarks/results/precision.json

Times forward + cross-entropy + backward + AdamW step on random data, after one warm-up step,
and reports the median of the timed steps for each precision.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.measure import load_average
from benchmarks.report import envelope, markdown_table, write_result
from nil.models import build_model
from nil.predict import autocast


def time_step(model_name: str, image_size: int, batch: int, precision: str, steps: int, seed: int = 0) -> float:
    """Median ms of one training step."""
    torch.manual_seed(seed)
    model = build_model(model_name, 5, 3, image_size, 128, None)
    opt = torch.optim.AdamW(model.parameters())
    x, y = torch.randn(batch, 3, image_size, image_size), torch.randint(0, 5, (batch,))
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        with autocast(torch.device("cpu"), precision):
            loss = F.cross_entropy(model(x).logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:  # the first step warms up the kernels
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/precision.json")
    args = parser.parse_args()
    load_start = load_average()
    rows = [{"precision": p, "ms_per_step": round(time_step(args.model, args.image_size, args.batch, p, args.steps), 1)}
            for p in ("fp32", "bf16")]
    command = (f"python -m benchmarks.precision_step --model {args.model} --image-size {args.image_size} "
               f"--batch {args.batch} --steps {args.steps} --out {args.out}")
    result = envelope(command) | {"model": args.model, "image_size": args.image_size,
              "batch": args.batch, "rows": rows, "load_avg_start": load_start, "load_avg_end": load_average()}
    speedup = rows[0]["ms_per_step"] / rows[1]["ms_per_step"]
    md = "\n".join([
        f"# Training step, fp32 versus bf16 autocast ({args.model}, {args.image_size}x{args.image_size}, "
        f"batch {args.batch}, CPU)", "", f"Command: `{command}`", "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; "
        f"load average (1/5/15 min) at start {load_start}, at end {result['load_avg_end']}.", "",
        markdown_table(["precision", "ms per step"], [[r["precision"], r["ms_per_step"]] for r in rows]), "",
        f"bf16 is {speedup:.2f}x faster here.", ""])
    out = Path(args.out)
    write_result(out, result, md)
    print(md)


if __name__ == "__main__":
    main()
