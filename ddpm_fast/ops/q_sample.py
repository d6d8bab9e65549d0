"""Fused forward diffusion: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Ho et al. eq. 4),
with eps given or drawn in-kernel from the shared stream (ops.randn)."""

from __future__ import annotations

import torch

from .. import _extension
from ..schedules import NoiseSchedule
from . import _args, _backend
from ._backend import resolve_backend
from .randn import normal_reference

__all__ = ["q_sample"]

_OP = "q_sample"


def _reference(x0, t, sqrt_ab, sqrt_1m_ab, noise, seed, offset):
    """The definition: float32 arithmetic on the float32 tables, noise indexed by
    logical (NCHW) position whatever x0's memory format."""
    if noise is None:
        counter = torch.arange(x0.numel(), device=x0.device, dtype=torch.int64).reshape(x0.shape) + offset
        noise = _args.match_layout(normal_reference(seed, counter), x0)  # eps in x0's dtype and memory format
    shape = (-1,) + (1,) * (x0.dim() - 1)
    a = _args.timestep_rows(sqrt_ab, t).reshape(shape)
    b = _args.timestep_rows(sqrt_1m_ab, t).reshape(shape)
    x_t = (a * x0.float() + b * noise.float()).to(x0.dtype)
    return x_t, noise


def q_sample(
    x0: torch.Tensor,
    t: int | torch.Tensor,
    schedule: NoiseSchedule,
    *,
    noise: torch.Tensor | None = None,
    seed: int | None = None,
    offset: int = 0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample q(x_t | x_0) in one pass over memory; returns ``(x_t, eps)``.

    Args:
        x0: data, N x ... (float32/float16/bfloat16; contiguous or channels_last).
        t: one zero-based timestep for all samples, or an integer tensor with one per sample.
        schedule: the noise schedule.
        noise: eps to use (seed and offset then left out); if None it is drawn in-kernel from the shared stream at
            counters ``offset + i`` (i the logical index) under ``seed``.
        seed: 64-bit seed for the drawn noise; None draws one from torch's generator.
        offset: counter of element 0 of the drawn noise.
        backend: ``auto``, ``reference``, ``cpu``, ``cuda`` or ``triton``.

    x_t has x0's dtype and memory format, and so has eps when drawn; a given
    ``noise`` is returned as eps itself, in its own dtype and memory format (the
    kernels read a copy cast to x0's, when those differ). On the GPU, timesteps
    outside [0, T) in a device tensor make their sample NaN (checking would need a sync).
    """
    x0 = _args.check_float_tensor(x0, "x0", _OP)
    _args.check_schedule(schedule, _OP)
    t = _args.as_timesteps(t, x0, schedule.num_timesteps, _OP)
    if noise is not None:
        noise = _args.check_given_noise(noise, x0, "x0", seed, _OP, offset=offset)
    else:
        seed = _args.as_seed(seed, _OP)
        offset = _args.as_offset(offset, x0.numel(), _OP)
    which = resolve_backend(backend, x0.device, _OP)
    if x0.numel() == 0:  # nothing to launch: the reference, which keeps autograd's graph (of empty tensors)
        which = "reference"
    if which != "reference" and _args.forward_ad._current_level >= 0:
        _args.refuse_tangents(which, _OP, x0=x0, noise=noise)

    x = _args.kernel_layout(x0)
    sqrt_ab = schedule.table("sqrt_alphas_cumprod", x.device)
    sqrt_1m_ab = schedule.table("sqrt_one_minus_alphas_cumprod", x.device)
    given = _args.match_layout(noise, x) if noise is not None else None

    if which == "reference":
        x_t, eps = _reference(x, t, sqrt_ab, sqrt_1m_ab, given, seed, offset)
    elif which == "triton":
        with _backend.triton_launch(x.device):
            if given is None:
                x_t, eps = torch.ops.ddpm_fast.q_sample_randn_triton(x, t, sqrt_ab, sqrt_1m_ab, seed, offset)
            else:
                x_t, eps = torch.ops.ddpm_fast.q_sample_triton(x, t, sqrt_ab, sqrt_1m_ab, given), given
    elif given is None:
        x_t, eps = torch.ops.ddpm_fast.q_sample_randn(x, t, sqrt_ab, sqrt_1m_ab, seed, offset)
    else:
        x_t, eps = torch.ops.ddpm_fast.q_sample(x, t, sqrt_ab, sqrt_1m_ab, given), given
    return x_t, (noise if noise is not None else eps)


def _coefficients(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return _args.timestep_rows(table, t).reshape((-1,) + (1,) * (like.dim() - 1))


def _setup_context(ctx, inputs, output) -> None:
    x0 = inputs[0]
    ctx.save_for_backward(*_args.savable(*inputs[1:4]))  # t and the tables
    ctx.x0_dtype = x0.dtype
    if isinstance(output, tuple):  # (x_t, drawn eps): eps depends on no input
        ctx.mark_non_differentiable(output[1])


def _backward_given_noise(ctx, grad_xt):
    t, sqrt_ab, sqrt_1m_ab = ctx.saved_tensors
    grad_x0 = (_coefficients(sqrt_ab, t, grad_xt) * grad_xt.float()).to(ctx.x0_dtype)
    grad_noise = (_coefficients(sqrt_1m_ab, t, grad_xt) * grad_xt.float()).to(ctx.x0_dtype)
    return grad_x0, None, None, None, grad_noise


def _backward_drawn_noise(ctx, grad_xt, grad_eps):
    t, sqrt_ab, _ = ctx.saved_tensors
    if grad_xt is None:
        return None, None, None, None, None, None
    grad_x0 = (_coefficients(sqrt_ab, t, grad_xt) * grad_xt.float()).to(ctx.x0_dtype)
    return grad_x0, None, None, None, None, None


def _register(name: str, drawn: bool) -> None:
    """Fake implementation (for torch.compile) of one q_sample op, and the
    autograd of the Triton ones (the C++ ops have theirs in csrc/q_sample_autograd.cpp)."""

    if drawn:

        def fake(x0, t, sqrt_ab, sqrt_1m_ab, seed, offset):
            _args.check_fake_devices("x0", x0, t=t, sqrt_alphas_cumprod=sqrt_ab, sqrt_one_minus_alphas_cumprod=sqrt_1m_ab)
            return torch.empty_like(x0), torch.empty_like(x0)

    else:

        def fake(x0, t, sqrt_ab, sqrt_1m_ab, noise):
            _args.check_fake_devices("x0", x0, t=t, sqrt_alphas_cumprod=sqrt_ab, sqrt_one_minus_alphas_cumprod=sqrt_1m_ab,
                                     noise=noise)
            return torch.empty_like(x0)

    if not name.endswith("_triton"):  # triton_op derives its fake from the launcher
        torch.library.register_fake(f"ddpm_fast::{name}")(fake)
        return
    backward = _backward_drawn_noise if drawn else _backward_given_noise
    torch.library.register_autograd(f"ddpm_fast::{name}", backward, setup_context=_setup_context)


def register_triton_autograd() -> None:
    """The autograd of the Triton ops (which ddpm_fast.kernels.q_sample
    registers); called once, by ``_triton`` (see ``_backend.load_triton_ops``)."""
    _register("q_sample_triton", drawn=False)
    _register("q_sample_randn_triton", drawn=True)


if _extension.AVAILABLE:
    _register("q_sample", drawn=False)
    _register("q_sample_randn", drawn=True)
