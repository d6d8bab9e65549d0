"""The DDPM U-Net (Ho et al. 2020, appendix B): a PixelCNN++-style U-Net of
wide ResNet blocks with GroupNorm, single-head self-attention at 16x16 and a
sinusoidal time embedding. ``UNet.ddpm_cifar10()`` is the paper's 35.7M
parameter CIFAR-10 model, layer for layer the authors' TensorFlow model and
diffusers' ``UNet2DModel`` of ``google/ddpm-cifar10-32`` (``from_diffusers``
loads those weights).
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_dense
from ..ops import BACKENDS
from .layers import AttnBlock, Downsample, ResBlock, Upsample, make_norm, norm_act, timestep_embedding

__all__ = ["UNet"]

_CONFIG_KEYS = (
    "in_channels", "out_channels", "image_size", "ch", "ch_mult", "num_res_blocks",
    "attn_resolutions", "dropout", "num_groups", "eps",
)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"UNet: {name} must be a positive int, got {value!r}")
    return int(value)


def _at_half(image_size: object) -> tuple[int]:
    """A preset's attention resolution, half its image size (at least 1, so that
    an image size too small to halve is what the UNet's message names)."""
    return (max(1, _positive_int("image_size", image_size) // 2),)


def _int_tuple(name: str, value: object) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"UNet: {name} must be a sequence of positive ints, got {value!r}")
    return tuple(_positive_int(f"{name}[{i}]", v) for i, v in enumerate(value))


class _Level(nn.Module):
    """One resolution of the down or up path: ResBlocks (each followed by
    attention at the attention resolutions) and an optional resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()
        self.downsample: Downsample | None = None
        self.upsample: Upsample | None = None


class _Mid(nn.Module):
    def __init__(self, ch: int, temb_ch: int, **block: Any) -> None:
        super().__init__()
        norm = {k: block[k] for k in ("num_groups", "eps", "reference", "backend")}
        self.res1 = ResBlock(ch, ch, temb_ch, **block)
        self.attn = AttnBlock(ch, **norm)
        self.res2 = ResBlock(ch, ch, temb_ch, **block)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(h, temb)), temb)


class _TimeEmbedding(nn.Module):
    """Sinusoidal embedding -> Linear(ch, 4ch) -> SiLU -> Linear(4ch, 4ch)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.ch = ch
        self.linear1 = nn.Linear(ch, 4 * ch)
        self.linear2 = nn.Linear(4 * ch, 4 * ch)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.ch).to(self.linear1.weight.dtype)  # float32, then the model's dtype
        return self.linear2(F.silu(self.linear1(emb)))


class UNet(nn.Module):
    """The DDPM noise predictor ``eps_theta(x_t, t)``.

    Args (keyword only):
        in_channels, out_channels: image channels in and out (out defaults to in).
        image_size: the (square) image side; forward checks its input against it.
        ch: base width; level i has ``ch * ch_mult[i]`` channels.
        ch_mult: width multipliers, one per resolution (the resolution halves
            between levels, so image_size must divide by 2**(len(ch_mult)-1)).
        num_res_blocks: ResBlocks per level on the way down (one more on the way up).
        attn_resolutions: resolutions (image sides) that get self-attention.
        dropout: inside every ResBlock (0.1 in the paper's CIFAR-10 model).
        num_groups, eps: of every GroupNorm.
        reference: plain ``nn.GroupNorm`` + ``F.silu`` + explicit adds instead of
            the fused op (same parameters, so weights move between the two).
        backend: the fused op's backend (``auto``, ``reference``, ``cpu``, ``cuda``, ``triton``).

    ``forward(x, t)``: x (N, in_channels, image_size, image_size) in any float
    dtype and memory format, t an integer tensor (N,) or a scalar; returns eps in
    x's dtype. The model may be cast (``model.to(torch.bfloat16)``) or run under
    autocast; the time embedding is computed in float32 either way.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        out_channels: int | None = None,
        image_size: int = 32,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        num_groups: int = 32,
        eps: float = 1e-6,
        reference: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        in_channels = _positive_int("in_channels", in_channels)
        out_channels = in_channels if out_channels is None else _positive_int("out_channels", out_channels)
        image_size = _positive_int("image_size", image_size)
        ch = _positive_int("ch", ch)
        ch_mult = _int_tuple("ch_mult", ch_mult)
        num_res_blocks = _positive_int("num_res_blocks", num_res_blocks)
        attn_resolutions = _int_tuple("attn_resolutions", attn_resolutions)
        num_groups = _positive_int("num_groups", num_groups)
        if not ch_mult:
            raise ValueError("UNet: ch_mult must name at least one level")
        if ch % 2 or ch < 4:
            raise ValueError(f"UNet: ch must be even and >= 4 (it is the sinusoidal embedding's width), got {ch}")
        if ch % num_groups:
            raise ValueError(f"UNet: ch ({ch}) must be divisible by num_groups ({num_groups})")
        levels = len(ch_mult)
        if image_size % 2 ** (levels - 1):
            raise ValueError(
                f"UNet: image_size ({image_size}) must be divisible by 2**(len(ch_mult)-1) = {2 ** (levels - 1)}"
            )
        resolutions = [image_size // 2**i for i in range(levels)]
        unknown = sorted(set(attn_resolutions) - set(resolutions))
        if unknown:
            raise ValueError(f"UNet: attn_resolutions {unknown} are not among the model's resolutions {resolutions}")
        # The narrowest width normalized at resolution i: level i's own, or the
        # previous level's (at level 0, conv_in's ch), which its first ResBlock takes in.
        narrowest = [min(ch_mult[i - 1] if i else 1, m) for i, m in enumerate(ch_mult)]
        if any(ch * m // num_groups * r * r < 2 for m, r in zip(narrowest, resolutions)):
            raise ValueError(f"UNet: with num_groups={num_groups} some GroupNorm group would hold a single value")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
            raise ValueError(f"UNet: dropout must be a number in [0, 1), got {dropout!r}")
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < math.inf:
            # (inf zeroed every output, and its config was not JSON: "Infinity")
            raise ValueError(f"UNet: eps must be a finite number > 0, got {eps!r}")
        if not isinstance(reference, bool):
            raise TypeError(f"UNet: reference must be a bool, got {type(reference).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"UNet: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")

        self.in_channels, self.out_channels, self.image_size = in_channels, out_channels, image_size
        self.reference, self.backend = reference, backend
        self._config = dict(
            in_channels=in_channels, out_channels=out_channels, image_size=image_size, ch=ch,
            ch_mult=list(ch_mult), num_res_blocks=num_res_blocks, attn_resolutions=list(attn_resolutions),
            dropout=float(dropout), num_groups=num_groups, eps=float(eps),
        )
        temb_ch = 4 * ch
        block = dict(dropout=float(dropout), num_groups=num_groups, eps=float(eps), reference=reference, backend=backend)
        norm = {k: block[k] for k in ("num_groups", "eps", "reference", "backend")}

        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.temb = _TimeEmbedding(ch)
        # Down: the widths of the activations the up path will concatenate back.
        skips, width = [ch], ch
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level = _Level()
            for _ in range(num_res_blocks):
                level.res.append(ResBlock(width, ch * mult, temb_ch, **block))
                width = ch * mult
                if resolutions[i] in attn_resolutions:
                    level.attn.append(AttnBlock(width, **norm))
                skips.append(width)
            if i != levels - 1:
                level.downsample = Downsample(width)
                skips.append(width)
            self.down.append(level)
        self.mid = _Mid(width, temb_ch, **block)
        # Up, built in resolution order (up[i] runs at resolution i) but run in reverse.
        ups: list[_Level] = []
        for i, mult in reversed(list(enumerate(ch_mult))):
            level = _Level()
            for _ in range(num_res_blocks + 1):
                level.res.append(ResBlock(width + skips.pop(), ch * mult, temb_ch, **block))
                width = ch * mult
                if resolutions[i] in attn_resolutions:
                    level.attn.append(AttnBlock(width, **norm))
            if i != 0:
                level.upsample = Upsample(width)
            ups.insert(0, level)
        self.up = nn.ModuleList(ups)
        self.norm_out = make_norm(width, num_groups, float(eps), act=True, reference=reference, backend=backend)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)
        self.reset_parameters()

    # ------------------------------------------------------------------ model

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The authors' initialisation: every conv and linear weight
        variance-scaled (fan_avg, uniform; i.e. Xavier-uniform), biases zero,
        and the last layer of each residual branch and of the network scaled by
        1e-10, so that each block starts as the identity."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        last = [self.conv_out] + [m.conv2 for m in self.modules() if isinstance(m, ResBlock)]
        last += [m.proj_out for m in self.modules() if isinstance(m, AttnBlock)]
        for module in last:
            nn.init.xavier_uniform_(module.weight, gain=1e-5)  # TF scale 1e-10 = gain 1e-5 squared

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        t = self._check_input(x, t)
        dtype = self.conv_in.weight.dtype
        temb = F.silu(self.temb(t))  # every ResBlock applies SiLU to temb first: do it once
        h = self.conv_in(x.to(dtype))
        hs = [h]
        for level in self.down:
            for i, res in enumerate(level.res):
                h = res(h, temb)
                if len(level.attn):
                    h = level.attn[i](h)
                hs.append(h)
            if level.downsample is not None:
                h = level.downsample(h)
                hs.append(h)
        h = self.mid(h, temb)
        for level in reversed(self.up):
            for i, res in enumerate(level.res):
                h = res(torch.cat([h, hs.pop()], dim=1), temb)
                if len(level.attn):
                    h = level.attn[i](h)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.conv_out(norm_act(self.norm_out, h)).to(x.dtype)

    def _check_input(self, x: object, t: object) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"UNet: x must be a torch.Tensor, got {type(x).__name__}")
        check_dense(x, "UNet", "x")
        if not x.is_floating_point():
            raise TypeError(f"UNet: x must be a floating point tensor, got {x.dtype}")
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"UNet: x must have shape (N, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        n = x.shape[0]
        if isinstance(t, bool) or (isinstance(t, torch.Tensor) and t.dtype == torch.bool):
            raise TypeError("UNet: t must be an int, a float or a numeric tensor, got a bool")
        if isinstance(t, numbers.Real):
            return torch.full((n,), t, dtype=torch.int64 if isinstance(t, numbers.Integral) else torch.float32, device=x.device)
        if not isinstance(t, torch.Tensor) or t.is_complex():
            raise TypeError(f"UNet: t must be an int or a real tensor, got {type(t).__name__}")
        check_dense(t, "UNet", "t")
        if t.dim() == 0:
            return t.to(x.device).expand(n)
        if tuple(t.shape) != (n,):
            raise ValueError(f"UNet: t must be a scalar or have shape ({n},) (one per sample), got {tuple(t.shape)}")
        return t.to(x.device)

    def extra_repr(self) -> str:
        return f"reference={self.reference}, backend={self.backend!r}"

    # ----------------------------------------------------------------- config

    @property
    def config(self) -> dict[str, Any]:
        """The constructor's arguments (without ``reference``/``backend``) as a JSON-ready dict."""
        return {k: list(v) if isinstance(v, list) else v for k, v in self._config.items()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> "UNet":
        """A fresh (randomly initialised) model from ``config``; missing keys take their defaults."""
        if not isinstance(config, Mapping):
            raise TypeError(f"UNet.from_config: config must be a mapping, got {type(config).__name__}")
        unknown = sorted(set(config) - set(_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"UNet.from_config: unknown keys {unknown}; a UNet config has {list(_CONFIG_KEYS)}")
        return cls(**{**config, **overrides})

    # ---------------------------------------------------------------- presets

    @classmethod
    def ddpm_cifar10(cls, **overrides: Any) -> "UNet":
        """The paper's CIFAR-10 model: 35.7M parameters, 32x32x3."""
        return cls(**{**dict(
            in_channels=3, image_size=32, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
            attn_resolutions=(16,), dropout=0.1,
        ), **overrides})

    @classmethod
    def small(cls, image_size: int = 32, in_channels: int = 3, **overrides: Any) -> "UNet":
        """A 6.5M parameter model for 32x32 data (three levels, attention at half resolution)."""
        return cls(**{**dict(
            in_channels=in_channels, image_size=image_size, ch=64, ch_mult=(1, 2, 2), num_res_blocks=2,
            attn_resolutions=_at_half(image_size), dropout=0.1,
        ), **overrides})

    @classmethod
    def tiny(cls, image_size: int = 8, in_channels: int = 1, **overrides: Any) -> "UNet":
        """A 0.18M parameter model for 8x8 digits that trains in minutes on a
        2-core CPU (a batch-128 forward takes 30-40 ms there): 16 channels at
        full resolution and 32 at half, one ResBlock per level, attention at the
        lower level, groups of 4 channels as in the CIFAR-10 model, and no
        dropout (it is too small to overfit in minutes)."""
        return cls(**{**dict(
            in_channels=in_channels, image_size=image_size, ch=16, ch_mult=(1, 2), num_res_blocks=1,
            attn_resolutions=_at_half(image_size), dropout=0.0, num_groups=4,
        ), **overrides})

    # ---------------------------------------------------------- save and load

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``folder`` (created
        if needed); each file is written to a temporary file and renamed, so a
        killed process never leaves a half-written one."""
        from .serialization import save_pretrained

        save_pretrained(self, folder)

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, *, weights: str = "model.safetensors",
        map_location: torch.device | str = "cpu", **overrides: Any,
    ) -> "UNet":
        """Load a ``save_pretrained`` folder, in eval mode (as diffusers' and
        transformers' ``from_pretrained``: dropout off; ``.train()`` to fine-tune);
        ``overrides`` go to the constructor (``reference``, ``backend``, ``dropout``, ...)."""
        from .serialization import load_pretrained

        return load_pretrained(cls, folder, weights=weights, map_location=map_location, overrides=overrides)

    @classmethod
    def from_diffusers(cls, model_or_folder: Any, **overrides: Any) -> "UNet":
        """Convert a diffusers ``UNet2DModel`` of the DDPM layout (an instance, or
        the folder it was saved to) into a float32 ``UNet`` on the CPU, in eval mode."""
        from .diffusers_interop import from_diffusers

        return from_diffusers(cls, model_or_folder, **overrides)
