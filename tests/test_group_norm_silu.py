"""Fused GroupNorm+SiLU against F.silu(F.group_norm(x + add)), forward and
backward, on every backend. The module and the fusing helper are tested in
test_group_norm_silu_module.py, the C++ CPU kernel's own paths in
test_group_norm_silu_cpu.py, the Triton kernels' in test_group_norm_silu_triton.py."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import TOLERANCES, backend_params, gpu_if_present, requires_extension, skip_without_gpu_memory
from ddpm_fast import ops
from ddpm_fast.nn import GroupNormSiLU
from group_norm_silu_helpers import (
    CASES,
    TOL,
    assert_bfloat16_rounded_once,
    assert_far_first_value_statistics,
    assert_matches_reference,
    case_id,
    inputs,
    layout_cases,
)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", list(TOL), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout,case", layout_cases(CASES))
@pytest.mark.parametrize("affine,with_add,act", [(True, True, True), (False, False, True), (True, False, False), (False, True, False)])
def test_forward_and_backward_match_reference(device, backend, dtype, layout, case, affine, with_add, act):
    assert_matches_reference(device, backend, dtype, layout, case, affine, with_add, act)


@pytest.mark.parametrize("dtype", list(TOL), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reference_backend_passes_the_comparison(dtype, case):
    """The comparison above, of the reference backend itself: what its
    cuda-reference cases run on the GPU (plain PyTorch in the dtype there too).
    Its float16 add gradient failed the kernels' gradient bounds (GRAD_TOL)."""
    assert_matches_reference("cpu", "reference", dtype, "contiguous", case, True, True, True)


@pytest.mark.parametrize("device,backend", [*backend_params(), pytest.param("cpu", "reference", id="cpu-reference")])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("eps", [1e-6, 3e-3])
def test_eps_is_the_one_given(device, backend, layout, eps):
    """Small-variance h = x + add (0.05^2 each) makes eps matter: a backend
    that kept 1e-5 in place of eps (a reference that did so passed every other
    test) is far outside the tolerances here, forward and backward."""
    g = torch.Generator().manual_seed(5)
    x = 0.05 * torch.randn(2, 6, 5, 7, generator=g)
    x = x.to(memory_format=torch.channels_last) if layout == "channels_last" else x
    w, b, add, dy = (torch.randn(shape, generator=g) for shape in ((6,), (6,), (2, 6), (2, 6, 5, 7)))
    add = 0.05 * add
    leaves = [v.clone().to(device).requires_grad_() for v in (x, w, b, add)]
    y = ops.group_norm_silu(leaves[0], 3, leaves[1], leaves[2], eps, add=leaves[3], backend=backend)
    y.backward(dy.to(device))
    want_leaves = [v.clone().double().requires_grad_() for v in (x, w, b, add)]
    xw, ww, bw, aw = want_leaves
    want = F.silu(F.group_norm(xw + aw[:, :, None, None], 3, ww, bw, eps))
    want.backward(dy.double())
    torch.testing.assert_close(y.detach().cpu().double(), want.detach(), rtol=1e-5, atol=1e-5)
    for name, got, ref in zip(("x", "weight", "bias", "add"), leaves, want_leaves):
        torch.testing.assert_close(got.grad.cpu().double(), ref.grad, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("device,backend", [*backend_params(), pytest.param("cpu", "reference", id="cpu-reference")])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_subnormal_eps_on_a_constant_group_gives_silu_of_the_bias(device, backend, layout):
    """eps = 1e-40, a float32 subnormal, and one group of zeros: its variance
    + eps is subnormal, rstd 1e20, and its y SiLU(bias). On the GPU the Triton
    forward's tl.sqrt flushed the subnormal to 0 (sqrt.approx.ftz): rstd was
    inf and the group's y NaN. (Triton's CPU interpreter computes in numpy,
    without the flush: this fails only on the GPU.)"""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 6, 5, 7, generator=g)
    x[1, 2:4] = 0.0  # sample 1's group 1 (3 groups of 2 channels)
    x = x.to(memory_format=torch.channels_last) if layout == "channels_last" else x
    w, b = torch.randn(6, generator=g), torch.randn(6, generator=g)
    y = ops.group_norm_silu(x.to(device), 3, w.to(device), b.to(device), 1e-40, backend=backend).cpu()
    assert y.isfinite().all()
    torch.testing.assert_close(y[1, 2:4], F.silu(b[2:4])[:, None, None].expand(2, 5, 7))
    want = F.silu(F.group_norm(x.double(), 3, w.double(), b.double(), 1e-40))
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


@requires_extension
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act", [True, False])
def test_gradcheck_float64_cpu(layout, act):
    x, w, b, add = inputs((2, 6, 3, 4), torch.float64, layout, "cpu", True, True)
    args = [t.clone().requires_grad_() for t in (x, w, b, add)]
    fn = lambda x, w, b, a: ops.group_norm_silu(x, 3, w, b, add=a, act=act, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)


@requires_extension
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act", [True, False])
def test_gradgradcheck_float64_cpu(layout, act):
    """Second derivatives (a gradient penalty, a Hessian-vector product): the
    backward op has no derivative of its own, and before the differentiable
    backward, create_graph=True gave a gradient that autograd treated as
    constant (second derivatives 0, with only torch's fallback warning)."""
    x, w, b, add = inputs((2, 6, 3, 4), torch.float64, layout, "cpu", True, True)
    args = [t.clone().requires_grad_() for t in (x, w, b, add)]
    fn = lambda x, w, b, a: ops.group_norm_silu(x, 3, w, b, add=a, act=act, backend="cpu")  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("weight_frozen", [False, True])
def test_second_derivatives_match_reference(device, backend, weight_frozen):
    """A gradient penalty through the op, differentiated again, as through
    F.group_norm: float32 on every backend, with x needing its gradient and the
    weight frozen or not."""
    x, w, b, add = inputs((3, 4, 5, 3), torch.float32, "contiguous", device, True, True)
    results = []
    for which in (backend, "reference"):
        xs = x.clone().requires_grad_()
        ws = w.clone().requires_grad_(not weight_frozen)
        adds = add.clone().requires_grad_()
        y = ops.group_norm_silu(xs, 2, ws, b, add=adds, backend=which)
        (gx,) = torch.autograd.grad(y.pow(2).sum(), xs, create_graph=True)
        leaves = [xs, adds] + ([] if weight_frozen else [ws])
        results.append(torch.autograd.grad(gx.pow(2).sum(), leaves))
    for got, want in zip(*results):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("x_dtype, w_dtype, b_dtype", [
    (torch.float16, torch.float16, torch.bfloat16), (torch.bfloat16, torch.float32, torch.bfloat16),
    (torch.bfloat16, None, torch.float32), (torch.float32, torch.float64, torch.float32),
], ids=lambda d: "none" if d is None else str(d)[6:])
def test_second_derivatives_with_parameters_of_other_dtypes(device, backend, x_dtype, w_dtype, b_dtype):
    """The differentiable backward takes weight and bias of two dtypes, as the
    forward does (the C++ op's converted each alone: ATen refused half with float)."""
    x, w, b, _ = inputs((2, 8, 3, 3), torch.float32, "contiguous", device, True, False)
    results = []
    for which in (backend, "reference"):
        xs = x.to(x_dtype).requires_grad_()
        params = [p.to(d).requires_grad_() for p, d in ((w, w_dtype), (b, b_dtype)) if d is not None]
        weight, bias = (params[0], params[1]) if w_dtype is not None else (None, params[0])
        y = ops.group_norm_silu(xs, 4, weight, bias, backend=which)
        grads = torch.autograd.grad(y.float().square().sum(), [xs, *params], create_graph=True)
        results.append(torch.autograd.grad(sum(g.float().sum() for g in grads), [xs, *params]))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **TOLERANCES[x_dtype])


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_recorded_gradients_of_16_bit_x_with_a_large_add(device, backend, dtype):
    """create_graph=True takes the differentiable backward, which on the C++
    backends added x + add in x's 16-bit dtype (the forward adds in float32):
    with an add of 300, dx was 61% off in bfloat16."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 6, 6, generator=g).to(dtype)
    add = torch.full((2, 4), 300.0) + torch.randn(2, 4, generator=g)
    dy = torch.randn(2, 4, 6, 6, generator=g)
    exact = x.double().requires_grad_()
    y = F.silu(F.group_norm(exact + add.double()[:, :, None, None], 2))
    (want,) = torch.autograd.grad(y, exact, dy.double())
    xs = x.to(device).requires_grad_()
    y = ops.group_norm_silu(xs, 2, add=add.to(device), backend=backend)
    (got,) = torch.autograd.grad(y, xs, dy.to(device, dtype), create_graph=True)
    # dx in x's dtype: within one unit of its rounding at the gradient's scale
    # (the errors seen: 0.4 and 0.1 of that, as without create_graph).
    scale = torch.finfo(dtype).eps * want.abs().max().item()
    torch.testing.assert_close(got.double().cpu(), want, atol=scale, rtol=0)


@requires_extension
def test_first_derivatives_use_the_backward_kernel():
    """The differentiable backward is only for create_graph=True: a plain
    backward runs the backward op, eagerly and under torch.compile's tracing."""
    from torch._dynamo.backends.common import aot_autograd
    from functorch.compile import make_boxed_func

    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    module = GroupNormSiLU(2, 4)
    with torch.profiler.profile() as prof:
        module(x).sum().backward()
    assert "ddpm_fast::group_norm_silu_backward" in {e.key for e in prof.key_averages()}
    graphs = []
    keep = lambda gm, _: graphs.append(gm) or make_boxed_func(gm)  # noqa: E731
    compiled = torch.compile(module, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    compiled(x).sum().backward()
    ops_in_backward = {str(n.target) for n in graphs[-1].graph.nodes if n.op == "call_function"}
    assert "ddpm_fast.group_norm_silu_backward.default" in ops_in_backward


def _float64_group_norm_silu_through_auto(device: str) -> None:
    """float64 through backend="auto" against float64 autograd of F.group_norm
    (values and gradients to float64 rounding), and a gradcheck."""
    x, w, b, add = inputs((2, 6, 3, 4), torch.float64, "channels_last", device, True, True)
    args = [t.clone().requires_grad_() for t in (x, w, b, add)]
    fn = lambda x, w, b, a: ops.group_norm_silu(x, 3, w, b, add=a, backend="auto")  # noqa: E731
    want_args = [t.clone().requires_grad_() for t in (x, w, b, add)]
    want = F.silu(F.group_norm(want_args[0] + want_args[3][:, :, None, None], 3, want_args[1], want_args[2]))
    got = fn(*args)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(want)
    for g, h in zip(torch.autograd.grad(got, args, dy), torch.autograd.grad(want, want_args, dy)):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(fn, args)


def test_auto_runs_float64_on_the_reference_where_the_backend_has_no_float64_kernel(monkeypatch):
    """Where auto picks a GPU kernel (cuda or triton, neither takes float64),
    float64 input runs on the reference instead of raising; an explicit GPU
    backend still raises (test_bad_input). The GPU's choice is stood in for by
    resolving auto to triton on the CPU."""
    module = sys.modules["ddpm_fast.ops.group_norm_silu"]  # the package's name is the function's
    monkeypatch.setattr(module, "resolve_backend", lambda backend, device, op: "triton" if backend == "auto" else backend)
    _float64_group_norm_silu_through_auto("cpu")
    with pytest.raises(TypeError, match="x is float64, which runs on the cpu and reference backends only, not triton"):
        ops.group_norm_silu(torch.randn(2, 6, 3, 4, dtype=torch.float64), 3, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_runs_float64_on_the_gpu():
    _float64_group_norm_silu_through_auto("cuda")


@requires_extension
def test_opcheck_cpp_op_float64():
    """float64 x: mean and rstd are float64, in the fake implementation too (torch.compile traces with it)."""
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    torch.library.opcheck(torch.ops.ddpm_fast.group_norm_silu.default, (x, None, None, None, 3, 1e-5, True))


@requires_extension
def test_opcheck_cpp_ops():
    x, w, b, add = inputs((2, 6, 3, 4), torch.float32, "contiguous", "cpu", True, True)
    torch.library.opcheck(torch.ops.ddpm_fast.group_norm_silu.default, (x, w, b, add, 3, 1e-5, True))
    x_cl = x.to(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.ddpm_fast.group_norm_silu.default, (x_cl, None, None, None, 2, 1e-5, False))
    y, mean, rstd = torch.ops.ddpm_fast.group_norm_silu(x, w, b, add, 3, 1e-5, True)
    torch.library.opcheck(torch.ops.ddpm_fast.group_norm_silu_backward.default, (torch.randn_like(x), x, w, b, add, mean, rstd, 3, True))


@gpu_if_present
def test_opcheck_triton_ops():
    """The Triton op and its backward op (registered on first use): schema and
    fake implementation (the latter is what torch.compile traces with)."""
    pytest.importorskip("triton")
    from ddpm_fast.kernels import group_norm_silu as _triton  # noqa: F401

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, w, b, add = inputs((2, 6, 3, 4), torch.float32, "contiguous", device, True, True)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.ddpm_fast.group_norm_silu_triton.default, (x, w, b, add, 3, 1e-5, True), test_utils=checks)
    x_cl = x.to(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.ddpm_fast.group_norm_silu_triton.default, (x_cl, None, None, None, 2, 1e-5, False),
                          test_utils=checks)
    y, mean, rstd = torch.ops.ddpm_fast.group_norm_silu_triton(x, w, b, add, 3, 1e-5, True)
    torch.library.opcheck(torch.ops.ddpm_fast.group_norm_silu_triton_backward.default,
                          (torch.randn_like(x), x, w, b, add, mean, rstd, 3, True), test_utils=checks)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize(
    "case,layout",
    [(((2, 160, 32, 32), 32), "channels_last"), (((2, 320, 32, 32), 32), "channels_last"),
     (((2, 128, 54, 54), 32), "contiguous"), (((2, 160, 24, 24), 32), "contiguous"),
     (((2, 32, 6000), 32), "contiguous"), (((2, 2, 128, 128), 2), "channels_last")],
    ids=lambda c: "x".join(map(str, c[0])) if isinstance(c, tuple) else c,
)
def test_cuda_tiles_near_48_kb_of_shared_memory(dtype, case, layout):
    """Shapes whose tiles ask for just under 48 KB of dynamic shared memory:
    with the kernels' static arrays they pass 48 KB, which the launch must
    ask for (it used to count the dynamic part only, and these failed)."""
    assert_matches_reference("cuda", "cuda", dtype, layout, case, True, True, True)


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cuda_split_path_first_value_far_from_the_mean(channels_last):
    """The split path's statistics with the group's first value far from its
    mean (3e3 in N(0, 1) data, 4M values a group): float32 accuracy against
    float64. The tiles' moments are about their own columns' means, combined
    in double (Chan's formula): nothing cancels. The former sums shifted by
    the first value did (rstd up to 0.1% off in the emulated tests' cases)."""
    assert_far_first_value_statistics((1, 4, 1024, 1024), channels_last)


@requires_extension
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_op_statistics_of_empty_groups_are_nan(device):
    """The raw op over an empty spatial extent (the public function refuses
    it): groups of no values have no mean or rstd, NaN rather than whatever
    memory the statistics were given."""
    x = torch.randn(2, 32, 0, 8, device=device)
    y, mean, rstd = torch.ops.ddpm_fast.group_norm_silu(x, None, None, None, 8, 1e-5, True)
    assert y.shape == x.shape and mean.shape == rstd.shape == (2, 8)
    assert mean.isnan().all() and rstd.isnan().all()


@requires_extension
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_backward_op_rejects_statistics_not_of_shape_n_g(device):
    """The backward op takes the forward's (N, G) statistics only: a flat
    (N G,) rstd used to pass the CPU check and fail inside the CUDA split path."""
    x = torch.randn(2, 6, 3, 4, device=device)
    y, mean, rstd = torch.ops.ddpm_fast.group_norm_silu(x, None, None, None, 3, 1e-5, True)
    backward = torch.ops.ddpm_fast.group_norm_silu_backward
    for bad_mean, bad_rstd in ((mean, rstd.flatten()), (mean.flatten(), rstd), (mean.t().contiguous(), rstd)):
        with pytest.raises(RuntimeError, match=r"\(N, G\) = \(2, 3\) statistics"):
            backward(torch.randn_like(x), x, None, None, None, bad_mean, bad_rstd, 3, True)
    if device == "cuda":  # statistics or dy on another device than x: an error, not host pointers read by a kernel
        with pytest.raises(RuntimeError, match="mean/rstd are on cpu"):
            backward(torch.randn_like(x), x, None, None, None, mean.cpu(), rstd.cpu(), 3, True)
        with pytest.raises(RuntimeError, match="dy is on cpu"):
            backward(torch.randn(x.shape), x, None, None, None, mean, rstd, 3, True)


class TestBadInput:
    x = torch.randn(2, 6, 4, 4)

    @pytest.mark.parametrize(
        "kwargs,error,match",
        [
            (dict(num_groups=4), ValueError, "divisible by num_groups"),
            (dict(num_groups=0), ValueError, "positive int"),
            (dict(add=torch.randn(2, 5)), ValueError, r"add must be a tensor of shape \(N, C\)"),
            (dict(add=torch.randn(2, 6, 1)), ValueError, "add must be"),
            (dict(add=torch.randn(2, 6, device="meta")), ValueError, "add is on meta"),
            (dict(weight=torch.randn(5)), ValueError, "weight must be"),
            (dict(weight=torch.randn(6, device="meta")), ValueError, "weight is on meta"),
            (dict(eps=0.0), ValueError, "eps"),
            (dict(act=1), TypeError, "act must be a bool"),
            (dict(backend="nope"), ValueError, "backend"),
        ],
    )
    def test_rejected(self, kwargs, error, match):
        args = dict(num_groups=3)
        args.update(kwargs)
        with pytest.raises(error, match=match):
            ops.group_norm_silu(self.x, args.pop("num_groups"), **args)

    def test_groups_of_one_value(self):
        # F.group_norm refuses them; every backend does the same.
        for backend in ("reference", "auto"):
            with pytest.raises(ValueError, match="more than one value"):
                ops.group_norm_silu(torch.randn(2, 4, 1, 1), 4, backend=backend)

    def test_dtypes_and_shapes(self):
        with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
            ops.group_norm_silu(self.x.int(), 3)
        with pytest.raises(ValueError, match="N x C"):
            ops.group_norm_silu(torch.randn(6), 3)

    @requires_extension
    def test_cpp_op_checks(self):
        with pytest.raises(RuntimeError, match="divisible"):
            torch.ops.ddpm_fast.group_norm_silu(self.x, None, None, None, 4, 1e-5, True)
        with pytest.raises(RuntimeError, match=r"add must be contiguous of shape \(N, C\)"):
            torch.ops.ddpm_fast.group_norm_silu(self.x, None, None, torch.randn(6, 2).t(), 3, 1e-5, True)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_more_than_2_to_the_31_elements(backend, layout):
    """64-bit indexing (issue 7): 1 x 32 x 8192 x 8193 half (2^31 + 262,144
    elements; groups of one channel, 67M values each, on the large-group
    paths): the first channel and the last, which holds element 2^31, against
    F.group_norm in float32."""
    skip_without_gpu_memory()
    x = torch.randn(1, 32, 8192, 8193, dtype=torch.float16, device="cuda")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    assert x.numel() > 2**31
    y = ops.group_norm_silu(x, 32, backend=backend)
    for c in (0, 31):
        want = F.silu(F.group_norm(x[:, c : c + 1].float(), 1))
        torch.testing.assert_close(y[:, c : c + 1].float(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_one_channel_of_more_than_2_to_the_31_positions(backend):
    """A channel of 46341 x 46341 half values (2^31 + 4,633): the split path's
    last position tiles start past 2^31 (Triton's tile start was int32, and
    wrapped). Forward and backward, the first and last 2^20 values against
    F.group_norm in float32."""
    skip_without_gpu_memory(75)
    x = torch.randn(1, 1, 46341, 46341, dtype=torch.float16, device="cuda").requires_grad_()
    y = ops.group_norm_silu(x, 1, backend=backend)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    y, dx = y.detach().flatten(), dx.flatten()
    xr = x.detach().float().requires_grad_()
    want = F.silu(F.group_norm(xr, 1))
    (dx_want,) = torch.autograd.grad(want, xr, dy.float())
    want, dx_want = want.detach().flatten(), dx_want.flatten()
    for part in (slice(0, 2**20), slice(-(2**20), None)):
        torch.testing.assert_close(y[part].float(), want[part], rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(dx[part].float(), dx_want[part], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_off_the_cpu_gives_group_norm_one_dtype(dtype):
    """16-bit x with float32 weight and bias: ATen's CPU group_norm mixes dtypes,
    its GPU kernel does not, so off the CPU the reference (and the differentiable
    backward built on it) computes in float32. Meta tensors stand in for a GPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ddpm_fast.ops.group_norm_silu import _reference

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "group_norm" in str(func):
                seen.append({a.dtype for a in args if isinstance(a, torch.Tensor)})
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 4, 3, 3, dtype=dtype, device="meta")
    w = torch.randn(4, device="meta")
    with Record():
        y = _reference(x, 2, w, w, 1e-5, torch.randn(2, 4, dtype=dtype, device="meta"), True)
    assert seen == [{torch.float32}] and y.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("param_dtypes", [(torch.float32, "x"), ("x", torch.float32), (torch.float64, "x"),
                                          (torch.float16, torch.bfloat16)], ids=str)
def test_reference_takes_weight_and_bias_of_different_dtypes(dtype, param_dtypes):
    """16-bit x with weight and bias of two dtypes: the kernels read each in
    float32, the reference raised ATen's 'mixed dtype' error; now it computes
    with both in float32, as the CPU kernel does, and gives x's dtype."""
    x = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
    w, b = (torch.randn(8).to(dtype if d == "x" else d) for d in param_dtypes)
    got = ops.group_norm_silu(x, 4, w, b, backend="reference")
    want = F.silu(F.group_norm(x.float(), 4, w.float(), b.float())).to(dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])


@pytest.mark.parametrize("device,backend", backend_params() + [pytest.param("cpu", "reference", id="cpu-reference")])
def test_output_layout_is_the_same_on_every_backend(device, backend):
    """Contiguous or 4-d channels_last x keeps its format; any other (a 5-d
    channels_last_3d x, a strided view) gives a contiguous y, which the reference
    did not (it kept channels_last_3d)."""
    base = torch.randn(2, 4, 3, 4, 5, device=device)
    cl3d = base.to(memory_format=torch.channels_last_3d)
    cl = base[:, :, 0].to(memory_format=torch.channels_last)
    view = base[:, :, :, ::2, 1:].select(2, 1)
    for x, channels_last in ((base, False), (cl3d, False), (cl, True), (view, False)):
        y = ops.group_norm_silu(x, 2, backend=backend)
        assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        torch.testing.assert_close(y, F.silu(F.group_norm(x, 2)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_differentiates_16_bit_x_with_a_float32_bias_alone(dtype):
    """F.group_norm's CPU backward refused a float32 bias without a weight for
    16-bit x ('expected scalar type Float'), which the kernels take."""
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
    bias = torch.randn(4, requires_grad=True)
    y = ops.group_norm_silu(x, 2, None, bias, act=False, backend="reference")
    dx, db = torch.autograd.grad(y.float().sum(), (x, bias))
    want = F.group_norm(x.detach().float().requires_grad_(), 2, None, bias.detach().requires_grad_())
    assert y.dtype == dtype and dx.dtype == dtype and db.dtype == torch.float32
    torch.testing.assert_close(y, want.to(dtype), **TOLERANCES[dtype])


@pytest.mark.parametrize("device,backend", backend_params() + [pytest.param("cpu", "reference", id="cpu-reference")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_x_plus_a_large_add_is_not_rounded_before_the_norm(device, backend, dtype):
    """x + add in float32, as the kernels add it: the reference added in x's
    16-bit dtype, so an add of 100 on x of spread 0.01 kept little of x (max
    error 2.35 in bfloat16 for the kernels' 0.008)."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 4, 8, 8, generator=g) * 0.01).to(dtype)
    add = torch.full((2, 4), 100.0).to(dtype)
    exact = F.silu(F.group_norm(x.double() + add.double()[:, :, None, None], 2))
    got = ops.group_norm_silu(x.to(device), 2, add=add.to(device), backend=backend)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double().cpu(), exact, **TOLERANCES[dtype])


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bfloat16_outputs_are_the_float32_result_rounded_once(device, backend, layout):
    assert_bfloat16_rounded_once(device, backend, layout, (2, 32, 16, 16), 8)
