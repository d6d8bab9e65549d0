"""Edges of the op wrappers (ops/q_sample.py, ops/ddpm_step.py,
ops/group_norm_silu.py, nn/group_norm_silu.py) the op tests do not reach,
found by mutation testing: the fake implementations' dtypes and layouts, Triton
gradients for x0 of any rank, the reference step's out_model_input, and fuse's
hooks and backend."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ddpm_fast import _extension, ops
from ddpm_fast.nn import GroupNormSiLU, fuse_group_norm_silu
from ddpm_fast.ops._backend import triton_available
from ddpm_fast.schedules import NoiseSchedule

needs_cpp = pytest.mark.skipif(not _extension.AVAILABLE, reason="needs the C++ extension")
SCHEDULE = NoiseSchedule("linear", timesteps=1000)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q_sample_fakes_keep_x0s_dtype_and_channels_last(dtype):
    """The fakes (what torch.compile traces with) match the kernels: x_t in
    x0's memory format with given noise, drawn eps in x0's dtype."""
    x = torch.randn(2, 3, 4, 5, dtype=dtype).to(memory_format=torch.channels_last)
    a = SCHEDULE.table("sqrt_alphas_cumprod", x.device)
    b = SCHEDULE.table("sqrt_one_minus_alphas_cumprod", x.device)
    t = torch.tensor([3, 700])
    check = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.ddpm_fast.q_sample.default, (x, t, a, b, torch.randn_like(x)), test_utils=check)
    torch.library.opcheck(torch.ops.ddpm_fast.q_sample_randn.default, (x, t, a, b, 3, 10), test_utils=check)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_norm_silu_fake_gives_float32_statistics_for_16_bit_x(dtype):
    """mean and rstd are float32 for 16-bit x, in the fake implementation too."""
    x = torch.randn(2, 4, 3, 3, dtype=dtype)
    torch.library.opcheck(torch.ops.ddpm_fast.group_norm_silu.default, (x, None, None, None, 2, 1e-5, True),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(not triton_available(), reason="needs triton (its CPU interpreter)")
def test_q_sample_triton_gradient_for_a_3d_and_a_2d_x0():
    """The Triton op's backward broadcasts the per-sample coefficients over x0 of any rank."""
    for shape in ((3, 5), (3, 2, 5)):
        x0 = torch.randn(shape, requires_grad=True)
        noise = torch.randn(shape, requires_grad=True)
        t = torch.tensor([1, 500, 999])
        x_t, _ = ops.q_sample(x0, t, SCHEDULE, noise=noise, backend="triton")
        x_t.sum().backward()
        a = SCHEDULE.table("sqrt_alphas_cumprod", "cpu")[t].reshape((-1,) + (1,) * (len(shape) - 1))
        b = SCHEDULE.table("sqrt_one_minus_alphas_cumprod", "cpu")[t].reshape((-1,) + (1,) * (len(shape) - 1))
        torch.testing.assert_close(x0.grad, a.expand(shape))
        torch.testing.assert_close(noise.grad, b.expand(shape))


def test_reference_ddpm_step_also_writes_out_model_input():
    """The reference backend fills out_model_input (in its own dtype) as the kernels do."""
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    mi = torch.full((2, 3, 4, 4), float("nan"), dtype=torch.bfloat16)
    y = ops.ddpm_step(x, eps, 7, SCHEDULE, seed=4, out_model_input=mi, backend="reference")
    torch.testing.assert_close(mi, y.to(torch.bfloat16), rtol=0, atol=0)


def test_fuse_passes_its_backend_and_keeps_hooked_silus():
    """The backend reaches the replacement; a hooked SiLU or a norm with a
    forward pre-hook is left alone (fusing would skip the hook); and
    from_group_norm(act=False) is the plain norm."""
    model = nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU())
    assert fuse_group_norm_silu(model, backend="reference") == 1
    assert isinstance(model[0], GroupNormSiLU) and model[0].backend == "reference"

    hooked_act = nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU())
    hooked_act[1].register_forward_hook(lambda m, i, o: None)
    pre_hooked = nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU())
    pre_hooked[0].register_forward_pre_hook(lambda m, i: None)
    assert fuse_group_norm_silu(hooked_act) == 0 and fuse_group_norm_silu(pre_hooked) == 0
    assert type(hooked_act[0]) is nn.GroupNorm and type(pre_hooked[0]) is nn.GroupNorm

    norm = nn.GroupNorm(2, 4)
    plain = GroupNormSiLU.from_group_norm(norm, act=False, backend="reference")
    x = torch.randn(2, 4, 3, 3)
    assert plain.act is False
    torch.testing.assert_close(plain(x), norm(x))


def test_group_norm_silu_module_refuses_a_non_bool_bias_flag():
    """bias is nn.GroupNorm's flag, a bool: an int is refused, not read for its truth."""
    with pytest.raises(TypeError, match="bias must be a bool"):
        GroupNormSiLU(2, 4, bias=1)


def test_the_overlap_check_passes_fake_tensors_by():
    """Fake tensors (make_fx, FakeTensorMode, opcheck; torch.compile and
    torch.export skip the check) have no memory: each reports address 0, with a
    deprecation warning, so outputs and inputs of different dtypes looked
    partially overlapping and were refused."""
    import warnings

    from torch._subclasses.fake_tensor import FakeTensorMode

    from ddpm_fast._checks import check_no_partial_overlap

    with FakeTensorMode(), warnings.catch_warnings():
        warnings.simplefilter("error")
        out = torch.empty(2, 3, 4, 4)
        check_no_partial_overlap(out, "out", {"eps": out.half(), "x_t": out.clone()}, "op")
    real = torch.empty(64)
    with pytest.raises(ValueError, match="out partially overlaps x_t"):
        check_no_partial_overlap(real[1:33], "out", {"x_t": real[:32]}, "op")
