"""Measuring: wall-clock timings that wait for the GPU, resident-memory high-water marks, load."""

from __future__ import annotations

import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

LOG = logging.getLogger(__name__)


KNOBS = {"ivf": "nprobe", "ivfpq": "nprobe", "hnsw": "efSearch", "cagra": "itopk_size"}  # recall/speed knob of each kind

def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work, so a timing covers the work and not just its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_ms(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[float, object]:
    """``(milliseconds, fn())`` for one call, GPU work included."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return (time.perf_counter() - start) * 1e3, out


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (other jobs on a shared machine slow every figure)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GOMP_SPINCOUNT")


def thread_env() -> dict[str, str]:
    """Threading variables set for this process. On a loaded machine OpenMP's default busy-waiting
    can make small parallel kernels many times slower (a spinning thread waits for a descheduled
    one); OMP_WAIT_POLICY=PASSIVE avoids that, so it is recorded with every figure."""
    return {k: os.environ[k] for k in THREAD_ENV if k in os.environ}


def faiss_simd() -> str | None:
    """Which SIMD code paths the loaded faiss uses, without importing faiss (None before it is loaded).

    faiss >= 1.12 wheels are one library with dynamic dispatch (``SIMDConfig`` names the level in
    use, e.g. "AVX2"); older wheels ship one module per level (``swigfaiss_avx2``...). "generic"
    means no AVX2/AVX-512 code paths, which slows flat scans and PQ fast-scan a lot."""
    faiss = sys.modules.get("faiss")
    if faiss is None:
        return None
    config = getattr(faiss, "SIMDConfig", None)
    if config is not None and hasattr(config, "get_level_name"):
        try:
            return str(config.get_level_name()).lower()
        except Exception:  # noqa: BLE001 - a build without dispatch: fall back to the module names
            pass
    for level in ("avx512_spr", "avx512", "avx2", "sve"):
        if f"faiss.swigfaiss_{level}" in sys.modules:
            return level
    return "generic"


def git_revision(paths: tuple[str, ...] = ("faiss_index", "nil", "benchmarks")) -> dict | None:
    """The checkout's commit, and whether the code measured (``paths``) differs from it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *paths, ":(exclude)benchmarks/results"],
                               cwd=root, capture_output=True, text=True, timeout=10, check=True).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head, "uncommitted": sorted(line[3:] for line in dirty if line.strip())}


def available_memory_gb() -> float | None:
    """MemAvailable of /proc/meminfo in GiB, or None off Linux."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:  # pragma: no cover
        pass
    return None


class PeakMemory:
    """High-water mark of resident memory over a block, in MB (RSS; GPU memory on a CUDA device).

    On Linux the kernel's high-water mark is reset at the start (``/proc/self/clear_refs``), so each
    block gets its own peak; where that is not allowed the figure is the process's peak so far and
    ``scope`` says so. On CUDA the figure is torch's peak allocation (FAISS's own GPU allocations are
    not seen by torch).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.scope = "block"
        self.peak_mb: float | None = None
        self.start_mb: float | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mb = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            self.scope = "process"
        self.start_mb = _rss_mb("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.peak_mb = _rss_mb("VmHWM")
            if self.peak_mb is None:  # no /proc: ru_maxrss is in kB on Linux
                self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                self.scope = "process"


def _rss_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover
        pass
    return None


def current_rss_mb() -> float | None:
    return _rss_mb("VmRSS")
