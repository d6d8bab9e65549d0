"""Fused q_sample on every backend against the reference, for given and
in-kernel noise, all dtypes, both memory formats and odd shapes. Under
torch.compile, opcheck and graph capture: test_q_sample_compile.py."""

from __future__ import annotations

import pytest
import torch

from conftest import (
    DTYPES, HUGE_PER_SAMPLE, HUGE_SAMPLES, HUGE_WINDOWS, TOLERANCES, backend_params, huge_timesteps, layout_params,
    poisoned_outputs, requires_extension, skip_without_gpu_memory,
)
from ddpm_fast import NoiseSchedule, ops

SCHEDULE = NoiseSchedule("linear", timesteps=1000)
T = SCHEDULE.num_timesteps
SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (3, 3, 17, 13), (5, 4, 1, 1), (6, 11), (2, 3, 31), (4, 130, 3, 3)]
LAYOUTS = ["contiguous", "channels_last"]


def make_input(shape, dtype, layout, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g).mul(2).sub(1).to(dtype)
    if layout == "channels_last":
        assert len(shape) == 4, "channels_last needs a 4-d shape: parametrize with conftest.layout_params"
        x = x.to(memory_format=torch.channels_last)
    return x.to(device)


def timesteps(kind, n, device):
    if kind == "int":
        return 517
    if kind == "first":
        return 0
    if kind == "last":
        return T - 1
    if kind == "0d":
        return torch.tensor(3, device=device)
    g = torch.Generator().manual_seed(n)
    t = torch.randint(0, T, (n,), generator=g)
    t[0] = T - 1
    t[-1] = 0
    return t.to(device)


T_KINDS = ["int", "first", "last", "0d", "per_sample"]


def assert_layout(out, x):
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    if x.dim() == 4 and not x.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout,shape", layout_params(SHAPES))
@pytest.mark.parametrize("t_kind", T_KINDS)
def test_drawn_noise_matches_reference(device, backend, dtype, layout, shape, t_kind):
    x = make_input(shape, dtype, layout, device)
    t = timesteps(t_kind, shape[0], device)
    with poisoned_outputs(device, x.numel() * x.element_size()):
        xt, eps = ops.q_sample(x, t, SCHEDULE, seed=77, offset=5, backend=backend)
    ref_t = t.cpu() if isinstance(t, torch.Tensor) else t
    xt_ref, eps_ref = ops.q_sample(x.cpu(), ref_t, SCHEDULE, seed=77, offset=5, backend="reference")
    assert_layout(xt, x)
    assert_layout(eps, x)
    torch.testing.assert_close(eps.cpu(), eps_ref, **TOLERANCES[dtype])
    torch.testing.assert_close(xt.cpu(), xt_ref, **TOLERANCES[dtype])


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout,shape", layout_params(SHAPES))
@pytest.mark.parametrize("t_kind", ["int", "per_sample"])
def test_given_noise_matches_reference(device, backend, dtype, layout, shape, t_kind):
    x = make_input(shape, dtype, layout, device)
    noise = make_input(shape, dtype, layout, device, seed=1) * 2
    t = timesteps(t_kind, shape[0], device)
    with poisoned_outputs(device, x.numel() * x.element_size()):
        xt, eps = ops.q_sample(x, t, SCHEDULE, noise=noise, backend=backend)
    ref_t = t.cpu() if isinstance(t, torch.Tensor) else t
    xt_ref, _ = ops.q_sample(x.cpu(), ref_t, SCHEDULE, noise=noise.cpu(), backend="reference")
    assert eps is noise
    assert_layout(xt, x)
    torch.testing.assert_close(xt.cpu(), xt_ref, **TOLERANCES[dtype])


def test_reference_is_the_diffusion_formula():
    # The op's reference equals eq. 4 computed from the float64 tables.
    x = torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    xt, eps = ops.q_sample(x, t, SCHEDULE, seed=3, backend="reference")
    a = SCHEDULE.sqrt_alphas_cumprod[t].reshape(-1, 1, 1, 1)
    b = SCHEDULE.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(xt.double(), a * x.double() + b * eps.double(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(eps, ops.randn(x.shape, 3, backend="reference"))


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 5, 19, 23)])  # the second: 7 tiles of 64 pixels a sample
def test_noise_follows_logical_position_not_memory_order(device, backend, shape):
    x = make_input(shape, torch.float32, "contiguous", device)
    _, eps_contiguous = ops.q_sample(x, 9, SCHEDULE, seed=11, backend=backend)
    _, eps_cl = ops.q_sample(x.to(memory_format=torch.channels_last), 9, SCHEDULE, seed=11, backend=backend)
    torch.testing.assert_close(eps_cl, eps_contiguous, atol=0, rtol=0)
    torch.testing.assert_close(eps_contiguous.cpu(), ops.randn(shape, 11, backend="reference"), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("device,backend", backend_params())
def test_a_one_element_t_tensor_is_every_samples_timestep(device, backend):
    x = make_input((3, 2, 5, 7), torch.float32, "contiguous", device)
    want = ops.q_sample(x, 640, SCHEDULE, seed=2, backend=backend)
    got = ops.q_sample(x, torch.tensor([640], device=device), SCHEDULE, seed=2, backend=backend)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("device,backend", backend_params())
def test_strided_views_are_handled(device, backend):
    base = make_input((4, 6, 10, 10), torch.float32, "contiguous", device)
    x = base[:, ::2, 1:, ::3]  # neither contiguous nor channels_last
    noise = torch.randn(x.shape, device=device).transpose(2, 3).contiguous().transpose(2, 3)
    xt, _ = ops.q_sample(x, 100, SCHEDULE, noise=noise, backend=backend)
    xt_ref, _ = ops.q_sample(x.cpu().contiguous(), 100, SCHEDULE, noise=noise.cpu().contiguous(), backend="reference")
    torch.testing.assert_close(xt.cpu(), xt_ref)


@pytest.mark.parametrize("device,backend", backend_params())
def test_noise_of_another_dtype_is_cast_first(device, backend):
    x = make_input((2, 3, 4, 4), torch.bfloat16, "contiguous", device)
    noise = torch.randn(x.shape, device=device)
    xt, eps = ops.q_sample(x, 7, SCHEDULE, noise=noise, backend=backend)
    assert eps is noise
    xt_ref, _ = ops.q_sample(x.cpu(), 7, SCHEDULE, noise=noise.cpu().bfloat16(), backend="reference")
    torch.testing.assert_close(xt.cpu(), xt_ref, **TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("device,backend", backend_params())
def test_given_noise_is_returned_as_given(device, backend):
    # eps is the given tensor itself, in its own dtype and memory format; x_t follows x0.
    x = make_input((2, 3, 4, 4), torch.float32, "contiguous", device)
    noise = torch.randn(x.shape, device=device).half().to(memory_format=torch.channels_last)
    xt, eps = ops.q_sample(x, 7, SCHEDULE, noise=noise, backend=backend)
    assert eps is noise
    assert xt.dtype == torch.float32 and xt.is_contiguous()


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.uint16, torch.int32, torch.uint32, torch.uint64])
def test_timesteps_of_every_integer_dtype(device, backend, dtype):
    # As int64 timesteps. (torch has no min/max, which the range check takes, for
    # uint16/32/64: those failed with NotImplementedError before they were widened.)
    x = make_input((3, 2, 4, 4), torch.float32, "contiguous", device)
    t = torch.tensor([0, 99, 127])
    want = ops.q_sample(x, t.to(device), SCHEDULE, seed=3, backend=backend)
    got = ops.q_sample(x, t.to(dtype).to(device), SCHEDULE, seed=3, backend=backend)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("device,backend", backend_params())
def test_same_seed_same_result_and_seed_none_follows_torch_seed(device, backend):
    x = make_input((3, 2, 4, 4), torch.float32, "contiguous", device)
    a = ops.q_sample(x, 5, SCHEDULE, seed=1, backend=backend)
    b = ops.q_sample(x, 5, SCHEDULE, seed=1, backend=backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.manual_seed(0)
    c = ops.q_sample(x, 5, SCHEDULE, backend=backend)
    torch.manual_seed(0)
    d = ops.q_sample(x, 5, SCHEDULE, backend=backend)
    assert torch.equal(c[1], d[1])
    assert not torch.equal(c[1], ops.q_sample(x, 5, SCHEDULE, backend=backend)[1])


@pytest.mark.parametrize("device,backend", backend_params() + [pytest.param("cpu", "reference", id="cpu-reference")])
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4, 4)])
def test_empty_batch(device, backend, shape):
    """Empty tensors keep autograd's graph, as non-empty ones do (an early
    return gave an x_t that did not require grad)."""
    x = torch.empty(shape, device=device, requires_grad=True)
    xt, eps = ops.q_sample(x, 1, SCHEDULE, seed=0, backend=backend)
    assert xt.shape == eps.shape == x.shape and xt.requires_grad and not eps.requires_grad
    noise = torch.empty(shape, device=device, requires_grad=True)
    xt, eps = ops.q_sample(x, 1, SCHEDULE, noise=noise, backend=backend)
    assert eps is noise
    xt.sum().backward()
    assert x.grad.shape == noise.grad.shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_drawn_eps_has_x0s_memory_format(dtype):
    """As the docstring and the kernels say: eps was contiguous for a channels_last x0."""
    x = make_input((2, 3, 4, 5), dtype, "channels_last", "cpu")
    xt, eps = ops.q_sample(x, 7, SCHEDULE, seed=2, backend="reference")
    assert_layout(xt, x)
    assert_layout(eps, x)


@pytest.mark.parametrize("device,backend", backend_params())
def test_gradient_flows_to_x0_and_noise(device, backend):
    x = make_input((2, 3, 4, 4), torch.float32, "contiguous", device).requires_grad_()
    noise = torch.randn(x.shape, device=device, requires_grad=True)
    t = torch.tensor([4, 900], device=device)
    xt, _ = ops.q_sample(x, t, SCHEDULE, noise=noise, backend=backend)
    xt.sum().backward()
    a = SCHEDULE.table("sqrt_alphas_cumprod", device)[t].reshape(-1, 1, 1, 1).expand_as(x)
    b = SCHEDULE.table("sqrt_one_minus_alphas_cumprod", device)[t].reshape(-1, 1, 1, 1).expand_as(x)
    torch.testing.assert_close(x.grad, a)
    torch.testing.assert_close(noise.grad, b)
    x.grad = None
    xt, _ = ops.q_sample(x, t, SCHEDULE, seed=1, backend=backend)
    xt.sum().backward()
    torch.testing.assert_close(x.grad, a)
    # One timestep for all, bfloat16, channels_last: the gradient keeps x's dtype.
    x16 = make_input((2, 3, 4, 4), torch.bfloat16, "channels_last", device).requires_grad_()
    xt, eps = ops.q_sample(x16, 900, SCHEDULE, seed=1, backend=backend)
    assert not eps.requires_grad
    (xt.float() * 2).sum().backward()
    assert x16.grad.dtype == torch.bfloat16
    expected = 2 * SCHEDULE.table("sqrt_alphas_cumprod", device)[900]
    torch.testing.assert_close(x16.grad.float(), expected.expand(x16.shape), **TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("device,backend", backend_params())
def test_int_timestep_after_inference_mode_still_differentiable(device, backend):
    """An int t becomes a view of a cached arange; a first call under inference
    mode must not make that cache an inference tensor that autograd cannot save."""
    schedule = NoiseSchedule("linear", timesteps=321)  # a step count no other test caches
    x = make_input((2, 3, 4, 4), torch.float32, "contiguous", device)
    with torch.inference_mode():
        ops.q_sample(x, 7, schedule, seed=1, backend=backend)
    leaf = x.clone().requires_grad_()
    xt, _ = ops.q_sample(leaf, 7, schedule, seed=1, backend=backend)
    xt.sum().backward()
    expected = schedule.table("sqrt_alphas_cumprod", device)[7].expand_as(x)
    torch.testing.assert_close(leaf.grad, expected)
    x_later, _ = ops.q_sample(x, 300, schedule, seed=1, backend=backend)
    x_ref, _ = ops.q_sample(x, torch.tensor(300, device=device), schedule, seed=1, backend=backend)
    torch.testing.assert_close(x_later, x_ref, atol=0, rtol=0)


def _op_args(device="cpu"):
    x = torch.randn(3, 2, 5, 5, device=device)
    t = torch.tensor([0, 4, 999], device=device)
    tables = (SCHEDULE.table("sqrt_alphas_cumprod", device), SCHEDULE.table("sqrt_one_minus_alphas_cumprod", device))
    return x, t, tables


class TestBadInput:
    x = torch.randn(2, 3, 4, 4)

    @pytest.mark.parametrize(
        "args,kwargs,error,match",
        [
            ((torch.randn(2, 3).double(), 1), {}, TypeError, "float32, float16 or bfloat16"),
            ((torch.ones(2, 3, dtype=torch.int64), 1), {}, TypeError, "float32, float16 or bfloat16"),
            (([1.0, 2.0], 1), {}, TypeError, "must be a torch.Tensor"),
            ((torch.tensor(1.0), 1), {}, ValueError, "batch dimension"),
            ((x, 1000), {}, ValueError, r"out of range \[0, 1000\)"),
            ((x, -1), {}, ValueError, "out of range"),
            ((x, torch.tensor([0, 1000])), {}, ValueError, "must lie in"),
            ((x, torch.tensor([1, 2, 3])), {}, ValueError, "one entry per sample"),
            ((x, torch.tensor([[1, 2]])), {}, ValueError, "one entry per sample"),
            ((x, torch.tensor([1.0, 2.0])), {}, TypeError, "integers"),
            ((x, True), {}, TypeError, "bool"),
            ((x, 2.5), {}, TypeError, "int or an integer tensor"),
            ((x, torch.tensor([1, 2], device="meta")), {}, ValueError, "t is on meta"),
            ((x, 1), dict(noise=torch.randn(2, 3, 4)), ValueError, "noise has shape"),
            ((x, 1), dict(noise=torch.randn(2, 3, 4, 4, device="meta")), ValueError, "noise is on meta"),
            ((x, 1), dict(noise=torch.randn(2, 3, 4, 4).double()), TypeError, "noise must be float32"),
            ((x, 1), dict(noise=torch.randn(2, 3, 4, 4), seed=3), ValueError, "not both"),
            ((x, 1), dict(seed="7"), TypeError, "seed must be an int"),
            ((x, 1), dict(seed=0, offset=-5), ValueError, "offset"),
            ((x, 1), dict(backend="gpu"), ValueError, "backend must be one of"),
            ((x, 1), dict(backend="cuda"), RuntimeError, "unavailable"),
        ],
    )
    def test_rejected_with_clear_error(self, args, kwargs, error, match):
        with pytest.raises(error, match=match):
            ops.q_sample(args[0], args[1], SCHEDULE, **kwargs)

    def test_schedule_type(self):
        with pytest.raises(TypeError, match="NoiseSchedule"):
            ops.q_sample(self.x, 1, "linear")

    def test_env_var_selects_backend(self, monkeypatch):
        monkeypatch.setenv("DDPM_FAST_BACKEND", "nonsense")
        with pytest.raises(ValueError, match="DDPM_FAST_BACKEND"):
            ops.q_sample(self.x, 1, SCHEDULE, seed=0)
        monkeypatch.setenv("DDPM_FAST_BACKEND", "reference")
        assert ops.resolve_backend("auto", torch.device("cpu"), "q_sample") == "reference"

    @requires_extension
    def test_cpp_ops_check_their_arguments(self):
        x, t, (a, b) = _op_args()
        with pytest.raises(RuntimeError, match="out of range"):
            torch.ops.ddpm_fast.q_sample_randn(x, torch.tensor([0, 1, 1000]), a, b, 0, 0)
        with pytest.raises(RuntimeError, match="int64"):
            torch.ops.ddpm_fast.q_sample_randn(x, t.int(), a, b, 0, 0)
        with pytest.raises(RuntimeError, match="float32 table"):
            torch.ops.ddpm_fast.q_sample_randn(x, t, a.double(), b, 0, 0)
        with pytest.raises(RuntimeError, match="differ in length"):
            torch.ops.ddpm_fast.q_sample_randn(x, t, a, b[:10], 0, 0)
        with pytest.raises(RuntimeError, match="noise has shape"):
            torch.ops.ddpm_fast.q_sample(x, t, a, b, x[:, :1])
        with pytest.raises(RuntimeError, match="memory format"):
            torch.ops.ddpm_fast.q_sample(x, t, a, b, x.to(memory_format=torch.channels_last))
        with pytest.raises(RuntimeError, match="contiguous or channels_last"):
            torch.ops.ddpm_fast.q_sample_randn(x.transpose(0, 1), torch.tensor(1), a, b, 0, 0)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_more_than_2_to_the_31_elements(backend):
    # 64-bit indexing: check windows at the start, across 2^31 and at the end.
    skip_without_gpu_memory()
    n = 2**31 + 2**20 + 3
    x = torch.rand(n, dtype=torch.float16, device="cuda").reshape(-1, 1)[: n // 1].reshape(1, n)
    xt, eps = ops.q_sample(x, 123, SCHEDULE, seed=9, offset=0, backend=backend)
    for start in (0, 2**31 - 500, n - 1000):
        window = slice(start, start + 1000)
        z = ops.randn(1000, 9, start, backend="reference").half()
        torch.testing.assert_close(eps[0, window].cpu(), z, **TOLERANCES[torch.float16])
        ref, _ = ops.q_sample(x[:, window].cpu(), 123, SCHEDULE, noise=eps[:, window].cpu(), backend="reference")
        torch.testing.assert_close(xt[:, window].cpu(), ref, **TOLERANCES[torch.float16])


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_more_than_2_to_the_31_elements_over_many_samples(backend):
    """Many samples with their own t (conftest's HUGE_*): the sample index,
    each sample's coefficients and its noise counters past 2^31."""
    skip_without_gpu_memory()
    x = torch.rand(HUGE_SAMPLES, HUGE_PER_SAMPLE, dtype=torch.float16, device="cuda")
    t = huge_timesteps(SCHEDULE.num_timesteps)
    xt, eps = ops.q_sample(x, t, SCHEDULE, seed=9, offset=0, backend=backend)
    for k, start in HUGE_WINDOWS:
        window, rows = slice(start, start + 1000), slice(k, k + 1)
        z = ops.randn((1, 1000), 9, k * HUGE_PER_SAMPLE + start, backend="reference").half()  # counters: the logical index
        torch.testing.assert_close(eps[rows, window].cpu(), z, **TOLERANCES[torch.float16])
        ref, _ = ops.q_sample(x[rows, window].cpu(), t[rows].cpu(), SCHEDULE, noise=eps[rows, window].cpu(), backend="reference")
        torch.testing.assert_close(xt[rows, window].cpu(), ref, **TOLERANCES[torch.float16])


def test_reference_gives_out_of_range_timesteps_nan_rows():
    """The reference path's table lookup (what runs for a device t, which is
    not range-checked without a sync): NaN for a timestep outside [0, T), as
    the GPU kernels give, where indexing wrapped t = -1 to the last row."""
    import importlib

    _args = importlib.import_module("ddpm_fast.ops._args")
    q_module = importlib.import_module("ddpm_fast.ops.q_sample")
    step_module = importlib.import_module("ddpm_fast.ops.ddpm_step")

    table = SCHEDULE.sqrt_alphas_cumprod.float()
    t = torch.tensor([-1, 0, 1000, 5])
    rows = _args.timestep_rows(table, t)
    assert rows[[0, 2]].isnan().all() and torch.equal(rows[[1, 3]], table[[0, 5]])
    x0 = torch.randn(4, 3, 2, 2)
    x_t, _ = q_module._reference(x0, t, table, SCHEDULE.sqrt_one_minus_alphas_cumprod.float(), None, 0, 0)
    assert x_t[[0, 2]].isnan().all() and x_t[[1, 3]].isfinite().all()
    step_table = torch.randn(1000, 8)
    x_prev = step_module._reference(x0, torch.randn_like(x0), t, step_table, None, 0, 0, 12, 0, False)
    assert x_prev[[0, 2]].isnan().all() and x_prev[[1, 3]].isfinite().all()


def test_reference_reads_a_device_timestep_without_a_sync():
    """A 0-d timestep on a device (an int t becomes one, and the Sampler's step
    counter is one) is looked up on the device: indexing a table with a 0-d
    integer tensor reads it on the host (.item(), a sync per step that also
    breaks CUDA graph capture). Meta tensors stand in for the device: they
    raise on .item()."""
    import importlib

    _args = importlib.import_module("ddpm_fast.ops._args")
    table = torch.randn(1000, 8, device="meta")
    for t in (torch.tensor(5, device="meta"), torch.tensor([5, 7], device="meta")):
        assert _args.timestep_rows(table, t).shape == t.shape + (8,)
        assert _args.timestep_rows(table[:, 0], t).shape == t.shape
    x = torch.randn(2, 3, 4, 4, device="meta")
    for t in (5, torch.tensor(5, device="meta")):
        x_t, eps = ops.q_sample(x, t, SCHEDULE, seed=0, backend="reference")
        assert x_t.shape == eps.shape == x.shape
        assert ops.ddpm_step(x, torch.randn_like(x), t, SCHEDULE, seed=0, backend="reference").shape == x.shape


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "cuda", "triton"])
@pytest.mark.parametrize("noise", ["drawn", "given"])
def test_gpu_out_of_range_device_timesteps_give_nan_samples_and_gradients(backend, noise):
    """Forward and backward: NaN rows, not a device-side assert (which would
    fail every later CUDA call of the process, hence the synchronize)."""
    x0 = torch.randn(4, 3, 8, 8, device="cuda", requires_grad=True)
    given = torch.randn(4, 3, 8, 8, device="cuda", requires_grad=True) if noise == "given" else None
    t = torch.tensor([-1, 0, 1000, 5], device="cuda")
    x_t, _ = ops.q_sample(x0, t, SCHEDULE, noise=given, seed=0, backend=backend)
    assert x_t[[0, 2]].isnan().all() and x_t[[1, 3]].isfinite().all()
    x_t.sum().backward()
    for grad in [x0.grad] + ([given.grad] if given is not None else []):
        assert grad[[0, 2]].isnan().all() and grad[[1, 3]].isfinite().all()
    torch.cuda.synchronize()


# The C++ autograd of the q_sample ops (csrc/q_sample_autograd.cpp) is the
# backward of the CPU and CUDA kernels. The CPU kernels refuse an out-of-range
# t before any backward, so here they are replaced (in a process of their own)
# by kernels that give NaN rows as the CUDA ones do.
_UNCHECKED_KERNELS = r"""
import warnings
import torch
from ddpm_fast import NoiseSchedule
from ddpm_fast.ops import _args

def rows(table, t, like):
    return _args.timestep_rows(table, t).reshape((-1,) + (1,) * (like.dim() - 1))

def q_sample(x0, t, a, b, noise):
    return (rows(a, t, x0) * x0 + rows(b, t, x0) * noise).to(x0.dtype)

def q_sample_randn(x0, t, a, b, seed, offset):
    eps = torch.randn_like(x0)
    return q_sample(x0, t, a, b, eps), eps

library = torch.library.Library("ddpm_fast", "IMPL")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
    library.impl("q_sample", q_sample, "CPU")
    library.impl("q_sample_randn", q_sample_randn, "CPU")

schedule = NoiseSchedule("linear")
a, b = schedule.sqrt_alphas_cumprod.float(), schedule.sqrt_one_minus_alphas_cumprod.float()
t = torch.tensor([-1, 0, 1000, 5])
x0, noise = (torch.randn(4, 3, 2, 2, requires_grad=True) for _ in range(2))
torch.ops.ddpm_fast.q_sample(x0, t, a, b, noise).sum().backward()
x0_drawn = torch.randn(4, 3, 2, 2, requires_grad=True)
torch.ops.ddpm_fast.q_sample_randn(x0_drawn, t, a, b, 0, 0)[0].sum().backward()
for grad in (x0.grad, noise.grad, x0_drawn.grad):
    assert grad[[0, 2]].isnan().all() and grad[[1, 3]].isfinite().all(), grad[:, 0, 0, 0]
print("ok")
"""


@requires_extension
def test_cpp_backward_gives_out_of_range_timesteps_nan_gradients():
    """The backward's table lookup, as the forward's: NaN for a t outside
    [0, T). Indexing with t unclamped raised here, and on the GPU would stop
    the device on an assert."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _UNCHECKED_KERNELS], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr[-3000:]


def test_poisoned_outputs_really_poison_new_cpu_tensors():
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    with poisoned_outputs("cpu", 0):
        fresh = [torch.empty(n, dtype=d) for n in (3, 1000, 300_000) for d in dtypes]
        fresh += [torch.empty_like(torch.zeros(7, 5).t()), torch.zeros(4).new_empty(9)]
        written, _ = ops.q_sample(torch.zeros(2, 3), 5, SCHEDULE, seed=0, backend="reference")
    assert all(bool(x.isnan().all()) for x in fresh)
    assert not written.isnan().any()  # what ops write is kept
    assert not torch.are_deterministic_algorithms_enabled()  # and only inside


@pytest.mark.parametrize("device,backend", backend_params() + [pytest.param("cpu", "reference", id="cpu-reference")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_drawn_eps_is_exactly_the_noise_in_x_t(device, backend, dtype, layout):
    """16-bit x0, noise drawn: x_t is made from eps as returned (rounded to x0's
    dtype), as the reference makes it. The kernels made x_t from the float32
    noise and returned it rounded: x_t differed by one unit in the last place
    from round(a x0 + b eps) in about a quarter of the elements, so the training
    target was not quite the noise in its input."""
    x0 = make_input((16, 4, 16, 16), dtype, layout, device)
    t = torch.arange(16, device=device) * 61
    x_t, eps = ops.q_sample(x0, t, SCHEDULE, seed=7, backend=backend)
    a = SCHEDULE.table("sqrt_alphas_cumprod", device)[t].reshape(-1, 1, 1, 1)
    b = SCHEDULE.table("sqrt_one_minus_alphas_cumprod", device)[t].reshape(-1, 1, 1, 1)
    want = (a * x0.float() + b * eps.float()).to(dtype)
    differ = (x_t != want).float().mean().item()
    # Exact where the arithmetic is the reference's (no fused multiply-add on the
    # CPU); a GPU's fused multiply-add may round a rare element the other way.
    assert differ == 0 if device == "cpu" else differ < 0.01, differ
    # eps itself is the stream rounded to nearest, as the reference rounds it: a
    # Triton kernel that stored it with a truncating cast (the interpreter's, for
    # bfloat16) was one unit off in half the elements, with x_t consistent with it.
    # (The backends' float32 streams differ by float rounding, which puts a rare
    # element on the other side of a 16-bit rounding boundary: 4 of 16384 here.)
    _, want_eps = ops.q_sample(x0.cpu(), t.cpu(), SCHEDULE, seed=7, backend="reference")
    assert (eps.cpu() != want_eps).float().mean().item() < 1e-3
    torch.testing.assert_close(eps.cpu(), want_eps, **TOLERANCES[dtype])


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("drawn", [True, False], ids=["drawn", "given"])
def test_a_block_one_element_into_the_next_sample(device, backend, layout, drawn):
    """63 elements per sample: the first 64-element block holds all of sample 0
    and the first element of sample 1, which must take sample 1's timestep (and,
    channels_last, its noise); no other shape puts a boundary there."""
    schedule = NoiseSchedule("linear", timesteps=100)
    x = torch.randn(3, 7, 3, 3, device=device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    t = torch.tensor([90, 3, 50], device=device)
    kwargs = dict(seed=11, offset=0) if drawn else dict(noise=torch.randn_like(x))
    xt, eps = ops.q_sample(x, t, schedule, backend=backend, **kwargs)
    ref = {k: v.cpu() if torch.is_tensor(v) else v for k, v in kwargs.items()}
    xt_ref, eps_ref = ops.q_sample(x.cpu(), t.cpu(), schedule, backend="reference", **ref)
    torch.testing.assert_close(eps.cpu(), eps_ref)
    torch.testing.assert_close(xt.cpu(), xt_ref)
