"""The CUDA kernels, run on the CPU.

CI has no GPU, so the device code of csrc/cuda/*_kernels.cuh is compiled with
tests/cuda_emulation/emulate.h (a CPU stand-in for the CUDA it uses: blocks in
turn, threads as fibers switched at barriers, warp shuffles) and checked against
references written from the ops' definitions:

* GroupNorm+SiLU against float64: forward and backward, fused and split paths,
  cluster paths (a cluster's blocks at once, distributed shared memory),
  both layouts, float32 and bfloat16, 16-byte packets and single elements,
  with add, weight and bias and without them (null: the kernels' defaults),
  blocks of one to several warps per channel, groups whose first value lies
  far from their mean, float32 data about a large offset (3e4: the tiles'
  float means off by their sums' rounding, which D = sum (x - m) corrects),
  groups holding NaN, +Inf and -Inf;
* fill_randn_, q_sample and ddpm_step_ against the Philox stream in double
  precision: odd sizes, both layouts, 16- and 32-bit types, counters across
  2^32, the sampler's sample_stride of 2^32, a first uniform below the 1e-7
  clamp, per-sample and out-of-range timesteps, a small sigma, one timestep
  for all samples
  (t = 0: sigma 0, no noise added, even +Inf), NaN kept by the clip, in-place
  steps, float, bfloat16 and half model inputs in either memory format; built
  with AddressSanitizer, so that a tail read or written past a tensor fails (as
  are three small cluster cases).

This tests the kernels' logic; their speed and the host code around them are
tested on the GPU.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent / "cuda_emulation"

# N, C, S, G, layout, dtype, path (split: shrunk tiles; large: real ones), packets, threads[, far|nonfinite|eps|offset].
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
    # Three channels, NCHW, too large to fuse: 4096 / 3 rows rounded to 1360, a
    # multiple of the packets (1365 left the whole tensor to single elements).
    "1 3 20000 3 nchw f32 large wide 512",
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
    # N(0, 1) data about 3e4 (float32): a tile column's float mean m is off its true
    # mean by the rounding of 3e4-sized sums (~1e-3), which D = sum (x - m) corrects.
    # A moments kernel writing D = 0 put rstd off by 6e-6 to 1.4e-4 (relative); the
    # kernel is within 4e-8: mean and rstd held to 5e-7, y to 2e-2 (float32 at 3e4).
    "1 4 8000 1 nchw f32 large wide 512 offset",
    "1 8 8000 2 nhwc f32 large scalar 64 offset",
    # eps 0.25 (a sixteenth of the data's variance) on the fused path: a kernel
    # that dropped eps passed every case with 1e-5. (The split path's kernels
    # take no eps: its host combination does, tested in test_group_norm_silu_combine.py.)
    "2 8 36 2 nchw f32 fused wide 64 eps",
    "3 12 49 4 nhwc bf16 fused scalar 64 eps",
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


# AddressSanitizer: a kernel reading or writing past a tensor, which the
# harnesses allocate to the element, aborts.
ASAN = ("-fsanitize=address", "-fno-omit-frame-pointer")


def _build(tmp_path_factory, name: str, extra: tuple[str, ...] = ()) -> Path:
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path_factory.mktemp("emu") / name
    # No fused multiply-adds (GCC contracts by default where the target has them):
    # some checks compare a kernel's float arithmetic with the same written out.
    cmd = [compiler, "-std=c++20", "-O2", "-ffp-contract=off", "-Wall", "-Werror", "-Wno-unknown-pragmas", *extra,
           "-o", str(exe), str(HERE / f"{name}.cpp")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return exe


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "group_norm_silu_emulated")


@pytest.fixture(scope="module")
def elementwise(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "elementwise_emulated", ASAN)  # the tails: a partial last packet


# What emulate.h promises about barriers, checked, so that the tests below can
# fail: a read of another thread's write with no barrier between them sees
# unwritten (NaN) shared memory whichever thread of the two writes (threads
# run in ascending order in even blocks, descending in odd ones); a barrier
# in a divergent branch, and a block exiting while its cluster may still read
# its shared memory, abort with a message.
SELFTEST = {
    "synced": (0, "ok"),
    "unsynced": (0, "unwritten 63 63"),
    "divergent": (-6, "deadlock: 32 threads wait at barriers"),
    "cluster_exit": (-6, "block 0 exited while its cluster may read its shared memory"),
}


@pytest.fixture(scope="module")
def selftest(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "emulate_selftest")


@pytest.mark.parametrize("mode", SELFTEST)
def test_emulation_catches_missing_barriers(selftest: Path, mode: str) -> None:
    result = subprocess.run([str(selftest), mode], capture_output=True, text=True, timeout=60)
    want_rc, want_text = SELFTEST[mode]
    assert result.returncode == want_rc and want_text in result.stdout + result.stderr, result


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.replace(" ", "-"))
def test_group_norm_silu_kernels(emulator: Path, case: str) -> None:
    result = subprocess.run([str(emulator), *case.split()], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout[-3000:]}{result.stderr[-2000:]}"
    assert result.stdout.count("act=") == 3 and "FAILED" not in result.stdout


@pytest.mark.parametrize("op", ["randn", "q_sample", "ddpm_step"])
def test_elementwise_kernels(elementwise: Path, op: str) -> None:
    result = subprocess.run([str(elementwise), op], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout[-3000:]}{result.stderr[-2000:]}"
    assert "FAILED" not in result.stdout and result.stdout.count("\n") >= 4


# The cluster kernels (sm_90+, group_norm_silu_cluster_kernels.cuh), forward and
# backward, a cluster's blocks run at once: N, C, S, G, layout, dtype, packets,
# threads, the shared memory a forward block may take (shrunk so that small
# groups need a cluster; twice that for the backward), the cluster size the
# forward's plan must choose[, far|nonfinite|eps|offset]. Each case runs with and without add, affine
# parameters and SiLU.
CLUSTER_CASES = [
    # One group a cluster over 2, 4 and 8 blocks; 16-byte packets; float16 and bfloat16.
    "2 8 1000 2 nchw f32 wide 64 9000 4",
    "1 4 2000 1 nchw f32 wide 64 21000 2",
    "1 4 4000 1 nchw bf16 wide 128 9000 8",
    "2 8 1200 2 nchw f16 wide 64 9500 2",
    # 2003 positions (prime): no packets, a partial last slice; 3 channels a group.
    "2 6 2003 2 nchw f32 scalar 64 11000 4",
    # 17 positions over slices of 8: a cluster of 3 blocks, the last of one position.
    "1 4 17 1 nchw f32 scalar 32 4900 3",
    # channels_last: one group a tile (16-byte rows), groups packed to 16-byte rows
    # (bfloat16, 2 channels a group), a partial last channel tile (10 channels, tiles
    # of 8; 997 positions, prime).
    "2 16 1500 4 nhwc f32 wide 64 13000 4",
    "2 16 3000 8 nhwc bf16 wide 128 12000 8",
    "1 10 997 5 nhwc bf16 scalar 64 10000 4",
    # 128 channels a group, more than the threads (channels in passes); 7 blocks.
    "1 128 200 1 nchw f32 wide 64 22000 7",
    # Blocks of 512 threads (runs of 128 threads a channel).
    "1 4 3000 1 nchw f32 wide 512 29000 2",
    # Each group's first value 1e3 in N(0, 1) data: statistics and float32 y to float32 rounding.
    "1 4 4000 1 nchw f32 wide 128 13000 8 far",
    "1 8 4000 2 nhwc f32 wide 128 15000 8 far",
    "1 8 4000 2 nhwc bf16 scalar 64 14000 8 far",
    # Data about 3e4 (offset, see CASES): without the columns' D / ns in their means
    # rstd was off by 8e-6 to 1.6e-4; the kernel is within 5e-8.
    "1 4 4000 1 nchw f32 wide 128 13000 8 offset",
    "1 8 4000 2 nhwc f32 scalar 64 15000 8 offset",
    # eps 0.25 (see CASES).
    "2 8 1000 2 nchw f32 wide 64 9000 4 eps",
    "2 16 1500 4 nhwc f32 wide 64 13000 4 eps",
    # Groups holding +Inf, -Inf, both, NaN, an add of +Inf, two +Inf (as the
    # fused and split cases above): NaN, +Inf and -Inf where the float64 reference
    # has them, in y, mean, rstd and the backward's outputs. A single value lies in
    # the cluster's first block (even samples) or its last (odd ones), the group's
    # finite values in the other blocks. The kernel used to give NaN for the mean
    # of a group holding +-Inf (D = sum (x - m) NaN in a column whose mean m is
    # infinite; Chan's update Inf + (-Inf) where a finite part followed an infinite
    # one) and a finite rstd, 1 / sqrt(eps), for every such group (NaN variances
    # clamped to 0). Clusters of 2, 4 and 8 blocks; channels_last tiles of 2 and 4
    # groups; 403 positions: a partial last block.
    "2 16 400 8 nchw f32 wide 64 8000 2 nonfinite",
    "2 32 301 8 nchw f32 scalar 64 5500 8 nonfinite",
    "2 16 403 8 nchw bf16 scalar 64 5500 4 nonfinite",
    "2 16 400 8 nhwc f32 scalar 64 8000 4 nonfinite",
    "2 16 400 8 nhwc bf16 wide 64 6000 8 nonfinite",
]


@pytest.fixture(scope="module")
def cluster_emulator(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "cluster_emulated")


def _check_cluster_case(exe: Path, case: str) -> None:
    result = subprocess.run([str(exe), *case.split()], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout[-3000:]}{result.stderr[-2000:]}"
    assert result.stdout.count("act=") == 4 and "FAILED" not in result.stdout


@pytest.mark.parametrize("case", CLUSTER_CASES, ids=lambda c: c.replace(" ", "-"))
def test_group_norm_silu_cluster_kernel(cluster_emulator: Path, case: str) -> None:
    _check_cluster_case(cluster_emulator, case)


# Three small cluster cases (NCHW scalar and packets, channels_last bfloat16)
# again built with AddressSanitizer: a tile's loads must not read past the
# tensor. (All the cases so built take about 30 s more; these, under a second.)
CLUSTER_ASAN_CASES = [
    "1 4 17 1 nchw f32 scalar 32 4900 3",
    "1 4 2000 1 nchw f32 wide 64 21000 2",
    "1 10 997 5 nhwc bf16 scalar 64 10000 4",
]


@pytest.fixture(scope="module")
def cluster_emulator_asan(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "cluster_emulated", ASAN)


@pytest.mark.parametrize("case", CLUSTER_ASAN_CASES, ids=lambda c: c.replace(" ", "-"))
def test_group_norm_silu_cluster_kernel_stays_in_bounds(cluster_emulator_asan: Path, case: str) -> None:
    _check_cluster_case(cluster_emulator_asan, case)


# The plan on an H100 (227 KB of shared memory a block at most): C, S, G, layout,
# element bytes, tiles (1: forward, 2: backward) -> cluster size, channels a tile,
# bytes of shared memory a block. The layer (128 channels of 256 x 256,
# 32 groups): 8 blocks a group; bfloat16 NCHW forward blocks (69 KB) leave room
# for two an SM. channels_last bfloat16 packs 2 groups a tile for 16-byte rows.
# The backward holds x and dy: 16-bit types only. Too large for 8 blocks: no cluster.
H100_PLANS = [
    ("128 65536 32 nchw 2 1", "cluster 8 cols 4 block_s 8192 smem 70216"),
    ("128 65536 32 nchw 4 1", "cluster 8 cols 4 block_s 8192 smem 135760"),
    ("128 65536 32 nhwc 2 1", "cluster 8 cols 8 block_s 8192 smem 152128"),
    ("128 65536 32 nhwc 4 1", "cluster 8 cols 4 block_s 8192 smem 168512"),
    ("128 16384 32 nchw 2 1", "cluster 2 cols 4 block_s 8192 smem 70216"),
    ("128 262144 32 nchw 2 1", "cluster 0"),
    ("128 65536 32 nchw 2 2", "cluster 8 cols 4 block_s 8192 smem 137296"),
    ("128 65536 32 nhwc 2 2", "cluster 8 cols 4 block_s 8192 smem 170048"),
    ("128 65536 32 nchw 4 2", "cluster 0"),
]


@pytest.mark.parametrize("case,want", H100_PLANS, ids=lambda c: c.replace(" ", "-"))
def test_group_norm_silu_cluster_plan(cluster_emulator: Path, case: str, want: str) -> None:
    cmd = [str(cluster_emulator), "plan", *case.split(), str(227 * 1024)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (result.stdout.strip() + " ").startswith(want + " "), result.stdout
