#!/usr/bin/env bash
# One call on a GPU machine (the device tool): build, GPU tests, benchmarks.
# Sized for that tool: one command runs at most 600 s, and a session has 15
# minutes of device time, the machine's start included. The stages' limits add
# up to 480 s (build 120, tests 100, op benchmarks 110, model benchmarks 150),
# the set-up before them takes some 15-30 s on a cold machine; a stage still
# running 10 s after its limit is killed, so even four such stages end the
# script before 600 s.
#
# At its limit a stage gets SIGINT, not timeout's default SIGTERM: pytest takes
# it as a KeyboardInterrupt and still prints its terminal summary (-rfE's
# failures, the "ddpm_fast GPU summary" table, pytest-benchmark's table) and
# writes tests.xml; SIGTERM kills it before any of that. Each GPU benchmark row
# is also appended to $out/gpu_rows.jsonl as soon as it is measured
# (benchmarks/conftest.py), so that rows survive even a kill.
# $OUT (default ./gpu_out) gets env.txt, build.log, tests.log, tests.xml,
# bench_ops.log, bench_models.log and gpu_rows.jsonl (the device tool returns
# at most 8 files); printed last: the two GPU summary tables, then each
# stage's outcome again (the tool's reply keeps the last 12,000 characters).
#
# Here first: bash benchmarks/fetch_gpu_wheels.sh (diffusers, for the peers).
# Then: run(command="bash benchmarks/run_gpu.sh", carry=[".whl"], timeout_s=600)
# Usage: bash benchmarks/run_gpu.sh [pytest -k expression for the benchmarks]
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1
export DDPM_FAST_GPU_ROWS="$out/gpu_rows.jsonl"
{
  date -u
  if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "
import torch, triton
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)
try:
    import diffusers
    print('diffusers', diffusers.__version__)
except Exception as error:
    print('diffusers missing or broken (%s): its peer rows skip (ours run on our own seeded weights)' % error)
"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"  # (a { } block is no subshell: its PYTHONPATH export holds)

recap=""
failed=0  # the script's exit status: 1 if any stage failed or was cut
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.log
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout -s INT -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local line="$name: rc=$rc ($((SECONDS - start)) s) $(grep -E '(passed|failed|error|skipped|deselected)' "$out/$name.log" | tail -1)"
  [ $rc = 124 ] && line+=$'\n'"  $name got SIGINT at its ${limit} s limit; its log holds what ran, and the summary"
  [ $rc = 137 ] && line+=$'\n'"  $name was killed 10 s after its ${limit} s limit: no summary in its log"
  echo "$line"
  recap+="$line"$'\n'
  [ $rc = 0 ] || failed=1
  return $rc
}

MAX_JOBS=16 DDPM_FAST_STRICT=1 TORCH_CUDA_ARCH_LIST=9.0 \
  stage build 120 python3 -m pip install --no-build-isolation --no-deps -v -e . || { tail -40 "$out/build.log"; exit 1; }
# GPU tests only (CUDA C++ and Triton on the GPU): CI runs the CPU ones. There
# are about 5350 (some 1780 of the CUDA C++ kernels and other GPU-only code,
# 1820 of Triton's, 1760 of the reference on CUDA), and each Triton
# specialization compiles on first use (a few hundred, about 0.3 s each on one
# core): 100 s may well not be enough for all. So, in one run under one limit,
# tests/conftest.py orders them on a GPU: the CUDA C++ kernels' tests (and the
# other GPU-only ones) first, then Triton's, then the reference on CUDA; a cut
# loses the last. pytest-xdist (in the machine's image, or a carried wheel)
# runs them in 12 processes, which share the Triton compilations out, and
# keeps that order roughly (each process takes the next tests as it finishes).
# Each process gets one CPU thread: 12 of torch's default 16 would oversubscribe
# the 16 cores in the tests' CPU work (references, inputs).
parallel=$(python3 -c "import xdist" 2> /dev/null && echo "-n 12")
threads=$([ -n "$parallel" ] && echo 1 || nproc)
OMP_NUM_THREADS=$threads stage tests 100 python3 -m pytest tests -q -m gpu -p no:cacheprovider -rfE --junitxml="$out/tests.xml" $parallel
# The op benchmarks (GroupNorm+SiLU first, the op with the most cases) and then
# the model ones. benchmarks/conftest.py orders the GPU benchmarks within a run:
# ours and the eager peers first, the torch.compile peers (a few seconds of
# compilation per op case, 30-60 s per U-Net) last; in the model run our U-Net
# step, the 1000-step sampling and our training step come first.
stage bench_ops 110 python3 -m pytest benchmarks/test_bench_group_norm_silu.py benchmarks/test_bench_ddpm_step.py \
  benchmarks/test_bench_q_sample.py benchmarks/test_bench_randn.py --benchmark-only -q -rsfE \
  -k "gpu${1:+ and ($1)}" -p no:cacheprovider
stage bench_models 150 python3 -m pytest benchmarks/test_bench_unet.py benchmarks/test_bench_train.py \
  --benchmark-only -q -rsfE -k "gpu${1:+ and ($1)}" -p no:cacheprovider
for name in bench_ops bench_models; do  # our table only: it ends at a blank line
  sed -n '/ddpm_fast GPU summary/,/^$/p' "$out/$name.log"
done
printf '%s' "$recap"
[ -f "$out/gpu_rows.jsonl" ] && echo "$(wc -l < "$out/gpu_rows.jsonl") GPU rows in $out/gpu_rows.jsonl"
exit $failed
