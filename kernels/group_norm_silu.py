"""GroupNorm + SiLU in Triton, forward and backward (math: csrc/group_norm_silu.h).

A program works on a tile of one sample: BLOCK_S positions by BLOCK_C channels,
loaded in x's memory order (NCHW: positions contiguous; channels_last: channels
contiguous). A column's channel comes from its index, so no element pays a
division to find its channel, and every load is coalesced in both layouts.

Two paths, chosen by `_plan`:

* fused: when a group fits in one tile (all its positions and channels, up to
  MAX_TILE elements), a program holds whole groups in registers. It reads x once,
  forms the mean and then the variance about it, and writes y. One read, one
  write: the floor. Small groups are packed several to a program, so that a
  channels_last row covers at least a 32-byte sector and a program has about
  TARGET_TILE elements of work.
* split: for large H*W, pass 1 writes per-(sample, channel, position-tile)
  partial moments; torch combines them in a fixed order (deterministic) into the
  group statistics; pass 2 normalizes each tile. Two reads, one write. The
  forward's partial moments are, per column of a tile, its float mean m and
  the sums of h - m and of (h - m)^2 (two passes over registers, as in the
  fused path); torch combines them in float64 by Chan's parallel formula, so
  that neither a mean large against the spread nor values far from the mean
  make float32 sums cancel.

The backward follows the same two paths over the per-(n, c) sums
A = sum du*xhat, B = sum du, X = sum xhat.

Tile sizes are a first choice, not yet tuned on a GPU (see BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .checks import check_group_norm_args, check_group_norm_backward_args
from .philox import launchable
from .rounding import to_element_type

MAX_TILE = 16384  # forward elements per program: 32 per thread at 16 warps
MAX_TILE_BACKWARD = 8192  # the backward holds x and dy
TARGET_TILE = 4096  # pack small groups until a program has about this many
MAX_GROUP_COLS = 256  # a fused program's channels
SPLIT_TILE = 4096  # elements per program on the split path
MIN_ROW_BYTES = 32  # a channels_last tile row fills at least one 32-byte sector


@dataclass(frozen=True)
class Plan:
    """How a (C, S, G) problem is cut into programs."""

    fused: bool
    block_c: int  # channels per tile (power of two, padded)
    block_s: int  # positions per tile (power of two)
    block_g: int  # groups per fused tile (power of two; 1 on the split path)
    groups_per_tile: int  # fused: whole groups per program
    col_tiles: int  # programs across the channels of one sample
    pos_tiles: int  # programs across the positions (1 when fused)
    num_warps: int


def plan(c: int, s: int, g: int, elem_bytes: int, channels_last: bool, backward: bool = False) -> Plan:
    """Fused when whole groups fit in a tile of MAX_TILE (MAX_TILE_BACKWARD)
    elements, split otherwise (read at call time, so tests can shrink them)."""
    max_tile = MAX_TILE_BACKWARD if backward else MAX_TILE
    cg = c // g
    p2 = triton.next_power_of_2
    gpt = 1
    if cg <= MAX_GROUP_COLS:
        while gpt * 2 <= g and p2(gpt * 2 * cg) <= MAX_GROUP_COLS and p2(gpt * 2 * cg) * p2(s) <= max_tile and (
            p2(gpt * cg) * p2(s) < TARGET_TILE or (channels_last and gpt * cg * elem_bytes < MIN_ROW_BYTES)
        ):
            gpt *= 2
    if cg <= MAX_GROUP_COLS and p2(gpt * cg) * p2(s) <= max_tile:
        block_c, block_s = p2(gpt * cg), p2(s)
        return Plan(True, block_c, block_s, p2(gpt), gpt, triton.cdiv(g, gpt), 1, _warps(block_c * block_s))
    # Split: any column range will do, since torch forms the group sums.
    block_c = min(p2(c), 64 if channels_last else 4)
    block_s = min(p2(s), max(1, SPLIT_TILE // block_c))
    return Plan(False, block_c, block_s, 1, 0, triton.cdiv(c, block_c), triton.cdiv(s, block_s), _warps(block_c * block_s))


def _warps(elements: int) -> int:
    return max(1, min(16, elements // 512))  # about 16 elements per thread


@triton.jit
def _split_pid(TILES):
    """(row, position tile) of this program of a split-path launch. Its grid is
    1-D, N * col_tiles * TILES programs, row-major: CUDA caps a grid's second
    axis at 65535, which a large image's position tiles pass (64 channels_last
    channels at 2048 x 2048: 65536), and the first at 2^31 - 1. The tile index is
    int64: its first position, tile * BLOCK_S, passes 2^31 in a channel of more
    than 2^31 positions (int32 wrapped negative there, and loads ran before the tensor)."""
    pid = tl.program_id(0)
    return pid // TILES, (pid % TILES).to(tl.int64)


@triton.jit
def _tile(x_ptr, add_ptr, pid_row, pid_pos, C, S, COLS_PER_PROGRAM,
          HAS_ADD: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """The tile of program (pid_row, pid_pos): sample n = pid_row // col_tiles,
    channels c0 .. c0 + COLS_PER_PROGRAM (capped at C), positions of tile pid_pos.
    Returns h = x + add (float32, 0 outside), the mask, the columns' channels, the
    column mask, the sample's offset and the in-sample memory offsets."""
    col_tiles = tl.cdiv(C, COLS_PER_PROGRAM)
    n = (pid_row // col_tiles).to(tl.int64)
    k = tl.arange(0, BLOCK_C)
    c = (pid_row % col_tiles) * COLS_PER_PROGRAM + k
    cmask = (k < COLS_PER_PROGRAM) & (c < C)
    s = pid_pos * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = (s < S)[:, None] & cmask[None, :]
    if CHANNELS_LAST:
        off = s.to(tl.int64)[:, None] * C + c[None, :]
    else:
        off = c.to(tl.int64)[None, :] * S + s[:, None]
    base = n * C * S
    h = tl.load(x_ptr + base + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        h = tl.where(mask, h + tl.load(add_ptr + n * C + c, mask=cmask, other=0.0).to(tl.float32)[None, :], 0.0)
    return h, mask, n, c, cmask, base, off


@triton.jit
def _affine_act(xhat, w_ptr, b_ptr, c, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                BLOCK_C: tl.constexpr):
    """u = xhat * w + b per column; returns (u, y = act(u), w per column)."""
    w = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + c, mask=cmask, other=1.0).to(tl.float32)
    u = xhat * w[None, :]
    if HAS_B:
        u += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    y = u
    if ACT:
        y = u * tl.sigmoid(u)
    return u, y, w


@triton.jit
def _group_sum(col, member):
    """Per-group sums [BLOCK_G] of per-column values [BLOCK_C]."""
    return tl.sum(tl.where(member, col[:, None], 0.0), axis=0)


@triton.jit
def _to_columns(per_group, member):
    """Per-column copies [BLOCK_C] of per-group values [BLOCK_G]."""
    return tl.sum(tl.where(member, per_group[None, :], 0.0), axis=1)


@triton.jit
def _membership(cmask, CG, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr):
    """member[k, j]: tile column k holds a channel of the program's j-th group."""
    k = tl.arange(0, BLOCK_C)
    return ((k // CG)[:, None] == tl.arange(0, BLOCK_G)[None, :]) & cmask[:, None]


@triton.jit
def gn_forward_fused_kernel(
    x_ptr,  # *T [N, C, S] input, NCHW or NHWC memory
    w_ptr,  # *P [C] weight (HAS_W)
    b_ptr,  # *P [C] bias (HAS_B)
    add_ptr,  # *P [N, C] added before the norm (HAS_ADD)
    y_ptr,  # *T [N, C, S] output, x's memory order
    mean_ptr,  # *f32 [N, G] out: group means
    rstd_ptr,  # *f32 [N, G] out: group 1/sqrt(var + eps)
    C, S, G,  # channels, positions per channel, groups
    CG,  # channels per group
    GROUPS_PER_TILE,  # whole groups per program
    eps,  # variance epsilon
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr,
    ACT: tl.constexpr,  # apply SiLU
    CHANNELS_LAST: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
):
    pid = tl.program_id(0)
    h, mask, n, c, cmask, base, off = _tile(x_ptr, add_ptr, pid, 0, C, S, GROUPS_PER_TILE * CG,
                                            HAS_ADD, CHANNELS_LAST, BLOCK_S, BLOCK_C)
    member = _membership(cmask, CG, BLOCK_C, BLOCK_G)
    g0 = (pid % tl.cdiv(G, GROUPS_PER_TILE)) * GROUPS_PER_TILE
    count = CG * S
    # Mean, then the variance about it, both from registers (x is read once).
    mean_g = _group_sum(tl.sum(h, axis=0), member) / count
    d = tl.where(mask, h - _to_columns(mean_g, member)[None, :], 0.0)
    # sqrt_rn, not sqrt: on the GPU tl.sqrt is sqrt.approx.ftz, which flushes
    # a subnormal variance + eps (a constant group, eps below 1.2e-38) to 0,
    # and rstd would be inf (y NaN) where the reference gives 1 / sqrt(eps).
    rstd_g = 1.0 / tl.sqrt_rn(_group_sum(tl.sum(d * d, axis=0), member) / count + eps)
    _, y, _ = _affine_act(d * _to_columns(rstd_g, member)[None, :], w_ptr, b_ptr, c, cmask, HAS_W, HAS_B, ACT, BLOCK_C)
    tl.store(y_ptr + base + off, to_element_type(y, y_ptr.dtype.element_ty), mask=mask)
    j = tl.arange(0, BLOCK_G)
    gmask = (j < GROUPS_PER_TILE) & (g0 + j < G)
    tl.store(mean_ptr + n * G + g0 + j, mean_g, mask=gmask)
    tl.store(rstd_ptr + n * G + g0 + j, rstd_g, mask=gmask)


@triton.jit
def gn_moments_kernel(
    x_ptr, add_ptr,  # as in the fused kernel
    mean_ptr,  # *f32 [N, C, T] out: per position tile, m, the float mean of h over the tile's positions
    dev_ptr,  # *f32 [N, C, T] out: D, sum of h - m (m's rounding: the host recovers the exact sum n m + D)
    m2_ptr,  # *f32 [N, C, T] out: sum of (h - m)^2
    C, S, COLS, TILES,  # COLS: channels per program; TILES: position tiles per row (see _split_pid)
    HAS_ADD: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid, t = _split_pid(TILES)
    tiles = TILES
    h, mask, n, c, cmask, base, off = _tile(x_ptr, add_ptr, pid, t, C, S, COLS, HAS_ADD, CHANNELS_LAST, BLOCK_S, BLOCK_C)
    # Every column of the tile has the same valid positions, at least one (t < T);
    # a column outside the channels holds zeros and is not stored.
    rows = tl.minimum(S - t * BLOCK_S, BLOCK_S)
    col_mean = tl.sum(h, axis=0) / rows
    d = tl.where(mask, h - col_mean[None, :], 0.0)
    out = (n * C + c) * tiles + t
    tl.store(mean_ptr + out, col_mean, mask=cmask)
    # Where m is not finite (the column holds +-Inf or NaN), D = 0: h - m is NaN
    # at an infinite h, and n m is the column's sum as it stands (+-Inf, or NaN),
    # so that the group's mean is +-Inf as the fused path's sum gives it, not
    # NaN (the sum of squares is NaN there: so is the variance).
    tl.store(dev_ptr + out, tl.where(tl.abs(col_mean) < float("inf"), tl.sum(d, axis=0), 0.0), mask=cmask)
    tl.store(m2_ptr + out, tl.sum(d * d, axis=0), mask=cmask)


@triton.jit
def gn_normalize_kernel(
    x_ptr, w_ptr, b_ptr, add_ptr, y_ptr,  # as in the fused kernel
    mean_ptr, rstd_ptr,  # *f32 [N, G] group statistics
    C, S, G, CG, COLS, TILES,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, ACT: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row, t = _split_pid(TILES)
    h, mask, n, c, cmask, base, off = _tile(x_ptr, add_ptr, row, t, C, S, COLS, HAS_ADD, CHANNELS_LAST, BLOCK_S, BLOCK_C)
    ng = n * G + c // CG
    mean = tl.load(mean_ptr + ng, mask=cmask, other=0.0)
    rstd = tl.load(rstd_ptr + ng, mask=cmask, other=0.0)
    xhat = tl.where(mask, (h - mean[None, :]) * rstd[None, :], 0.0)  # padding stays finite
    _, y, _ = _affine_act(xhat, w_ptr, b_ptr, c, cmask, HAS_W, HAS_B, ACT, BLOCK_C)
    tl.store(y_ptr + base + off, to_element_type(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _xhat_du(x_ptr, dy_ptr, w_ptr, b_ptr, add_ptr, mean_ptr, rstd_ptr, pid_row, pid_pos, C, S, G, CG, COLS,
             HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, ACT: tl.constexpr,
             CHANNELS_LAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """The backward's per-element terms of a tile: xhat, du = dy * SiLU'(u)
    (0 outside the tile), and per column w, rstd and the channel."""
    h, mask, n, c, cmask, base, off = _tile(x_ptr, add_ptr, pid_row, pid_pos, C, S, COLS,
                                            HAS_ADD, CHANNELS_LAST, BLOCK_S, BLOCK_C)
    ng = n * G + c // CG
    rstd = tl.load(rstd_ptr + ng, mask=cmask, other=0.0)
    xhat = tl.where(mask, (h - tl.load(mean_ptr + ng, mask=cmask, other=0.0)[None, :]) * rstd[None, :], 0.0)
    u, _, w = _affine_act(xhat, w_ptr, b_ptr, c, cmask, HAS_W, HAS_B, False, BLOCK_C)
    du = tl.load(dy_ptr + base + off, mask=mask, other=0.0).to(tl.float32)
    if ACT:
        sg = tl.sigmoid(u)
        du = du * sg * (1.0 + u * (1.0 - sg))
    return xhat, tl.where(mask, du, 0.0), w, rstd, n, c, cmask, mask, base, off


@triton.jit
def gn_backward_fused_kernel(
    dy_ptr, x_ptr, w_ptr, b_ptr, add_ptr,  # as in the forward; dy in x's memory order
    mean_ptr, rstd_ptr,  # *f32 [N, G] forward statistics
    dx_ptr,  # *T [N, C, S] out, x's memory order
    a_ptr, bsum_ptr,  # *f32 [N, C] out: A = sum du*xhat, B = sum du (for dweight, dbias)
    dadd_ptr,  # *f32 [N, C] out: sum over positions of dh
    C, S, G, CG, GROUPS_PER_TILE,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, ACT: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
):
    xhat, du, w, rstd, n, c, cmask, mask, base, off = _xhat_du(
        x_ptr, dy_ptr, w_ptr, b_ptr, add_ptr, mean_ptr, rstd_ptr, tl.program_id(0), 0, C, S, G, CG,
        GROUPS_PER_TILE * CG, HAS_W, HAS_B, HAS_ADD, ACT, CHANNELS_LAST, BLOCK_S, BLOCK_C)
    col_a = tl.sum(du * xhat, axis=0)
    col_b = tl.sum(du, axis=0)
    member = _membership(cmask, CG, BLOCK_C, BLOCK_G)
    count = CG * S
    m1 = _to_columns(_group_sum(w * col_b, member), member) / count
    m2 = _to_columns(_group_sum(w * col_a, member), member) / count
    dx = rstd[None, :] * (du * w[None, :] - m1[None, :] - xhat * m2[None, :])
    tl.store(dx_ptr + base + off, to_element_type(dx, dx_ptr.dtype.element_ty), mask=mask)
    tl.store(a_ptr + n * C + c, col_a, mask=cmask)
    tl.store(bsum_ptr + n * C + c, col_b, mask=cmask)
    tl.store(dadd_ptr + n * C + c, rstd * (w * col_b - S * m1 - tl.sum(xhat, axis=0) * m2), mask=cmask)


@triton.jit
def gn_backward_sums_kernel(
    dy_ptr, x_ptr, w_ptr, b_ptr, add_ptr, mean_ptr, rstd_ptr,  # as in the fused backward
    a_ptr, bsum_ptr, xsum_ptr,  # *f32 [N, C, T] out: per position tile, A, B and X
    C, S, G, CG, COLS, TILES,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, ACT: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row, t = _split_pid(TILES)
    tiles = TILES
    xhat, du, w, rstd, n, c, cmask, mask, base, off = _xhat_du(
        x_ptr, dy_ptr, w_ptr, b_ptr, add_ptr, mean_ptr, rstd_ptr, row, t, C, S, G, CG, COLS,
        HAS_W, HAS_B, HAS_ADD, ACT, CHANNELS_LAST, BLOCK_S, BLOCK_C)
    out = (n * C + c) * tiles + t
    tl.store(a_ptr + out, tl.sum(du * xhat, axis=0), mask=cmask)
    tl.store(bsum_ptr + out, tl.sum(du, axis=0), mask=cmask)
    tl.store(xsum_ptr + out, tl.sum(xhat, axis=0), mask=cmask)


@triton.jit
def gn_backward_dx_kernel(
    dy_ptr, x_ptr, w_ptr, b_ptr, add_ptr, mean_ptr, rstd_ptr,  # as in the fused backward
    m1_ptr, m2_ptr,  # *f32 [N, G] group means of w*B and w*A over its elements
    dx_ptr,  # *T [N, C, S] out, x's memory order
    C, S, G, CG, COLS, TILES,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, ACT: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row, t = _split_pid(TILES)
    xhat, du, w, rstd, n, c, cmask, mask, base, off = _xhat_du(
        x_ptr, dy_ptr, w_ptr, b_ptr, add_ptr, mean_ptr, rstd_ptr, row, t, C, S, G, CG,
        COLS, HAS_W, HAS_B, HAS_ADD, ACT, CHANNELS_LAST, BLOCK_S, BLOCK_C)
    ng = n * G + c // CG
    m1 = tl.load(m1_ptr + ng, mask=cmask, other=0.0)
    m2 = tl.load(m2_ptr + ng, mask=cmask, other=0.0)
    dx = rstd[None, :] * (du * w[None, :] - m1[None, :] - xhat * m2[None, :])
    tl.store(dx_ptr + base + off, to_element_type(dx, dx_ptr.dtype.element_ty), mask=mask)


def _layout(x: torch.Tensor) -> Tuple[int, int, int, bool]:
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // (n * c) if n * c else 0
    channels_last = x.dim() == 4 and not x.is_contiguous()
    return n, c, s, channels_last


def _flags(weight, bias, add, act: bool, channels_last: bool, p: Plan) -> dict:
    return dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_ADD=add is not None, ACT=act,
                CHANNELS_LAST=channels_last, BLOCK_S=p.block_s, BLOCK_C=p.block_c, num_warps=p.num_warps)


def _or(t: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return t if t is not None else x  # a pointer the kernel never reads (its HAS_* flag is off)


@triton_op("ddpm_fast::group_norm_silu_triton", mutates_args=())
def group_norm_silu_triton(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    add: Optional[torch.Tensor],
    num_groups: int,
    eps: float,
    act: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_group_norm_args(x, weight, bias, add, num_groups)
    n, c, s, channels_last = _layout(x)
    y = torch.empty_like(x)
    mean = torch.empty((n, num_groups), device=x.device, dtype=torch.float32)
    rstd = torch.empty((n, num_groups), device=x.device, dtype=torch.float32)
    if x.numel() == 0:  # groups of no values (an empty spatial extent): no statistics, NaN
        mean.fill_(float("nan"))
        rstd.fill_(float("nan"))
        return y, mean, rstd
    g, cg = num_groups, c // num_groups
    p = plan(c, s, g, x.element_size(), channels_last)
    flags = _flags(weight, bias, add, act, channels_last, p)
    w, b, a = _or(weight, x), _or(bias, x), _or(add, x)
    if p.fused:
        launchable(gn_forward_fused_kernel)[(n * p.col_tiles,)](
            x, w, b, a, y, mean, rstd, c, s, g, cg, p.groups_per_tile, eps, BLOCK_G=p.block_g, **flags)
        return y, mean, rstd
    sums = torch.empty((3, n, c, p.pos_tiles), device=x.device, dtype=torch.float32)
    grid = (n * p.col_tiles * p.pos_tiles,)  # 1-D: see _split_pid
    launchable(gn_moments_kernel)[grid](
        x, a, sums[0], sums[1], sums[2], c, s, p.block_c, p.pos_tiles,
        HAS_ADD=add is not None, CHANNELS_LAST=channels_last, BLOCK_S=p.block_s, BLOCK_C=p.block_c,
        num_warps=p.num_warps)
    # Chan's parallel formula in float64, over each group's (channel, tile) parts
    # in a fixed order: M2 = sum of the parts' M2 + sum of n_t (mean_t - mean)^2.
    # A part of n_t values about its float mean m with D = sum (h - m) and
    # Q = sum (h - m)^2 has the sum n_t m + D and M2 = Q - D^2 / n_t: exact
    # however m was rounded (a float sum of h would carry its rounding, of
    # order |mean| against the spread, into the between-part term).
    part_m, part_d, part_q = sums.double().view(3, n, g, cg * p.pos_tiles)
    part_n = (s - p.block_s * torch.arange(p.pos_tiles, device=x.device)).clamp(max=p.block_s).double().repeat(cg)
    part_sum = part_m * part_n + part_d
    part_m2 = part_q - part_d * part_d / part_n
    count = cg * s
    group_mean = part_sum.sum(-1) / count
    m2 = part_m2.sum(-1) + (part_n * (part_sum / part_n - group_mean[..., None]).square()).sum(-1)
    mean.copy_(group_mean)
    rstd.copy_(torch.rsqrt(m2 / count + eps))
    launchable(gn_normalize_kernel)[grid](x, w, b, a, y, mean, rstd, c, s, g, cg, p.block_c, p.pos_tiles, **flags)
    return y, mean, rstd


@triton_op("ddpm_fast::group_norm_silu_triton_backward", mutates_args=())
def group_norm_silu_triton_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    add: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    act: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_group_norm_args(x, weight, bias, add, num_groups)
    check_group_norm_backward_args(dy, x, mean, rstd, num_groups)
    n, c, s, channels_last = _layout(x)
    dy = dy.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)  # as x: as read
    dx = torch.empty_like(x)
    col_a = torch.zeros((n, c), device=x.device, dtype=torch.float32)
    col_b = torch.zeros((n, c), device=x.device, dtype=torch.float32)
    dadd = torch.zeros((n, c), device=x.device, dtype=torch.float32)
    if x.numel() > 0:
        g, cg = num_groups, c // num_groups
        p = plan(c, s, g, x.element_size(), channels_last, backward=True)
        flags = _flags(weight, bias, add, act, channels_last, p)
        params = (_or(weight, x), _or(bias, x), _or(add, x))
        if p.fused:
            launchable(gn_backward_fused_kernel)[(n * p.col_tiles,)](
                dy, x, *params, mean, rstd, dx, col_a, col_b, dadd, c, s, g, cg, p.groups_per_tile,
                BLOCK_G=p.block_g, **flags)
        else:
            sums = torch.empty((3, n, c, p.pos_tiles), device=x.device, dtype=torch.float32)
            grid = (n * p.col_tiles * p.pos_tiles,)  # 1-D: see _split_pid
            launchable(gn_backward_sums_kernel)[grid](
                dy, x, *params, mean, rstd, sums[0], sums[1], sums[2], c, s, g, cg, p.block_c, p.pos_tiles, **flags)
            # In float32: against float64, at 1x32x512x512 (256 position tiles) and
            # 1x128x256x256 (64, or 1024 channels_last), N(0.5, 2) x, the largest
            # error of dx, dweight, dbias and dadd was at most 1e-6 of the
            # largest value (torch's float32 CPU backward: 3e-6 to 1.4e-5; dadd
            # of one-channel groups, 0 in float64: 2e-5 absolute, torch 6e-3), and
            # combining in float64 moved no largest error past its third digit
            # (Triton interpreter; the CUDA host combines the same way).
            col_a, col_b, col_x = sums.sum(-1)
            w = weight.float() if weight is not None else torch.ones(c, dtype=torch.float32, device=x.device)
            count = cg * s
            m1 = (w * col_b).view(n, g, cg).sum(-1) / count
            m2 = (w * col_a).view(n, g, cg).sum(-1) / count
            launchable(gn_backward_dx_kernel)[grid](
                dy, x, *params, mean, rstd, m1, m2, dx, c, s, g, cg, p.block_c, p.pos_tiles, **flags)
            per_channel = lambda t: t.repeat_interleave(cg, dim=1)  # noqa: E731
            dadd = per_channel(rstd) * (w * col_b - s * per_channel(m1) - col_x * per_channel(m2))
    w_type = weight.dtype if weight is not None else x.dtype
    b_type = bias.dtype if bias is not None else x.dtype
    a_type = add.dtype if add is not None else x.dtype
    return dx, col_a.sum(0).to(w_type), col_b.sum(0).to(b_type), dadd.to(a_type)
