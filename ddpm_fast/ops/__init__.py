"""Fused ops, one public function each; each picks a backend (see ``_backend``)
and has a plain PyTorch reference path that defines its result."""

from ._backend import BACKENDS, resolve_backend
from .ddpm_step import ddpm_step
from .q_sample import q_sample
from .randn import randn

__all__ = ["BACKENDS", "resolve_backend", "ddpm_step", "q_sample", "randn"]
