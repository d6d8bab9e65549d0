"""Loads the compiled extension ``ddpm_fast._C``, which registers the
``torch.ops.ddpm_fast`` operators; without it ddpm_fast runs on the reference
backend after one warning."""

from __future__ import annotations

import warnings

import torch  # noqa: F401  (loads libtorch, which _C links against)

__all__ = ["AVAILABLE", "WITH_CUDA", "LOAD_ERROR"]

try:
    from . import _C  # noqa: F401  (registers the operators)

    AVAILABLE: bool = True
    WITH_CUDA: bool = bool(_C.WITH_CUDA)
    LOAD_ERROR: str | None = None
except ImportError as error:  # not built, or built for another torch
    AVAILABLE = False
    WITH_CUDA = False
    LOAD_ERROR = str(error)
    warnings.warn(
        "ddpm_fast: the compiled extension ddpm_fast._C could not be loaded "
        f"({error}); every op falls back to the plain PyTorch reference backend. "
        "Build it with `pip install -e .` in an environment that has torch.",
        RuntimeWarning,
        stacklevel=2,
    )
