"""Fused GroupNorm+SiLU against F.silu(F.group_norm(x + add)), forward and
backward, on every backend; the module and the fusing helper."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import HAS_CUDA, backend_params, gpu_if_present, poison_cuda_allocator, requires_extension
from ddpm_fast import _extension, ops
from ddpm_fast.nn import GroupNormSiLU, fuse_group_norm_silu
from ddpm_fast.ops._backend import triton_available

# (shape, groups): C not a power of two, prime H*W, one group, groups of one channel, N x C x L,
# one (sample, group) block (fewer than the threads: the CPU backward's per-row schedule).
CASES = [
    ((2, 6, 5, 7), 3),
    ((3, 12, 7, 7), 4),
    ((2, 8, 13, 1), 2),
    ((2, 5, 3, 3), 1),
    ((2, 6, 4, 4), 6),
    ((3, 8, 11), 2),
    ((1, 32, 16, 16), 8),
    ((1, 3, 9, 5), 1),
]
# (forward atol/rtol, gradient atol/rtol), against a float32 reference of the same rounded inputs.
TOL = {
    torch.float32: (dict(atol=1e-5, rtol=1e-5), dict(atol=1e-4, rtol=1e-4)),
    torch.float16: (dict(atol=4e-3, rtol=4e-3), dict(atol=2e-2, rtol=2e-2)),
    torch.bfloat16: (dict(atol=3e-2, rtol=3e-2), dict(atol=1e-1, rtol=5e-2)),
}
# Gradients against a float32 reference of the same rounded inputs
# (assert_matches_reference), as fractions of the largest: the gradient's own
# rounding to its dtype (half an ulp) and float32 differences, with room. Observed
# on the CPU (C++ and Triton): 1e-6, 2.3e-4 and 3.3e-3. TOL's gradient bounds
# (100x, 86x and 30x these) passed a Triton backward that rounded float16 dy
# through bfloat16 (2.8e-3).
GRAD_TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
}


def reference(x, groups, w, b, add, act):
    h = x if add is None else x + add.reshape(add.shape + (1,) * (x.dim() - 2))
    y = F.group_norm(h, groups, w, b, 1e-5)
    return F.silu(y) if act else y


def inputs(shape, dtype, layout, device, affine, with_add, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    if layout == "channels_last":
        if len(shape) != 4:
            pytest.skip("channels_last needs 4-d")
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    w = (torch.randn(c, generator=g) + 1).to(dtype) if affine else None
    b = torch.randn(c, generator=g).to(dtype) if affine else None
    add = torch.randn(shape[:2], generator=g).to(dtype) if with_add else None
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return move(x), move(w), move(b), move(add)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", list(TOL), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-g{c[1]}")
@pytest.mark.parametrize("affine,with_add,act", [(True, True, True), (False, False, True), (True, False, False), (False, True, False)])
def test_forward_and_backward_match_reference(device, backend, dtype, layout, case, affine, with_add, act):
    assert_matches_reference(device, backend, dtype, layout, case, affine, with_add, act)


def assert_matches_reference(device, backend, dtype, layout, case, affine, with_add, act):
    shape, groups = case
    x, w, b, add = inputs(shape, dtype, layout, device, affine, with_add)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, add)]
    poison_cuda_allocator(x.numel() * 4, device)
    y = ops.group_norm_silu(leaves[0], groups, leaves[1], leaves[2], add=leaves[3], act=act, backend=backend)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous() == x.is_contiguous()
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(dtype).to(device)
    y.backward(dy)

    ref_leaves = [t.detach().cpu().float().requires_grad_() if t is not None else None for t in (x, w, b, add)]
    y_ref = reference(ref_leaves[0], groups, ref_leaves[1], ref_leaves[2], ref_leaves[3], act)
    y_ref.backward(dy.cpu().float())
    fwd_tol, grad_tol = TOL[dtype][0], GRAD_TOL[dtype]
    torch.testing.assert_close(y.cpu().float(), y_ref, **fwd_tol)
    for name, got, want in zip(("x", "weight", "bias", "add"), leaves, ref_leaves):
        if got is None:
            continue
        assert got.grad is not None, name
        scale = max(1.0, want.grad.abs().max().item())  # weight/bias grads sum over N*H*W
        torch.testing.assert_close(got.grad.cpu().float() / scale, want.grad / scale, **grad_tol, msg=name)


@requires_extension
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act", [True, False])
def test_gradcheck_float64_cpu(layout, act):
    x, w, b, add = inputs((2, 6, 3, 4), torch.float64, layout, "cpu", True, True)
    args = [t.clone().requires_grad_() for t in (x, w, b, add)]
    fn = lambda x, w, b, a: ops.group_norm_silu(x, 3, w, b, add=a, act=act, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)


@requires_extension
def test_opcheck_cpp_ops():
    x, w, b, add = inputs((2, 6, 3, 4), torch.float32, "contiguous", "cpu", True, True)
    torch.library.opcheck(torch.ops.ddpm_fast.group_norm_silu.default, (x, w, b, add, 3, 1e-5, True))
    x_cl = x.to(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.ddpm_fast.group_norm_silu.default, (x_cl, None, None, None, 2, 1e-5, False))
    y, mean, rstd = torch.ops.ddpm_fast.group_norm_silu(x, w, b, add, 3, 1e-5, True)
    torch.library.opcheck(torch.ops.ddpm_fast.group_norm_silu_backward.default, (torch.randn_like(x), x, w, b, add, mean, rstd, 3, True))


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=lambda d: str(d)[6:])
def test_cpu_backward_gradients_in_their_parameters_dtypes(dtype):
    """Each parameter's gradient comes in that parameter's dtype (float32
    weight, bias and add beside 16-bit x, as under autocast), or in x's
    without one; the fake implementation says the same (opcheck)."""
    x, _, _, _ = inputs((2, 6, 3, 4), dtype, "contiguous", "cpu", False, False)
    w, b, add = torch.randn(6) + 1, torch.randn(6), torch.randn(2, 6)
    y, mean, rstd = torch.ops.ddpm_fast.group_norm_silu(x, w, b, add, 3, 1e-5, True)
    dy = torch.randn_like(x)
    backward = torch.ops.ddpm_fast.group_norm_silu_backward.default
    _, dw, db, dadd = backward(dy, x, w, b, add, mean, rstd, 3, True)
    assert (dw.dtype, db.dtype, dadd.dtype) == (torch.float32,) * 3
    leaves = [t.double().requires_grad_() for t in (w, b, add)]
    reference(x.double(), 3, *leaves, True).backward(dy.double())
    for got, want in zip((dw, db, dadd), leaves):
        scale = max(1.0, want.grad.abs().max().item())
        torch.testing.assert_close(got.double() / scale, want.grad / scale, **TOL[dtype][1])
    assert backward(dy, x, None, None, None, mean, rstd, 3, True)[1].dtype == dtype
    torch.library.opcheck(backward, (dy, x, w, b, add, mean, rstd, 3, True))


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


# (shape, groups, layout, with add, dtype): the CPU kernel's moment paths: NCHW
# blocks summed whole (no add) and row by row (add, rows of 1024 values),
# blocks of short rows with add, channels_last samples (parts of 4096 pixels),
# a 16-bit input.
CPU_MOMENT_PATHS = [
    ((2, 64, 64, 64), 32, "contiguous", False, torch.float32),
    ((2, 64, 32, 32), 16, "contiguous", True, torch.float32),
    ((4, 64, 8, 8), 16, "contiguous", True, torch.float32),
    ((2, 32, 96, 96), 8, "channels_last", False, torch.float32),
    ((2, 32, 64, 64), 8, "channels_last", True, torch.bfloat16),
]


@requires_extension
@pytest.mark.parametrize("far", [30.0, 1e3, 1e4])
@pytest.mark.parametrize("case", CPU_MOMENT_PATHS, ids=lambda c: f"{'x'.join(map(str, c[0]))}-{c[2]}-{c[3]}-{c[4]}")
def test_cpu_statistics_with_first_values_far_from_the_mean(case, far):
    """Every channel's first value lies `far` spreads from N(0, 1) data: the
    float sums about it (the CPU kernel's shift) cancel, and used to cost rstd
    up to 3e-4 of its accuracy here (2e-6 to 3e-5 at 30 spreads); rows whose
    sums cancelled are now summed again about their mean. The statistics must
    be as good as float sums allow (3e-7 in the vector loops, 5e-7 in the
    portable ones, DDPM_FAST_CPU_SIMD=none)."""
    shape, groups, layout, with_add, dtype = case
    g = torch.Generator().manual_seed(11)
    x = torch.randn(shape, generator=g)
    x[:, :, 0, 0] = far
    x = x.to(dtype).contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    add = torch.randn(shape[:2], generator=g).to(dtype) if with_add else None
    _, mean, rstd = torch.ops.ddpm_fast.group_norm_silu(x, None, None, add, groups, 1e-5, True)
    h = x.double() + (add.double()[..., None, None] if with_add else 0.0)
    var, want_mean = torch.var_mean(h.reshape(shape[0], groups, -1), -1, unbiased=False)
    want_rstd = (var + 1e-5).rsqrt()
    assert ((rstd.double() - want_rstd).abs() / want_rstd).max().item() < 1e-6
    assert ((mean.double() - want_mean).abs() * want_rstd).max().item() < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cuda_split_path_first_value_far_from_the_mean(channels_last):
    """The split path's statistics with the group's first value far from its
    mean (3e3 in N(0, 1) data, 4M values a group): float32 accuracy against
    float64. The tiles' moments are about their own columns' means, combined
    in double (Chan's formula): nothing cancels. The former sums shifted by
    the first value did (rstd up to 0.1% off in the emulated tests' cases)."""
    x = torch.randn(1, 4, 1024, 1024, generator=torch.Generator().manual_seed(5))
    x[0, 0, 0, 0] = 3000.0
    want_mean, want_var = x.double().mean(), x.double().var(unbiased=False)
    want_rstd = 1.0 / (want_var + 1e-5).sqrt()
    xc = x.cuda()
    if channels_last:
        xc = xc.contiguous(memory_format=torch.channels_last)
    _, mean, rstd = torch.ops.ddpm_fast.group_norm_silu(xc, None, None, None, 1, 1e-5, True)
    rstd_error = abs(rstd.item() / want_rstd.item() - 1.0)
    mean_error = abs(mean.item() - want_mean.item()) / want_var.sqrt().item()
    assert rstd_error <= 1e-5 and mean_error <= 1e-6, (rstd_error, mean_error)


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


@requires_extension
def test_torch_compile_fullgraph_over_a_module():
    block = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), GroupNormSiLU(4, 8, backend="cpu"), nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, block(x))
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_module_is_a_drop_in_for_group_norm():
    fused, plain = GroupNormSiLU(4, 12), nn.GroupNorm(4, 12)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    nn.init.normal_(plain.weight)
    nn.init.normal_(plain.bias)
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(3, 12, 5, 5)
    torch.testing.assert_close(fused(x), F.silu(plain(x)))
    assert torch.equal(GroupNormSiLU(4, 12, act=False, backend="reference")(x), nn.GroupNorm(4, 12)(x))
    add = torch.randn(3, 12)
    torch.testing.assert_close(fused(x, add), F.silu(plain(x + add[:, :, None, None])))


def test_fuse_helper_replaces_pairs_and_keeps_outputs():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8), nn.SiLU(),
        nn.Sequential(nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 8, 1)),
        nn.GroupNorm(2, 8),  # no SiLU after it: left alone
    )
    x = torch.randn(2, 3, 9, 9)
    before = model(x)
    keys = set(model.state_dict())
    assert fuse_group_norm_silu(model) == 2
    assert isinstance(model[1], GroupNormSiLU) and isinstance(model[2], nn.Identity)
    assert type(model[4]) is nn.GroupNorm
    assert set(model.state_dict()) == keys
    torch.testing.assert_close(model(x), before)


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


@requires_extension
@pytest.mark.parametrize("dtype", list(TOL), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(6, 12, 33, 35), (1, 8, 67, 71)], ids=["6-samples", "1-sample"])
def test_cpu_kernel_forward_task_paths(dtype, layout, shape):
    """The C++ forward's ways through a batch: 6 samples, each small enough to
    be normalized in the task that read it while the next is prefetched
    (channels_last; NCHW prefetches the next (sample, group) block), and one
    sample of 4757 pixels, whose channels_last moments run in two parts on
    different threads; rows of more than 1024 values, which 16-bit input
    converts in pieces. Against a float64 reference, and the same bits on 1
    and 2 threads."""
    x, w, b, add = inputs(shape, dtype, layout, "cpu", True, True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        y = ops.group_norm_silu(x, 4, w, b, add=add, backend="cpu")
        torch.set_num_threads(1)
        y_one_thread = ops.group_norm_silu(x, 4, w, b, add=add, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    y_ref = reference(x.double(), 4, w.double(), b.double(), add.double(), True)
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    torch.testing.assert_close(y.double(), y_ref, **TOL[dtype][0])
    assert torch.equal(y, y_one_thread)


@requires_extension
@pytest.mark.parametrize("dtype", list(TOL), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("with_add", [True, False], ids=["add", "no-add"])
@pytest.mark.parametrize("groups", [1, 6])
@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (4, 4), (5, 9), (8, 8), (9, 9), (1, 127)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_cpu_kernel_short_rows(dtype, with_add, groups, hw):
    """NCHW rows under 128 values run the forward a (sample, group) block at
    a time, each vector's per-channel coefficients (and add) permuted from the
    channels it spans, and rows of at most 64 the backward: rows shorter than
    a vector (1, 4), rows that vectors straddle (45, 81, 127), whole vectors
    per row (16, 64); 24 channels in one group make blocks over 1024 values,
    which 16-bit input converts in pieces of whole rows. Forward and gradients
    against a float64 reference, and the same bits on 1 and 2 threads (over
    32k values in all: calls of fewer than 16k, kMinParallelValues in
    group_norm_silu_cpu_common.h, stay on one thread)."""
    n = max(3, -(-2 * 16384 // (24 * hw[0] * hw[1])))
    x, w, b, add = inputs((n, 24) + hw, dtype, "contiguous", "cpu", True, with_add)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    names = ("x", "weight", "bias", "add")[: 4 if with_add else 3]
    runs = []
    threads = torch.get_num_threads()
    try:
        for n_threads in (2, 1):
            torch.set_num_threads(n_threads)
            leaves = [t.clone().requires_grad_() for t in (x, w, b, add)[: len(names)]]
            y = ops.group_norm_silu(leaves[0], groups, leaves[1], leaves[2], add=leaves[3] if with_add else None,
                                    backend="cpu")
            y.backward(dy)
            runs.append((y, [t.grad for t in leaves]))
    finally:
        torch.set_num_threads(threads)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, w, b, add)[: len(names)]]
    y_ref = reference(ref_leaves[0], groups, ref_leaves[1], ref_leaves[2], ref_leaves[3] if with_add else None, True)
    y_ref.backward(dy.double())
    (y, grads), (y_one_thread, grads_one_thread) = runs
    torch.testing.assert_close(y.double(), y_ref, **TOL[dtype][0])
    for name, got, want in zip(names, grads, ref_leaves):
        scale = max(1.0, want.grad.abs().max().item())
        torch.testing.assert_close(got.double() / scale, want.grad / scale, **TOL[dtype][1], msg=name)
    assert torch.equal(y, y_one_thread) and all(map(torch.equal, grads, grads_one_thread))


@requires_extension
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("offset", [0.0, 1000.0])
@pytest.mark.parametrize("with_add", [True, False])
@pytest.mark.parametrize("hw", [(37, 41), (3, 5)])
def test_cpu_kernel_long_rows_and_large_mean(layout, offset, with_add, hw):
    """The C++ kernel's float paths on rows longer than its chunks (37x41 pixels:
    1517 > 1024 values per NCHW row, > 256 pixels per channels_last flush; 12
    channels: one 8-wide vector and a tail) and on short ones (3x5), and on
    data far from zero, whose float partial sums must not cancel (NCHW sums
    each group's values as one row without add, and with add in short rows);
    against a float64 reference."""
    x, w, b, add = inputs((2, 12) + hw, torch.float32, layout, "cpu", True, with_add)
    x = (x + offset).contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    names = ("x", "weight", "bias", "add")[: 4 if with_add else 3]
    leaves = [t.clone().requires_grad_() for t in (x, w, b, add)[: len(names)]]
    y = ops.group_norm_silu(leaves[0], 4, leaves[1], leaves[2], add=leaves[3] if with_add else None, backend="cpu")
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    y.backward(dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, w, b, add)[: len(names)]]
    y_ref = reference(ref_leaves[0], 4, ref_leaves[1], ref_leaves[2], ref_leaves[3] if with_add else None, True)
    y_ref.backward(dy.double())
    torch.testing.assert_close(y.double(), y_ref, atol=1e-4, rtol=1e-4)
    for name, got, want in zip(names, leaves, ref_leaves):
        scale = max(1.0, want.grad.abs().max().item())
        torch.testing.assert_close(got.grad.double() / scale, want.grad / scale, atol=1e-4, rtol=1e-4, msg=name)


class TestAutoOnTheCpu:
    """`auto` runs the C++ kernel on the CPU, with autograd too: its autograd is
    C++ (csrc/group_norm_silu_autograd.cpp), and forward + backward measured
    faster than the reference from 2^9 elements up (docs/benchmarks-history.md, 2026-12-01)."""

    @pytest.fixture
    def ran_reference(self, monkeypatch):
        module = importlib.import_module("ddpm_fast.ops.group_norm_silu")  # not the function of that name
        calls = []
        real = module._reference
        monkeypatch.setattr(module, "_reference", lambda *a: calls.append(1) or real(*a))
        monkeypatch.delenv("DDPM_FAST_BACKEND", raising=False)
        return calls

    @pytest.mark.parametrize("shape", [(2, 8, 4, 4), (2, 8, 64, 64)])
    @pytest.mark.parametrize("grad", [False, True])
    @requires_extension
    def test_the_kernel_runs(self, ran_reference, shape, grad):
        x = torch.randn(shape, requires_grad=grad)
        y = ops.group_norm_silu(x, 4)
        assert not ran_reference
        if grad:  # recorded by the C++ autograd function, not a Python one
            assert "GroupNormSiLUFunction" in y.grad_fn.name()
            y.sum().backward()
            assert x.grad is not None and torch.isfinite(x.grad).all()

    def test_env_var_and_explicit_backend_win(self, ran_reference, monkeypatch):
        x = torch.randn(2, 8, 4, 4, requires_grad=True)
        monkeypatch.setenv("DDPM_FAST_BACKEND", "reference")
        ops.group_norm_silu(x, 4)
        assert ran_reference
        if not _extension.AVAILABLE:
            return
        ran_reference.clear()
        monkeypatch.setenv("DDPM_FAST_BACKEND", "cpu")
        ops.group_norm_silu(x, 4)
        ops.group_norm_silu(x, 4, backend="cpu")
        assert not ran_reference


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_16bit_rounding_is_exact(dtype, layout):
    """Groups of -1 and +1 in equal numbers (mean 0, variance 1) with an eps
    below double's resolution make plain GroupNorm y = x * w + b: exact in
    float for 16-bit w and b, so the kernel's rounding of y to 16 bits (its
    vector conversions, and their tails: rows of 81 values) must give the
    reference's bits, round to nearest even included. Half of the channels
    get w + b exactly halfway between two 16-bit values."""
    g = torch.Generator().manual_seed(3)
    n, c, h, w_ = 2, 64, 9, 9
    signs = torch.ones(n, c // 2, 2 * h * w_)
    signs[:, :, 1::2] = -1
    x = signs[:, :, torch.randperm(2 * h * w_, generator=g)].reshape(n, c, h, w_).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    weight = (torch.randn(c, generator=g) * 4).to(dtype)
    bias = (torch.randn(c, generator=g) * 4).to(dtype)
    ulp = 2.0 ** (-10 if dtype == torch.float16 else -7)  # the spacing of 16-bit values in [1, 2)
    weight[::2] = torch.linspace(1 + ulp, 2 - ulp, c // 2).to(dtype)
    bias[::2] = ulp / 2  # w + b and w - b halfway between 16-bit values
    exact = weight[::2].double() + bias[::2].double()
    assert (exact.to(dtype).double() != exact).all()  # (ties indeed)
    got = ops.group_norm_silu(x, c // 2, weight, bias, eps=1e-300, act=False, backend="cpu")
    want = F.group_norm(x, c // 2, weight, bias, eps=1e-300)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,groups", [
    ((3, 64, 32, 32), 32),  # NCHW rows of 1024 (a kChunk) and channels_last pixels of 4 vectors
    ((2, 40, 37, 41), 8),  # rows and pixels ending in partial vectors
    ((4, 24, 4, 4), 6),  # short NCHW rows, a block at a time
    ((2, 264, 3, 3), 8),  # channels_last pixels of 16.5 AVX-512 vectors
])
def test_cpu_16bit_input_gives_the_float_result_rounded_once(dtype, layout, shape, groups):
    """The kernels convert 16-bit x (and dy) to float in registers and compute
    as for float32 input: the same statistics and parameter gradients bit for
    bit, and y and dx those of float32 input rounded to dtype (once: the
    kernels round the float values they computed)."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(shape, generator=g) * 3 + 1).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    if layout == "channels_last":
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    w, b = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    op, backward = torch.ops.ddpm_fast.group_norm_silu, torch.ops.ddpm_fast.group_norm_silu_backward
    for add in (None, torch.randn(shape[:2], generator=g)):
        for act in (True, False):
            y, mean, rstd = op(x, w, b, add, groups, 1e-5, act)
            y32, mean32, rstd32 = op(x.float(), w, b, add, groups, 1e-5, act)
            assert torch.equal(mean, mean32) and torch.equal(rstd, rstd32)
            assert torch.equal(y.view(torch.int16), y32.to(dtype).view(torch.int16))
            dx, dw, db, dadd = backward(dy, x, w, b, add, mean, rstd, groups, act)
            dx32, dw32, db32, dadd32 = backward(dy.float(), x.float(), w, b, add, mean, rstd, groups, act)
            assert torch.equal(dx.view(torch.int16), dx32.to(dtype).view(torch.int16))
            assert torch.equal(dw, dw32) and torch.equal(db, db32)
            if add is not None:
                assert torch.equal(dadd, dadd32)


@requires_extension
@pytest.mark.parametrize("cap", ["avx2", "none"])
def test_cpu_narrower_loops_match_reference(cap):
    """The C++ kernel runs its widest vector loops the CPU has (AVX-512, or
    AVX2 + FMA as on every CI machine so far); DDPM_FAST_CPU_SIMD caps them
    (none: the portable loops that other CPUs run). Each must pass the same
    float32 tests and the 16-bit ones (exact rounding, float32 bits)."""
    import os
    import subprocess
    import sys

    selection = "long_rows or short_rows or 16bit or (match_reference and cpu-cpu and float32)"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", selection],
        env={**os.environ, "DDPM_FAST_CPU_SIMD": cap}, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


requires_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def triton_split_path(monkeypatch):
    """Shrink the Triton tiles so that every case takes the split path (partial
    moments per position tile, combined by torch) with several position tiles."""
    gn = importlib.import_module("ddpm_fast.kernels.group_norm_silu")
    monkeypatch.setattr(gn, "MAX_TILE", 8)
    monkeypatch.setattr(gn, "MAX_TILE_BACKWARD", 8)
    monkeypatch.setattr(gn, "SPLIT_TILE", 16)
    return gn


# The split path's cases: CASES but 1x32x16x16, whose 64 (NCHW) and 256
# (channels_last) position tiles took 9-25 s a case in the interpreter (130 s
# of CI's 12 minutes of tests); the others run 3 to 49 position tiles through
# the same code.
SPLIT_CASES = [c for c in CASES if c[0] != (1, 32, 16, 16)]


@requires_triton
@gpu_if_present
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-g{c[1]}")
@pytest.mark.parametrize("affine,with_add,act", [(True, True, True), (False, False, False)])
def test_triton_split_path_matches_reference(triton_split_path, dtype, layout, case, affine, with_add, act):
    shape, groups = case
    cl = layout == "channels_last" and len(shape) == 4
    s = 1 if len(shape) < 3 else int(torch.tensor(shape[2:]).prod())
    p = triton_split_path.plan(shape[1], s, groups, dtype.itemsize, cl)
    assert not p.fused and p.pos_tiles == -(-s // p.block_s)
    assert not triton_split_path.plan(shape[1], s, groups, dtype.itemsize, cl, backward=True).fused
    assert_matches_reference(TRITON_DEVICE, "triton", dtype, layout, case, affine, with_add, act)


@requires_triton
@gpu_if_present
@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_triton_large_mean_against_float64(request, path, layout):
    """Data far from zero (mean 1000, spread 2): the fused path's two-pass
    variance and the split path's per-tile moments must not cancel."""
    if path == "split":
        request.getfixturevalue("triton_split_path")
    x, w, b, add = inputs((2, 12, 9, 11), torch.float32, layout, TRITON_DEVICE, True, True)
    x = (x + 1000.0).contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, add)]
    y = ops.group_norm_silu(leaves[0], 4, leaves[1], leaves[2], add=leaves[3], backend="triton")
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(TRITON_DEVICE)
    y.backward(dy)
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in (x, w, b, add)]
    y_ref = reference(ref_leaves[0], 4, ref_leaves[1], ref_leaves[2], ref_leaves[3], True)
    y_ref.backward(dy.cpu().double())
    # float32 x near 1000 is itself rounded to 6e-5: the reference sees the same rounded values.
    torch.testing.assert_close(y.cpu().double(), y_ref, atol=2e-4, rtol=2e-4)
    for name, got, want in zip(("x", "weight", "bias", "add"), leaves, ref_leaves):
        scale = max(1.0, want.grad.abs().max().item())
        torch.testing.assert_close(got.grad.cpu().double() / scale, want.grad / scale, atol=2e-4, rtol=2e-4, msg=name)


@requires_triton
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("with_add", [False, True], ids=["no-add", "add"])
def test_triton_split_path_first_value_far_from_the_mean(triton_split_path, layout, with_add):
    """N(0, 1) data but h = 1e3 at each group's first value: the split path's
    statistics stay within float32 rounding of float64 truth. Its partial sums
    used to be shifted by that first value, and their float32 cancellation cost
    rstd 2e-4 to 3e-4 (relative) here and the mean 1e-4 (absolute), more in
    larger groups; per-tile moments combined in float64 give 7e-8 and 2e-8."""
    shape, groups = (2, 4, 32, 32), 2
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=gen)
    add = torch.randn(shape[:2], generator=gen) if with_add else None
    x[:, ::2, 0, 0] = 1e3 - (add[:, ::2] if with_add else 0.0)  # h = 1e3 at (channel 0, position 0) of each group
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    assert not triton_split_path.plan(shape[1], 32 * 32, groups, 4, layout == "channels_last").fused
    h = x.double() if add is None else x.double() + add.double()[:, :, None, None]
    want_mean = h.reshape(2, groups, -1).mean(-1)
    want_rstd = (h.reshape(2, groups, -1).var(-1, unbiased=False) + 1e-5).rsqrt()
    y, mean, rstd = torch.ops.ddpm_fast.group_norm_silu_triton(
        x.to(TRITON_DEVICE), None, None, None if add is None else add.to(TRITON_DEVICE), groups, 1e-5, True)
    torch.testing.assert_close(rstd.cpu().double(), want_rstd, atol=0.0, rtol=1e-5)
    torch.testing.assert_close(mean.cpu().double(), want_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(y.cpu().double(), reference(h, groups, None, None, None, True), atol=1e-5, rtol=1e-5)


@requires_triton
@gpu_if_present
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_triton_split_path_large_mean_at_real_tile_sizes(layout):
    """N(0, 1) data plus 1e4 with the split path's real tiles (hundreds of
    positions each): each tile's float sum of h carries a rounding of order
    1e4 ulp into the combination unless the tile writes its deviations' sum
    too (26bc414, without it, was 3e-5 off in rstd here)."""
    shape, groups = (1, 8, 64, 64), 1
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4)) + 1e4
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    gn = importlib.import_module("ddpm_fast.kernels.group_norm_silu")
    p = gn.plan(shape[1], 64 * 64, groups, 4, layout == "channels_last")
    assert not p.fused and p.pos_tiles > 1
    want_var, want_mean = torch.var_mean(x.double().reshape(1, groups, -1), -1, unbiased=False)
    want_rstd = (want_var + 1e-5).rsqrt()
    _, mean, rstd = torch.ops.ddpm_fast.group_norm_silu_triton(x.to(TRITON_DEVICE), None, None, None, groups, 1e-5, True)
    assert ((rstd.cpu().double() - want_rstd).abs() / want_rstd).max().item() < 2e-6
    # A float32 mean near 1e4 is itself rounded to 1e-3 (half an ulp: 5e-4).
    assert (mean.cpu().double() - want_mean).abs().max().item() <= 5e-4


@requires_triton
def test_triton_op_statistics_of_empty_groups_are_nan():
    """test_op_statistics_of_empty_groups_are_nan of the raw Triton op (it
    returned torch.empty's memory)."""
    importlib.import_module("ddpm_fast.kernels.group_norm_silu")  # registers the op
    x = torch.randn(2, 32, 0, 8, device=TRITON_DEVICE)
    y, mean, rstd = torch.ops.ddpm_fast.group_norm_silu_triton(x, None, None, None, 8, 1e-5, True)
    assert y.shape == x.shape and mean.shape == rstd.shape == (2, 8)
    assert mean.isnan().all() and rstd.isnan().all()


class TestTritonPlan:
    """How the Triton kernels cut the benchmark shapes into programs."""

    @pytest.fixture
    def gn(self):
        pytest.importorskip("triton")
        return importlib.import_module("ddpm_fast.kernels.group_norm_silu")

    # (C, H*W, G): the U-Net's GroupNorms at N = 128, then the large-image shape.
    UNET = [(128, 1024, 32), (256, 256, 32), (256, 64, 32), (256, 16, 32), (512, 64, 32), (64, 1024, 32)]

    @pytest.mark.parametrize("c,s,g", UNET)
    @pytest.mark.parametrize("elem_bytes", [4, 2])
    @pytest.mark.parametrize("channels_last", [False, True])
    @pytest.mark.parametrize("backward", [False, True])
    def test_unet_shapes_read_once(self, gn, c, s, g, elem_bytes, channels_last, backward):
        p = gn.plan(c, s, g, elem_bytes, channels_last, backward)
        assert p.fused and p.pos_tiles == 1
        assert p.block_s >= s and p.block_c >= p.groups_per_tile * (c // g)
        assert p.block_c * p.block_s <= (gn.MAX_TILE_BACKWARD if backward else gn.MAX_TILE)
        assert p.col_tiles * p.groups_per_tile >= g
        if channels_last:  # a tile row fills a 32-byte sector, unless that would overflow the tile
            row_bytes = p.groups_per_tile * (c // g) * elem_bytes
            assert row_bytes >= 32 or 2 * p.block_c * p.block_s > (gn.MAX_TILE_BACKWARD if backward else gn.MAX_TILE)

    @pytest.mark.parametrize("channels_last", [False, True])
    def test_large_images_split(self, gn, channels_last):
        p = gn.plan(128, 256 * 256, 32, 2, channels_last)
        assert not p.fused and p.col_tiles * p.block_c >= 128 and p.pos_tiles * p.block_s >= 256 * 256
        assert p.block_c * p.block_s <= gn.SPLIT_TILE

    def test_wide_groups_split(self, gn):
        assert not gn.plan(1024, 16, 1, 4, False).fused  # 1024 channels in one group
