"""Non-finite values propagate through every op on every local backend exactly
where the reference puts them: the same NaN, +Inf and -Inf masks, and the same
finite values elsewhere. Nothing is clamped silently that the reference keeps
(torch.clamp keeps NaN and maps +-Inf to the bounds; so must the clipped step).
One exception, explained at test_group_norm_silu: a +-Inf GroupNorm weight.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from conftest import backend_params, device_backends
from ddpm_fast import NoiseSchedule, ops

NAN, INF = float("nan"), float("inf")
SCHEDULE = NoiseSchedule("linear", timesteps=50)
BACKENDS = backend_params()  # the GPU pairs marked `gpu`, so that the GPU run (-m gpu) selects them
# The Triton interpreter computes in numpy, which warns on every Inf - Inf: expected here.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
# Positions (flat, logical order) poisoned in an N=2, C=4, 3x3 tensor: sample 0
# gets NaN, +Inf and -Inf in channel 0; sample 1 gets them in channels 1 and 3.
SHAPE = (2, 4, 3, 3)
POISON = {0: NAN, 4: INF, 8: -INF, 36 + 9: NAN, 36 + 13: INF, 36 + 27 + 2: -INF}


def poisoned(seed: int, where: dict[int, float] = POISON, shape=SHAPE, dtype=torch.float32) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    flat = x.reshape(-1)
    for i, v in where.items():
        flat[i] = v
    return x.to(dtype)


def finite(seed: int, shape=SHAPE, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_same_nonfinite(got: torch.Tensor, want: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5, *, kinds: bool = True) -> None:
    """NaN, +Inf and -Inf exactly where ``want`` has them (with ``kinds=False``:
    non-finite exactly where ``want`` is, of any kind), finite values close."""
    got, want = got.detach().cpu().float(), want.detach().cpu().float()
    assert got.shape == want.shape
    masks = (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)) if kinds else (("non-finite", lambda v: ~torch.isfinite(v)),)
    for name, mask in masks:
        g, w = mask(got), mask(want)
        assert torch.equal(g, w), f"{name} at {g.nonzero().tolist()} but the reference has it at {w.nonzero().tolist()}"
    keep = torch.isfinite(want)
    torch.testing.assert_close(got[keep], want[keep], atol=atol, rtol=rtol)


def test_inputs_really_are_poisoned():
    x = poisoned(0)
    assert int(torch.isnan(x).sum()) == 2 and int(torch.isinf(x).sum()) == 4


# --------------------------------------------------------------------- q_sample


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("where", ["x0", "noise", "both"])
def test_q_sample(device, backend, dtype, where):
    x0 = poisoned(1, dtype=dtype) if where in ("x0", "both") else finite(1, dtype=dtype)
    # "both": +Inf in x0 meets -Inf in noise at position 4 -> NaN (inf - inf).
    noise = poisoned(2, {4: -INF, 5: NAN, 40: INF}, dtype=dtype) if where in ("noise", "both") else finite(2, dtype=dtype)
    t = torch.tensor([3, 41])
    want, _ = ops.q_sample(x0, t, SCHEDULE, noise=noise, backend="reference")
    assert not torch.isfinite(want).all()
    got, eps = ops.q_sample(x0.to(device), t.to(device), SCHEDULE, noise=noise.to(device), backend=backend)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_same_nonfinite(got, want, tol, tol)
    assert_same_nonfinite(eps, noise, 0, 0)  # the given noise is returned as is


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_q_sample_drawn_noise(device, backend, channels_last):
    x0 = poisoned(3)
    if channels_last:
        x0 = x0.to(memory_format=torch.channels_last)
    want, _ = ops.q_sample(x0, 7, SCHEDULE, seed=11, backend="reference")
    got, _ = ops.q_sample(x0.to(device), 7, SCHEDULE, seed=11, backend=backend)
    assert_same_nonfinite(got, want)
    assert int(torch.isnan(want).sum()) == 2 and int(torch.isinf(want).sum()) == 4


# -------------------------------------------------------------------- ddpm_step

STEP_KINDS = [
    pytest.param(dict(variance="fixed_large"), id="large"),
    pytest.param(dict(variance="fixed_small"), id="small"),
    pytest.param(dict(eta=0.0), id="ddim0"),
    pytest.param(dict(eta=1.0), id="ddim1"),
]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("kind", STEP_KINDS)
@pytest.mark.parametrize("clip", [False, True], ids=["eps-form", "clipped-x0"])
@pytest.mark.parametrize("where", ["x_t", "eps", "noise", "all"])
def test_ddpm_step(device, backend, kind, clip, where):
    x = poisoned(4) if where in ("x_t", "all") else finite(4)
    # eps in bfloat16: non-finite values survive the mixed-dtype read too.
    eps = (poisoned(5, {1: NAN, 4: -INF, 9: INF, 50: -INF}) if where in ("eps", "all") else finite(5)).bfloat16()
    noise = poisoned(6, {2: NAN, 10: INF, 60: -INF}) if where in ("noise", "all") else finite(6)
    # Sample 0 at t = 0 (no noise: a NaN in z must not reach it), sample 1 at t = 30.
    t = torch.tensor([0, 30])
    want = ops.ddpm_step(x, eps, t, SCHEDULE, clip_denoised=clip, noise=noise, backend="reference", **kind)
    got = ops.ddpm_step(x.to(device), eps.to(device), t.to(device), SCHEDULE, clip_denoised=clip, noise=noise.to(device), backend=backend, **kind)
    assert_same_nonfinite(got, want, 1e-4, 1e-4)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("clip", [False, True], ids=["eps-form", "clipped-x0"])
def test_ddpm_step_drawn_noise_and_model_input(device, backend, clip):
    x, eps = poisoned(7), poisoned(8, {3: NAN, 20: INF, 40: -INF}).half()
    t = torch.tensor([5, 49])
    want = ops.ddpm_step(x, eps, t, SCHEDULE, clip_denoised=clip, seed=3, backend="reference")
    model_input = torch.empty(SHAPE, dtype=torch.bfloat16, device=device).to(memory_format=torch.channels_last)
    got = ops.ddpm_step(x.to(device), eps.to(device), t.to(device), SCHEDULE, clip_denoised=clip, seed=3,
                        out_model_input=model_input, backend=backend)
    assert_same_nonfinite(got, want, 1e-4, 1e-4)
    assert_same_nonfinite(model_input, want.bfloat16(), 1e-2, 1e-2)


def test_clipped_step_keeps_nan_and_clamps_inf_like_torch_clamp():
    """The reference's x0 clip is torch.clamp: NaN stays NaN, +-Inf become +-1.
    With x_t finite, eps = +-Inf gives a *finite* x_{t-1} on the clipped path and
    a non-finite one on the eps-form path; eps = NaN gives NaN on both."""
    for device, backend in [("cpu", "reference")] + device_backends():
        x = torch.zeros(1, 3, device=device)
        eps = torch.tensor([[NAN, INF, -INF]], device=device)
        clipped = ops.ddpm_step(x, eps, 10, SCHEDULE, clip_denoised=True, seed=0, backend=backend).cpu()
        assert torch.isnan(clipped[0, 0]) and torch.isfinite(clipped[0, 1:]).all(), (backend, clipped)
        plain = ops.ddpm_step(x, eps, 10, SCHEDULE, clip_denoised=False, seed=0, backend=backend).cpu()
        assert torch.isnan(plain[0, 0]) and torch.isneginf(plain[0, 1]) and torch.isposinf(plain[0, 2]), (backend, plain)


# -------------------------------------------------------------- group_norm_silu


def _gn_inputs(where: str):
    x = finite(9)
    weight, bias, add = finite(10, (4,)), finite(11, (4,)), None
    if where == "x":
        x = poisoned(9)  # NaN or Inf anywhere in a group makes the whole group NaN
    elif where == "x-inf-only":
        x = poisoned(9, {5: INF})
    elif where == "weight-nan":
        weight = poisoned(10, {1: NAN}, shape=(4,))
    elif where == "weight-inf":
        weight = poisoned(10, {2: INF, 3: -INF}, shape=(4,))
    elif where == "bias":
        bias = poisoned(11, {0: NAN, 2: INF, 3: -INF}, shape=(4,))
    elif where == "add":
        add = poisoned(12, {1: NAN, 6: INF}, shape=(2, 4))
    return x, weight, bias, add


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("where", ["x", "x-inf-only", "weight-nan", "weight-inf", "bias", "add"])
@pytest.mark.parametrize("act", [True, False], ids=["silu", "plain"])
def test_group_norm_silu(device, backend, where, act):
    """Bias +-Inf gives u = +-Inf and silu(-Inf) = -Inf * sigmoid(-Inf) = NaN, as
    F.silu has it. A +-Inf *weight* makes its whole channel non-finite in any
    formula, but whether an element is NaN or +-Inf depends on how the affine
    map is written (F.group_norm folds it into x * scale + shift, an Inf - Inf
    where the fused kernels' (x - mean) * rstd * w gives +-Inf): only the
    non-finite mask is compared there."""
    x, weight, bias, add = _gn_inputs(where)
    want = ops.group_norm_silu(x, 2, weight, bias, add=add, act=act, backend="reference")
    assert not torch.isfinite(want).all()
    on = lambda v: None if v is None else v.to(device)  # noqa: E731
    got = ops.group_norm_silu(x.to(device), 2, on(weight), on(bias), add=on(add), act=act, backend=backend)
    assert_same_nonfinite(got, want, 1e-4, 1e-4, kinds=where != "weight-inf")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_group_norm_silu_channels_last_bfloat16(device, backend):
    x = poisoned(13, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    bias = poisoned(14, {3: -INF}, shape=(4,))
    want = ops.group_norm_silu(x.float(), 2, None, bias, backend="reference")
    got = ops.group_norm_silu(x.to(device), 2, None, bias.to(device), backend=backend)
    assert_same_nonfinite(got, want, 3e-2, 3e-2)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_silu_float32_variance_overflow(device, backend, channels_last):
    """Finite input whose float32 variance overflows (values about 1e20, squares
    1e40) has no float32 result; as the README says, the reference gives NaN and
    the fused kernels SiLU(bias): their 1/sqrt(Inf) is 0, so x's scale is 0 and
    the shift is the bias. (The CPU kernels were documented as giving NaN.)"""
    x = finite(15, shape=(2, 4, 3, 3)) * 1e20
    bias = torch.tensor([1.0, -2.0, 0.5, 3.0])
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    if backend == "reference":
        assert torch.isnan(ops.group_norm_silu(x, 2, None, bias, backend="reference")).all()
        return
    got = ops.group_norm_silu(x.to(device), 2, None, bias.to(device), backend=backend).cpu()
    torch.testing.assert_close(got, torch.nn.functional.silu(bias)[None, :, None, None].expand_as(got))  # Triton: within 1 ulp


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("where", ["x", "weight-nan", "bias", "add"])
def test_group_norm_silu_backward(device, backend, where):
    """Gradients carry NaN/Inf where the reference's autograd puts them."""
    inputs = [v if v is not None else finite(20 + i, (2, 4) if i == 3 else (4,)) for i, v in enumerate(_gn_inputs(where))]
    dy = finite(30)

    def grads(dev, b):
        leaves = [v.to(dev).requires_grad_() for v in inputs]
        x, weight, bias, add = leaves
        ops.group_norm_silu(x, 2, weight, bias, add=add, backend=b).backward(dy.to(dev))
        return [v.grad for v in leaves]

    want = grads("cpu", "reference")
    assert any(not torch.isfinite(g).all() for g in want)
    for name, g, w in zip(["x", "weight", "bias", "add"], grads(device, backend), want):
        try:
            assert_same_nonfinite(g, w, 1e-3, 1e-3)
        except AssertionError as error:
            raise AssertionError(f"grad of {name}: {error}") from None


@pytest.mark.skipif(not any(b == "triton" for _, b in device_backends()), reason="triton is not installed")
@pytest.mark.parametrize("where", ["x", "x-inf-only", "bias", "add"])
def test_group_norm_silu_triton_split_path(monkeypatch, where):
    """The Triton split path (per-tile moments combined by torch) propagates
    NaN and Inf as the reference does: tiles shrunk so that the 3x3 groups take
    it, over several position tiles, the last one partial."""
    gn = importlib.import_module("ddpm_fast.kernels.group_norm_silu")
    monkeypatch.setattr(gn, "MAX_TILE", 8)
    monkeypatch.setattr(gn, "SPLIT_TILE", 8)
    assert gn.plan(4, 9, 2, 4, False).pos_tiles > 1
    device = next(d for d, b in device_backends() if b == "triton")
    x, weight, bias, add = _gn_inputs(where)
    want = ops.group_norm_silu(x, 2, weight, bias, add=add, backend="reference")
    on = lambda v: None if v is None else v.to(device)  # noqa: E731
    got = ops.group_norm_silu(x.to(device), 2, on(weight), on(bias), add=on(add), backend="triton")
    assert_same_nonfinite(got, want, 1e-4, 1e-4)


# ------------------------------------------------- group_norm_silu statistics

# The raw op's saved statistics (mean, rstd) of groups holding non-finite
# values, on every path of every local backend (the CUDA kernels' are tested in
# their emulation, tests/test_cuda_kernels_emulated.py, "nonfinite" cases).
# The mean is the group's sum over its count: +Inf for +Inf among finite
# values, -Inf for -Inf, NaN for both or a NaN; rstd is NaN (the variance about
# an infinite mean is NaN). torch's native_group_norm is no guide to the mean:
# its Welford updates make it NaN or +-Inf by where the Inf lies and by the
# layout (torch 2.14 on the CPU: NaN for a +Inf first in an NCHW group, +Inf for
# one last in a 1x64x32x32 one, +Inf for one anywhere in channels_last); y is
# NaN in the group either way.
STAT_POISON = {"+inf": (INF,), "-inf": (-INF,), "both": (INF, -INF), "nan": (NAN,), "+inf-twice": (INF, INF)}


def _stat_inputs(shape, groups, kind, where, channels_last, dtype=torch.float32):
    """x (and add) with the kind's values in group 0 of sample 0 and the last
    group of the last sample, the other groups finite: in x, at the group's
    first and last values (sample 0) or last and middle ones (the last sample);
    or in add, one channel each from the group's first."""
    n, c = shape[:2]
    cg = c // groups
    x = finite(40, shape)
    add = finite(41, (n, c)) if where == "add" else None
    for sample, group, order in ((0, 0, (0, -1)), (n - 1, groups - 1, (-1, None))):
        if where == "add":
            for j, v in enumerate(STAT_POISON[kind]):
                add[sample, group * cg + j] = v
        else:
            flat = x[sample, group * cg:(group + 1) * cg].reshape(-1)
            spots = [i if i is not None else flat.numel() // 2 for i in order]
            for i, v in zip(spots, STAT_POISON[kind]):
                flat[i] = v
            x[sample, group * cg:(group + 1) * cg] = flat.view_as(x[sample, group * cg:(group + 1) * cg])
    x = x.to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, (None if add is None else add.to(dtype))


def _stats_want(x, add, groups, eps=1e-5):
    h = x.double()
    if add is not None:
        h = h + add.double()[:, :, None, None]
    hg = h.reshape(h.shape[0], groups, -1)
    mean = hg.sum(-1) / hg.shape[-1]
    return mean, ((hg - mean[..., None]).square().mean(-1) + eps).rsqrt()


def _check_stats(x, add, groups, y, mean, rstd):
    """mean and rstd as _stats_want has them; y NaN in the poisoned groups, finite elsewhere."""
    want_mean, want_rstd = _stats_want(x, add, groups)
    assert not torch.isfinite(want_mean[0, 0]) and not torch.isfinite(want_rstd[-1, -1])
    assert_same_nonfinite(mean, want_mean, 1e-5, 1e-5)
    assert_same_nonfinite(rstd, want_rstd, 1e-5, 1e-5)
    y = y.cpu().reshape(y.shape[0], groups, -1)
    poisoned_groups = ~torch.isfinite(want_rstd)
    assert torch.isnan(y[poisoned_groups]).all() and torch.isfinite(y[~poisoned_groups]).all()


# (path, shape, groups, channels_last, dtype): the CPU's NCHW short rows (whole
# blocks, under kShortRow = 128 values a row) and long rows (a part a channel
# with add), channels_last one sample a task (N >= twice the threads) or in
# parallel passes, over two 4096-pixel parts, and float64.
CPU_STAT_PATHS = [
    ("nchw-short-rows", (2, 4, 3, 3), 2, False, torch.float32),
    ("nchw-long-rows", (2, 4, 16, 16), 2, False, torch.float32),
    ("channels_last-in-task", None, 2, True, torch.float32),
    ("channels_last-passes", (1, 4, 3, 3), 2, True, torch.float32),
    ("channels_last-parts", (1, 4, 65, 65), 2, True, torch.float32),
    ("float64", (2, 4, 3, 3), 2, False, torch.float64),
]


@pytest.mark.skipif(not any(b == "cpu" for _, b in device_backends()), reason="the C++ extension is not built")
@pytest.mark.parametrize("path,shape,groups,channels_last,dtype", CPU_STAT_PATHS, ids=[p[0] for p in CPU_STAT_PATHS])
@pytest.mark.parametrize("where", ["x", "add"])
@pytest.mark.parametrize("kind", list(STAT_POISON))
def test_group_norm_silu_statistics_cpu(path, shape, groups, channels_last, dtype, where, kind):
    if shape is None:
        shape = (2 * torch.get_num_threads() + 1, 4, 3, 3)
    x, add = _stat_inputs(shape, groups, kind, where, channels_last, dtype)
    y, mean, rstd = torch.ops.ddpm_fast.group_norm_silu(x, None, None, add, groups, 1e-5, True)
    _check_stats(x, add, groups, y, mean, rstd)


@pytest.mark.skipif(not any(b == "triton" for _, b in device_backends()), reason="triton is not installed")
@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("where", ["x", "add"])
@pytest.mark.parametrize("kind", list(STAT_POISON))
def test_group_norm_silu_statistics_triton(monkeypatch, path, channels_last, where, kind):
    """The split path's tiles wrote D = sum (h - m) = NaN in a column whose
    float mean m is +-Inf, and the group's mean came out NaN, not +-Inf."""
    gn = importlib.import_module("ddpm_fast.kernels.group_norm_silu")
    shape, groups = (2, 4, 5, 5), 2
    if path == "split":
        monkeypatch.setattr(gn, "MAX_TILE", 8)
        monkeypatch.setattr(gn, "SPLIT_TILE", 8)
    p = gn.plan(shape[1], 25, groups, 4, channels_last)
    assert p.fused == (path == "fused") and (p.fused or p.pos_tiles > 2)
    device = next(d for d, b in device_backends() if b == "triton")
    x, add = _stat_inputs(shape, groups, kind, where, channels_last)
    y, mean, rstd = torch.ops.ddpm_fast.group_norm_silu_triton(
        x.to(device), None, None, None if add is None else add.to(device), groups, 1e-5, True)
    _check_stats(x, add, groups, y, mean, rstd)
