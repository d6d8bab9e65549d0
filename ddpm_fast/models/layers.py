"""Building blocks of the DDPM U-Net (Ho et al. 2020, appendix B; the layout of
the authors' TensorFlow code, ``diffusion_tf/models/unet.py``).

Every block exists in two forms that share parameter names and state_dicts:
the fused one, where each GroupNorm followed by SiLU is one
``GroupNormSiLU`` op (with the ResBlock's time-embedding add folded into its
second norm), and ``reference=True``, plain ``nn.GroupNorm`` + ``F.silu`` +
an explicit add, which defines what the fused one must compute.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import under_a_transform
from ..nn import GroupNormSiLU

__all__ = ["timestep_embedding", "make_norm", "norm_act", "ResBlock", "AttnBlock", "Downsample", "Upsample"]


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The transformer's sinusoidal position embedding of timesteps (Vaswani et
    al. 2017, as used by DDPM): [sin(t f_i), cos(t f_i)] with
    f_i = 10000^(-i / (dim/2 - 1)), i < dim/2, zero-padded to ``dim`` when odd.

    Always float32: t reaches 999, where bfloat16 could not even hold t f_0;
    the caller casts the result to the model's dtype.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 4:  # half - 1 = 0 below: NaN frequencies
        raise ValueError(f"timestep_embedding: dim must be an int >= 4 (two frequencies at least), got {dim!r}")
    half = dim // 2
    # -ln(10000) i / (half - 1), in this order of operations (as diffusers does)
    # so that checkpoints converted from diffusers see the same embedding bit for bit.
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1)
    angles = t.to(torch.float32)[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def make_norm(channels: int, num_groups: int, eps: float, *, act: bool, reference: bool, backend: str) -> nn.GroupNorm:
    """The block's GroupNorm: fused (``GroupNormSiLU``) or plain ``nn.GroupNorm``;
    either way an ``nn.GroupNorm`` subclass with the same state_dict keys."""
    if reference:
        return nn.GroupNorm(num_groups, channels, eps)
    return GroupNormSiLU(num_groups, channels, eps, act=act, backend=backend)


def norm_act(norm: nn.GroupNorm, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """SiLU(norm(x + add[:, :, None, None])): one op for a fused norm, three for a plain one."""
    if isinstance(norm, GroupNormSiLU):
        return norm(x, add)
    if add is not None:
        x = x + add.to(x.dtype)[:, :, None, None]
    return F.silu(norm(x))


class ResBlock(nn.Module):
    """Wide ResNet block with a per-channel time-embedding bias (the paper's
    ``resnet_block``): GN+SiLU -> conv3x3 -> + Linear(temb) -> GN+SiLU ->
    dropout -> conv3x3, plus x (through a 1x1 conv when the width changes)."""

    def __init__(
        self, in_ch: int, out_ch: int, temb_ch: int, *, dropout: float, num_groups: int, eps: float,
        reference: bool, backend: str,
    ) -> None:
        super().__init__()
        self.norm1 = make_norm(in_ch, num_groups, eps, act=True, reference=reference, backend=backend)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = make_norm(out_ch, num_groups, eps, act=True, reference=reference, backend=backend)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """``temb`` is SiLU(time embedding), computed once for all blocks."""
        h = self.conv1(norm_act(self.norm1, x))
        # The time embedding enters as a bias per sample and channel, added
        # before norm2: fused, the add happens inside the norm's first read of h.
        h = norm_act(self.norm2, h, self.temb_proj(temb))
        h = self.conv2(self.dropout(h))
        return (x if self.shortcut is None else self.shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (the paper's
    ``attn_block``, used at 16x16): GroupNorm (no SiLU), q/k/v projections,
    softmax(q k^T / sqrt(C)) v, output projection, residual."""

    def __init__(self, ch: int, *, num_groups: int, eps: float, reference: bool, backend: str) -> None:
        super().__init__()
        self.norm = make_norm(ch, num_groups, eps, act=False, reference=reference, backend=backend)
        self.q = nn.Linear(ch, ch)
        self.k = nn.Linear(ch, ch)
        self.v = nn.Linear(ch, ch)
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, height, width = x.shape
        # (N, C, H, W) -> (N, HW, C) tokens: a free view for channels_last input.
        h = self.norm(x).flatten(2).transpose(1, 2)
        # One GEMM for q, k and v; the three weights stay separate parameters
        # so that state_dicts map one to one onto other implementations.
        weight = torch.cat([self.q.weight, self.k.weight, self.v.weight])
        bias = torch.cat([self.q.bias, self.k.bias, self.v.bias])
        q, k, v = F.linear(h, weight, bias).unsqueeze(1).chunk(3, dim=-1)  # (N, 1, HW, C): one head
        if under_a_transform():
            # torch's fused attention kernels have no forward-mode derivative (jvp,
            # dual tensors) and no vmap rule: the same softmax(q k^T / sqrt(C)) v
            # in plain ops, which every transform differentiates and batches.
            attended = torch.softmax(q @ k.transpose(-2, -1) * c**-0.5, dim=-1) @ v
        else:
            attended = F.scaled_dot_product_attention(q, k, v)
        out = self.proj_out(attended.squeeze(1))
        # back to (N, C, H, W); a view with channels_last strides
        return x + out.transpose(1, 2).reshape(n, c, height, width)


class Downsample(nn.Module):
    """3x3 stride-2 conv after padding right and bottom by one, as TF's
    ``padding='SAME'`` does for even sizes (the paper's ``downsample``)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv (the paper's ``upsample``)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
