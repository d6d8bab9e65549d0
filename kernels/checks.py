"""Argument checks of the raw Triton ops, the same as the C++ ops' (csrc/layout.h
and the ops' headers), in the same words.

The public wrappers (ddpm_fast.ops) check their arguments before they call an
op, but ``torch.ops.ddpm_fast.*_triton`` can be called directly, and a kernel
trusts its pointers and sizes: without these checks a short output or noise
tensor, a wrong-length t or a stray layout was read or written out of bounds
(heap corruption or a segfault under the interpreter, an illegal address on
a GPU) or silently gave garbage. Metadata only: no device sync, nothing that
reads a tensor's values (a CUDA t is not range-checked, as in the CUDA ops).
"""

from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_no_partial_overlap  # shared with the ops' own checks (ops/_args.py)

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
STEP_COLUMNS = 8  # columns of a step table (schedules.STEP_COLUMNS)


# dtypes, shapes and strides as the C++ checks print them (c10's names, [2, 3])
_C10_NAMES = {torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float64: "Double",
              torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
              torch.bool: "Bool"}


def _shown(part: object) -> str:
    if isinstance(part, torch.dtype):
        return _C10_NAMES.get(part, str(part))
    if isinstance(part, (torch.Size, tuple)):
        return str(list(part))
    return str(part)


def _check(ok: bool, *message: object) -> None:
    if not ok:
        raise RuntimeError("ddpm_fast: " + "".join(_shown(part) for part in message))


def is_channels_last_4d(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def check_float_input(x: torch.Tensor, name: str) -> None:
    _check(x.dtype in _FLOATS, name, " must be float32, float16 or bfloat16, got ", x.dtype)
    _check(x.dim() >= 1, name, " must have a batch dimension, got a 0-d tensor")
    _check(x.is_contiguous() or is_channels_last_4d(x), name,
           " must be contiguous or channels_last; call .contiguous() first (strides ", x.stride(), ")")


def check_timesteps(t: torch.Tensor, x: torch.Tensor, name: str) -> None:
    """t: int64, one timestep (0-d) or one per sample (shape [N]), on x's device."""
    _check(t.dtype == torch.int64, name, " must be int64, got ", t.dtype)
    _check(t.device == x.device, name, " is on ", t.device, " but the input is on ", x.device)
    _check(t.dim() == 0 or (t.dim() == 1 and t.shape[0] == x.shape[0]), name,
           " must be a scalar or have one entry per sample (", x.shape[0], "), got shape ", tuple(t.shape))
    _check(t.dim() == 0 or t.stride(0) == 1 or t.shape[0] <= 1, name, " must be contiguous")


def check_coefficient_table(table: torch.Tensor, x: torch.Tensor, name: str) -> None:
    _check(table.dtype == torch.float32 and table.dim() == 1 and table.is_contiguous(),
           name, " must be a contiguous 1-d float32 table")
    _check(table.numel() > 0, name, " is empty")
    _check(table.device == x.device, name, " is on ", table.device, " but the input is on ", x.device)


def check_same_layout(a: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    _check(a.device == ref.device, name, " is on ", a.device, " but ", ref_name, " is on ", ref.device)
    _check(a.shape == ref.shape, name, " has shape ", tuple(a.shape), " but ", ref_name, " has shape ",
           tuple(ref.shape))
    _check(a.dtype == ref.dtype, name, " is ", a.dtype, " but ", ref_name, " is ", ref.dtype)
    same_order = a.is_contiguous() if ref.is_contiguous() else is_channels_last_4d(a)
    _check(same_order, name, " must have the memory format of ", ref_name, " (strides ", a.stride(), " vs ",
           ref.stride(), ")")


def check_q_sample_args(x0: torch.Tensor, t: torch.Tensor, sqrt_ab: torch.Tensor, sqrt_1m_ab: torch.Tensor,
                        noise: Optional[torch.Tensor]) -> None:
    check_float_input(x0, "x0")
    check_timesteps(t, x0, "t")
    check_coefficient_table(sqrt_ab, x0, "sqrt_alphas_cumprod")
    check_coefficient_table(sqrt_1m_ab, x0, "sqrt_one_minus_alphas_cumprod")
    _check(sqrt_ab.numel() == sqrt_1m_ab.numel(), "coefficient tables differ in length: ", sqrt_ab.numel(), " vs ",
           sqrt_1m_ab.numel())
    if noise is not None:
        check_same_layout(noise, x0, "noise", "x0")


def check_ddpm_step_args(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, coefficients: torch.Tensor,
                         noise: Optional[torch.Tensor], sample_stride: int, step_stride: int, out: torch.Tensor,
                         model_input: Optional[torch.Tensor]) -> None:
    check_float_input(x, "x_t")
    check_float_input(eps, "eps")
    _check(eps.device == x.device, "eps is on ", eps.device, " but x_t is on ", x.device)
    _check(eps.shape == x.shape, "eps has shape ", tuple(eps.shape), " but x_t has shape ", tuple(x.shape))
    _check(eps.is_contiguous() if x.is_contiguous() else is_channels_last_4d(eps),
           "eps must have the memory format of x_t")
    check_timesteps(t, x, "t")
    _check(coefficients.dtype == torch.float32 and coefficients.dim() == 2 and coefficients.shape[1] == STEP_COLUMNS
           and coefficients.shape[0] > 0 and coefficients.is_contiguous(),
           "coefficients must be a contiguous float32 (T, 8) step table, got ", coefficients.dtype, " ",
           tuple(coefficients.shape))
    _check(coefficients.device == x.device, "coefficients are on ", coefficients.device, " but x_t is on ", x.device)
    if noise is not None:
        check_same_layout(noise, x, "noise", "x_t")
    _check(sample_stride >= 0 and step_stride >= 0, "noise strides must be >= 0")
    check_same_layout(out, x, "out", "x_t")
    if model_input is not None:
        _check(model_input.dtype in _FLOATS, "model_input must be float32, float16 or bfloat16")
        _check(model_input.device == x.device, "model_input is on ", model_input.device, " but x_t is on ", x.device)
        _check(model_input.shape == x.shape, "model_input has shape ", tuple(model_input.shape),
               " but x_t has shape ", tuple(x.shape))
        _check(model_input.is_contiguous() or is_channels_last_4d(model_input),
               "model_input must be contiguous or channels_last")
    # In place (an output that is an input) or apart: a partial overlap would
    # have a program read elements another one already wrote.
    inputs = {"x_t": x, "eps": eps, "noise": noise}
    check_no_partial_overlap(out, "out", inputs, "ddpm_fast")
    if model_input is not None:
        check_no_partial_overlap(model_input, "model_input", {**inputs, "out": out}, "ddpm_fast")


def check_randn_out(out: torch.Tensor, sample_stride: int) -> None:
    _check(out.dtype in _FLOATS, "randn output must be float32, float16 or bfloat16, got ", out.dtype)
    _check(out.is_contiguous(), "randn output must be contiguous")
    _check(sample_stride >= 0, "sample_stride must be >= 0, got ", sample_stride)


def check_group_norm_args(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                          add: Optional[torch.Tensor], num_groups: int) -> None:
    _check(x.dtype in _FLOATS, "x must be float32, float16 or bfloat16, got ", x.dtype)
    _check(x.dim() >= 2, "x must be N x C x ..., got ", x.dim(), " dims")
    _check(x.is_contiguous() or is_channels_last_4d(x), "x must be contiguous or channels_last")
    channels = x.shape[1]
    _check(num_groups > 0 and channels % num_groups == 0, "channels (", channels, ") must be divisible by num_groups (",
           num_groups, ")")
    for v in (weight, bias):
        if v is not None:
            _check(v.dim() == 1 and v.shape[0] == channels and v.is_contiguous(),
                   "weight and bias must be contiguous of shape (C,) = (", channels, "), got ", tuple(v.shape))
            _check(v.device == x.device, "weight/bias are on ", v.device, " but x is on ", x.device)
            _check(v.dtype in (x.dtype, torch.float32), "weight/bias must be float32 or x's dtype, got ", v.dtype)
    if add is not None:
        _check(add.dim() == 2 and add.shape[0] == x.shape[0] and add.shape[1] == channels and add.is_contiguous(),
               "add must be contiguous of shape (N, C) = (", x.shape[0], ", ", channels, "), got ", tuple(add.shape))
        _check(add.device == x.device, "add is on ", add.device, " but x is on ", x.device)
        _check(add.dtype in (x.dtype, torch.float32), "add must be float32 or x's dtype, got ", add.dtype)


def check_group_norm_backward_args(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                                   num_groups: int) -> None:
    """After check_group_norm_args of the forward's arguments."""
    _check(dy.shape == x.shape and dy.dtype == x.dtype, "dy must have x's shape and dtype")
    _check(dy.device == x.device, "dy is on ", dy.device, " but x is on ", x.device)
    for stat in (mean, rstd):
        _check(stat.dim() == 2 and stat.shape[0] == x.shape[0] and stat.shape[1] == num_groups
               and stat.is_contiguous() and stat.dtype == torch.float32,
               "mean and rstd must be the forward's contiguous ", torch.float32, " (N, G) = (", x.shape[0], ", ", num_groups,
               ") statistics, got ", tuple(stat.shape), " ", stat.dtype)
        _check(stat.device == x.device, "mean/rstd are on ", stat.device, " but x is on ", x.device)
