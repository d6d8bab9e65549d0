"""Images out: model samples to uint8, PNG grids, ``.npz`` files and a loss
plot — with Pillow and NumPy only."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ._checks import is_int

__all__ = ["to_uint8", "make_grid", "save_grid", "save_npz", "plot_curve"]

_MIN_TILE_PX = 32  # small samples (8x8 digits) are upscaled to at least this
# How many samples a written grid shows by default (the first ones): a grid of
# every sample would not be looked at (50,000 made a 157 MB picture in 16 s).
GRID_SAMPLES = 256


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Float images in [-1, 1], N x C x H x W, as uint8 N x H x W x C:
    round((clamp(x, -1, 1) + 1) * 127.5), so that ``x = u / 127.5 - 1`` comes
    back as ``u`` exactly. NaN becomes 0 (black)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point() or x.shape[1] not in (1, 3):
        raise ValueError(f"x must be a floating N x C x H x W tensor (channels first) with C 1 or 3, got "
                         f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
    x = torch.nan_to_num(x.detach().float(), nan=-1.0)
    scaled = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).cpu().numpy()


def _check_nhwc(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] == 0 or images.shape[3] not in (1, 3):
        raise ValueError(f"images must be non-empty uint8 N x H x W x C with C 1 or 3, got {images.dtype} {images.shape}")
    return images


def make_grid(images: np.ndarray, nrow: int | None = None, padding: int = 2, scale: int = 1) -> np.ndarray:
    """Tile uint8 N x H x W x C images into one H' x W' x C picture, ``nrow``
    per row (default: a square), each upscaled ``scale`` times (nearest)."""
    images = _check_nhwc(images)
    for name, value, least in (("nrow", nrow, 1), ("padding", padding, 0), ("scale", scale, 1)):
        valid = is_int(value) and value >= least
        if not valid and not (name == "nrow" and value is None):
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    nrow, padding, scale = None if nrow is None else int(nrow), int(padding), int(scale)
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = images.shape
    nrow = min(nrow or math.ceil(math.sqrt(n)), n)
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for i, image in enumerate(images):
        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[top : top + h, left : left + w] = image
    return grid


def save_grid(images: np.ndarray, path: str | os.PathLike, nrow: int | None = None, scale: int | None = None) -> None:
    """Write a PNG grid of uint8 N x H x W x C images; small images are upscaled
    (by default to at least 32 px a tile) so that the picture is viewable.
    Written atomically: a killed process leaves the old picture or the new one."""
    from PIL import Image

    from .checkpoint import atomic_write

    images = _check_nhwc(images)
    if scale is None:
        scale = max(1, math.ceil(_MIN_TILE_PX / max(images.shape[1:3])))
    grid = make_grid(images, nrow, scale=scale)
    picture = Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid)
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def save_npz(images: np.ndarray, path: str | os.PathLike, **extra: np.ndarray) -> None:
    """Write uint8 N x H x W x C images under key ``images`` (plus ``extra``
    arrays), atomically: a killed process leaves no half-written file."""
    from .checkpoint import atomic_write

    images = _check_nhwc(images)
    clash = sorted({"file", "allow_pickle"} & extra.keys())  # names np.savez would take itself
    if clash:
        raise ValueError(f"save_npz: extra arrays may not be named {', '.join(clash)}")
    arrays = {"images": images, **extra}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


def plot_curve(
    values: Sequence[float],
    path: str | os.PathLike,
    *,
    steps: Sequence[float] | None = None,
    title: str = "loss",
    smooth: int = 20,
    log_y: bool = True,
    size: tuple[int, int] = (640, 360),
) -> None:
    """A line chart PNG of ``values`` at x positions ``steps`` (default 0, 1, ...):
    raw in grey, a ``smooth``-point trailing moving average in blue, on a log
    (``log_y``) or linear y axis. Non-finite values are left out."""
    from PIL import Image, ImageDraw

    left, right, top, bottom = 70, 20, 30, 30  # margins: the axis labels
    if (not isinstance(size, (tuple, list)) or len(size) != 2 or not all(map(is_int, size))
            or size[0] < left + right + 10 or size[1] < top + bottom + 10):
        raise ValueError(f"size must be a (width, height) of ints of at least ({left + right + 10}, {top + bottom + 10}) "
                         f"pixels, got {size!r}")
    size = (int(size[0]), int(size[1]))
    raw = np.asarray(values, dtype=np.float64)
    if raw.ndim != 1:
        raise ValueError(f"values must be 1-d, got shape {raw.shape}")
    at = np.arange(raw.size, dtype=np.float64) if steps is None else np.asarray(steps, dtype=np.float64)
    if at.shape != raw.shape:
        raise ValueError(f"steps has shape {at.shape} for values of shape {raw.shape}")
    keep = np.isfinite(raw)
    v, at = raw[keep], at[keep]
    if v.size < 2:
        raise ValueError(f"plot_curve needs at least 2 finite values, got {v.size}")
    if log_y and (v <= 0).any():
        log_y = False
    y = np.log10(v) if log_y else v
    width, height = size
    lo, hi = float(y.min()), float(y.max())
    if hi <= lo:  # a constant series: centre it in a band that keeps the labels true
        pad = 0.05 if log_y else abs(lo) * 0.05 or 1.0
        lo, hi = lo - pad, hi + pad
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)

    x_lo, x_hi = float(at[0]), float(at[-1]) if at[-1] > at[0] else float(at[0]) + 1.0

    def points(x: np.ndarray, series: np.ndarray) -> list[tuple[float, float]]:
        xs = left + (x - x_lo) * (width - left - right) / (x_hi - x_lo)
        ys = top + (hi - series) * (height - top - bottom) / (hi - lo)
        return list(zip(xs.tolist(), ys.tolist()))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.line(points(at, y), fill=(190, 190, 190), width=1)
    k = max(1, min(smooth, y.size // 5))
    if k > 1:  # each average drawn at the last point of its window
        draw.line(points(at[k - 1 :], np.convolve(y, np.ones(k) / k, mode="valid")), fill=(30, 90, 200), width=2)
    label = (lambda z: f"{10 ** z:.3g}") if log_y else (lambda z: f"{z:.3g}")
    draw.text((5, top - 5), label(hi), fill="black")
    draw.text((5, height - bottom - 10), label(lo), fill="black")
    draw.text((left, 8), f"{title} ({v.size} points{', log scale' if log_y else ''})", fill="black")
    draw.text((left, height - bottom + 8), f"{x_lo:g}", fill="black")
    draw.text((width - right - 50, height - bottom + 8), f"{x_hi:g}", fill="black")
    image.save(Path(path), format="PNG")
