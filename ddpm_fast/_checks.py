"""Argument checks shared by the public API, the ops and the kernels (the ops' own are in ops/_args.py)."""

from __future__ import annotations

import contextlib
import numbers

import torch
import torch.autograd.forward_ad as _forward_ad
from torch._subclasses.fake_tensor import is_fake

__all__ = ["is_int", "check_bool", "as_device", "is_traced", "outside_transforms", "under_a_transform", "host_readable", "check_dense", "type_name", "check_no_partial_overlap", "WIDENED_TIMESTEP_DTYPES",
           "is_out_of_memory"]

# Unsigned timestep dtypes that few ops take (min/max do not): widened to int64
# first. (A uint64 from 2^63 on wraps negative, which fails the range check.)
WIDENED_TIMESTEP_DTYPES = (torch.uint16, torch.uint32, torch.uint64)


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer: a Python int or numpy's (counts read
    from arrays or configs), but not a bool (True is no count). (The exact-type
    test goes first: the ABC check costs almost a microsecond, paid on every op call.)"""
    return type(value) is int or (not isinstance(value, bool) and isinstance(value, numbers.Integral))


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation that failed: CUDA's OutOfMemoryError, or
    the plain RuntimeError of the CPU allocator."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


def check_dense(x: torch.Tensor, op: str, name: str) -> None:
    """``x`` (``op``'s argument ``name``) must be a dense (strided) tensor, as
    the kernels and the references' views read: a sparse, MKL-DNN or nested one
    failed deep inside, in torch's words ("unsupported memory format option
    Contiguous", "NestedTensorImpl doesn't support sizes. Please file an issue")."""
    if x.layout is not _STRIDED or x.is_nested:
        kind = "nested" if x.is_nested else str(x.layout).removeprefix("torch.").lstrip("_")
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got a {kind} tensor: convert it first "
                        "(.to_dense(); a nested one with .unbind() or .to_padded_tensor())")


_STRIDED = torch.strided


def type_name(value: object) -> str:
    """``value``'s type for an error message, qualified unless built in: numpy's
    bool is "numpy.bool", not a "bool" that a flag "must be"."""
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def check_bool(value: object, name: str) -> None:
    """A flag must be a bool: ``bool("no")`` would be True, and 0 or None could
    mean a default."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def as_device(value: object, name: str) -> torch.device:
    """``value`` (a torch.device, or a string or index torch.device takes) as a
    device: torch's own error for a typo such as 'cdua' names no argument."""
    if isinstance(value, torch.device):
        return value
    if not isinstance(value, str) and not is_int(value):
        raise TypeError(f"{name} must be a torch.device or a device string such as 'cpu' or 'cuda:0', got {type_name(value)}")
    try:
        return torch.device(value)
    except RuntimeError as error:
        raise ValueError(f"{name} {value!r} is not a device (e.g. 'cpu', 'cuda' or 'cuda:0'): {error}") from None


def is_traced(t: torch.Tensor) -> bool:
    """Whether ``t``, just made, is a trace's tensor (a FakeTensor or
    FunctionalTensor of make_fx, FakeTensorMode or torch.export), which no cache
    may keep: later eager calls would get it. Plain tensors, made eagerly or
    under a dispatch mode that runs the real ops (a FLOP or copy counter), are
    real. (Asked outside Dynamo, whose traces keep no such tensor.)"""
    return type(t) is not torch.Tensor


def under_a_transform() -> bool:
    """Whether a torch.func transform (grad, vmap, jvp, functionalize, ...) or a
    forward-mode AD level (``torch.autograd.forward_ad.dual_level``) is active:
    code with plain PyTorch ops for them to differentiate runs then (the ops'
    ``auto`` backend, ``ops._backend.resolve_backend``, and the U-Net's
    attention). torch.compile reads it as a constant where it traces (True
    inside a torch.func.grad it traces) and keeps the functorch check's call,
    unused, in its graph (inductor drops it)."""
    return _forward_ad._current_level >= 0 or _functorch_transforms_active()


_functorch_transforms_active = torch._C._are_functorch_transforms_active  # (bound once: every op call asks)


def outside_transforms() -> contextlib.AbstractContextManager:
    """Where a cache's constant (the timestep arange, a schedule's tables and
    their device copies) is made: under a torch.func transform, with the
    transforms set aside. functionalize and grad wrap even what a factory
    function makes, and a wrapped tensor kept by a cache went to later eager
    calls (a step first run under functionalize left a functional table, and
    every later step raised); torch 2.7 could not read one either (``nonzero``
    of a grad-wrapped table: "Cannot access data pointer"). Nothing is set
    aside where torch.compile traces."""
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        return torch._C._DisableFuncTorch()
    return contextlib.nullcontext()


def host_readable(t: torch.Tensor) -> torch.Tensor:
    """``t`` for a check that reads its values on the host (a timestep range),
    unless ``torch.func.vmap`` batches it: vmap lets no code read a batched
    tensor's values ("calling .item() on a Tensor"), so then the plain tensor
    under t's functorch wrappers, which holds the values of every sample (all
    of them inside the range if each sample's are). Wrappers without a batch
    (grad's, jvp's, functionalize's) read as t itself. (Asked outside Dynamo.)"""
    if not _functorch_transforms_active():
        return t
    inner, batched = t, False
    while _functorch.maybe_get_level(inner) != -1:
        batched = batched or _functorch.is_batchedtensor(inner)
        inner = _functorch.get_unwrapped(inner)
    return inner if batched else t


_functorch = torch._C._functorch


def _memory_span(x: torch.Tensor) -> tuple[int, int] | None:
    """[first, last) byte of x's memory; None for a tensor without memory to
    compare (a fake or functional tensor of a trace: make_fx, the fake
    implementations torch.compile runs). Fake tensors must be asked first:
    each reports address 0 (with a deprecation warning), which made tensors
    of different dtypes look partially overlapping."""
    if type(x) is not torch.Tensor and is_fake(x):
        return None
    try:
        start = x.data_ptr()
    except RuntimeError:
        return None
    return start, start + x.numel() * x.element_size()


def check_no_partial_overlap(out: torch.Tensor, out_name: str, inputs: dict[str, torch.Tensor | None], op: str) -> None:
    """``out`` (a dense kernel output) may be one of ``inputs`` itself (in place:
    each element is read before it is written) or share no memory with them; a
    partial overlap would have kernels read elements already overwritten.
    Metadata only: no device sync. (Skipped while tracing: fake tensors have no memory.)"""
    span = None if torch.compiler.is_compiling() or out.numel() == 0 else _memory_span(out)
    if span is None:
        return
    lo, hi = span
    for name, x in inputs.items():
        x_span = None if x is None or x.numel() == 0 else _memory_span(x)
        if x_span is None:
            continue
        x_lo, x_hi = x_span
        if x_lo == lo and x.dtype == out.dtype and x.stride() == out.stride():
            continue  # the same elements: in place
        if x_lo < hi and lo < x_hi:
            raise ValueError(f"{op}: {out_name} partially overlaps {name} in memory; give it separate memory or {name} itself")
