"""GroupNorm + SiLU in Triton, forward and backward (math: csrc/group_norm_silu.h).

Forward: one program per (sample, group) computes the mean, then the variance
about it (two passes, fp32), then writes y. Backward: one program per (sample,
channel) forms A = sum du*xhat, B = sum du, X = sum xhat; a second kernel turns
the group sums of w*A and w*B into dx and dadd.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .philox import launchable

BLOCK = 1024


@triton.jit
def _index(n, c, s, C, S, CHANNELS_LAST: tl.constexpr):
    """Memory index of element (n, c, s) of x viewed as N x C x S."""
    if CHANNELS_LAST:
        return (n * S + s) * C + c
    return (n * C + c) * S + s


@triton.jit
def _load_h(x_ptr, add_ptr, n, c0, start, count, C, S, HAS_ADD: tl.constexpr, CHANNELS_LAST: tl.constexpr,
            BLOCK: tl.constexpr):
    """Group elements start .. start+BLOCK of h = x + add: group element i is
    channel c0 + i // S at position i % S. Returns (h, mask, channel, memory index)."""
    i = start + tl.arange(0, BLOCK)
    mask = i < count
    c = c0 + i // S
    idx = _index(n, c, i % S, C, S, CHANNELS_LAST)
    h = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        h += tl.load(add_ptr + n * C + c, mask=mask, other=0.0).to(tl.float32)
    return h, mask, c, idx


@triton.jit
def gn_forward_kernel(
    x_ptr,  # *T [N, C, S] input, NCHW or NHWC memory
    w_ptr,  # *P [C] weight (HAS_W)
    b_ptr,  # *P [C] bias (HAS_B)
    add_ptr,  # *P [N, C] added before the norm (HAS_ADD)
    y_ptr,  # *T [N, C, S] output, x's memory order
    mean_ptr,  # *f32 [N, G] group means
    rstd_ptr,  # *f32 [N, G] group 1/sqrt(var + eps)
    C,  # channels
    S,  # spatial elements per channel
    G,  # groups
    eps,  # variance epsilon
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_ADD: tl.constexpr,
    ACT: tl.constexpr,  # apply SiLU
    CHANNELS_LAST: tl.constexpr,
    BLOCK: tl.constexpr,  # elements per iteration
):
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    cg = C // G
    count = cg * S
    c0 = g * cg
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, count, BLOCK):
        h, mask, c, idx = _load_h(x_ptr, add_ptr, n, c0, start, count, C, S, HAS_ADD, CHANNELS_LAST, BLOCK)
        acc += tl.where(mask, h, 0.0)
    mean = tl.sum(acc, axis=0) / count
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, count, BLOCK):
        h, mask, c, idx = _load_h(x_ptr, add_ptr, n, c0, start, count, C, S, HAS_ADD, CHANNELS_LAST, BLOCK)
        d = tl.where(mask, h - mean, 0.0)
        acc += d * d
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / count + eps)
    tl.store(mean_ptr + pid, mean)
    tl.store(rstd_ptr + pid, rstd)
    for start in range(0, count, BLOCK):
        h, mask, c, idx = _load_h(x_ptr, add_ptr, n, c0, start, count, C, S, HAS_ADD, CHANNELS_LAST, BLOCK)
        u = (h - mean) * rstd
        if HAS_W:
            u = u * tl.load(w_ptr + c, mask=mask, other=1.0).to(tl.float32)
        if HAS_B:
            u = u + tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
        if ACT:
            u = u * tl.sigmoid(u)
        tl.store(y_ptr + idx, u.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _xhat_and_du(x_ptr, dy_ptr, w_ptr, b_ptr, add_ptr, idx, n, c, C, mean, rstd, mask,
                 HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, ACT: tl.constexpr):
    h = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        h += tl.load(add_ptr + n * C + c).to(tl.float32)
    xhat = (h - mean) * rstd
    w = 1.0
    if HAS_W:
        w = tl.load(w_ptr + c).to(tl.float32)
    u = xhat * w
    if HAS_B:
        u = u + tl.load(b_ptr + c).to(tl.float32)
    du = tl.load(dy_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if ACT:
        s = tl.sigmoid(u)
        du = du * s * (1.0 + u * (1.0 - s))
    return tl.where(mask, xhat, 0.0), tl.where(mask, du, 0.0), w


@triton.jit
def _channel_and_stats(pid, C, G, mean_ptr, rstd_ptr):
    """Sample and channel of a backward program (one per (n, c)) and its group's statistics."""
    n = pid // C
    c = pid % C
    ng = n * G + c // (C // G)
    return n, c, tl.load(mean_ptr + ng), tl.load(rstd_ptr + ng)


@triton.jit
def gn_backward_sums_kernel(
    dy_ptr, x_ptr, w_ptr, b_ptr, add_ptr,  # as in the forward; dy in x's memory order
    mean_ptr, rstd_ptr,  # *f32 [N, G] forward statistics
    a_ptr, bsum_ptr, xsum_ptr,  # *f32 [N, C] outputs: sum du*xhat, sum du, sum xhat
    C, S, G,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, ACT: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    n, c, mean, rstd = _channel_and_stats(pid, C, G, mean_ptr, rstd_ptr)
    acc_a = tl.zeros([BLOCK], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK], dtype=tl.float32)
    acc_x = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, S, BLOCK):
        s = start + tl.arange(0, BLOCK)
        mask = s < S
        idx = _index(n, c, s, C, S, CHANNELS_LAST)
        xhat, du, w = _xhat_and_du(x_ptr, dy_ptr, w_ptr, b_ptr, add_ptr, idx, n, c, C, mean, rstd, mask,
                                   HAS_W, HAS_B, HAS_ADD, ACT)
        acc_a += du * xhat
        acc_b += du
        acc_x += xhat
    tl.store(a_ptr + pid, tl.sum(acc_a, axis=0))
    tl.store(bsum_ptr + pid, tl.sum(acc_b, axis=0))
    tl.store(xsum_ptr + pid, tl.sum(acc_x, axis=0))


@triton.jit
def gn_backward_dx_kernel(
    dy_ptr, x_ptr, w_ptr, b_ptr, add_ptr, mean_ptr, rstd_ptr,
    a_ptr, bsum_ptr, xsum_ptr,  # *f32 [N, C] from gn_backward_sums_kernel
    dx_ptr,  # *T [N, C, S] output, x's memory order
    dadd_ptr,  # *f32 [N, C] output: sum over S of dh
    C, S, G,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, ACT: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr, BLOCK_CG: tl.constexpr,
):
    pid = tl.program_id(0)
    n, c, mean, rstd = _channel_and_stats(pid, C, G, mean_ptr, rstd_ptr)
    cg = C // G
    c0 = (c // cg) * cg
    k = tl.arange(0, BLOCK_CG)
    kmask = k < cg
    if HAS_W:
        wk = tl.load(w_ptr + c0 + k, mask=kmask, other=0.0).to(tl.float32)
    else:
        wk = tl.where(kmask, 1.0, 0.0)
    s1 = tl.sum(wk * tl.load(bsum_ptr + n * C + c0 + k, mask=kmask, other=0.0), axis=0)
    s2 = tl.sum(wk * tl.load(a_ptr + n * C + c0 + k, mask=kmask, other=0.0), axis=0)
    count = cg * S
    m1 = s1 / count
    m2 = s2 / count
    for start in range(0, S, BLOCK):
        s = start + tl.arange(0, BLOCK)
        mask = s < S
        idx = _index(n, c, s, C, S, CHANNELS_LAST)
        xhat, du, w = _xhat_and_du(x_ptr, dy_ptr, w_ptr, b_ptr, add_ptr, idx, n, c, C, mean, rstd, mask,
                                   HAS_W, HAS_B, HAS_ADD, ACT)
        dx = rstd * (du * w - m1 - xhat * m2)
        tl.store(dx_ptr + idx, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    w_c = 1.0
    if HAS_W:
        w_c = tl.load(w_ptr + c).to(tl.float32)
    dadd = rstd * (w_c * tl.load(bsum_ptr + pid) - S * m1 - tl.load(xsum_ptr + pid) * m2)
    tl.store(dadd_ptr + pid, dadd)


def _layout(x: torch.Tensor):
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // (n * c) if n * c else 0
    channels_last = x.dim() == 4 and not x.is_contiguous()
    return n, c, s, channels_last


@triton_op("ddpm_fast::group_norm_silu_triton", mutates_args=())
def group_norm_silu_triton(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    add: Optional[torch.Tensor],
    num_groups: int,
    eps: float,
    act: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c, s, channels_last = _layout(x)
    y = torch.empty_like(x)
    mean = torch.empty((n, num_groups), device=x.device, dtype=torch.float32)
    rstd = torch.empty((n, num_groups), device=x.device, dtype=torch.float32)
    if x.numel() == 0:
        return y, mean, rstd
    launchable(gn_forward_kernel)[(n * num_groups,)](
        x, weight if weight is not None else x, bias if bias is not None else x, add if add is not None else x,
        y, mean, rstd, c, s, num_groups, eps,
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_ADD=add is not None, ACT=act,
        CHANNELS_LAST=channels_last, BLOCK=BLOCK,
    )
    return y, mean, rstd


@triton_op("ddpm_fast::group_norm_silu_triton_backward", mutates_args=())
def group_norm_silu_triton_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    add: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    act: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c, s, channels_last = _layout(x)
    dx = torch.empty_like(x)
    sums = torch.zeros((3, n, c), device=x.device, dtype=torch.float32)
    dadd = torch.zeros((n, c), device=x.device, dtype=torch.float32)
    if x.numel() > 0:
        flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_ADD=add is not None, ACT=act,
                     CHANNELS_LAST=channels_last, BLOCK=BLOCK)
        params = (weight if weight is not None else x, bias if bias is not None else x, add if add is not None else x)
        launchable(gn_backward_sums_kernel)[(n * c,)](dy, x, *params, mean, rstd, sums[0], sums[1], sums[2], c, s, num_groups, **flags)
        launchable(gn_backward_dx_kernel)[(n * c,)](
            dy, x, *params, mean, rstd, sums[0], sums[1], sums[2], dx, dadd, c, s, num_groups,
            BLOCK_CG=triton.next_power_of_2(c // num_groups), **flags,
        )
    w_type = weight.dtype if weight is not None else x.dtype
    b_type = bias.dtype if bias is not None else x.dtype
    a_type = add.dtype if add is not None else x.dtype
    return dx, sums[0].sum(0).to(w_type), sums[1].sum(0).to(b_type), dadd.to(a_type)
