"""Shared by the GroupNorm+SiLU tests (test_group_norm_silu.py, _cpu.py,
_triton.py, _cluster.py): the cases, tolerances, the float reference, inputs,
and the forward+backward comparison against the reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conftest import layout_params, poisoned_outputs
from ddpm_fast import ops

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


def case_id(case: tuple) -> str:
    """A (shape, groups) case's test id: 2x6x5x7-g3."""
    return f"{'x'.join(map(str, case[0]))}-g{case[1]}"


def layout_cases(cases: list) -> list:
    """(layout, case) parameters of (shape, groups) cases: channels_last for the 4-d ones only."""
    return layout_params(cases, shape=lambda case: case[0], case_id=case_id)


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
        assert len(shape) == 4, "channels_last needs a 4-d shape: parametrize with conftest.layout_params"
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    w = (torch.randn(c, generator=g) + 1).to(dtype) if affine else None
    b = torch.randn(c, generator=g).to(dtype) if affine else None
    add = torch.randn(shape[:2], generator=g).to(dtype) if with_add else None
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return move(x), move(w), move(b), move(add)


def assert_matches_reference(device, backend, dtype, layout, case, affine, with_add, act):
    shape, groups = case
    x, w, b, add = inputs(shape, dtype, layout, device, affine, with_add)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, add)]
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(dtype).to(device)
    with poisoned_outputs(device, x.numel() * 4):  # the backward's gradients too
        y = ops.group_norm_silu(leaves[0], groups, leaves[1], leaves[2], add=leaves[3], act=act, backend=backend)
        assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous() == x.is_contiguous()
        y.backward(dy)

    ref_leaves = [t.detach().cpu().float().requires_grad_() if t is not None else None for t in (x, w, b, add)]
    y_ref = reference(ref_leaves[0], groups, ref_leaves[1], ref_leaves[2], ref_leaves[3], act)
    y_ref.backward(dy.cpu().float())
    # The reference backend in a 16-bit dtype is PyTorch's own ops in that dtype,
    # which round their intermediates (x + add, y before SiLU, the gradients
    # between the ops) to it: GRAD_TOL, which bounds one rounding of a float32
    # result, does not hold for it (float16: 1.4e-3 in the add gradient of
    # groups of one channel, where that gradient cancels to about 0); TOL's does.
    fwd_tol, grad_tol = TOL[dtype][0], (TOL[dtype][1] if backend == "reference" else GRAD_TOL[dtype])
    torch.testing.assert_close(y.cpu().float(), y_ref, **fwd_tol)
    for name, got, want in zip(("x", "weight", "bias", "add"), leaves, ref_leaves):
        if got is None:
            continue
        assert got.grad is not None, name
        scale = max(1.0, want.grad.abs().max().item())  # weight/bias grads sum over N*H*W
        torch.testing.assert_close(got.grad.cpu().float() / scale, want.grad / scale, **grad_tol, msg=name)


def assert_bfloat16_rounded_once(device, backend, layout, shape, groups):
    """y and dx in bfloat16 are the backend's own float32 results for the same
    inputs, rounded to nearest: they differ only where the two runs' float32
    values straddle a rounding boundary, which is rare. (Under Triton's CPU
    interpreter, whose bfloat16 cast truncates, half of y and of dx differed
    before the kernels rounded by bits; CI then checked a rounding no GPU does.)"""
    x, w, b, add = inputs(shape, torch.bfloat16, layout, device, True, True)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(device)
    runs = []
    for dtype in (torch.bfloat16, torch.float32):
        xs = x.detach().to(dtype).requires_grad_()
        y = ops.group_norm_silu(xs, groups, w.to(dtype), b.to(dtype), add=add.to(dtype), backend=backend)
        y.backward(dy.to(dtype))
        runs.append((y.detach().cpu(), xs.grad.cpu()))
    for name, got, want in zip(("y", "dx"), runs[0], runs[1]):
        assert got.dtype == torch.bfloat16, name
        differ = (got != want.to(torch.bfloat16)).float().mean().item()
        assert differ < 0.01, (name, differ)


def assert_far_first_value_statistics(shape, channels_last):
    """One group (x of `shape`, N = 1) of N(0, 1) data whose first value is
    3e3, on CUDA: the op's mean and rstd to float32 accuracy against float64
    (statistics about a shift that is far from the values would cancel)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
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
