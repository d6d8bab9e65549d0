"""``ddpm-fast fid``: the FID of samples against a dataset's images or their
saved Inception statistics (``--save-stats`` writes them)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import cli_options as options
from .cli_options import UsageError

if TYPE_CHECKING:
    from .data import ImageDataset

__all__ = ["fid_command"]


def fid_command(args: argparse.Namespace) -> int:
    """FID of --samples against --data (images, or their saved statistics)."""
    from .data import load_dataset
    from .fid import activation_statistics, check_method, frechet_distance, load_inception, save_statistics

    try:  # before the Inception passes, not after them
        check_method(args.method)
    except ImportError:
        raise UsageError(f"--method {args.method} needs scipy (pip install scipy); --method eigh does not") from None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    given = _statistics_given(args)
    model = load_inception(args.inception_weights, device=device)  # first: a missing file fails before any work
    samples = _load_samples(args.samples)
    data = load_dataset(args.data, image_size=args.image_size, progress=True) if given is None else None
    sizes = [len(samples)] + ([] if data is None else [len(data)])
    if args.n is not None and args.n > min(sizes):
        raise UsageError(f"-n {args.n} exceeds the {len(samples)} samples" +
                         ("" if data is None else f" or the {len(data)} data images"))
    for option, count in (("-n", args.n), ("--samples", len(samples)), ("--data", None if data is None else len(data))):
        if count is not None and count < 2:  # a covariance needs two images
            raise UsageError(f"FID needs at least 2 images of each set, but {option} gives {count}")
    sets = [images.images[: args.n].permute(0, 2, 3, 1) for images in (samples, data) if images is not None]  # NHWC uint8
    stats = [activation_statistics(x, model, batch_size=args.batch_size, device=device, progress=True) for x in sets]
    if args.save_stats is not None:
        Path(args.save_stats).parent.mkdir(parents=True, exist_ok=True)
        save_statistics(*stats[1], args.save_stats)
    value = frechet_distance(*stats[0], *(stats[1] if given is None else given), method=args.method)
    against = f"the statistics in {args.data}" if given is not None else f"{len(sets[1])} images of {args.data}"
    print(f"FID {value:.4f} ({len(sets[0])} samples of {args.samples} vs {against})")
    return 0


def _load_samples(path: str) -> "ImageDataset":
    """An array file ("images", else arr_0, else its only array), or a folder of
    image files of one square size, taken as they are (--image-size resizes --data)."""
    from .data import ImageSizeError, load_array, load_image_folder

    folder = Path(path)
    if folder.is_dir() and (folder / "samples.npz").is_file() and (folder / "samples.png").is_file():
        # read as a folder of images, its one image would be the grid
        raise UsageError(f"--samples {path} is a `ddpm-fast sample` output folder, whose samples.png is a grid of "
                         f"the samples: pass --samples {folder / 'samples.npz'}")
    try:
        return load_image_folder(folder, progress=True) if folder.is_dir() else load_array(folder)
    except ImageSizeError as error:
        raise UsageError(f"--samples {path}: {error.problem}; FID takes the samples as they are, of one square size "
                         "(--image-size resizes --data only)") from None


def _statistics_given(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray] | None:
    """(mu, sigma) where --data is a statistics file (else None), with the
    options checked before any work: --save-stats and --image-size apply to
    images, and the statistics must be of the Inception's features."""
    from .fid import FEATURES, is_statistics_file, load_statistics

    given = load_statistics(args.data) if is_statistics_file(args.data) else None  # mu and sigma, not images
    if given is not None and (args.save_stats is not None or args.image_size is not None):
        option = "--save-stats saves" if args.save_stats is not None else "--image-size resizes"
        raise UsageError(f"{option} --data's images, and {args.data} holds their statistics")
    if given is not None and len(given[0]) != FEATURES:  # before the samples' features, not after
        raise UsageError(f"{args.data} holds statistics of {len(given[0])} features; the FID Inception's have {FEATURES}")
    if args.save_stats is not None:  # before the work, not after it
        target = Path(args.save_stats)
        if target.suffix != ".npz":  # read back as statistics by that suffix
            raise UsageError(f"--save-stats {args.save_stats}: the file name must end in .npz")
        options.check_output_folder(target.parent, "--save-stats", files=(target.name,))
        for option in ("--samples", "--data"):  # replaced by the statistics: read, then gone
            source = getattr(args, option[2:])
            if target.exists() and Path(source).exists() and os.path.samefile(target, source):
                raise UsageError(f"--save-stats {args.save_stats} is the {option} file; the statistics would "
                                 "replace it: save them to another file")
    return given
