"""The CUDA GroupNorm+SiLU split paths' host combinations
(csrc/group_norm_silu_combine.cpp), run on the CPU through their internal ops:
the very code the GPU runs between its kernels when a group is too large for
one block. The tiles' partial sums are made here as the kernels make them
(moments_kernel, backward_sums_kernel), from float32 data; the combined
statistics and gradients are checked against float64 definitions."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import requires_extension

pytestmark = requires_extension

# (N, C, positions, groups, positions a tile): last tiles of 2 of 7, 1 of 16
# (a nearly empty one), 15 of 16 (nearly full) and whole; one channel a group.
SHAPES = [(2, 6, 30, 3, 7), (1, 4, 33, 1, 16), (2, 8, 47, 4, 16), (3, 4, 32, 4, 8)]


def tiles(v: torch.Tensor, block_s: int) -> list[torch.Tensor]:
    """(N, C, S) -> the position tiles (N, C, <= block_s)."""
    return list(v.split(block_s, dim=-1))


def data(shape, mean: float, seed: int = 0):
    n, c, s, groups, block_s = shape
    g = torch.Generator().manual_seed(seed)
    x = (mean + 2 * torch.randn(n, c, s, generator=g, dtype=torch.float64)).float()
    add = torch.randn(n, c, generator=g, dtype=torch.float64).float()
    return x, add


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mean", [3.0, 1e4])
@pytest.mark.parametrize("with_add", [False, True], ids=["no-add", "add"])
@pytest.mark.parametrize("about", ["tile-mean", "first-value"])
def test_combined_moments_are_the_groups_mean_and_rstd(shape, mean, with_add, about):
    """Each tile column's m, D = sum (x - m), Q = sum (x - m)^2 in float32: m is
    the column's float mean, as the kernels take it (D then nearly 0), or its
    first value, about which the combination is exact all the same (and which
    needs the D terms: dropping -D^2 / n passed with the mean alone)."""
    n, c, s, groups, block_s = shape
    x, add = data(shape, mean)
    means, devs, squares = [], [], []
    for tile in tiles(x, block_s):
        m = tile.sum(-1) / tile.shape[-1] if about == "tile-mean" else tile[..., 0]
        d = tile - m[..., None]
        means.append(m), devs.append(d.sum(-1)), squares.append((d * d).sum(-1))
    parts = torch.stack([torch.stack(v, -1) for v in (means, devs, squares)])
    eps = 1e-5
    mean_got, rstd_got = torch.ops.ddpm_fast._group_norm_combine_moments(
        parts, add if with_add else None, groups, s, block_s, eps)
    h = x.double() + (add.double()[..., None] if with_add else 0)
    var, want_mean = torch.var_mean(h.reshape(n, groups, -1), -1, unbiased=False)
    assert mean_got.shape == rstd_got.shape == (n, groups) and mean_got.dtype == torch.float64
    # float32 inputs near `mean`: the tiles' m carry their rounding (6e-8 of m).
    torch.testing.assert_close(mean_got, want_mean, rtol=1e-7, atol=0)
    torch.testing.assert_close(rstd_got, (var + eps).rsqrt(), rtol=2e-6, atol=0)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("affine", [False, True], ids=["no-weight", "weight"])
def test_combined_backward_sums_give_the_gradients(shape, affine):
    """From the tiles' A = sum du xhat, B = sum du, X = sum xhat: A and B summed
    over tiles, m1 = S1 / M, m2 = S2 / M and dadd = sum over positions of
    dh = rstd (du w - m1 - xhat m2), against dh made element by element."""
    n, c, s, groups, block_s = shape
    x, _ = data(shape, 3.0)
    g = torch.Generator().manual_seed(1)
    du = torch.randn(n, c, s, generator=g)
    weight = (1 + torch.randn(c, generator=g)) if affine else None
    var, mean = torch.var_mean(x.double().reshape(n, groups, -1), -1, unbiased=False)
    rstd = (var + 1e-5).rsqrt().float()
    cg = c // groups
    xhat = (x.double() - mean.repeat_interleave(cg, 1)[..., None]) * rstd.double().repeat_interleave(cg, 1)[..., None]
    sums = torch.stack([torch.stack([(d * xh).sum(-1) for d, xh in zip(tiles(du.double(), block_s), tiles(xhat, block_s))], -1),
                        torch.stack([d.sum(-1) for d in tiles(du.double(), block_s)], -1),
                        torch.stack([xh.sum(-1) for xh in tiles(xhat, block_s)], -1)]).float()
    col_a, col_b, m1, m2, dadd = torch.ops.ddpm_fast._group_norm_combine_backward(sums, weight, rstd, groups, s)
    w = (weight if affine else torch.ones(c)).double()
    a_want, b_want = (du.double() * xhat).sum(-1), du.double().sum(-1)
    m1_want = (w * b_want).reshape(n, groups, cg).sum(-1) / (cg * s)
    m2_want = (w * a_want).reshape(n, groups, cg).sum(-1) / (cg * s)
    per = lambda v: v.repeat_interleave(cg, 1)[..., None]  # noqa: E731  (N, G) -> (N, C, 1)
    dh = per(rstd.double()) * (du.double() * w[:, None] - per(m1_want) - xhat * per(m2_want))
    for name, got, want in (("A", col_a, a_want), ("B", col_b, b_want), ("m1", m1, m1_want), ("m2", m2, m2_want),
                            ("dadd", dadd, dh.sum(-1))):
        assert got.dtype == torch.float32, name
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.double() / scale, want / scale, rtol=1e-5, atol=1e-5, msg=name)


def test_tiles_that_do_not_cover_the_positions_are_refused():
    parts = torch.zeros(3, 1, 4, 3)
    with pytest.raises(RuntimeError, match="3 tiles of 8 positions do not cover 30"):
        torch.ops.ddpm_fast._group_norm_combine_moments(parts, None, 2, 30, 8, 1e-5)
    with pytest.raises(RuntimeError, match="do not cover 16"):  # the last tile would be empty
        torch.ops.ddpm_fast._group_norm_combine_moments(parts, None, 2, 16, 8, 1e-5)


@pytest.mark.parametrize("call, message", [
    (lambda: torch.ops.ddpm_fast._group_norm_combine_moments(torch.zeros(4, 1, 4, 2), None, 2, 16, 8, 1e-5),
     r"parts must be \(3, N, C, tiles\)"),
    (lambda: torch.ops.ddpm_fast._group_norm_combine_backward(torch.ones(4, 1, 4, 2), None, torch.ones(1, 2), 2, 5),
     r"sums must be \(3, N, C, tiles\)"),
    (lambda: torch.ops.ddpm_fast._group_norm_combine_backward(torch.ones(3, 1, 4, 2), None, torch.ones(1, 2), 2, 0),
     "4 channels in 2 groups"),
], ids=["moments-of-4-rows", "backward-sums-of-4-rows", "backward-of-no-positions"])
def test_partial_sums_of_another_shape_are_refused(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


@pytest.mark.parametrize("which", ["moments", "backward"])
def test_no_groups_are_refused(which):
    """groups = 0 refused before `c % groups` (a division by zero: SIGFPE, so in a subprocess)."""
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
