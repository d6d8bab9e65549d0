"""Modules built on the fused ops."""

from .group_norm_silu import GroupNormSiLU, fuse_group_norm_silu

__all__ = ["GroupNormSiLU", "fuse_group_norm_silu"]
