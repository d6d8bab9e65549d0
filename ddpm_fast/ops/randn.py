"""The backend-independent Gaussian stream (shared/DESIGN.md, "Noise").

Element i of ``randn(shape, seed, offset)`` (in logical, row-major order) is the
normal of Philox4x32-10 keyed by ``seed`` at counter ``offset + i``; every
backend yields the same numbers to float rounding. ``normal_reference`` is the
definition, in plain PyTorch.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .. import _extension
from .._checks import as_device, is_int
from . import _args, _backend
from ._backend import resolve_backend

__all__ = ["randn", "normal_reference", "philox4x32_reference"]

_MASK32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_ROUNDS = 10


def _mulhilo(constant: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of constant * x for x in [0, 2^32), exactly, in
    int64 arithmetic that never overflows (the constant split in 16-bit halves)."""
    c_hi, c_lo = constant >> 16, constant & 0xFFFF
    a = x * c_hi  # < 2^48
    b = x * c_lo  # < 2^48
    hi = (a + (b >> 16)) >> 16
    lo = (((a & 0xFFFF) << 16) + b) & _MASK32
    return hi, lo


def _uniform(bits: torch.Tensor) -> torch.Tensor:
    signed = torch.where(bits > 0x7FFFFFFF, bits - (1 << 32), bits)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def philox4x32_reference(seed: int, counter: torch.Tensor) -> list[torch.Tensor]:
    """Philox4x32-10 (Salmon et al., SC'11) of the 128-bit counters
    (counter & 0xffffffff, counter >> 32, 0, 0) under the key (seed & 0xffffffff,
    seed >> 32): its four output words, as int64 tensors in [0, 2^32)."""
    seed &= (1 << 64) - 1
    counter = counter.to(torch.int64)
    c0 = counter & _MASK32
    c1 = (counter >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, seed >> 32
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return [c0, c1, c2, c3]


def normal_reference(seed: int, counter: torch.Tensor) -> torch.Tensor:
    """The stream's float32 normals at the int64 counters ``counter`` (any shape)."""
    if torch.compiler.is_compiling():
        # Inductor inlines each op into its readers, so the 10 rounds became one
        # expression rebuilt at every use of every word: a compile of q_sample
        # on this backend had not ended after 7 minutes. One opaque op instead.
        # The op's int is int64: any int seed, as its low 64 bits (the key), in as_seed's signed form.
        key = _args.as_seed(seed & (_args.UINT64 - 1), "normal_reference")
        return torch.ops.ddpm_fast.normal_reference(key, counter)
    return _normal(seed, counter)


@torch.library.custom_op("ddpm_fast::normal_reference", mutates_args=())
def _normal_op(seed: int, counter: torch.Tensor) -> torch.Tensor:
    return _normal(seed, counter)


@_normal_op.register_fake
def _normal_fake(seed: int, counter: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(counter, dtype=torch.float32)


def _normal(seed: int, counter: torch.Tensor) -> torch.Tensor:
    c0, c1, _, _ = philox4x32_reference(seed, counter)
    u1 = torch.clamp_min(_uniform(c0), torch.tensor(1.0e-7, dtype=torch.float32))
    u2 = _uniform(c1)
    theta = torch.tensor(6.283185307179586, dtype=torch.float32) * u2
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(theta)


def _check_shape(shape: object) -> tuple[int, ...]:
    if is_int(shape):
        shape = (shape,)
    # numpy's ints too (sizes read from arrays), as every other count the ops take
    if not isinstance(shape, (tuple, list, torch.Size)) or not all(is_int(s) for s in shape):
        raise TypeError(f"randn: shape must be an int or a sequence of ints, got {shape!r}")
    shape = tuple(s if type(s) is int else int(s) for s in shape)  # (a traced size stays symbolic)
    if any(s < 0 for s in shape):
        raise ValueError(f"randn: shape must not have negative sizes, got {shape}")
    return shape


def randn(
    shape: int | Sequence[int],
    seed: int,
    offset: int = 0,
    *,
    sample_stride: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> torch.Tensor:
    """A tensor of the shared normal stream.

    Element i (row-major) is normal(seed, offset + i). With ``sample_stride``,
    element j of sample n (index of dim 0) is normal(seed, offset + n *
    sample_stride + j) instead: each sample its own counter range (the Sampler
    uses 2^32, so a sample's noise does not depend on its batch).
    """
    shape = _check_shape(shape)
    if dtype not in _args.SUPPORTED_DTYPES:
        raise TypeError(f"randn: dtype must be float32, float16 or bfloat16, got {dtype}")
    device = as_device("cpu" if device is None else device, "randn: device")
    seed = _args.as_seed(seed, "randn")
    out = torch.empty(shape, device=device, dtype=dtype)
    n = shape[0] if shape else 1  # 1-d too: each element is a sample
    per_sample = out.numel() // n if n else 0
    offset, stride = _args.as_noise_counters(offset, sample_stride, n, per_sample, "randn")
    which = resolve_backend(backend, device, "randn")
    if out.numel() == 0:
        return out
    if which == "reference":
        i = torch.arange(out.numel(), device=device, dtype=torch.int64)
        counter = offset + (i // per_sample) * stride + i % per_sample
        return normal_reference(seed, counter).reshape(shape).to(dtype)
    if which == "triton":
        with _backend.triton_launch(out.device):
            torch.ops.ddpm_fast.fill_randn_triton_(out, seed, offset, stride)
    else:
        torch.ops.ddpm_fast.fill_randn_(out, seed, offset, stride)
    return out


if _extension.AVAILABLE:

    @torch.library.register_fake("ddpm_fast::fill_randn_")
    def _fill_randn_fake(out: torch.Tensor, seed: int, offset: int, sample_stride: int = 0) -> None:
        return None
