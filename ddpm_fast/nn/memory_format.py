"""Which memory format a model's convolutions expect."""

from __future__ import annotations

from typing import Any

import torch


def has_channels_last_weights(model: Any) -> bool:
    """Whether ``model`` (an nn.Module, or any object with ``parameters()``) has
    channels_last 4-d weights, as after ``model.to(memory_format=torch.channels_last)``:
    then its input should be channels_last too, else every convolution converts
    one of the two at every call. False for objects without parameters."""
    weights = [p for p in getattr(model, "parameters", lambda: [])() if p.dim() == 4]
    # A 1x1 or one-input-channel weight is both contiguous and channels_last: it says nothing.
    return any(not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last) for p in weights)
