#!/usr/bin/env bash
# The GPU device check: installs what the device machine lacks, then runs benchmarks/gpu_check.py.
#   bash benchmarks/gpu_check.sh             on a CUDA machine (writes benchmarks/results/gpu.json)
#   bash benchmarks/gpu_check.sh --dry-run   anywhere, CPU, toy sizes (the test suite runs this)
# Wheels carried with the tree in .whl/ (zarr and its needs; faiss-gpu where it can travel) are
# installed into /tmp/site first, since the device machine reaches no package registry.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec python3 -m benchmarks.gpu_check "$@"
