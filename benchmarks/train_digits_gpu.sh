#!/usr/bin/env bash
# Issue 6's real GPU training run on the bundled digits, for docs/gpu_digits/:
# the demo's recipe (tiny U-Net, lr 1e-3 with 100 warm-up steps, EMA 0.999, no
# flips, batch 128) for STEPS steps (default 6000) on the GPU, then 100 EMA
# samples (250 respaced steps, bf16: `sample --dtype auto` on the GPU) judged
# as the demo's are, and the distance of bf16 and fp16 samples from fp32 ones
# (benchmarks/sample_precision.py). $OUT (default ./gpu_digits_out) gets
# samples.png (the run's grid), loss.png, log.jsonl, digits.png / digits.npz
# (the judged samples), train.txt, quality.txt and precision.txt: eight
# files. Exit status 1 if any step failed.
# On a GPU machine: run(command="bash benchmarks/train_digits_gpu.sh", timeout_s=...)
set -uo pipefail
out=${OUT:-gpu_digits_out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
steps=${STEPS:-6000}
if ! python3 -c "import ddpm_fast._extension as e, sys; sys.exit(0 if e.WITH_CUDA else 1)" 2> /dev/null; then
  MAX_JOBS=16 DDPM_FAST_STRICT=1 TORCH_CUDA_ARCH_LIST=9.0 \
    python3 -m pip install --no-build-isolation --no-deps -e . > /tmp/digits_build.log 2>&1 || { tail -30 /tmp/digits_build.log; exit 1; }
fi
run=/tmp/gpu_digits_run
rm -rf "$run"
start=$SECONDS
timeout -s INT -k 20 "${TRAIN_LIMIT:-300}" python3 -m ddpm_fast train --data digits --model tiny --no-flip \
  --steps "$steps" --batch-size 128 --lr 1e-3 --warmup 100 --ema-decay 0.999 --log-every 100 \
  --checkpoint-every "$steps" --sample-steps 250 --device cuda --out "$run" > /tmp/digits_train.log 2>&1
rc=$?
failed=0  # each step's failure is kept: the exit status says whether all held
[ "$rc" -eq 0 ] || failed=1
echo "train: rc=$rc ($((SECONDS - start)) s); $(tail -c 300 /tmp/digits_train.log | tr '\r' '\n' | tail -2 | tr '\n' ' ')" \
  | tee "$out/train.txt"
cp "$run/samples.png" "$run/loss.png" "$run/log.jsonl" "$out/" 2> /dev/null
if python3 -m ddpm_fast sample --checkpoint "$run" --out /tmp/gpu_digits_samples -n 100 --steps 250 --device cuda \
  > /tmp/digits_sample.log 2>&1; then
  cp /tmp/gpu_digits_samples/samples.png "$out/digits.png" && cp /tmp/gpu_digits_samples/samples.npz "$out/digits.npz"
else  # the judging below then fails on the missing digits.npz: say why here
  failed=1
  echo "sample failed:"; tail -c 1500 /tmp/digits_sample.log | tr '\r' '\n' | tail -15
fi
python3 - "$out" << 'PY' | tee "$out/quality.txt"
import sys
import numpy as np
import torch
from ddpm_fast.demo import digit_quality
out = sys.argv[1]
q = digit_quality(np.load(f"{out}/digits.npz")["images"])
print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: a classifier of the real digits is confident "
      f"(p > 0.8) on {q['confident']:.0%} of 100 samples (mean top probability {q['confidence']:.2f}), "
      f"covering {q['classes']} of the 10 digits")
PY
[ "$?" -eq 0 ] || failed=1  # pipefail: the judging's status, not tee's
python3 benchmarks/sample_precision.py "$run" -n 400 --steps 250 --device cuda | tee "$out/precision.txt" || failed=1
exit "$failed"
