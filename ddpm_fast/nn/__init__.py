"""Modules built on the fused ops."""

from .group_norm_silu import GroupNormSiLU, fuse_group_norm_silu
from .memory_format import has_channels_last_weights

__all__ = ["GroupNormSiLU", "fuse_group_norm_silu", "has_channels_last_weights"]
