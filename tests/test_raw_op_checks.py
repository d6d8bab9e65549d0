"""The raw ops, called as torch.ops.ddpm_fast.* (the wrappers in ddpm_fast.ops
check first, so only direct callers reach these): bad arguments are a
RuntimeError naming them, from the Triton ops in the C++ ops' own words.

The Triton ops checked nothing: an out shorter than x corrupted the heap
(SIGABRT), an empty t segfaulted, noise of another shape was read past its
end (values of 4e18), and a wrong dtype or layout silently gave garbage. On a
GPU each would have been an illegal memory access or a wrong result."""

from __future__ import annotations

import pytest
import torch

from ddpm_fast import NoiseSchedule
from conftest import requires_extension

pytest.importorskip("triton")
from ddpm_fast.ops import _backend  # noqa: E402

S = NoiseSchedule("linear", timesteps=100)
X = torch.randn(2, 3, 4, 5)
CL = X.to(memory_format=torch.channels_last)
T2 = torch.tensor([3, 7])
SAB = S.sqrt_alphas_cumprod.float()
S1M = S.sqrt_one_minus_alphas_cumprod.float()
TABLE = S.step_table("fixed_large")


def q_sample(x0=X, t=T2, sab=SAB, s1m=S1M, noise=None):
    if noise is None:
        return "q_sample_randn", (x0, t, sab, s1m, 1, 0)
    return "q_sample", (x0, t, sab, s1m, noise)


def ddpm_step(x=X, eps=None, t=T2, table=TABLE, noise=None, sample_stride=60, step_stride=0, out=None, mi=None):
    eps = torch.randn_like(x) if eps is None else eps
    out = torch.empty_like(x) if out is None else out
    return "ddpm_step_", (x, eps, t, table, noise, 1, 0, sample_stride, step_stride, False, out, mi)


def randn(out=torch.empty(2, 3), sample_stride=0):
    return "fill_randn_", (out, 1, 0, sample_stride)


def gn(x=X, weight=None, bias=None, add=None, groups=3):
    return "group_norm_silu", (x, weight, bias, add, groups, 1e-5, True)


def gn_backward(dy=X, x=X, mean=torch.zeros(2, 3), rstd=torch.ones(2, 3), groups=3):
    return "group_norm_silu_backward", (dy, x, None, None, None, mean, rstd, groups, True)


CASES = {
    # q_sample
    "noise-of-another-shape": (q_sample(noise=torch.randn(2, 3, 4, 4)), "noise has shape"),
    "noise-of-another-dtype": (q_sample(noise=X.half()), "noise is Half but x0 is Float"),
    "noise-in-another-layout": (q_sample(noise=torch.randn_like(CL)), "noise must have the memory format of x0"),
    "empty-t": (q_sample(t=torch.tensor([], dtype=torch.long)), r"t must be a scalar or have one entry per sample \(2\), got shape \[0\]"),
    "int32-t": (q_sample(t=T2.int()), "t must be int64"),
    "2-d-t": (q_sample(t=T2.view(2, 1)), "t must be a scalar or have one entry per sample"),
    # [3, 7] viewed with stride 2: a kernel reading t as contiguous would take 3 and 0, the gap
    "strided-t": (q_sample(t=torch.tensor([3, 0, 7, 0])[::2]), "t must be contiguous"),
    "float64-x0": (q_sample(x0=X.double()), "x0 must be float32, float16 or bfloat16"),
    "0-d-x0": (q_sample(x0=torch.tensor(1.0), t=torch.tensor(1)), "x0 must have a batch dimension"),
    "transposed-x0": (q_sample(x0=X.transpose(2, 3)), "x0 must be contiguous or channels_last"),
    "float64-table": (q_sample(sab=SAB.double()), "sqrt_alphas_cumprod must be a contiguous 1-d float32 table"),
    "empty-table": (q_sample(sab=SAB[:0], s1m=S1M[:0]), "sqrt_alphas_cumprod is empty"),
    "tables-of-two-lengths": (q_sample(s1m=S1M[:50]), "coefficient tables differ in length: 100 vs 50"),
    # the other way round: t = 97 would be read past sqrt_alphas_cumprod's 50 entries
    "shorter-sqrt-alphas-cumprod": (q_sample(sab=SAB[:50], noise=X), "coefficient tables differ in length: 50 vs 100"),
    # ddpm_step_
    "short-out": (ddpm_step(out=torch.empty(1, 3, 4, 5)), "out has shape"),
    "model-input-of-another-shape": (ddpm_step(mi=torch.empty(2, 3, 4)), "model_input has shape"),
    "float64-model-input": (ddpm_step(mi=X.double()), "model_input must be float32, float16 or bfloat16"),
    "transposed-model-input": (ddpm_step(mi=torch.randn(2, 3, 5, 4).transpose(2, 3)), "model_input must be contiguous or channels_last"),
    "out-of-another-dtype": (ddpm_step(out=X.half()), "out is Half but x_t is Float"),
    "eps-of-another-shape": (ddpm_step(eps=torch.randn(2, 3, 4, 4)), "eps has shape"),
    "eps-in-another-layout": (ddpm_step(eps=torch.randn_like(CL)), "eps must have the memory format of x_t"),
    "7-column-table": (ddpm_step(table=TABLE[:, :7].contiguous()), r"coefficients must be a contiguous float32 \(T, 8\) step table, got Float \[100, 7\]"),
    # the step table's columns read as rows; no rows (t clamped to [0, -1] would read before it)
    "column-major-step-table": (ddpm_step(table=TABLE.t().contiguous().t()), r"coefficients must be a contiguous float32 \(T, 8\) step table"),
    "empty-step-table": (ddpm_step(table=TABLE[:0]), r"coefficients must be a contiguous float32 \(T, 8\) step table, got Float \[0, 8\]"),
    "negative-stride": (ddpm_step(step_stride=-1), "noise strides must be >= 0"),
    "step-noise-of-another-shape": (ddpm_step(noise=torch.randn(3, 3, 4, 5)), "noise has shape"),
    "step-t-too-long": (ddpm_step(t=torch.tensor([1, 2, 3])), "t must be a scalar or have one entry per sample"),
    # fill_randn_
    "float64-randn-out": (randn(out=torch.empty(2, 3, dtype=torch.float64)), "randn output must be float32"),
    "transposed-randn-out": (randn(out=torch.empty(3, 2).t()), "randn output must be contiguous"),
    "negative-sample-stride": (randn(sample_stride=-1), "sample_stride must be >= 0"),
    # group_norm_silu and its backward
    "no-groups": (gn(groups=0), r"channels \(3\) must be divisible by num_groups \(0\)"),
    "groups-not-dividing-channels": (gn(groups=2), r"channels \(3\) must be divisible by num_groups \(2\)"),
    "weight-of-another-length": (gn(weight=torch.ones(4)), r"weight and bias must be contiguous of shape \(C,\)"),
    "strided-bias": (gn(bias=torch.ones(6)[::2]), r"weight and bias must be contiguous of shape \(C,\)"),
    "float64-weight": (gn(weight=torch.ones(3, dtype=torch.float64)), "weight/bias must be float32 or x's dtype"),
    "add-of-another-shape": (gn(add=torch.ones(2, 4)), r"add must be contiguous of shape \(N, C\)"),
    "1-d-x": (gn(x=torch.randn(6), groups=1), "x must be N x C x ..., got 1 dims"),
    "transposed-x": (gn(x=X.transpose(2, 3)), "x must be contiguous or channels_last"),
    "dy-of-another-shape": (gn_backward(dy=torch.randn(2, 3, 4, 4)), "dy must have x's shape and dtype"),
    "mean-of-another-shape": (gn_backward(mean=torch.zeros(2, 4)), r"mean and rstd must be the forward's contiguous Float \(N, G\) = \(2, 3\) statistics, got \[2, 4\] Float"),
    "float64-rstd": (gn_backward(rstd=torch.ones(2, 3, dtype=torch.float64)), "mean and rstd must be the forward's"),
    # One argument on the meta device: the call dispatches to the op's fake,
    # which returned uninitialized memory on x's device for the C++ ops.
    "meta-t": (q_sample(t=T2.to("meta")), "t is on meta but"),
    "meta-table": (q_sample(sab=SAB.to("meta"), noise=X), "sqrt_alphas_cumprod is on meta but"),
    "meta-noise": (q_sample(noise=X.to("meta")), "noise is on meta but x0 is on cpu"),
    "meta-step-eps": (ddpm_step(eps=X.to("meta")), "eps is on meta but x_t is on cpu"),
    "meta-step-out": (ddpm_step(out=X.to("meta")), "out is on meta but x_t is on cpu"),
    "meta-add": (gn(add=torch.ones(2, 3, device="meta")), "add is on meta but x is on cpu"),
    "meta-dy": (gn_backward(dy=X.to("meta")), "dy is on meta but x is on cpu"),
}


TRITON_NAMES = {"q_sample_randn": "q_sample_randn_triton", "q_sample": "q_sample_triton",
                "ddpm_step_": "ddpm_step_triton_", "fill_randn_": "fill_randn_triton_",
                "group_norm_silu": "group_norm_silu_triton", "group_norm_silu_backward": "group_norm_silu_triton_backward"}


def _triton(name: str):
    _backend.load_triton_ops()
    return getattr(torch.ops.ddpm_fast, TRITON_NAMES[name])


@pytest.mark.parametrize("case", CASES)
def test_triton_ops_refuse_bad_arguments(case):
    (name, args), message = CASES[case]
    with pytest.raises(RuntimeError, match=f"^ddpm_fast: {message}"):
        _triton(name)(*args)


@requires_extension
@pytest.mark.parametrize("case", CASES)
def test_the_cpp_ops_refuse_them_in_the_same_words(case):
    (name, args), message = CASES[case]
    with pytest.raises(RuntimeError, match=f"ddpm_fast: {message}"):
        getattr(torch.ops.ddpm_fast, name)(*args)


def test_a_triton_step_refuses_an_out_partially_over_its_input():
    """In place (out is x_t) stays allowed; an out shifted over x_t would be
    read after other programs wrote it."""
    buf = torch.randn(2 * 60 + 8)
    x, shifted = buf[:120].view(2, 3, 4, 5), buf[8:].view(2, 3, 4, 5)
    step = _triton("ddpm_step_")
    with pytest.raises(ValueError, match="out partially overlaps x_t"):
        step(*ddpm_step(x=x, out=shifted)[1])
    step(*ddpm_step(x=x, out=x)[1])


def test_a_triton_backward_takes_dy_in_either_layout():
    """As the C++ backward does: dy is read in x's memory order."""
    x = CL.clone()
    y, mean, rstd = _triton("group_norm_silu")(x, None, None, None, 3, 1e-5, True)
    dy = torch.randn(x.shape)  # contiguous, x channels_last
    backward = _triton("group_norm_silu_backward")
    got = backward(dy, x, None, None, None, mean, rstd, 3, True)[0]
    want = backward(dy.contiguous(memory_format=torch.channels_last), x, None, None, None, mean, rstd, 3, True)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["fake", "symbolic"])
def test_a_checked_triton_step_still_traces_with_fake_tensors(mode):
    """The overlap check read data pointers, which a fake tensor has none of:
    make_fx (and, on torch 2.11, torch.compile's fake run) failed there."""
    from torch.fx.experimental.proxy_tensor import make_fx

    step = _triton("ddpm_step_")

    def call(x, eps, t, table, out):
        step(x, eps, t, table, None, 1, 0, 60, 0, False, out, None)
        return out

    graph = make_fx(call, tracing_mode=mode)(X, torch.randn_like(X), T2, TABLE, torch.empty_like(X))
    x, eps = torch.randn_like(X), torch.randn_like(X)
    torch.testing.assert_close(graph(x, eps, T2, TABLE, torch.empty_like(x)), call(x, eps, T2, TABLE, torch.empty_like(x)))


@requires_extension
@pytest.mark.parametrize("name", ["ddpm_step_", "fill_randn_"])
def test_the_cpp_in_place_ops_meet_autograd_as_atens_do(name):
    """They wrote below autograd's sight: a tensor saved for a backward, then
    overwritten, gave a silently wrong gradient (no version bump), and an
    argument requiring grad was written with no trace in the graph (a non-leaf
    out back-propagated as if the step were the identity)."""
    op = getattr(torch.ops.ddpm_fast, name)

    def call(out, **args):
        op(*(ddpm_step(out=out, **args) if name == "ddpm_step_" else randn(out=out))[1])

    w = torch.ones(1, requires_grad=True)
    saved = torch.ones_like(X)
    product = (saved * w).sum()  # saves `saved`
    call(saved)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        product.backward()
    with torch.inference_mode():  # a normal tensor's counter moves there too, as for ATen's ops
        version = saved._version
        call(saved)
    assert saved._version > version
    leaf = torch.zeros_like(X, requires_grad=True)
    for out in (leaf, leaf * 1):
        with pytest.raises(RuntimeError, match=f"ddpm_fast::{name}: out requires grad, but this op records no gradient"):
            call(out)
    assert leaf.abs().sum() == 0  # refused before writing
    with torch.no_grad():  # allowed there, as for ATen's in-place ops
        call(leaf)
    assert leaf.abs().sum() > 0
    if name == "ddpm_step_":
        with pytest.raises(RuntimeError, match="ddpm_step_: eps requires grad"):
            call(torch.empty_like(X), eps=torch.randn_like(X, requires_grad=True))
        with torch.inference_mode():
            frozen = torch.zeros_like(X)
        with pytest.raises(RuntimeError, match="out is an inference tensor, which cannot be written outside"):
            call(frozen)
        assert frozen.abs().sum() == 0
