"""q_sample in Triton: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, eps given or drawn in-kernel."""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .checks import check_q_sample_args
from .philox import NOISE_ARGS, launchable, philox_normal, split_seed
from .rounding import to_element_type

BLOCK = 1024


@triton.jit(do_not_specialize=NOISE_ARGS)
def q_sample_kernel(
    x0_ptr,  # *T [numel] input x_0, in the tensor's memory order
    noise_ptr,  # *T [numel] given noise (HAS_NOISE), else unused
    t_ptr,  # *i64 [1] or [N] timesteps
    t_stride,  # 0: one timestep for all samples, 1: one per sample
    sqrt_ab_ptr,  # *f32 [T] sqrt(abar)
    sqrt_1m_ab_ptr,  # *f32 [T] sqrt(1 - abar)
    num_steps,  # T; an out-of-range timestep yields NaN (no host sync to report it)
    xt_ptr,  # *T [numel] output x_t
    eps_ptr,  # *T [numel] output: the drawn noise (not HAS_NOISE)
    numel,  # elements
    per_sample,  # elements per sample
    channels,  # C of a channels_last N x C x H x W tensor
    spatial,  # H * W of a channels_last tensor
    seed_lo,  # low 32 bits of the seed
    seed_hi,  # high 32 bits of the seed
    offset,  # counter of logical element 0
    HAS_NOISE: tl.constexpr,  # noise given rather than drawn
    CHANNELS_LAST: tl.constexpr,  # memory order N, H, W, C: noise indexed by the NCHW position
    BLOCK: tl.constexpr,  # elements per program
):
    p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = p < numel
    x = tl.load(x0_ptr + p, mask=mask, other=0.0).to(tl.float32)
    step = tl.load(t_ptr + (p // per_sample) * t_stride, mask=mask, other=0)
    valid = mask & (step >= 0) & (step < num_steps)
    a = tl.load(sqrt_ab_ptr + step, mask=valid, other=float("nan"))
    b = tl.load(sqrt_1m_ab_ptr + step, mask=valid, other=float("nan"))
    if HAS_NOISE:
        z = tl.load(noise_ptr + p, mask=mask, other=0.0).to(tl.float32)
    else:
        if CHANNELS_LAST:
            c = p % channels
            q = p // channels
            logical = (q // spatial * channels + c) * spatial + q % spatial
        else:
            logical = p
        # x_t from eps as stored (rounded to x0's dtype, as the reference makes
        # it), so the eps returned is exactly the noise in x_t.
        z = to_element_type(philox_normal(seed_lo, seed_hi, offset + logical), eps_ptr.dtype.element_ty)
        tl.store(eps_ptr + p, z, mask=mask)
        z = z.to(tl.float32)
    y = a * x + b * z
    tl.store(xt_ptr + p, to_element_type(y, xt_ptr.dtype.element_ty), mask=mask)


def _launch(x0, t, sqrt_ab, sqrt_1m_ab, noise: Optional[torch.Tensor], seed: int, offset: int, xt, eps) -> None:
    check_q_sample_args(x0, t, sqrt_ab, sqrt_1m_ab, noise)
    numel = x0.numel()
    if numel == 0:
        return
    channels_last = x0.dim() == 4 and not x0.is_contiguous()
    seed_lo, seed_hi = split_seed(seed)
    grid = (triton.cdiv(numel, BLOCK),)
    launchable(q_sample_kernel)[grid](
        x0,
        noise if noise is not None else x0,
        t,
        1 if t.dim() == 1 and t.numel() > 1 else 0,
        sqrt_ab,
        sqrt_1m_ab,
        sqrt_ab.numel(),
        xt,
        eps if eps is not None else xt,
        numel,
        numel // x0.shape[0],
        x0.shape[1] if channels_last else 1,
        x0.shape[2] * x0.shape[3] if channels_last else 1,
        seed_lo,
        seed_hi,
        offset,
        HAS_NOISE=noise is not None,
        CHANNELS_LAST=channels_last,
        BLOCK=BLOCK,
    )


@triton_op("ddpm_fast::q_sample_randn_triton", mutates_args=())
def q_sample_randn_triton(
    x0: torch.Tensor, t: torch.Tensor, sqrt_ab: torch.Tensor, sqrt_1m_ab: torch.Tensor, seed: int, offset: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    xt = torch.empty_like(x0)
    eps = torch.empty_like(x0)
    _launch(x0, t, sqrt_ab, sqrt_1m_ab, None, seed, offset, xt, eps)
    return xt, eps


@triton_op("ddpm_fast::q_sample_triton", mutates_args=())
def q_sample_triton(
    x0: torch.Tensor, t: torch.Tensor, sqrt_ab: torch.Tensor, sqrt_1m_ab: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    xt = torch.empty_like(x0)
    _launch(x0, t, sqrt_ab, sqrt_1m_ab, noise, 0, 0, xt, None)
    return xt
