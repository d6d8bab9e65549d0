"""benchmarks/train_digits_gpu.sh says by its exit status whether every step
held. It runs only on a GPU machine, so here each step's python3 is a stub
that succeeds or fails as the case asks; a step failing unseen would leave a
GPU session believing a run it did not get."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Answers each of the script's python3 calls by what it runs; FAIL_<STEP>=1
# makes that step fail as the real one would (a non-zero status).
STUB = r"""#!/usr/bin/env bash
case "$*" in
  *"import ddpm_fast._extension"*) exit 0;;
  *"ddpm_fast train"*) [ -n "${FAIL_TRAIN:-}" ] && { echo "train crashed" >&2; exit 1; }
    mkdir -p /tmp/gpu_digits_run; exit 0;;
  *"ddpm_fast sample"*) [ -n "${FAIL_SAMPLE:-}" ] && exit 1
    out=${@: -7:1}; mkdir -p "$out"; touch "$out/samples.png" "$out/samples.npz"; exit 0;;
  "- "*) cat > /dev/null; [ -n "${FAIL_JUDGE:-}" ] && { echo "Traceback" >&2; exit 1; }; echo "judged";;
  *sample_precision.py*) [ -n "${FAIL_PRECISION:-}" ] && exit 1; echo "precision";;
  *) echo "unexpected call: $*" >&2; exit 3;;
esac
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("failing", [None, "TRAIN", "SAMPLE", "JUDGE", "PRECISION"])
def test_train_digits_gpu_exit_status_reports_any_failed_step(tmp_path, failing):
    stub = tmp_path / "bin" / "python3"
    stub.parent.mkdir()
    stub.write_text(STUB)
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}", "OUT": str(tmp_path / "out")}
    if failing:
        env[f"FAIL_{failing}"] = "1"
    result = subprocess.run(["bash", "benchmarks/train_digits_gpu.sh"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert "unexpected call" not in result.stderr
    assert result.returncode == (1 if failing else 0), result.stdout + result.stderr
    assert (tmp_path / "out" / "train.txt").read_text().startswith(f"train: rc={1 if failing == 'TRAIN' else 0} ")
