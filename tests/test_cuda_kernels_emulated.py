"""The CUDA kernels, run on the CPU.

CI has no GPU, so the device code of csrc/cuda/*_kernels.cuh is compiled with
tests/cuda_emulation/emulate.h (a CPU stand-in for the CUDA it uses: blocks in
turn, threads as real threads, barriers, warp shuffles) and checked against
references written from the ops' definitions:

* GroupNorm+SiLU against float64: forward and backward, fused and split paths,
  both layouts, float32 and bfloat16, 16-byte packets and single elements,
  blocks of one to several warps per channel, groups whose first value lies
  far from their mean, groups holding NaN, +Inf and -Inf;
* fill_randn_, q_sample and ddpm_step_ against the Philox stream in double
  precision: odd sizes, both layouts, 16- and 32-bit types, counters across
  2^32, per-sample and out-of-range timesteps, in-place steps, model inputs in
  either memory format.

This tests the kernels' logic; their speed and the host code around them are
tested on the GPU.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent / "cuda_emulation"

# N, C, S, G, layout, dtype, path (split: shrunk tiles; large: real ones), packets, threads[, far].
CASES = [
    # Packed groups with per-thread loops whose steps wrap rows (S = 36: 9 packets a row).
    "2 8 36 2 nchw f32 fused wide 64",
    "2 8 36 2 nhwc f32 fused wide 64",
    # Odd sizes: 3 channels a group, 35 or 49 positions, no packets.
    "2 6 35 3 nchw f32 fused scalar 64",
    "3 12 49 4 nhwc f32 fused wide 64",
    "3 12 49 4 nhwc bf16 fused scalar 64",
    # Channels reduced over several warps (runs of 64 and 128 threads).
    "2 8 256 2 nchw f32 fused wide 512",
    "2 8 256 2 nhwc bf16 fused wide 512",
    # More channels than threads in a tile: channels taken in passes.
    "1 256 16 1 nhwc f32 fused wide 64",
    "2 32 64 8 nchw bf16 fused wide 128",
    # Split path: partial sums per position tile, a partial last channel tile.
    "2 8 16 2 nchw f32 split wide 64",
    "2 8 16 2 nhwc bf16 split wide 64",
    "2 6 35 3 nchw f32 split scalar 64",
    "2 6 35 3 nhwc f32 split scalar 64",
    "1 264 4 1 nhwc f32 split wide 64",
    # The real tile sizes: a U-Net layer (128 channels of 32x32, 32 groups, 4 groups
    # a block), and a group too large to fuse (4 x 8192 values) taking the split path.
    "1 128 1024 32 nhwc bf16 fused wide 512",
    "1 8 8192 2 nchw f32 large wide 512",
    # One channel a group, channels_last: padding would double the fused tile
    # (128 KB, past sm_86's shared memory), so the split path.
    "1 2 16384 2 nhwc f32 large scalar 512",
    # The split path with each group's first value far from its mean (1e3 in N(0, 1)
    # data), statistics and y to float32 rounding: its tiles' moments about their own
    # means, combined by Chan's formula (sums shifted by the first value cancelled).
    # 8000 positions: a partial last position tile.
    "1 4 8000 1 nchw f32 large wide 512 far",
    "1 8 8000 2 nhwc f32 large wide 512 far",
    "1 8 8000 2 nhwc bf16 large scalar 512 far",
    # Groups holding +Inf, -Inf, both, NaN, an add of +Inf, two +Inf (and finite
    # groups beside them): NaN, +Inf and -Inf where the float64 reference has
    # them, in y, the statistics and the gradients. The mean of a group with
    # +-Inf is +-Inf on both paths: the split path's tiles used to write NaN for
    # D = sum (x - m) in a column whose mean m is infinite, and the group's mean
    # came out NaN.
    "2 16 36 8 nchw f32 fused wide 64 nonfinite",
    "2 16 36 8 nhwc bf16 fused scalar 64 nonfinite",
    "2 16 35 8 nchw f32 split scalar 64 nonfinite",
    "2 16 16 8 nhwc bf16 split wide 64 nonfinite",
    "1 16 8200 8 nchw f32 large wide 512 nonfinite",
    "1 16 8200 8 nhwc f32 large scalar 512 nonfinite",
]


def _build(tmp_path_factory, name: str) -> Path:
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path_factory.mktemp("emu") / name
    cmd = [compiler, "-std=c++20", "-O2", "-pthread", "-Wall", "-Werror", "-Wno-unknown-pragmas",
           "-o", str(exe), str(HERE / f"{name}.cpp")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return exe


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "group_norm_silu_emulated")


@pytest.fixture(scope="module")
def elementwise(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "elementwise_emulated")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.replace(" ", "-"))
def test_group_norm_silu_kernels(emulator: Path, case: str) -> None:
    result = subprocess.run([str(emulator), *case.split()], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout[-3000:]}{result.stderr[-2000:]}"
    assert result.stdout.count("act=") == 2 and "FAILED" not in result.stdout


@pytest.mark.parametrize("op", ["randn", "q_sample", "ddpm_step"])
def test_elementwise_kernels(elementwise: Path, op: str) -> None:
    result = subprocess.run([str(elementwise), op], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout[-3000:]}{result.stderr[-2000:]}"
    assert "FAILED" not in result.stdout and result.stdout.count("\n") >= 4
