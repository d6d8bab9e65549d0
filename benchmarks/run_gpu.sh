#!/usr/bin/env bash
# One call on a GPU machine (the device tool): build, GPU tests, benchmarks.
# Logs go to $OUT (default ./gpu_out); the last lines printed are the summary.
# Usage: bash benchmarks/run_gpu.sh [pytest -k expression for the benchmarks]
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$out/env.txt"
MAX_JOBS=16 DDPM_FAST_STRICT=1 TORCH_CUDA_ARCH_LIST=9.0 \
  pip install --no-build-isolation --no-deps -v -e . > "$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
python3 -m pytest tests -q -m "gpu or not slow" > "$out/tests.log" 2>&1  # slow tests are CPU-only: CI runs them
echo "tests: $(tail -1 "$out/tests.log")"
python3 -m pytest benchmarks/ --benchmark-only -q ${1:+-k "$1"} > "$out/bench.log" 2>&1
echo "benchmarks: $(grep -E 'passed|failed' "$out/bench.log" | tail -1)"
sed -n '/ddpm_fast GPU summary/,$p' "$out/bench.log"
