"""Fused ops, one public function each; each picks a backend (see ``_backend``)
and has a plain PyTorch reference path that defines its result."""

from ._backend import BACKENDS, resolve_backend
from .q_sample import q_sample
from .randn import randn

__all__ = ["BACKENDS", "resolve_backend", "q_sample", "randn"]
