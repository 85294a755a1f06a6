#!/usr/bin/env bash
# The GPU checks in one unattended go: the CUDA tests, the benchmark (float32, then TF32), a summary.
#   bash scripts/gpu_check.sh [OUT_DIR]
# Needs the project installed (pip install -e '.[dev]') on a machine with a CUDA GPU.
set -uo pipefail
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_steps.py tests/test_regularizers.py \
  2>&1 | tee "$out/tests.txt"
tests=${PIPESTATUS[0]}
PYTHONUNBUFFERED=1 python scripts/bench.py --device cuda --steps 300 --epochs 3 --n 60000 --json "$out/bench.json" \
  2>&1 | tee "$out/bench.txt"
bench=${PIPESTATUS[0]}
PYTHONUNBUFFERED=1 python scripts/bench.py --device cuda --steps 300 --epochs 3 --n 60000 --cases none,contractive --tf32 \
  --json "$out/bench_tf32.json" 2>&1 | tee "$out/bench_tf32.txt"
tf32=${PIPESTATUS[0]}
echo "== summary: tests exit $tests, bench exit $bench, tf32 bench exit $tf32; $(date -u +%F) $(tail -1 "$out/gpu.txt")"
tail -3 "$out/tests.txt"
grep '^|' "$out/bench.txt"
grep '^| none\|^| contractive' "$out/bench_tf32.txt"
exit $(( tests || bench || tf32 ))
