"""The fused reverse step x_t -> x_{t-1} (Ho et al. 2020 eq. 11 and its
clipped-x0 form; DDIM, Song et al. 2021 eq. 12, with ``eta``), noise drawn
in-kernel from the shared stream (ops.randn)."""

from __future__ import annotations

import contextlib

import torch

from .. import _extension
from .._checks import check_dense, check_no_partial_overlap, host_readable, type_name
from ..schedules import NoiseSchedule
from . import _args, _backend
from ._backend import resolve_backend
from .randn import normal_reference

__all__ = ["ddpm_step"]

_OP = "ddpm_step"
_VARIANCES = ("fixed_small", "fixed_large")


def _noise_counters(x: torch.Tensor, t: torch.Tensor, offset: int, sample_stride: int, step_stride: int) -> torch.Tensor:
    """offset + n * sample_stride + t_n * step_stride + j for element j (logical order) of sample n."""
    n = x.shape[0]
    per_sample = x.numel() // n
    j = torch.arange(per_sample, device=x.device, dtype=torch.int64).reshape((1,) + tuple(x.shape[1:]))
    steps = t.reshape(-1).expand(n) if t.dim() == 0 or t.numel() == 1 else t
    base = offset + torch.arange(n, device=x.device, dtype=torch.int64) * sample_stride + steps * step_stride
    return base.reshape((n,) + (1,) * (x.dim() - 1)) + j


def _reference(x, eps, t, table, noise, seed, offset, sample_stride, step_stride, clip):
    """The definition, in float32 from the float32 step table."""
    rows = _args.timestep_rows(table, t).reshape((-1,) + (1,) * (x.dim() - 1) + (8,)).unbind(-1)
    a, b, k2, k3, c1, c2, sigma = rows[:7]
    xf, ef = x.float(), eps.float()
    if clip:
        x0 = (k2 * xf - k3 * ef).clamp(-1.0, 1.0)
        mean = c1 * x0 + c2 * xf
    else:
        mean = a * xf + b * ef
    if noise is None:
        z = normal_reference(seed, _noise_counters(x, t, offset, sample_stride, step_stride))
    else:
        z = noise.float()
    return torch.where(sigma != 0, mean + sigma * z, mean)


def _check_output(out: torch.Tensor, x: torch.Tensor, name: str, same_dtype: bool) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(out).__name__}")
    check_dense(out, _OP, name)
    if out.shape != x.shape or out.device != x.device:
        raise ValueError(f"{_OP}: {name} must have x_t's shape {tuple(x.shape)} on {x.device}, got {tuple(out.shape)} on {out.device}")
    if same_dtype and out.dtype != x.dtype:
        raise TypeError(f"{_OP}: {name} must have x_t's dtype {x.dtype}, got {out.dtype}")
    if out.dtype not in _args.SUPPORTED_DTYPES:
        raise TypeError(f"{_OP}: {name} must be float32, float16 or bfloat16, got {out.dtype}")
    if not (out.is_contiguous() or (out.dim() == 4 and out.is_contiguous(memory_format=torch.channels_last))):
        raise ValueError(f"{_OP}: {name} must be contiguous or channels_last")


def _check_writable(buf: torch.Tensor, name: str, backend: str) -> None:
    """The errors ATen's in-place ops give, for a given output, asked of every
    output before any is written (a refused second one left the first, x_t
    itself in place, written). The reference backend's copy_ records a
    gradient: it refuses a leaf that requires grad, or a view of one; a kernel
    records none, and refuses any tensor that requires grad."""
    if buf.requires_grad and torch.is_grad_enabled():
        if backend != "reference":
            raise RuntimeError(
                f"{_OP}: {name} requires grad, but the {backend} backend does not record gradients; "
                "write into it under torch.no_grad(), or use backend='reference' to differentiate through a step"
            )
        if not torch.compiler.is_compiling() and (buf if buf._base is None else buf._base).is_leaf:
            raise RuntimeError(f"{_OP}: {name} is a leaf Variable that requires grad (or a view of one), "
                               "which an in-place write may not change outside torch.no_grad()")
    # (Not asked while tracing: dynamo cannot trace is_inference() or ._base, and
    # the compiled graph's functionalized copy_ makes ATen's own checks.)
    if not torch.compiler.is_compiling() and buf.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(f"{_OP}: {name} is an inference tensor: an in-place update to it is allowed only "
                           "inside torch.inference_mode()")


def ddpm_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t: int | torch.Tensor,
    schedule: NoiseSchedule,
    *,
    variance: str = "fixed_large",
    clip_denoised: bool = False,
    eta: float | None = None,
    noise: torch.Tensor | None = None,
    seed: int | None = None,
    offset: int = 0,
    sample_stride: int | None = None,
    step_stride: int = 0,
    out: torch.Tensor | None = None,
    out_model_input: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One reverse-diffusion step in one pass over memory; returns x_{t-1}.

    Args:
        x_t: the current sample, N x ... (float32/16, bfloat16; contiguous or channels_last).
        eps: the model's noise prediction, x_t's shape and memory format, any of those dtypes.
        t: zero-based timestep, one for all samples or an integer tensor with one per sample
            (a device tensor is read on the device: no host sync).
        schedule: the noise schedule (a respaced one for respaced sampling).
        variance: ``fixed_large`` (sigma_t^2 = beta_t) or ``fixed_small`` (beta~_t).
        clip_denoised: use the x0-form with the predicted x0 clipped to [-1, 1].
        eta: if given, a DDIM step with this eta (0 = deterministic) instead of DDPM
            (``variance``, the DDPM step's, is then not used: eta sets DDIM's).
        noise: z to use instead of drawing it (seed, offset and the strides then left out);
            read as x_t's dtype (a copy cast to it, when they differ: float32 z with a
            bfloat16 x_t is rounded to bfloat16 first, as the kernels read it).
        seed, offset, sample_stride, step_stride: the drawn z of logical element j of
            sample n is normal(seed, offset + n * sample_stride + t_n * step_stride + j);
            by default sample_stride is the elements per sample and step_stride 0, so
            the counter is offset + the logical index, as in q_sample. As in ops.randn,
            sample_stride must be at least the elements per sample, and the counters
            (of every timestep of the schedule) must fit in int64.
        out: where to write x_{t-1} (x_t's shape, dtype, memory format; may be x_t itself).
        out_model_input: also write x_{t-1} here, in this tensor's dtype and memory
            format (the next model input), with no separate cast kernel.
        backend: ``auto``, ``reference``, ``cpu``, ``cuda`` or ``triton``.

    No noise is added at t = 0. Kernel backends do not record gradients: with
    an input that requires grad (outside no_grad) ``auto`` takes the reference,
    which does, and a kernel backend named refuses. Writes into ``out``
    and ``out_model_input`` bump the version counter on every backend, and an
    inference tensor (outside inference_mode) is refused. A tensor requiring grad
    (outside no_grad) is refused by the kernel backends; the reference backend,
    an ATen copy_, refuses a leaf and records the write into any other.
    """
    x_t = _args.check_float_tensor(x_t, "x_t", _OP)
    eps = _args.check_float_tensor(eps, "eps", _OP)
    _args.check_same_device(eps, x_t, "eps", "x_t", _OP)
    if eps.shape != x_t.shape:
        raise ValueError(f"{_OP}: eps has shape {tuple(eps.shape)} but x_t has {tuple(x_t.shape)}")
    _args.check_schedule(schedule, _OP)
    if variance not in _VARIANCES:
        raise ValueError(f"{_OP}: variance must be one of {', '.join(_VARIANCES)}, got {variance!r}")
    if not isinstance(clip_denoised, bool):
        raise TypeError(f"{_OP}: clip_denoised must be a bool, got {type_name(clip_denoised)}")
    t = _args.as_timesteps(t, x_t, schedule.num_timesteps, _OP)
    n = x_t.shape[0]
    per_sample = x_t.numel() // n if n else 0
    if noise is not None:  # no counters are read (z is given): each at its default
        noise = _args.check_given_noise(noise, x_t, "x_t", seed, _OP, offset=offset, sample_stride=sample_stride,
                                        step_stride=step_stride)
        seed, offset, sample_stride, step_stride = 0, 0, per_sample, 0
    else:
        step_stride = _args.as_offset(step_stride, 0, _OP, "step_stride")
        seed = _args.as_seed(seed, _OP)
        # The counters of every timestep must fit, not only of this t (which a
        # device tensor holds unread): a chain's later steps then fit as well.
        offset, sample_stride = _args.as_noise_counters(
            offset, sample_stride, n, per_sample, _OP, step_span=(schedule.num_timesteps - 1) * step_stride
        )
    which = resolve_backend(backend, x_t.device, _OP)
    if which != "reference" and _args.forward_ad._current_level >= 0:
        _args.refuse_tangents(which, _OP, x_t=x_t, eps=eps, noise=noise, out=out, out_model_input=out_model_input)
    if which != "reference" and torch.is_grad_enabled():
        wants_grad = [name for name, v in (("x_t", x_t), ("eps", eps), ("noise", noise)) if v is not None and v.requires_grad]
        if wants_grad and backend == "auto":  # the kernels record no gradient: the reference, which does
            which = "reference"
        elif wants_grad:  # (was a result silently cut from the graph)
            raise RuntimeError(
                f"{_OP}: {' and '.join(wants_grad)} require{'s' if len(wants_grad) == 1 else ''} grad, but the "
                f"{which} backend does not record gradients; call it under torch.no_grad(), or use "
                "backend='reference' (or 'auto') to differentiate through a step"
            )
    if out is not None:
        _check_output(out, x_t, "out", same_dtype=True)
    if out_model_input is not None:
        _check_output(out_model_input, x_t, "out_model_input", same_dtype=False)
    kind = "ddim" if eta is not None else variance
    try:
        table = schedule.step_table(kind, eta=0.0 if eta is None else eta, device=x_t.device)
    except (TypeError, ValueError) as error:  # a bad eta: named as this op's argument
        raise type(error)(f"{_OP}: {error}") from None
    # Checked where t is on the host (as its range is); on the GPU such a step gives NaN.
    # (Not asked under torch.compile: the first ask for a kind computes the list
    # with nonzero(), which a fullgraph trace cannot follow.)
    if t.device.type == "cpu" and not torch.compiler.is_compiling():
        undefined = schedule.undefined_steps(kind, eta=0.0 if eta is None else eta, clip_denoised=clip_denoised)
        hit = sorted(set(host_readable(t).flatten().tolist()) & set(undefined)) if undefined else None
        if hit:
            raise ValueError(
                f"{_OP}: the step is undefined at timestep {hit[0]} of this schedule: alpha_t or abar_t is 0 there "
                "(beta_t = 1, as at t = T-1 of the jsd schedule, or abar_t underflowing float64), "
                "so its coefficients are infinite"
            )

    x = _args.kernel_layout(x_t)
    given_out = out is not None
    if out is None:
        out = torch.empty_like(x)
    elif not (out.is_contiguous() if x.is_contiguous() else out.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"{_OP}: out must have the memory format of x_t")
    if x.numel() == 0:
        return out
    e = _args.match_layout(eps, x, dtype=eps.dtype)
    z = _args.match_layout(noise, x) if noise is not None else None
    inputs = {"x_t": x, "eps": e, "noise": z}
    if given_out:
        check_no_partial_overlap(out, "out", inputs, _OP)
    if out_model_input is not None:
        check_no_partial_overlap(out_model_input, "out_model_input", {**inputs, "out": out}, _OP)

    written = [] if not given_out else [out]
    if out_model_input is not None:
        written.append(out_model_input)
    for buf in written:
        _check_writable(buf, "out" if buf is out else "out_model_input", which)
    if which == "reference":
        y = _reference(x, e, t, table, z, seed, offset, sample_stride, step_stride, clip_denoised)
        # out_model_input first: ATen has refusals the checks above do not repeat (a
        # view from unbind, say), and out may be x_t itself, in place.
        if out_model_input is not None:
            out_model_input.copy_(y)
        out.copy_(y)
        return out
    # (Not under torch.export: its no_grad region around an op that returns
    # nothing became a node that torch.export.load refuses. The checks above
    # leave no input requiring grad to a kernel.)
    with contextlib.nullcontext() if torch.compiler.is_exporting() else torch.no_grad():
        if which == "triton":
            device = _backend.triton_launch(x.device)  # loads the op on first use
            op = torch.ops.ddpm_fast.ddpm_step_triton_
        else:
            op, device = torch.ops.ddpm_fast.ddpm_step_, contextlib.nullcontext()  # the C++ op guards its device
        with device:
            op(x, e, t, table, z, seed, offset, sample_stride, step_stride, clip_denoised, out, out_model_input)
    return out  # (both ops bump the version counters of what they write, as ATen's in-place ops)


if _extension.AVAILABLE:

    @torch.library.register_fake("ddpm_fast::ddpm_step_")
    def _ddpm_step_fake(x_t, eps, t, coefficients, noise, seed, offset, sample_stride, step_stride, clip_denoised, out, model_input):
        _args.check_fake_devices("x_t", x_t, eps=eps, t=t, coefficients=coefficients, noise=noise, out=out,
                                 model_input=model_input)
        return None
