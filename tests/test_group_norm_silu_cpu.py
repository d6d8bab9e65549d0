"""The C++ CPU kernel of GroupNorm+SiLU: its paths through a batch (rows
long and short, task splits, moments of data far from the mean), 16-bit input,
the parameters' gradient dtypes, `auto` on the CPU and the narrower vector
loops (DDPM_FAST_CPU_SIMD)."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from conftest import requires_extension
from ddpm_fast import _extension, ops
from group_norm_silu_helpers import TOL, assert_matches_reference, inputs, reference


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
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_cpu_silu_stage_within_a_few_ulp(layout):
    """The kernel's SiLU, apart from the normalization: act=True's output
    against float64 silu of act=False's (the same u), over u spanning
    [-104, 104] (past exp's float range both ways) and at +-Inf and NaN.
    The vector loops' exp are polynomials on a reduced argument (3.0 ulp
    worst case measured for AVX2's, 2.3 for the portable loop's); a wrong
    coefficient, table entry or range reduction shows here as errors of
    thousands of ulp, which the general tests' 1e-5 would let through."""
    n, c, h, w = 2, 8, 61, 67  # rows of 4087 values: whole vectors and a partial one
    x = torch.linspace(-1.0, 1.0, n * c * h * w).reshape(n, c, h, w).contiguous(memory_format=layout)
    weight = torch.full((c,), 60.0)  # normalized values reach about +-1.73, so u about +-104
    with torch.inference_mode():
        u = ops.group_norm_silu(x, 2, weight, act=False, backend="cpu")
        y = ops.group_norm_silu(x, 2, weight, act=True, backend="cpu")
    assert u.min() < -100 and u.max() > 100
    want = F.silu(u.double())
    # relative: 4 ulp (float spacing is 2^-23 to 2^-24 of a value); absolute
    # below 1e-30, where silu(u) for u below about -88 (where exp(-u)
    # overflows) comes out as -0.
    torch.testing.assert_close(y.double(), want, rtol=2.0**-21, atol=1e-30)
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0])
    with torch.inference_mode():  # weight 0, bias v: u = v whatever the statistics
        got = ops.group_norm_silu(torch.randn(2, 4, 3, 3).contiguous(memory_format=layout), 2, torch.zeros(4), special,
                                  backend="cpu")
    torch.testing.assert_close(got, F.silu(special)[None, :, None, None].expand_as(got), equal_nan=True)


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("layout, case", [
    ("contiguous", ((2, 4, 1, 129), 2)), ("contiguous", ((2, 2, 3, 43), 1)), ("contiguous", ((2, 2, 1, 257), 2)),
    ("channels_last", ((2, 17, 3, 3), 1)), ("channels_last", ((2, 33, 2, 2), 3)), ("channels_last", ((2, 65, 1, 3), 5)),
], ids=lambda v: v if isinstance(v, str) else "x".join(map(str, v[0])))
def test_cpu_tail_of_one_value(dtype, layout, case):
    """Rows of 129, 257 (NCHW) and 17, 33, 65 values (channels_last channels)
    leave one value after the 8- and 16-wide vector loops: a tail loop that
    stopped one short left it unwritten (outputs poisoned), which no other
    shape showed. Run again under DDPM_FAST_CPU_SIMD caps below."""
    assert_matches_reference("cpu", "cpu", dtype, layout, case, True, True, True)


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

    selection = "long_rows or short_rows or tail_of_one or 16bit or silu_stage or (match_reference and cpu-cpu and float32)"
    cross_backend = os.path.join(os.path.dirname(__file__), "test_group_norm_silu.py")  # match_reference
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, cross_backend, "-k", selection],
        env={**os.environ, "DDPM_FAST_CPU_SIMD": cap}, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


@requires_extension
@pytest.mark.parametrize("cap, warned", [("avx9", True), ("AVX2", True), ("off", True), ("avx2", False), ("none", False),
                                         ("avx512", False), ("", False)])
def test_an_unknown_simd_cap_is_warned_of(cap, warned):
    """The kernels take any value but avx2 and none as no cap: a misspelt cap
    ran the widest loops without a word."""
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", "import ddpm_fast"], env={**os.environ, "DDPM_FAST_CPU_SIMD": cap},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"DDPM_FAST_CPU_SIMD={cap!r} is not one of avx512, avx2, none" in result.stderr) is warned, result.stderr


@requires_extension
@pytest.mark.parametrize("shape, groups", [((1, 32, 8, 8), 1), ((1, 4, 4, 4), 1), ((1, 8, 8, 8), 1),
                                           ((1, 6, 3, 5), 2), ((3, 12, 5, 7), 4), ((2, 16, 9, 9), 8)])
def test_cpu_backward_does_not_depend_on_the_thread_count(shape, groups):
    """Short rows with fewer (sample, group) blocks than threads took another route,
    whose row sums round differently: 1 and 2 threads gave other dx, dw and db bits."""
    g = torch.Generator().manual_seed(0)
    x, dy = (torch.randn(shape, generator=g) for _ in range(2))
    w, b, add = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g), torch.randn(shape[:2], generator=g)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            leaves = [t.clone().requires_grad_() for t in (x, w, b, add)]
            y = ops.group_norm_silu(leaves[0], groups, leaves[1], leaves[2], add=leaves[3], backend="cpu")
            grads.append(torch.autograd.grad(y, leaves, dy))
    finally:
        torch.set_num_threads(threads)
    for other in grads[1:]:
        for a, o in zip(grads[0], other):
            assert torch.equal(a, o)


@requires_extension
@pytest.mark.parametrize("act", [True, False], ids=["silu", "plain"])
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_backward_of_one_long_row_group(act, threads):
    """The NCHW backward with fewer (sample, group) blocks than threads and rows
    longer than the short-row route's (1 sample, 1 group, 12x12 maps): its
    passes then run over the channels' rows, each row a task; every row's dx and
    add gradient must come out (on 2 threads no other test took this route).
    Against a float64 reference."""
    x, w, b, add = inputs((1, 8, 12, 12), torch.float32, "contiguous", "cpu", True, True)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        leaves = [t.clone().requires_grad_() for t in (x, w, b, add)]
        y = ops.group_norm_silu(leaves[0], 1, leaves[1], leaves[2], add=leaves[3], act=act, backend="cpu")
        grads = torch.autograd.grad(y, leaves, dy)
    finally:
        torch.set_num_threads(before)
    ref_leaves = [t.double().requires_grad_() for t in (x, w, b, add)]
    x64, w64, b64, add64 = ref_leaves
    want = torch.autograd.grad(reference(x64, 1, w64, b64, add64, act), ref_leaves, dy.double())
    for name, got, expected in zip(("x", "weight", "bias", "add"), grads, want):
        scale = max(1.0, expected.abs().max().item())
        torch.testing.assert_close(got.double() / scale, expected / scale, atol=1e-5, rtol=1e-5, msg=name)


@requires_extension
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("eps", [1e-6, 3e-3])
def test_cpu_float64_kernel_takes_the_eps_given(layout, eps):
    """The C++ kernel's float64 path (gradcheck's) with small-variance data
    (0.05^2), where eps matters: against F.group_norm in float64 with that eps,
    to float64 rounding (the float32 paths are checked in test_group_norm_silu.py)."""
    g = torch.Generator().manual_seed(5)
    x = 0.05 * torch.randn(2, 6, 5, 7, generator=g, dtype=torch.float64)
    x = x.to(memory_format=torch.channels_last) if layout == "channels_last" else x
    w, b, dy = (torch.randn(shape, generator=g, dtype=torch.float64) for shape in ((6,), (6,), (2, 6, 5, 7)))
    add = 0.05 * torch.randn(2, 6, generator=g, dtype=torch.float64)
    leaves = [v.clone().requires_grad_() for v in (x, w, b, add)]
    y = ops.group_norm_silu(leaves[0], 3, leaves[1], leaves[2], eps, add=leaves[3], backend="cpu")
    grads = torch.autograd.grad(y, leaves, dy)
    want_leaves = [v.clone().requires_grad_() for v in (x, w, b, add)]
    xw, ww, bw, aw = want_leaves
    want = F.silu(F.group_norm(xw + aw[:, :, None, None], 3, ww, bw, eps))
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    for name, got, ref in zip(("x", "weight", "bias", "add"), grads, torch.autograd.grad(want, want_leaves, dy)):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9, msg=name)
