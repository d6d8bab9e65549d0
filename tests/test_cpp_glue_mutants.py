"""The C++ glue between the kernels and their callers (csrc/*.h argument
checks, csrc/*_autograd.cpp, csrc/ops.cpp): what a mutation round found no
test for. The raw ops (torch.ops.ddpm_fast.*) are reached only by direct
callers, as the ddpm_fast.ops wrappers check first; a check missing there
read memory as the wrong dtype, past an end or out of order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_CUDA, requires_extension
from ddpm_fast import _extension, ops

# The CUDA backward casts its gradients in group_norm_silu.h's param_grads_as, the CPU one in its kernel.
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if HAS_CUDA and _extension.AVAILABLE and _extension.WITH_CUDA else [])

X = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))


def gn(x=X, weight=None, bias=None, add=None, groups=3):
    return torch.ops.ddpm_fast.group_norm_silu(x, weight, bias, add, groups, 1e-5, True)


def gn_backward(mean, rstd, x=X):
    return torch.ops.ddpm_fast.group_norm_silu_backward(torch.ones_like(x), x, None, None, None, mean, rstd, 3, True)


GN_CASES = {
    # [2, 3] viewed with stride 2 out of [2, 6]: read as contiguous it would take the gaps.
    "strided-add": (lambda: gn(add=torch.ones(2, 6)[:, ::2]), r"add must be contiguous of shape \(N, C\) = \(2, 3\), got \[2, 3\]"),
    # One sample's add for two samples: the second would be read past its end.
    "add-of-another-batch": (lambda: gn(add=torch.ones(1, 3)), r"add must be contiguous of shape \(N, C\) = \(2, 3\), got \[1, 3\]"),
    "float64-add": (lambda: gn(add=torch.ones(2, 3, dtype=torch.float64)), "add must be float32 or x's dtype, got Double"),
    "transposed-mean": (lambda: gn_backward(torch.zeros(3, 2).t(), torch.ones(2, 3)), r"mean and rstd must be the forward's contiguous Float \(N, G\) = \(2, 3\) statistics, got \[2, 3\] Float"),
}


@requires_extension
@pytest.mark.parametrize("case", GN_CASES)
def test_raw_group_norm_ops_refuse_bad_add_and_statistics(case):
    call, message = GN_CASES[case]
    with pytest.raises(RuntimeError, match=f"ddpm_fast: {message}"):
        call()


@requires_extension
def test_raw_fill_randn_default_sample_stride_is_one_stream():
    """The schema's sample_stride=0 (omitted): element j of sample n takes
    counter offset + n * per_sample + j, the stream of a flat tensor."""
    a = torch.empty(3, 4)
    flat = torch.empty(12)
    torch.ops.ddpm_fast.fill_randn_(a, 5, 7)
    torch.ops.ddpm_fast.fill_randn_(flat, 5, 7, 0)
    assert torch.equal(a.reshape(-1), flat)


@requires_extension
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_second_derivatives_use_the_given_eps(layout):
    """create_graph=True takes the differentiable backward (ATen group_norm
    recomputed): with small-variance data eps matters, and the eps the forward
    was given must be the one used there too."""
    g = torch.Generator().manual_seed(3)
    x = 0.05 * torch.randn(2, 6, 3, 4, generator=g, dtype=torch.float64)
    x = x.to(memory_format=torch.channels_last) if layout == "channels_last" else x
    w, b = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    results = []
    for which in ("cpu", "reference"):
        xs = x.clone().requires_grad_()
        y = ops.group_norm_silu(xs, 3, w, b, 3e-3, backend=which)
        (gx,) = torch.autograd.grad(y.square().sum(), xs, create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum(), xs)[0])
    exact = x.clone().requires_grad_()
    y = F.silu(F.group_norm(exact, 3, w, b, 3e-3))
    (gx,) = torch.autograd.grad(y.square().sum(), exact, create_graph=True)
    want = torch.autograd.grad(gx.square().sum(), exact)[0]
    for got in results:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


@requires_extension
@pytest.mark.parametrize("act", [True, False], ids=["silu", "plain"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_recorded_gradients_of_every_input_match_the_plain_backward(dtype, act):
    """create_graph=True (a gradient penalty) takes the differentiable backward:
    it must give the gradients of x, weight, bias and add, each as the plain
    backward (the kernel) does; the tests before asked it for x's alone. With
    act=False it must not apply SiLU there either (gradgradcheck could not see
    that: it checks the recorded first derivative against itself)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 6, 3, 4, generator=g).to(dtype)
    w, b, add = (torch.randn(shape, generator=g).to(dtype) for shape in ((6,), (6,), (2, 6)))
    dy = torch.randn(2, 6, 3, 4, generator=g).to(dtype)
    grads = []
    for create_graph in (False, True):
        leaves = [v.clone().requires_grad_() for v in (x, w, b, add)]
        y = ops.group_norm_silu(leaves[0], 3, leaves[1], leaves[2], add=leaves[3], act=act, backend="cpu")
        grads.append(torch.autograd.grad(y, leaves, dy, create_graph=create_graph))
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    for plain, recorded in zip(*grads):
        torch.testing.assert_close(recorded, plain, **tol)


@requires_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w_dtype, b_dtype, add_dtype", [
    (torch.float32, torch.bfloat16, torch.float32), (torch.bfloat16, torch.float32, torch.bfloat16),
    (None, torch.float32, None),
], ids=lambda d: "none" if d is None else str(d)[6:])
def test_raw_backward_gives_each_gradient_in_its_inputs_dtype(device, w_dtype, b_dtype, add_dtype):
    """dweight, dbias and dadd in the dtype of the weight, bias and add they are
    for (x's where there was none): the raw op's callers get them as they are."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 6, 3, 3, generator=g).to(device, torch.bfloat16)
    w, b, add = (None if d is None else torch.randn(shape, generator=g).to(device, d)
                 for shape, d in (((6,), w_dtype), ((6,), b_dtype), ((2, 6), add_dtype)))
    _, mean, rstd = torch.ops.ddpm_fast.group_norm_silu(x, w, b, add, 3, 1e-5, True)
    dx, dw, db, dadd = torch.ops.ddpm_fast.group_norm_silu_backward(torch.ones_like(x), x, w, b, add, mean, rstd, 3, True)
    assert dx.dtype == torch.bfloat16
    assert (dw.dtype, db.dtype, dadd.dtype) == tuple(x.dtype if d is None else d for d in (w_dtype, b_dtype, add_dtype))


@requires_extension
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_second_derivatives_with_a_bias_and_no_weight(backend):
    """A bias without a weight under create_graph=True: torch 2.11's own
    group_norm double backward fails there ("shape '[0]' is invalid"), so the
    differentiable backward gives a weight of ones; the result is the one with
    that weight given."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 6, 3, 4, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    results = []
    for w in (None, torch.ones(6, dtype=torch.float64)):
        xs, bs = x.clone().requires_grad_(), b.clone().requires_grad_()
        y = ops.group_norm_silu(xs, 3, w, bs, backend=backend)
        (gx,) = torch.autograd.grad(y.square().sum(), xs, create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum(), [xs, bs]))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@requires_extension
def test_statistics_are_not_differentiable():
    """The forward's mean and rstd come out not requiring grad even when x does
    (the backward ignores their gradients: a loss on them would get none)."""
    x = X.clone().requires_grad_()
    y, mean, rstd = gn(x)
    assert y.requires_grad and not mean.requires_grad and not rstd.requires_grad
