"""``GroupNormSiLU``: a drop-in for ``nn.GroupNorm`` followed by ``nn.SiLU`` on
the fused op, and ``fuse_group_norm_silu`` to swap such pairs in a model."""

from __future__ import annotations

import torch
from torch import nn

from .._checks import type_name
from .._interrupts import sigint_deferred
from ..ops import BACKENDS, group_norm_silu

__all__ = ["GroupNormSiLU", "fuse_group_norm_silu"]

_ABSENT = object()  # a parameter name missing from a module's _parameters


class GroupNormSiLU(nn.GroupNorm):
    """GroupNorm (+ SiLU when ``act``) in one fused op.

    Same constructor, parameters and state_dict keys as ``nn.GroupNorm``, so
    checkpoints load either way. ``forward(x, add=None)`` optionally adds an
    (N, C) tensor per sample and channel before the norm. ``backend`` picks the
    op backend for this module (``auto`` defers to the environment and device).
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        *,
        act: bool = True,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        bias: bool = True,
    ) -> None:
        if not isinstance(act, bool):
            raise TypeError(f"GroupNormSiLU: act must be a bool, got {type_name(act)}")
        if backend not in BACKENDS:
            raise ValueError(f"GroupNormSiLU: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if not isinstance(bias, bool):
            raise TypeError(f"GroupNormSiLU: bias must be a bool, got {type_name(bias)}")
        if isinstance(num_groups, int) and isinstance(num_channels, int) and num_groups > 0 and num_channels % num_groups:
            # ours: nn.GroupNorm names the two numbers on torch 2.11 but not on 2.7 or 2.8
            raise ValueError(f"GroupNormSiLU: num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        if affine and not bias:  # nn.GroupNorm's bias=False (newer torch): a weight and no bias
            self.register_parameter("bias", None)
        self.act = act
        self.backend = backend

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[1] != self.num_channels:
            raise ValueError(f"GroupNormSiLU: x has {x.shape[1]} channels (shape {tuple(x.shape)}), expected num_channels = {self.num_channels}")
        # The parameters straight from their dict: `self.weight` goes through
        # nn.Module.__getattr__, about 0.9 us each, a tenth of the op's own cost
        # on small maps (BENCHMARKS.md). A parametrized weight or bias
        # (torch.nn.utils.parametrize) is not in the dict: then the attribute.
        params = self._parameters
        weight = params.get("weight", _ABSENT)
        bias = params.get("bias", _ABSENT)
        return group_norm_silu(
            x,
            self.num_groups,
            self.weight if weight is _ABSENT else weight,
            self.bias if bias is _ABSENT else bias,
            self.eps,
            add=add,
            act=self.act,
            backend=self.backend,
        )

    @classmethod
    def from_group_norm(cls, norm: nn.GroupNorm, *, act: bool = True, backend: str = "auto") -> "GroupNormSiLU":
        """A ``GroupNormSiLU`` holding ``norm``'s own parameters (the same
        ``nn.Parameter`` objects, so frozen ones stay frozen and an optimizer
        built on ``norm`` trains it), in ``norm``'s training mode."""
        if not isinstance(norm, nn.GroupNorm):
            raise TypeError(f"GroupNormSiLU.from_group_norm: norm must be an nn.GroupNorm, got {type_name(norm)}")
        if "weight" in getattr(norm, "parametrizations", {}) or "bias" in getattr(norm, "parametrizations", {}):
            raise TypeError("GroupNormSiLU.from_group_norm: the norm's weight or bias is parametrized "
                            "(torch.nn.utils.parametrize); build GroupNormSiLU(...) and register the parametrization on it")
        fused = cls(norm.num_groups, norm.num_channels, norm.eps, affine=False, act=act, backend=backend)
        fused.affine = norm.affine
        for name in ("weight", "bias"):
            if name in norm._buffers:  # frozen as a buffer, which nn.GroupNorm's forward reads alike
                delattr(fused, name)
                fused.register_buffer(name, norm._buffers[name], persistent=name not in norm._non_persistent_buffers_set)
            elif name in norm._parameters:
                setattr(fused, name, norm._parameters[name])
            else:
                raise TypeError(f"GroupNormSiLU.from_group_norm: the norm's {name} is neither a parameter nor a "
                                f"buffer ({type_name(getattr(norm, name, None))}); build GroupNormSiLU(...) instead")
        return fused.train(norm.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act}, backend={self.backend!r}"


def fuse_group_norm_silu(model: nn.Module, *, backend: str = "auto") -> int:
    """Replace, inside every ``nn.Sequential`` of ``model``, each ``nn.GroupNorm``
    directly followed by ``nn.SiLU`` with one ``GroupNormSiLU`` (the SiLU slot
    becomes ``nn.Identity``, so indices and state_dict keys stay). Returns the
    number of pairs fused. Pairs written as code in a ``forward`` (``F.silu(self.norm(x))``)
    are not visible here; use ``GroupNormSiLU`` in such modules directly.

    The replacement holds the norm's own parameters (the same ``nn.Parameter``
    objects), so a frozen norm stays frozen, an optimizer built before still
    updates them, and a norm used in several places becomes one shared
    ``GroupNormSiLU``. It replaces the norm wherever that slot is reached: a
    ``forward`` that also calls the norm alone (``self.block[0](x)``) gets the
    SiLU there too. Only ``nn.Sequential``s that run ``nn.Sequential.forward``,
    and exact ``nn.GroupNorm`` and ``nn.SiLU`` (not subclasses, whose
    ``forward`` may do otherwise), are fused, and not a norm or SiLU with
    hooks (they would stop running)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_group_norm_silu: model must be an nn.Module, got {type_name(model)}")
    if backend not in BACKENDS:  # here, not only once a model has a pair to fuse
        raise ValueError(f"fuse_group_norm_silu: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    # Every replacement is made before any is put in: a norm that cannot be
    # replaced (its weight neither a parameter nor a buffer) leaves the model as it was.
    pairs = []
    replacements: dict[int, GroupNormSiLU] = {}  # id(norm) -> its replacement, for shared norms
    for module in model.modules():
        # A subclass's forward may not run its children in order.
        if type(module).forward is not nn.Sequential.forward:
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            norm, act = module._modules[first], module._modules[second]
            exact = type(norm) is nn.GroupNorm and type(act) is nn.SiLU
            if exact and not (has_hooks(norm) or has_hooks(act)):
                if id(norm) not in replacements:
                    replacements[id(norm)] = GroupNormSiLU.from_group_norm(norm, backend=backend)
                pairs.append((module, first, second, replacements[id(norm)], act.training))
    with sigint_deferred():  # not a Ctrl-C between a norm and its SiLU: that SiLU would run twice
        for module, first, second, replacement, training in pairs:
            module._modules[first] = replacement
            module._modules[second] = nn.Identity().train(training)  # keeps model.training consistent
    return len(pairs)


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has hooks (forward or backward), which a replacement would drop."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)
