"""`nil bench` from a built wheel, away from the checkout (benchmarks are an installed package)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_nil_bench_runs_from_an_installed_wheel(tmp_path):
    source, wheels, site, work = (tmp_path / d for d in ("source", "wheels", "site", "work"))
    work.mkdir()
    # Built from a copy of the project files, so no build/ folder left in the checkout can leak in.
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "runs", "build", "*.egg-info", "__pycache__",
                                                                 ".*cache", ".hypothesis", ".venv", ".whl", ".gpu"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", str(source), "-w", str(wheels)], check=True)
    wheel, = wheels.glob("nil-*.whl")
    subprocess.run(pip + ["install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    # Only the wheel's packages on the path (the dependencies come from this environment), run from
    # an empty folder: nothing can be found through the checkout.
    env = os.environ | {"PYTHONPATH": str(site), "PYTHONSAFEPATH": "1"}
    code = ("import benchmarks, cli, faiss_index, nil; from cli.main import main; "
            f"assert not any(m.__file__.startswith({str(ROOT)!r}) for m in (benchmarks, cli, faiss_index, nil)); main()")
    run = subprocess.run([sys.executable, "-c", code, "bench", "mining", "--n", "1000", "--dim", "8", "--batch", "32",
                          "--batches", "1", "--warmup", "0", "--no-sweep", "--no-progress", "--out", "m.json"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((work / "m.json").read_text())
    assert {r["method"] for r in result["rows"]} >= {"exact-torch", "exact-faiss-flat"}
    assert (work / "m.md").exists()
