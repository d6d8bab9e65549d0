"""Fused ops, one public function each; each picks a backend (see ``_backend``)
and has a plain PyTorch reference path that defines its result."""

from ._backend import BACKENDS, BackendUnavailableError, load_triton_ops, resolve_backend
from .ddpm_step import ddpm_step
from .group_norm_silu import group_norm_silu
from .q_sample import q_sample
from .randn import randn

__all__ = ["BACKENDS", "BackendUnavailableError", "load_triton_ops", "resolve_backend", "ddpm_step", "group_norm_silu", "q_sample", "randn"]
