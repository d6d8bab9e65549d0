"""The C++ glue, a second mutation round (csrc/*.h argument checks of the raw
ops, csrc/group_norm_silu_combine.cpp's checks and clamp, GroupNorm+SiLU's
autograd): what no test caught. The raw ops are
reached only by direct callers, as the ddpm_fast.ops wrappers check first."""

from __future__ import annotations

import pytest
import torch

from conftest import requires_extension
from ddpm_fast import NoiseSchedule

pytestmark = requires_extension

S = NoiseSchedule("linear", timesteps=100)
X = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
T2 = torch.tensor([3, 97])
SAB = S.sqrt_alphas_cumprod.float()
S1M = S.sqrt_one_minus_alphas_cumprod.float()
TABLE = S.step_table("fixed_large")


def step(table=TABLE):
    return torch.ops.ddpm_fast.ddpm_step_(X, torch.randn_like(X), T2, table, None, 1, 0, 60, 0, False, torch.empty_like(X), None)


def combine_backward(sums=None, groups=2, hw=5):
    sums = torch.ones(3, 1, 4, 2) if sums is None else sums
    return torch.ops.ddpm_fast._group_norm_combine_backward(sums, None, torch.ones(1, max(groups, 1)), groups, hw)


def combine_moments(parts=None, groups=2, hw=16, block_s=8):
    parts = torch.zeros(3, 1, 4, 2) if parts is None else parts
    return torch.ops.ddpm_fast._group_norm_combine_moments(parts, None, groups, hw, block_s, 1e-5)


CASES = {
    # A shorter sqrt_alphas_cumprod (the refused case was the other way round):
    # t = 97 would be read past its 50 entries.
    "shorter-sqrt-alphas-cumprod": (
        lambda: torch.ops.ddpm_fast.q_sample(X, T2, SAB[:50], S1M, torch.randn_like(X)),
        "coefficient tables differ in length: 50 vs 100"),
    # The step table's columns read as rows.
    "column-major-step-table": (lambda: step(table=TABLE.t().contiguous().t()),
                                r"coefficients must be a contiguous float32 \(T, 8\) step table"),
    # No rows: t clamped into [0, T - 1] = [0, -1] would read before the table.
    "empty-step-table": (lambda: step(table=TABLE[:0]),
                         r"coefficients must be a contiguous float32 \(T, 8\) step table, got Float \[0, 8\]"),
    # The split paths' host combinations (internal ops, run by the CUDA op).
    "moments-of-4-rows": (lambda: combine_moments(parts=torch.zeros(4, 1, 4, 2)), r"parts must be \(3, N, C, tiles\)"),
    "backward-sums-of-4-rows": (lambda: combine_backward(sums=torch.ones(4, 1, 4, 2)), r"sums must be \(3, N, C, tiles\)"),
    "backward-of-no-positions": (lambda: combine_backward(hw=0), "4 channels in 2 groups"),
}


@pytest.mark.parametrize("case", CASES)
def test_raw_ops_refuse(case):
    call, message = CASES[case]
    with pytest.raises(RuntimeError, match=message):
        call()


@pytest.mark.parametrize("which", ["moments", "backward"])
def test_combinations_refuse_no_groups(which):
    """groups = 0 refused before `c % groups` (a division by zero: SIGFPE)."""
    import subprocess
    import sys

    call = ("torch.ops.ddpm_fast._group_norm_combine_moments(torch.zeros(3, 1, 4, 2), None, 0, 16, 8, 1e-5)"
            if which == "moments" else
            "torch.ops.ddpm_fast._group_norm_combine_backward(torch.ones(3, 1, 4, 2), None, torch.ones(1, 1), 0, 5)")
    code = f"""
import torch, ddpm_fast
try:
    {call}
except RuntimeError as e:
    print("refused:", e)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "refused:" in run.stdout and "in 0 groups" in run.stdout, (
        run.returncode, run.stdout, run.stderr[-2000:])


def test_combined_variance_below_zero_is_clamped():
    """Q - D^2 / n below zero (float rounding of a constant column: here made
    outright) is a variance of 0, rstd = 1 / sqrt(eps), not NaN."""
    parts = torch.zeros(3, 1, 2, 1)
    parts[1] = 1.0  # D = 1, Q = 0 over 4 positions: M2 = -0.25
    mean, rstd = torch.ops.ddpm_fast._group_norm_combine_moments(parts, None, 1, 4, 4, 1e-4)
    torch.testing.assert_close(mean, torch.full((1, 1), 0.25, dtype=torch.float64))
    torch.testing.assert_close(rstd, torch.full((1, 1), 100.0, dtype=torch.float64))


def test_statistics_are_not_differentiable():
    """The forward's mean and rstd come out not requiring grad even when x does
    (the backward ignores their gradients: a loss on them would get none)."""
    x = X.clone().requires_grad_()
    y, mean, rstd = torch.ops.ddpm_fast.group_norm_silu(x, None, None, None, 3, 1e-5, True)
    assert y.requires_grad and not mean.requires_grad and not rstd.requires_grad


@pytest.mark.parametrize("act", [False, True])
def test_recorded_gradients_without_the_activation(act):
    """create_graph=True takes the differentiable backward (ATen group_norm
    recomputed): with act=False it must not apply SiLU there either. gradgradcheck
    could not see it (it checks the recorded first derivative against itself)."""
    from ddpm_fast import ops

    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 6, 3, 4, generator=g, dtype=torch.float64)
    w, b = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    dy = torch.randn(2, 6, 3, 4, generator=g, dtype=torch.float64)
    grads = []
    for create_graph in (False, True):
        xs = x.clone().requires_grad_()
        y = ops.group_norm_silu(xs, 3, w, b, act=act, backend="cpu")
        grads.append(torch.autograd.grad(y, xs, dy, create_graph=create_graph)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-10)
