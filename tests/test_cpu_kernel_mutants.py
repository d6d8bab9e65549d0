"""Gaps in the C++ CPU kernels' tests found by mutation testing (second round
over csrc/cpu): each test here failed on a mutant that every other test passed.
Tiny shapes; the C++ ops and the reference stream only."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import requires_extension
from ddpm_fast import NoiseSchedule, ops


@requires_extension
def test_cpp_ops_refuse_negative_timesteps():
    """The C++ ops check the timesteps they read on the host (a negative one
    would index before the coefficient table); the Python wrappers check
    first, so only a direct call of the ops reaches that check."""
    schedule = NoiseSchedule("linear", timesteps=1000)
    x = torch.randn(2, 3, 4, 4)
    a, b = schedule.table("sqrt_alphas_cumprod", "cpu"), schedule.table("sqrt_one_minus_alphas_cumprod", "cpu")
    with pytest.raises(RuntimeError, match=r"timestep -1 is out of range \[0, 1000\)"):
        torch.ops.ddpm_fast.q_sample_randn(x, torch.tensor([-1, 3]), a, b, 0, 0)
    with pytest.raises(RuntimeError, match=r"timestep -1 is out of range \[0, 1000\)"):
        torch.ops.ddpm_fast.q_sample(x, torch.tensor(-1), a, b, x)
    table = schedule.step_table("fixed_large")
    with pytest.raises(RuntimeError, match=r"timestep -1 is out of range \[0, 1000\)"):
        torch.ops.ddpm_fast.ddpm_step_(x, x, torch.tensor([3, -1]), table, None, 0, 0, 48, 0, False,
                                       torch.empty_like(x), None)


@requires_extension
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_bfloat16_nan_is_the_quiet_nan_c10_rounds_to(layout):
    """bfloat16 output rounds NaN to 0x7FC0, as c10::BFloat16 does (the vector
    loops' store_bf16, float16_cpu.h). silu(-Inf) = -Inf / Inf is the x86
    default NaN, whose sign bit is set: rounded by bits alone it came out
    0xFFC0. Rows of 35 values and 35 channels: whole vectors and a tail."""
    special = torch.full((35,), -float("inf"))
    special[::2] = float("nan")
    x = torch.randn(2, 35, 5, 7).to(torch.bfloat16).contiguous(memory_format=layout)
    with torch.inference_mode():  # weight 0, bias -Inf or NaN: u = the bias whatever the statistics
        y = ops.group_norm_silu(x, 5, torch.zeros(35, dtype=torch.bfloat16), special.to(torch.bfloat16),
                                backend="cpu")
    assert torch.isnan(y).all()
    assert (y.view(torch.int16) == 0x7FC0).all(), y.view(torch.int16).unique()


@requires_extension
def test_channels_last_forward_with_more_than_4096_channels_ends():
    """The channels_last moments run pixels in runs of 4096 // C (at least 1):
    without that floor, C > 4096 made runs of 0 pixels and the forward never
    returned. In a subprocess, so that a hang fails the test."""
    script = (
        "import torch\n"
        "import torch.nn.functional as F\n"
        "from ddpm_fast import ops\n"
        "x = torch.randn(1, 4104, 2, 3).contiguous(memory_format=torch.channels_last)\n"
        "y = ops.group_norm_silu(x, 8, backend='cpu')\n"
        "torch.testing.assert_close(y, F.silu(F.group_norm(x, 8, eps=1e-5)), atol=1e-5, rtol=1e-5)\n"
        "print('ok')\n"
    )
    try:
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the channels_last forward with 4104 channels did not return in 120 s")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def _has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return all(f in flags for f in ("avx512f", "avx512dq", "avx512bw", "avx512vl", "avx2", "fma", "f16c"))


@requires_extension
@pytest.mark.skipif(not _has_avx512(), reason="the avx2 cap changes nothing without AVX-512")
def test_the_avx2_cap_runs_the_avx2_loops():
    """DDPM_FAST_CPU_SIMD=avx2 must select the AVX2 loops on an AVX-512 CPU:
    the tests that run under it (test_cpu_narrower_loops_match_reference,
    test_cpu_vector_paths_are_bit_identical) pass just as well when the cap is
    ignored, and then check the AVX-512 loops twice. The two loops' exp
    polynomials differ (a table of 2^(j/8) against vscalefps), so their SiLU
    bits differ on some of a few thousand values."""
    script = (
        "import torch, sys\n"
        "from ddpm_fast import ops\n"
        "x = torch.linspace(-1.0, 1.0, 2 * 8 * 61 * 67).reshape(2, 8, 61, 67)\n"
        "with torch.inference_mode():\n"
        "    y = ops.group_norm_silu(x, 2, torch.full((8,), 30.0), act=True, backend='cpu')\n"
        "sys.stdout.write(y.view(torch.int32).flatten().numpy().tobytes().hex())\n"
    )
    outputs = {}
    for cap in ("", "avx2"):
        env = {**os.environ, "DDPM_FAST_CPU_SIMD": cap}
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[cap] = result.stdout
    assert outputs[""] != outputs["avx2"]
