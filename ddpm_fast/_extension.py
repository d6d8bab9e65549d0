"""Loads the compiled extension ``ddpm_fast._C``, which registers the
``torch.ops.ddpm_fast`` operators; without it ddpm_fast runs on the reference
backend after one warning."""

from __future__ import annotations

import importlib
import os

import torch  # loads libtorch, which _C links against

from ._warn import warn

__all__ = ["AVAILABLE", "WITH_CUDA", "LOAD_ERROR", "OLDEST_TORCH", "running_torch"]


def running_torch() -> tuple[int, int]:
    """The installed torch's (major, minor); a 2.8 pre-release counts as 2.8."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


# The oldest torch ddpm_fast runs on, as pyproject.toml's torch>= says (a test
# holds the two together). Older ones lack what it uses (torch 2.6 has no
# torch.compiler.is_exporting): without this, they failed at the first op.
OLDEST_TORCH = (2, 7)
if running_torch() < OLDEST_TORCH:
    raise ImportError(f"ddpm_fast needs torch {OLDEST_TORCH[0]}.{OLDEST_TORCH[1]} or newer, but torch {torch.__version__} "
                      "is installed: upgrade it (pip install -U torch), then rebuild ddpm_fast (pip install -e .)")


try:
    # (registers the operators) Not `from . import _C`: where it is not built, that
    # blames "a circular import" (the package is still being imported).
    _C = importlib.import_module(f"{__package__}._C")

    _built = (getattr(_C, "TORCH_MAJOR", None), getattr(_C, "TORCH_MINOR", None))
    if _built != running_torch():  # torch's C++ ABI differs between versions: its ops could crash
        raise ImportError(f"it was built against torch {_built[0]}.{_built[1]}, but torch {torch.__version__} "
                          "is running: rebuild it with `pip install -e .`")
    AVAILABLE: bool = True
    WITH_CUDA: bool = bool(_C.WITH_CUDA)
    LOAD_ERROR: str | None = None
except ImportError as error:  # not built, or built for another torch
    AVAILABLE = False
    WITH_CUDA = False
    LOAD_ERROR = str(error)
    warn(
        "ddpm_fast: the compiled extension ddpm_fast._C could not be loaded "
        f"({error}); every op falls back to the plain PyTorch reference backend "
        "(on a GPU, to Triton where it is installed). "
        "Build it with `pip install -e .` in an environment that has torch and a C++ compiler "
        "(`DDPM_FAST_STRICT=1 pip install -v -e .` shows why a build fails).",
        RuntimeWarning,
    )

# The CPU kernels' vector loops read DDPM_FAST_CPU_SIMD themselves, at their
# first use, and take any other value as no cap: a misspelt cap would run the
# widest loops without a word. Said here, once, at import.
_SIMD_CAPS = ("avx512", "avx2", "none")
_simd_cap = os.environ.get("DDPM_FAST_CPU_SIMD")
if AVAILABLE and _simd_cap not in (None, "", *_SIMD_CAPS):
    warn(
        f"ddpm_fast: DDPM_FAST_CPU_SIMD={_simd_cap!r} is not one of {', '.join(_SIMD_CAPS)} (lower case): ignored, "
        "the CPU kernels use the widest vector loops this CPU has",
        RuntimeWarning,
    )
