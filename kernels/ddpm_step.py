"""The reverse step (csrc/ddpm_step.h) in Triton: one read of x_t and eps, one
write of x_{t-1} and optionally of the next model input."""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .checks import check_ddpm_step_args
from .philox import NOISE_ARGS, launchable, philox_normal, split_seed
from .rounding import to_element_type

BLOCK = 1024


@triton.jit(do_not_specialize=NOISE_ARGS)
def ddpm_step_kernel(
    x_ptr,  # *X [numel] x_t, memory order of the tensor
    eps_ptr,  # *E [numel] model output, x_t's memory order
    t_ptr,  # *i64 [1] or [N] timesteps
    t_stride,  # 0: one timestep for all samples, 1: one per sample
    table_ptr,  # *f32 [T, 8] step table (schedules.STEP_COLUMNS)
    num_steps,  # T; an out-of-range timestep yields NaN
    noise_ptr,  # *X [numel] given z (HAS_NOISE)
    out_ptr,  # *X [numel] x_{t-1}; may alias x_ptr
    mi_ptr,  # *M [numel] next model input (MODEL_INPUT > 0)
    numel,  # elements
    per_sample,  # elements per sample
    inner,  # extent of the fastest memory index within a sample (H*W, or C if channels_last)
    outer,  # extent of the other (C, or H*W if channels_last; 1 unless 4-d)
    seed_lo,  # low 32 bits of the seed
    seed_hi,  # high 32 bits of the seed
    offset,  # noise counter base
    sample_stride,  # counter distance between samples
    step_stride,  # counter distance between timesteps
    CLIP: tl.constexpr,  # clip the predicted x0 to [-1, 1]
    HAS_NOISE: tl.constexpr,  # z given rather than drawn
    CHANNELS_LAST: tl.constexpr,  # x is NHWC: the logical index is the transposed position
    MODEL_INPUT: tl.constexpr,  # 0: none, 1: same memory format as x, 2: the other one
    BLOCK: tl.constexpr,  # elements per program
):
    p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = p < numel
    x = tl.load(x_ptr + p, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(eps_ptr + p, mask=mask, other=0.0).to(tl.float32)
    n = p // per_sample
    step = tl.load(t_ptr + n * t_stride, mask=mask, other=0)
    valid = mask & (step >= 0) & (step < num_steps)
    row = table_ptr + step * 8
    if CLIP:
        k2 = tl.load(row + 2, mask=valid, other=float("nan"))
        k3 = tl.load(row + 3, mask=valid, other=float("nan"))
        c1 = tl.load(row + 4, mask=valid, other=float("nan"))
        c2 = tl.load(row + 5, mask=valid, other=float("nan"))
        x0 = k2 * x - k3 * e
        x0 = tl.where(x0 < -1.0, -1.0, tl.where(x0 > 1.0, 1.0, x0))  # NaN stays NaN
        y = c1 * x0 + c2 * x
    else:
        a = tl.load(row, mask=valid, other=float("nan"))
        b = tl.load(row + 1, mask=valid, other=float("nan"))
        y = a * x + b * e
    sigma = tl.load(row + 6, mask=valid, other=0.0)
    q = p - n * per_sample
    q_other = (q % inner) * outer + q // inner
    if HAS_NOISE:
        z = tl.load(noise_ptr + p, mask=mask, other=0.0).to(tl.float32)
    else:
        if CHANNELS_LAST:
            j = q_other
        else:
            j = q
        z = philox_normal(seed_lo, seed_hi, offset + n * sample_stride + step * step_stride + j)
    y = tl.where(sigma != 0.0, y + sigma * z, y)
    tl.store(out_ptr + p, to_element_type(y, out_ptr.dtype.element_ty), mask=mask)
    if MODEL_INPUT == 1:
        tl.store(mi_ptr + p, to_element_type(y, mi_ptr.dtype.element_ty), mask=mask)
    if MODEL_INPUT == 2:
        tl.store(mi_ptr + n * per_sample + q_other, to_element_type(y, mi_ptr.dtype.element_ty), mask=mask)


@triton_op("ddpm_fast::ddpm_step_triton_", mutates_args={"out", "model_input"})
def ddpm_step_triton_(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    coefficients: torch.Tensor,
    noise: Optional[torch.Tensor],
    seed: int,
    offset: int,
    sample_stride: int,
    step_stride: int,
    clip_denoised: bool,
    out: torch.Tensor,
    model_input: Optional[torch.Tensor],
) -> None:
    check_ddpm_step_args(x_t, eps, t, coefficients, noise, sample_stride, step_stride, out, model_input)
    numel = x_t.numel()
    if numel == 0:
        return
    channels_last = x_t.dim() == 4 and not x_t.is_contiguous()
    four_d = x_t.dim() == 4
    per_sample = numel // x_t.shape[0]
    channels = x_t.shape[1] if four_d else 1
    spatial = x_t.shape[2] * x_t.shape[3] if four_d else per_sample
    mode = 0
    if model_input is not None:
        mode = 1 if model_input.is_contiguous() == (not channels_last) else 2
    seed_lo, seed_hi = split_seed(seed)
    grid = (triton.cdiv(numel, BLOCK),)
    launchable(ddpm_step_kernel)[grid](
        x_t,
        eps,
        t,
        1 if t.dim() == 1 and t.numel() > 1 else 0,
        coefficients,
        coefficients.shape[0],
        noise if noise is not None else x_t,
        out,
        model_input if model_input is not None else out,
        numel,
        per_sample,
        channels if channels_last else spatial,
        spatial if channels_last else channels,
        seed_lo,
        seed_hi,
        offset,
        sample_stride,
        step_stride,
        CLIP=clip_denoised,
        HAS_NOISE=noise is not None,
        CHANNELS_LAST=channels_last,
        MODEL_INPUT=mode,
        BLOCK=BLOCK,
    )
