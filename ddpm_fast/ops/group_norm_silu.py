"""Fused GroupNorm + SiLU: y = SiLU(GroupNorm(x + add[:, :, None, ...])), forward
and backward (csrc/group_norm_silu.h has the math)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _extension
from .._checks import check_dense, type_name
from . import _args, _backend
from ._backend import resolve_backend

__all__ = ["group_norm_silu"]

_OP = "group_norm_silu"
_DTYPES = _args.SUPPORTED_DTYPES + (torch.float64,)
_FLOAT32_TINIEST = 2.0**-149  # float32's smallest positive value (plain floats: torch.compile traces this check)


def _reference(x, num_groups, weight, bias, eps, add, act):
    w, b = _reference_params(weight, bias, x)
    mixed = any(p is not None and p.dtype != x.dtype for p in (w, b))
    # 16-bit x with an add or float32 parameters: in float32, rounded to x's dtype
    # once. x + add as the kernels add it (rounded to 16 bits, a large add left
    # little of a small x: errors of 2.35 for the kernels' 0.008 in bf16); ATen's
    # GPU group_norm takes one dtype, and its CPU backward refuses a float32 bias
    # without a weight. (Otherwise every .to below is x's own dtype: no copy.)
    in_float = x.dtype in (torch.float16, torch.bfloat16) and (add is not None or mixed)
    dtype = torch.float32 if in_float else x.dtype
    h = x.to(dtype)
    if add is not None:
        h = h + add.to(dtype).reshape(add.shape + (1,) * (x.dim() - 2))
    w, b = (None if p is None else p.to(dtype) for p in (w, b))
    if b is not None and w is None:  # torch 2.11's backward fails on a bias alone ("tensor does not have a device")
        w = torch.ones_like(b)
    y = F.group_norm(h, num_groups, w, b, eps)
    return (F.silu(y) if act else y).to(x.dtype)


def _reference_params(
    weight: torch.Tensor | None, bias: torch.Tensor | None, x: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Weight and bias in dtypes F.group_norm takes with x: x's own, or both
    float32 for 16-bit x when either differs from it (ATen takes one parameter
    dtype; the kernels read any float dtype, in float32 or x's)."""
    params = (weight, bias)
    if all(p is None or p.dtype == x.dtype for p in params):
        return weight, bias
    dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return tuple(None if p is None else p.to(dtype) for p in params)


def _check(x, num_groups, weight, bias, eps, add, act):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{_OP}: x must be a torch.Tensor, got {type(x).__name__}")
    check_dense(x, _OP, "x")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{_OP}: x must be float32, float16 or bfloat16 (float64 on the CPU), got {x.dtype}")
    shape = tuple(x.shape)  # once: each x.shape builds a torch.Size
    if len(shape) < 2:
        raise ValueError(f"{_OP}: x must be N x C x ..., got shape {shape}")
    if not _args.is_int(num_groups) or num_groups < 1:
        raise ValueError(f"{_OP}: num_groups must be a positive int, got {num_groups!r}")
    if shape[1] % num_groups:
        raise ValueError(f"{_OP}: channels ({shape[1]}) must be divisible by num_groups ({num_groups})")
    # Whatever the batch size (an empty batch gives an empty result): F.group_norm
    # refuses groups of one value, and groups of none (C = 0 or H*W = 0).
    if (shape[1] // num_groups) * math.prod(shape[2:]) < 2:
        raise ValueError(f"{_OP}: each group needs more than one value to normalize, got shape {shape} with {num_groups} groups")
    if not _args.is_real(eps) or not eps > 0:
        raise ValueError(f"{_OP}: eps must be a positive number, got {eps!r}")
    if not isinstance(act, bool):
        raise TypeError(f"{_OP}: act must be a bool, got {type_name(act)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            _args.check_param(p, name, shape[1:2], x, _OP)
    if add is not None:
        _args.check_param(add, "add", shape[:2], x, _OP, what="(N, C) = ")


def _param(p: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """Weight, bias or add as the kernels take them: contiguous, float32 or x's dtype."""
    if p is None:
        return None
    if p.dtype not in (torch.float32, x.dtype):
        p = p.to(torch.float32)
    return p.contiguous()


def group_norm_silu(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    add: torch.Tensor | None = None,
    act: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """SiLU(GroupNorm(x + add)) in one op, differentiable in x, weight, bias and add.

    Args:
        x: N x C x H x W (or N x C x L), float32/float16/bfloat16 (float64 on the CPU
            backends), contiguous or channels_last. Statistics are always float32 or wider.
        num_groups: groups G, dividing C.
        weight, bias: optional affine parameters of shape (C,).
        eps: added to the variance.
        add: optional (N, C) tensor added to x per sample and channel before the norm
            (the ResBlock's time-embedding projection).
        act: apply SiLU; ``act=False`` gives plain GroupNorm.
        backend: ``auto``, ``reference``, ``cpu``, ``cuda`` or ``triton``. ``auto``
            runs float64 on the reference backend where no kernel takes it (the GPU).

    Returns y in x's dtype and memory format.
    """
    _check(x, num_groups, weight, bias, eps, add, act)
    which = resolve_backend(backend, x.device, _OP)
    if x.dtype == torch.float64 and which not in ("cpu", "reference"):
        if backend != "auto":
            raise TypeError(f"{_OP}: x is float64, which runs on the cpu and reference backends only, not {which}")
        # auto on a GPU: no GPU kernel takes float64 (a gradcheck, a float64
        # model), and the reference computes it in float64 there.
        which = "reference"
    if which in ("cuda", "triton") and eps < _FLOAT32_TINIEST:
        # The GPU kernels take eps as float32, where it would be 0: rsqrt(0) on
        # a constant group (the CPU kernel and the reference take a double).
        raise ValueError(f"{_OP}: eps must be representable in float32 (at least about 1.4e-45) on the {which} backend, got {eps!r}")
    if which != "reference" and _args.forward_ad._current_level >= 0:
        _args.refuse_tangents(which, _OP, x=x, weight=weight, bias=bias, add=add)
    if which == "reference":  # in the layout the kernels give (5-d channels_last_3d x: contiguous y)
        y = _reference(x, int(num_groups), weight, bias, float(eps), add, act)
        return _args.kernel_layout(y) if x.dim() == 4 else y.contiguous()
    xk = _args.kernel_layout(x) if x.dim() == 4 else x.contiguous()
    args = (xk, _param(weight, x), _param(bias, x), _param(add, x), int(num_groups), float(eps), act)
    if which == "triton":
        with _backend.triton_launch(x.device):
            y, _, _ = torch.ops.ddpm_fast.group_norm_silu_triton(*args)
    else:
        y, _, _ = torch.ops.ddpm_fast.group_norm_silu(*args)
    return y


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, add, num_groups, eps, act = inputs
    _, mean, rstd = output
    ctx.save_for_backward(*_args.savable(x, weight, bias, add), mean, rstd)
    ctx.num_groups, ctx.eps, ctx.act = num_groups, eps, act


def _differentiable_backward(ctx, dy, x, weight, bias, add):
    """The backward when autograd records it (create_graph=True: a gradient
    penalty, a Hessian-vector product). The backward op has no derivative of its
    own, so these gradients come from the reference, recomputed from the saved
    inputs, which autograd can differentiate again (as the C++ op's autograd,
    csrc/group_norm_silu_autograd.cpp, does)."""
    inputs = (x, weight, bias, add)
    wanted = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
    grads: list[torch.Tensor | None] = [None] * 7
    if wanted:
        y = _reference(x, ctx.num_groups, weight, bias, ctx.eps, add, ctx.act)
        found = torch.autograd.grad(y, [inputs[i] for i in wanted], dy.to(y.dtype), create_graph=True, allow_unused=True)
        for i, g in zip(wanted, found):
            grads[i] = g
    return tuple(grads)


def _make_backward(backward_op):
    def backward(ctx, dy, _dmean, _drstd):
        x, weight, bias, add, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _differentiable_backward(ctx, dy, x, weight, bias, add)
        dy = _args.match_layout(dy, x) if x.dim() == 4 else dy.to(x.dtype).contiguous()
        dx, dw, db, dadd = backward_op(dy, x, weight, bias, add, mean, rstd, ctx.num_groups, ctx.act)
        return (
            dx,
            dw if weight is not None else None,
            db if bias is not None else None,
            dadd if add is not None else None,
            None,
            None,
            None,
        )

    return backward


def _register_fakes() -> None:
    """Shapes of the C++ ops for torch.compile. Their autograd is in C++
    (csrc/group_norm_silu_autograd.cpp)."""

    @torch.library.register_fake("ddpm_fast::group_norm_silu")
    def _fake(x, weight, bias, add, num_groups, eps, act):
        _args.check_fake_devices("x", x, weight=weight, bias=bias, add=add)
        stat = torch.float64 if x.dtype == torch.float64 else torch.float32
        n, g = x.shape[0], num_groups
        return torch.empty_like(x), x.new_empty((n, g), dtype=stat), x.new_empty((n, g), dtype=stat)

    @torch.library.register_fake("ddpm_fast::group_norm_silu_backward")
    def _fake_backward(dy, x, weight, bias, add, mean, rstd, num_groups, act):
        _args.check_fake_devices("x", x, dy=dy, weight=weight, bias=bias, add=add, mean=mean, rstd=rstd)
        c = x.shape[1]
        return (
            torch.empty_like(x),
            x.new_empty((c,), dtype=weight.dtype if weight is not None else x.dtype),
            x.new_empty((c,), dtype=bias.dtype if bias is not None else x.dtype),
            x.new_empty((x.shape[0], c), dtype=add.dtype if add is not None else x.dtype),
        )


def register_triton_autograd() -> None:
    """The autograd of the Triton op (which ddpm_fast.kernels.group_norm_silu
    registers, with its backward op); called once, by ``_triton`` (see
    ``_backend.load_triton_ops``). Autograd runs the backward on the tensors'
    device (its worker thread for a CUDA device sets that device current)."""
    torch.library.register_autograd(
        "ddpm_fast::group_norm_silu_triton",
        _make_backward(torch.ops.ddpm_fast.group_norm_silu_triton_backward),
        setup_context=_setup_context,
    )


if _extension.AVAILABLE:
    _register_fakes()
