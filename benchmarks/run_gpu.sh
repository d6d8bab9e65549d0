#!/usr/bin/env bash
# One call on a GPU machine (the device tool): build, GPU tests, benchmarks,
# sized for a session's 15 minutes of device time (one command may run 10):
# each stage has its own time limit, so a slow stage costs its own results only.
# Logs go to $OUT (default ./gpu_out); the last lines printed are the summary.
#
# Here first: bash benchmarks/fetch_gpu_wheels.sh (diffusers, for the peers).
# Then: run(command="bash benchmarks/run_gpu.sh", carry=[".whl"], timeout_s=600)
# Usage: bash benchmarks/run_gpu.sh [pytest -k expression for the benchmarks]
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$out/wheels.log" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python3 -c "import diffusers; print('diffusers', diffusers.__version__)" || echo "diffusers missing: its peers skip"
} 2>&1 | tee "$out/env.txt"

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.log
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc ($((SECONDS - start)) s) $(grep -E '(passed|failed|error|skipped|deselected)' "$out/$name.log" | tail -1)"
  [ $rc = 124 ] && echo "  $name stopped at its ${limit} s limit; its log holds what ran"
  return $rc
}

MAX_JOBS=16 DDPM_FAST_STRICT=1 TORCH_CUDA_ARCH_LIST=9.0 \
  stage build 150 pip install --no-build-isolation --no-deps -v -e . || { tail -40 "$out/build.log"; exit 1; }
# GPU tests only (CUDA C++ and Triton on the GPU): CI runs the CPU ones. Each
# Triton specialization compiles on first use (a few hundred, about 0.3 s each
# on one core): with pytest-xdist (a carried wheel) 12 processes compile them.
parallel=$(python3 -c "import xdist" 2> /dev/null && echo "-n 12")
stage tests 120 python3 -m pytest tests -q -m gpu -p no:cacheprovider $parallel
# The op benchmarks first (each a few seconds), then the model ones (torch.compile peers).
stage bench_ops 120 python3 -m pytest benchmarks/test_bench_q_sample.py benchmarks/test_bench_randn.py \
  benchmarks/test_bench_ddpm_step.py benchmarks/test_bench_group_norm_silu.py --benchmark-only -q \
  -k "gpu${1:+ and ($1)}" -p no:cacheprovider
stage bench_models 150 python3 -m pytest benchmarks/test_bench_unet.py benchmarks/test_bench_train.py \
  --benchmark-only -q -k "gpu${1:+ and ($1)}" -p no:cacheprovider
for name in bench_ops bench_models; do
  sed -n '/ddpm_fast GPU summary/,$p' "$out/$name.log"
done
