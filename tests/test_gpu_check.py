"""The GPU device check must run end to end on the CPU first (--dry-run), so GPU time only runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_well_formed_results(tmp_path):
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = tmp_path / "gpu.json"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] is True
    methods = {r["method"] for r in result["rows"]}
    assert {"exact-torch-float32", "exact-torch", "train-small_cnn-none", "train-small_cnn-exact"} <= methods
    exact = next(r for r in result["rows"] if r["method"] == "exact-torch-float32")
    assert exact["bytes_read_gb"] == 2000 * 16 * 4 / 1e9 and exact["ms_per_batch"] > 0
    for r in result["rows"]:
        if r["method"].startswith("train-") and "skipped" not in r:
            assert r["ms_per_step"] > 0 and 0 <= r["mining_share"] < 1
    assert result["checks"]["gpu_tests"]["returncode"] in (0, 5)  # all GPU tests skip (or none) on a CPU
