#!/usr/bin/env bash
# compute-sanitizer over every CUDA kernel path (tests/sanitize/kernels.py),
# for issue 7: memcheck (out-of-bounds and misaligned accesses) and
# racecheck (shared-memory hazards); TOOLS adds
# synccheck or initcheck. Each tool gets SANITIZE_LIMIT seconds (default 150).
# On a GPU machine; it builds the extension first unless it is there with its
# CUDA kernels (benchmarks/run_gpu.sh's build, kept on a warm machine):
#   run(command="bash tests/sanitize/run.sh", timeout_s=...)
# Logs go to $OUT (default ./sanitize_out); the last lines say what each tool found.
# compute-sanitizer needs a Firecracker machine: on gVisor it refuses the device
# ("Device not supported", .library/device/KINDS.md), which the logs then show.
set -uo pipefail
out=${OUT:-sanitize_out}
mkdir -p "$out"
if ! python3 -c "import ddpm_fast._extension as e, sys; sys.exit(0 if e.WITH_CUDA else 1)" 2> /dev/null; then
  MAX_JOBS=16 DDPM_FAST_STRICT=1 TORCH_CUDA_ARCH_LIST=9.0 \
    python3 -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
fi
# The caching allocator hands out pieces of larger blocks, so an access past a
# tensor's end would land in its neighbour, unseen by memcheck: off for these runs.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
status=0
for tool in ${TOOLS:-memcheck racecheck}; do
  start=$SECONDS
  timeout -k 10 "${SANITIZE_LIMIT:-150}" compute-sanitizer --tool "$tool" --error-exitcode 99 \
    python3 tests/sanitize/kernels.py > "$out/sanitize_$tool.log" 2>&1
  rc=$?
  [ $rc != 0 ] && status=1
  echo "$tool: rc=$rc ($((SECONDS - start)) s) $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|sanitize kernels' "$out/sanitize_$tool.log" | tr '\n' ' ')"
done
exit $status
