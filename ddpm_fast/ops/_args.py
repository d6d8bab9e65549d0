"""Argument checks shared by the public ops: every backend sees the same,
already validated arguments, and bad input fails here with a clear message."""

from __future__ import annotations

import numbers

import torch
import torch.autograd.forward_ad as forward_ad

from .._checks import WIDENED_TIMESTEP_DTYPES, check_dense, host_readable, is_int, is_traced, outside_transforms, under_a_transform
from ..schedules import NoiseSchedule

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Integer dtypes a timestep tensor may have. torch has no min/max (the range
# check) for uint16/32/64, so those are widened to int64 first.
_TIMESTEP_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64)
UINT64 = 1 << 64
INT64_MAX = (1 << 63) - 1


def is_real(v: object) -> bool:
    """A real number, not a bool (exact types first, as in ``is_int``)."""
    return type(v) is float or type(v) is int or (not isinstance(v, bool) and isinstance(v, numbers.Real))


def check_float_tensor(x: object, name: str, op: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    check_dense(x, op, name)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{op}: {name} must have a batch dimension, got a 0-d tensor")
    return x


def check_same_device(x: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str, op: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{op}: {name} is on {x.device} but {ref_name} is on {ref.device}")


def check_fake_devices(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """For the fake (meta) implementations of the C++ ops. A call with one
    tensor on the meta device and the others real dispatches to the fake, which
    would return uninitialized memory on the real device: refuse it as the C++
    ops refuse mixed devices (RuntimeError, their words)."""
    for name, v in others.items():
        if v is not None and v.device != ref.device:
            raise RuntimeError(f"ddpm_fast: {name} is on {v.device} but {ref_name} is on {ref.device}")


def check_param(p: object, name: str, shape: tuple[int, ...], x: torch.Tensor, op: str, what: str = "") -> torch.Tensor:
    """A per-channel (or per-sample-and-channel) float tensor of exactly ``shape`` on x's device."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(p).__name__}")
    check_dense(p, op, name)
    if not p.is_floating_point():
        raise TypeError(f"{op}: {name} must be floating point, got {p.dtype}")
    if p.shape != shape:
        raise ValueError(f"{op}: {name} must be a tensor of shape {what}{tuple(shape)}, got {tuple(p.shape)}")
    check_same_device(p, x, name, "x", op)
    return p


def check_schedule(schedule: object, op: str) -> None:
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"{op}: schedule must be a NoiseSchedule, got {type(schedule).__name__}")


def check_given_noise(noise: object, x: torch.Tensor, x_name: str, seed: object, op: str, **counters: object) -> torch.Tensor:
    """Noise given to an op that could also draw it: x's shape and device, a
    supported dtype, no seed, and ``counters`` (where drawn noise would come
    from: offset, ...) left at None or 0, as they would be ignored."""
    noise = check_float_tensor(noise, "noise", op)
    check_same_device(noise, x, "noise", x_name, op)
    if noise.shape != x.shape:
        raise ValueError(f"{op}: noise has shape {tuple(noise.shape)} but {x_name} has {tuple(x.shape)}")
    if seed is not None:
        raise ValueError(f"{op}: give noise or a seed to draw it, not both")
    placed = [f"{name}={value!r}" for name, value in counters.items() if value is not None and not (is_int(value) and value == 0)]
    if placed:
        raise ValueError(f"{op}: give noise or the counters to draw it ({', '.join(placed)}), not both")
    return noise


def refuse_tangents(which: str, op: str, **tensors: torch.Tensor | None) -> None:
    """Refuse ``tensors`` that carry a forward-mode tangent (dual tensors of
    ``torch.autograd.forward_ad``, or the inputs of ``torch.func.jvp`` and
    ``jacfwd``, which are dual tensors too) for the ``which`` kernel backend,
    named per call (``auto`` runs the reference under forward-mode AD). No
    kernel has a forward-mode rule: the step's and the Triton ops' dropped the
    tangent silently (None from dual tensors, zeros from jvp), the C++ q_sample
    and group_norm_silu failed in torch's words. Asked where a dual level is
    open (``forward_ad._current_level >= 0``): callers skip the call elsewhere."""
    names = [name for name, v in tensors.items() if v is not None and forward_ad.unpack_dual(v).tangent is not None]
    if names:
        raise RuntimeError(
            f"{op}: {' and '.join(names)} carr{'ies' if len(names) == 1 else 'y'} a forward-mode tangent "
            f"(torch.func.jvp, jacfwd or torch.autograd.forward_ad), but the {which} backend does not propagate "
            "it; use backend='reference' (or 'auto'), which does"
        )


def as_timesteps(t: object, x: torch.Tensor, num_steps: int, op: str) -> torch.Tensor:
    """``t`` as an int64 tensor on x's device: 0-d, or one entry per sample.

    Ranges are checked wherever that needs no device sync (Python ints and CPU
    tensors); on the GPU an out-of-range timestep turns its sample into NaN.
    """
    if isinstance(t, bool) or (isinstance(t, torch.Tensor) and t.dtype == torch.bool):
        raise TypeError(f"{op}: t must be an int or an integer tensor, got a bool")
    if isinstance(t, numbers.Integral):
        t = int(t)
        if not 0 <= t < num_steps:
            raise ValueError(f"{op}: timestep {t} is out of range [0, {num_steps})")
        return _timestep_scalar(t, num_steps, x.device)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: t must be an int or an integer tensor, got {type(t).__name__}")
    check_dense(t, op, "t")
    if t.dtype not in _TIMESTEP_DTYPES:
        raise TypeError(f"{op}: t must hold integers (int8/16/32/64 or uint8/16/32/64), got {t.dtype}")
    if t.dim() > 1 or (t.dim() == 1 and t.numel() not in (1, x.shape[0])):
        raise ValueError(
            f"{op}: t must be a scalar or have one entry per sample ({x.shape[0]}), got shape {tuple(t.shape)}"
        )
    if t.device != x.device:
        raise ValueError(f"{op}: t is on {t.device} but x is on {x.device}")
    if t.dtype in WIDENED_TIMESTEP_DTYPES:
        # Every timestep fits in int64; a uint64 value from 2^63 on wraps to a
        # negative one, which fails the range check (or gives NaN) all the same.
        t = t.to(torch.int64)
    if t.device.type == "cpu" and t.numel() > 0 and torch.compiler.is_compiling():
        # The value is unknown while tracing: checked in the graph (the reference
        # backend gave NaN, silently, where eager raises). Not under a torch.func
        # transform, which the trace cannot tell vmap from (_assert_async has no
        # vmap rule): the reference then gives NaN, as on the GPU.
        if not under_a_transform():
            torch._assert_async(((t >= 0) & (t < num_steps)).all(), f"{op}: timesteps must lie in [0, {num_steps})")
    elif t.device.type == "cpu" and t.numel() > 0:
        values = host_readable(t)  # (every sample's, where vmap batches t)
        if values.numel() == 1:  # read, checked and served as an int is (one read instead of two reductions: 3 us, not 11)
            value = int(values.item())
            if not 0 <= value < num_steps:
                raise ValueError(f"{op}: timesteps must lie in [0, {num_steps}), got min {value}, max {value}")
            return _timestep_scalar(value, num_steps, x.device)
        low, high = (int(v) for v in torch.aminmax(values))
        if low < 0 or high >= num_steps:
            raise ValueError(f"{op}: timesteps must lie in [0, {num_steps}), got min {low}, max {high}")
    if t.dim() == 1 and t.numel() == 1:
        t = t.reshape(())
    return t.to(torch.int64).contiguous()


_TIMESTEPS: dict[tuple[torch.device, int], torch.Tensor] = {}


def timestep_rows(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``table[t]`` (rows along dim 0), NaN where t lies outside [0, len(table)):
    what the GPU kernels give for a timestep that a device tensor cannot be
    checked for without a sync. Plain indexing would wrap a negative t into
    another row, or stop the device on an assert. (index_select, not
    ``table[t]``: indexing with a 0-d integer tensor reads it on the host, a
    device sync per call, which also breaks CUDA graph capture.)"""
    n = table.shape[0]
    rows = table.index_select(0, t.reshape(-1).clamp(0, n - 1)).reshape(t.shape + table.shape[1:])
    valid = ((t >= 0) & (t < n)).reshape(t.shape + (1,) * (table.dim() - 1))
    return torch.where(valid, rows, float("nan"))


def _capturing(device: torch.device) -> bool:
    """Whether the current stream of ``device`` is capturing a CUDA graph (False off CUDA)."""
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def _timestep_scalar(t: int, num_steps: int, device: torch.device) -> torch.Tensor:
    """t as a 0-d int64 tensor on ``device``: a view into a cached arange, so that
    no fill kernel runs before every step on the GPU (the kernels only read t)."""
    if torch.compiler.is_compiling():
        return torch.full((), t, dtype=torch.int64, device=device)
    steps = _TIMESTEPS.get((device, num_steps))
    if steps is None:
        if _capturing(device):
            # An arange queued now would be recorded into the caller's graph, not
            # run: the cache would hold unwritten memory until that graph replays.
            # A fill the graph itself runs, not cached.
            return torch.full((), t, dtype=torch.int64, device=device)
        with torch.inference_mode(False), outside_transforms():  # usable in autograd after an inference-mode first call
            steps = torch.arange(num_steps, dtype=torch.int64, device=device)
        if is_traced(steps):  # under make_fx or FakeTensorMode: not for later calls
            return steps[t]
        _TIMESTEPS[(device, num_steps)] = steps
    return steps[t]


def as_seed(seed: object, op: str) -> int:
    """A 64-bit seed as the signed int the C++ ops take; None draws one from
    torch's default generator (so torch.manual_seed makes runs repeatable)."""
    if seed is None:
        return int(torch.empty((), dtype=torch.int64).random_())
    if not is_int(seed):
        raise TypeError(f"{op}: seed must be an int, got {type(seed).__name__}")
    seed = int(seed)
    if not -(1 << 63) <= seed < UINT64:
        raise ValueError(f"{op}: seed must fit in 64 bits, got {seed}")
    return seed - UINT64 if seed > INT64_MAX else seed


def as_offset(offset: object, count: int, op: str, name: str = "offset") -> int:
    """The counter of element 0; the counters offset .. offset+count-1 must fit in int64.
    (Also the noise strides, with count 0; ``name`` is the argument's.)"""
    if not is_int(offset):
        raise TypeError(f"{op}: {name} must be an int, got {type(offset).__name__}")
    offset = int(offset)
    if offset < 0 or offset + count > INT64_MAX:
        raise ValueError(f"{op}: {name} must lie in [0, 2^63 - 1 - {count}], got {offset}")
    return offset


def as_noise_counters(
    offset: object, sample_stride: object, n: int, per_sample: int, op: str, step_span: int = 0
) -> tuple[int, int]:
    """``(offset, sample_stride)`` of noise drawn for n samples of per_sample elements:
    element j of sample k at counter offset + k * sample_stride + j, plus a step's
    shift of at most ``step_span`` (ops.ddpm_step's t * step_stride). A stride below
    per_sample would give samples overlapping streams (at 0, the same noise each),
    so it is refused where there are several samples; None is per_sample (the
    counters follow the logical index). Every counter must fit in int64."""
    stride = per_sample if sample_stride is None else as_offset(sample_stride, 0, op, "sample_stride")
    if stride < per_sample and n > 1:
        raise ValueError(f"{op}: sample_stride {stride} is below the {per_sample} elements per sample (streams would overlap)")
    count = (n - 1) * stride + step_span + per_sample if n * per_sample else 0
    if count > INT64_MAX:  # beyond int64 even from offset 0: the strides are at fault, not the offset
        steps = f" and step_stride * (T - 1) = {step_span}" if step_span else ""
        raise ValueError(f"{op}: the noise counters must fit in int64, but sample_stride {stride} for {n} samples{steps} span {count}")
    return as_offset(offset, count, op), stride


def kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """x itself if the kernels can read it (contiguous, or 4-d channels_last), else a contiguous copy."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    return x.contiguous()


def match_layout(x: torch.Tensor, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x in like's memory format (like is in a kernel layout), with like's dtype
    unless ``dtype`` is given; x itself when nothing changes."""
    x = x.to(like.dtype if dtype is None else dtype)
    if like.is_contiguous():
        return x.contiguous()
    return x.contiguous(memory_format=torch.channels_last)


def savable(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The tensors as a Triton op's autograd saves them: an inference tensor
    (made under torch.inference_mode: timesteps, a time embedding's add) cannot
    be saved for a backward, where the reference backend, whose ops save what
    they computed from it, took it; a copy of it can (as csrc/*_autograd.cpp do)."""
    return [t.clone() if t is not None and t.is_inference() else t for t in tensors]
