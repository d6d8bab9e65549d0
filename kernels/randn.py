"""fill_randn_ in Triton: the shared normal stream written into a contiguous tensor."""

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .checks import check_randn_out
from .philox import NOISE_ARGS, launchable, philox_normal, split_seed
from .rounding import to_element_type

BLOCK = 1024


@triton.jit(do_not_specialize=NOISE_ARGS)
def fill_randn_kernel(
    out_ptr,  # *T [numel] contiguous output
    numel,  # elements to write
    per_sample,  # elements per sample (index of dim 0)
    sample_stride,  # counter distance between samples
    seed_lo,  # low 32 bits of the seed
    seed_hi,  # high 32 bits of the seed
    offset,  # counter of element 0
    BLOCK: tl.constexpr,  # elements per program
):
    p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = p < numel
    n = p // per_sample
    z = philox_normal(seed_lo, seed_hi, offset + n * sample_stride + (p - n * per_sample))
    tl.store(out_ptr + p, to_element_type(z, out_ptr.dtype.element_ty), mask=mask)


@triton_op("ddpm_fast::fill_randn_triton_", mutates_args={"out"})
def fill_randn_triton_(out: torch.Tensor, seed: int, offset: int, sample_stride: int = 0) -> None:
    check_randn_out(out, sample_stride)
    numel = out.numel()
    if numel == 0:
        return
    per_sample = numel // out.shape[0] if out.dim() > 0 else numel
    seed_lo, seed_hi = split_seed(seed)
    grid = (triton.cdiv(numel, BLOCK),)
    launchable(fill_randn_kernel)[grid](
        out, numel, per_sample, sample_stride or per_sample, seed_lo, seed_hi, offset, BLOCK=BLOCK
    )
