#!/usr/bin/env bash
# The GPU checks in one unattended go: the CUDA tests, then the benchmark, then a summary.
#   bash scripts/gpu_check.sh [OUT_DIR]
# Needs the project installed (pip install -e '.[dev]') on a machine with a CUDA GPU.
set -uo pipefail
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -m pytest -q tests/test_gpu.py tests/test_regularizers.py 2>&1 | tee "$out/tests.txt"
tests=${PIPESTATUS[0]}
PYTHONUNBUFFERED=1 python scripts/bench.py --device cuda --steps 300 --epochs 3 --json "$out/bench.json" 2>&1 | tee "$out/bench.txt"
bench=${PIPESTATUS[0]}
echo "== summary: tests exit $tests, bench exit $bench; $(date -u +%F) $(head -2 "$out/gpu.txt" | tail -1)"
grep '^|' "$out/bench.txt"
exit $(( tests || bench ))
