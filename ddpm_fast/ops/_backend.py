"""Which implementation runs an op: ``reference`` (plain PyTorch), ``cpu`` (C++),
``cuda`` (CUDA C++) or ``triton``; ``auto`` picks the first available one, for
the tensor's device, in a fixed order meant to be fastest first (_AUTO_ORDER:
not measured at run time).

Precedence: an explicit per-call ``backend`` wins; with ``backend="auto"`` the
environment variable ``DDPM_FAST_BACKEND`` (if set to a backend name) decides;
otherwise the preference order below. Under a torch.func transform (grad, vmap,
jvp, functionalize, ...) or forward-mode AD (``torch.autograd.forward_ad``)
``auto`` is ``reference``, whatever the variable says: neither can
differentiate the kernel ops' autograd, and plain PyTorch has their rules.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

import torch

from .. import _extension
from .._checks import as_device, under_a_transform

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "resolve_backend",
    "triton_available",
    "triton_interpreting",
    "load_triton_ops",
    "triton_launch",
    "triton_launch_device",
]

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")


class BackendUnavailableError(RuntimeError):
    """A backend asked for (by name, or by DDPM_FAST_BACKEND) cannot run on
    these tensors here: a setting to change, not a failure of the op."""


ENV_VAR = "DDPM_FAST_BACKEND"

# Fastest first, per device type. CUDA C++ ahead of Triton is provisional until
# the GPU benchmarks (BENCHMARKS.md) rank them per op.
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


def _interpret_variable() -> bool:
    """Whether TRITON_INTERPRET says on, as the installed triton reads it: its
    knobs (Triton 3.4 on) take 1, true, on, yes, y in any case; earlier Triton
    took only "1", and "true" there meant compiled mode."""
    knobs = getattr(sys.modules.get("triton"), "knobs", None)
    if knobs is None:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


def triton_interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1).

    Triton fixes the mode when it is imported (its own jit functions, tl.sigmoid's
    kind, are made then), so that mode counts, not the variable: set later, the
    variable would send CPU tensors to compiled kernels. Triton is imported here
    if it is not yet, as the Triton backend would import it anyway, so that its
    own reading of the variable decides. Once it is imported this is a lookup
    that torch.compile traces (resolve_backend asks on every call)."""
    standard = sys.modules.get("triton.language.standard")
    if standard is None:
        if not triton_available():
            return False
        from triton.language import standard
    return type(standard.sigmoid).__name__ == "InterpretedFunction"


def _interpret_set_late() -> bool:
    """Whether TRITON_INTERPRET is on now but triton was imported without it."""
    return not triton_interpreting() and _interpret_variable()


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# Whether load_triton_ops has run. triton_launch tests this plain module global before
# calling the loader: torch.compile reads a global bool as a constant (with a
# guard), so once the ops are loaded a compiled function never traces the
# loader. (An lru_cache'd loader was traced on every compile, and the
# registration it did, torch.library.register_autograd, cannot be traced.)
triton_ops_loaded = False


def load_triton_ops() -> None:
    """Register the Triton ops (``torch.ops.ddpm_fast.*_triton``) and their
    autograd, on the first call of a Triton backend: importing triton and the
    kernels costs a second or more, which users of the other backends need not pay.

    The work is done by importing ``._triton``. Under torch.compile an import
    statement is executed, not traced, so a first Triton call inside a compiled
    function works too (with fullgraph=True): the registration runs as plain Python.
    """
    global triton_ops_loaded
    from . import _triton  # noqa: F401  (registers the ops on import)

    triton_ops_loaded = True


def triton_launch(device: torch.device) -> contextlib.AbstractContextManager:
    """What an op does before launching a Triton kernel on tensors on
    ``device``: load the Triton ops on first use (a check of the plain flag,
    which torch.compile reads as a constant), then return the context to
    launch in (``triton_launch_device``)."""
    if not triton_ops_loaded:
        load_triton_ops()
    return triton_launch_device(device)


def triton_launch_device(device: torch.device) -> contextlib.AbstractContextManager:
    """The context to launch Triton kernels for tensors on ``device`` in.

    Triton launches on the current CUDA device (and that device's current
    stream), not on its arguments' device, and neither ``triton_op`` nor
    ``wrap_triton`` sets it: without this, cuda:1 tensors would be handed to a
    kernel running on device 0. A no-op for CPU tensors (Triton's interpreter).
    torch.compile traces ``torch.cuda.device``; inductor's own code puts its
    kernels on their buffers' device.
    """
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _available(backend: str, device_type: str) -> bool:
    if backend == "reference":
        return True
    if backend == "cpu":
        return device_type == "cpu" and _extension.AVAILABLE
    if backend == "cuda":
        return device_type == "cuda" and _extension.WITH_CUDA
    if backend == "triton":
        runs_here = device_type == "cuda" or (device_type == "cpu" and triton_interpreting())
        return runs_here and triton_available()
    return False


def _why_unavailable(backend: str, device: torch.device) -> str:
    if backend in ("cpu", "cuda") and not _extension.AVAILABLE:
        return f"the compiled extension is not loaded ({_extension.LOAD_ERROR})"
    if backend == "cuda" and device.type == "cuda":
        return "the extension was built without its CUDA kernels (see setup.py: DDPM_FAST_CUDA)"
    if backend == "triton" and not triton_available():
        return "triton is not installed"
    if backend == "triton" and device.type == "cpu" and _interpret_set_late():
        return ("TRITON_INTERPRET=1 was set after triton was imported, which fixes its mode then: "
                "set it before the process starts")
    if backend == "triton":
        return f"triton runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1, set before triton is imported), got {device}"
    return f"it runs on {backend} tensors, got {device}"


def resolve_backend(backend: str, device: torch.device | str, op: str) -> str:
    """The concrete backend that runs ``op`` on ``device`` for the requested ``backend``."""
    if backend == "auto" and under_a_transform():  # (see the module's docstring)
        return "reference"
    if isinstance(device, torch.device) and isinstance(backend, str):  # the common case, every op call
        # Each os.environ read costs about 1 us (as much as a small kernel's
        # work), so only the variables this answer depends on are read.
        env = os.environ.get(ENV_VAR, "") if backend == "auto" else ""
        key = (backend, device, env, (backend == "triton" or "triton" in env.lower()) and triton_interpreting())
        found = _RESOLVED.get(key)
        if found is None:
            found = _RESOLVED[key] = _resolve(backend, device, op)
        return found
    return _resolve(backend, as_device(device, f"{op}: device"), op)


# (backend, device, DDPM_FAST_BACKEND, interpreting) -> the backend; failures are not cached.
# (Keyed by the device itself: device.type builds a new string per call.)
_RESOLVED: dict[tuple[str, torch.device, str, bool], str] = {}


def _resolve(backend: str, device: torch.device, op: str) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    source = ""
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"{ENV_VAR}={env!r} is not a backend; expected one of {', '.join(BACKENDS)}")
            backend, source = env, f" (chosen by {ENV_VAR}; unset it or name another)"
        else:
            for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
                if _available(candidate, device.type):
                    return candidate
            return "reference"
    if not _available(backend, device.type):
        raise BackendUnavailableError(
            f"{op}: backend {backend!r} is unavailable for {device} tensors: {_why_unavailable(backend, device)}{source}"
        )
    return backend
