#!/usr/bin/env bash
# The GPU checks in one unattended go: the CUDA tests, the benchmark (float32, TF32, compiled), a summary.
#   bash scripts/gpu_check.sh [OUT_DIR]
# Where aelab is installed (pip install -e '.[dev]'), that is all. On a bare machine that has torch
# but no package index (this project's lent GPUs), carry the pure-Python wheels aelab needs beyond
# torch in .whl/ (git-ignored); fetch them once where pip works:
#   pip download --no-deps -d .whl hydra-core==1.3.8 omegaconf==2.3.1
#   pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
# and, for the bench on real MNIST rather than random images, copy ../shared/data into the checkout
# (shared/ is git-ignored and travels to a lent GPU): mkdir -p shared && cp -r ../shared/data shared/
# Each phase has a time limit (seconds: TESTS_S, BENCH_S, TF32_S, COMPILE_S) so a hang cannot eat the GPU's time;
# the whole script stays under 10 minutes.
set -uo pipefail
out=${1:-${OUT:-gpu-check}}
py=${PYTHON:-python3}
mkdir -p "$out"
if ! "$py" -c "import hydra, omegaconf" 2>/dev/null; then
  "$py" -m pip install -q --no-index --no-deps .whl/*.whl || { echo "no hydra-core/omegaconf: carry .whl/"; exit 2; }
fi
if ! "$py" -c "import aelab.configs" 2>/dev/null; then  # not installed: install, or run from source
  "$py" -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>/dev/null ||
    { ln -sfn ../configs aelab/configs && export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; }
  "$py" -c "import aelab.configs" || { echo "aelab is not importable"; exit 2; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"
pertest=$("$py" -c "import pytest_timeout" 2>/dev/null && echo --timeout=90)  # one hung test must not take the rest
timeout -k 5 "${TESTS_S:-150}" "$py" -m pytest -q -p no:cacheprovider -rfE --durations=6 $pertest tests/test_gpu.py tests/test_regularizers.py 2>&1 | tee "$out/tests.txt"
tests=${PIPESTATUS[0]}
run_bench() {  # run_bench NAME SECONDS [ARGS...]: one time-limited bench run on 60,000 images into $out/NAME.{txt,json}
  local name=$1 limit=$2
  shift 2
  PYTHONUNBUFFERED=1 timeout -k 5 "$limit" "$py" scripts/bench.py --device cuda --steps 300 --epochs 3 --repeat 2 \
    --n 60000 "$@" --json "$out/$name.json" 2>&1 | tee "$out/$name.txt"
  return "${PIPESTATUS[0]}"
}
run_bench bench "${BENCH_S:-200}"; bench=$?
run_bench bench_tf32 "${TF32_S:-90}" --cases none,contractive --tf32; tf32=$?
run_bench bench_compile "${COMPILE_S:-120}" --cases none,contractive --compile; compiled=$?
echo "== summary (exit 124: the phase ran out of time): tests exit $tests, bench exit $bench, tf32 bench exit $tf32, compiled bench exit $compiled; $(date -u +%F); $(tail -1 "$out/gpu.txt")"
tail -3 "$out/tests.txt"
grep '^|' "$out/bench.txt"
grep '^| none\|^| contractive' "$out/bench_tf32.txt"
grep '^| none\|^| contractive' "$out/bench_compile.txt"
exit $(( tests || bench || tf32 || compiled ))
