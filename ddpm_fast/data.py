"""Datasets of images: the bundled 8x8 digits, folders of image files, the
CIFAR-10 python batches, and ``.npy``/``.npz`` arrays.

Every loader returns an ``ImageDataset``: uint8 N x C x H x W in memory (a
quarter of float32's size, so whole datasets fit on the GPU), scaled to
[-1, 1] float32 (x / 127.5 - 1, as in the paper) when read.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import numbers
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ._checks import check_dense
from ._memory import MemoryLimitError, check_fits_in_memory, npy_header, npz_member_header, open_npz
from ._progress import progress_bar
from ._warn import warn
from .cifar10 import is_cifar10, read_cifar10

__all__ = [
    "ImageDataset",
    "ImageSizeError",
    "load_digits",
    "load_image_folder",
    "load_cifar10",
    "load_array",
    "load_dataset",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
ARRAY_SUFFIXES = (".npy", ".npz")
PROGRESS_MIN_FILES = 1000  # an image folder this large gets a progress bar, where asked for
_IMAGES_SET = itertools.count(1)  # a process-wide number for each setting of a dataset's images

_ACCEPTED = (
    "'digits', a .npy/.npz file, a CIFAR-10 python folder (cifar-10-batches-py or its parent) "
    "or archive (.tar.gz), or a folder of image files"
)


class ImageSizeError(ValueError):
    """Images not square, or of several sizes, where no ``image_size`` was
    given to resize them. ``problem`` says what without that advice (a caller
    that cannot resize, as ``ddpm-fast fid --samples``, gives its own)."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(f"{problem}: pass image_size (--image-size) to resize and center-crop them")


def _checked_images(images: object, name: str) -> torch.Tensor:
    """``images`` as an ImageDataset keeps them: uint8 N x C x H x W (C 1 or 3, square),
    contiguous; a uint8 numpy array shared where torch can share it."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        # Copied where torch cannot share it: read-only (torch warns) or with negative strides (flipped).
        shareable = images.flags.writeable and all(stride >= 0 for stride in images.strides)
        images = torch.from_numpy(images if shareable else images.copy())
    if isinstance(images, torch.Tensor):
        # torch's own words came later: "unsupported memory format option Contiguous" (sparse), or,
        # from the Trainer and evaluate_bpd, "Cannot copy out of meta tensor; no data!"
        check_dense(images, "ImageDataset", "images")
        if images.is_meta:
            raise ValueError("images must hold data: got a tensor on the meta device, which holds none")
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        got = (f"{images.dtype} {tuple(images.shape)}" if isinstance(images, (torch.Tensor, np.ndarray))
               else f"a {type(images).__name__}")
        raise ValueError(f"images must be a uint8 N x C x H x W tensor or numpy array, got {got}")
    n, c, h, w = images.shape
    if n == 0:
        raise ValueError(f"dataset {name!r} holds no images")
    if c not in (1, 3):
        hint = " (channels last, N x H x W x C? then permute(0, 3, 1, 2) them)" if w in (1, 3) else ""
        raise ValueError(f"images must have 1 or 3 channels, got {c} (shape {tuple(images.shape)}){hint}")
    if h != w:
        raise ImageSizeError(f"images must be square, got {h}x{w}")
    if h == 0:
        raise ValueError(f"dataset {name!r} holds images of 0 pixels (shape {tuple(images.shape)})")
    return images.contiguous()


class ImageDataset(torch.utils.data.Dataset):
    """Square uint8 images N x C x H x W (C 1 or 3), read as float in [-1, 1].

    ``images`` stays uint8; ``dataset[i]`` and ``dataset.batch(indices)`` give
    float32 x / 127.5 - 1. ``labels`` (N integer class labels: a tensor, an
    array or a list) is kept as an int64 tensor, or None. ``images`` may be a
    numpy array too; either is kept, not copied, when contiguous (a read-only
    array, and a flipped, transposed or channels_last one, is copied)."""

    def __init__(self, images: torch.Tensor | np.ndarray, *, name: str = "images",
                 labels: torch.Tensor | np.ndarray | Sequence[int] | None = None) -> None:
        self.name = name
        self.labels = None
        self.images = images  # checked (the setter)
        if labels is not None:
            n = len(self)
            labels = torch.as_tensor(labels)
            if labels.shape != (n,) or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
                raise ValueError(f"labels must be {n} integers (shape ({n},)), "
                                 f"got {labels.dtype} {tuple(labels.shape)}")
            self.labels = labels.long()

    @property
    def images(self) -> torch.Tensor:
        """The uint8 N x C x H x W images."""
        return self._images

    @images.setter
    def images(self, images: torch.Tensor | np.ndarray) -> None:
        # Checked whenever set, not only when made: the Trainer and evaluate_bpd read the
        # tensor as uint8 levels, and float images put here later were read so, silently.
        images = _checked_images(images, getattr(self, "name", "images"))
        labels = getattr(self, "labels", None)
        if labels is not None and len(labels) != images.shape[0]:
            raise ValueError(f"images must be {len(labels)}, as the dataset's labels, got {images.shape[0]}")
        if images is not self.__dict__.get("_images"):  # (the same tensor set again changes nothing)
            self._images_version = next(_IMAGES_SET)  # a Trainer refuses images set since it was made
        self._images = images
        self.channels = images.shape[1]
        self.image_size = images.shape[2]

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "images" in state:  # pickled when images was a plain attribute
            state["_images"] = state.pop("images")
        self.__dict__.update(state)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        """Image ``index`` as float32 C x H x W in [-1, 1]."""
        return self.images[index].float() / 127.5 - 1

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        """Images ``indices`` as one float32 batch in [-1, 1]."""
        return self.images[indices].float() / 127.5 - 1

    def check_model(self, model: object) -> None:
        """Raise if ``model`` declares (``in_channels``, ``image_size``) other images than these."""
        channels = getattr(model, "in_channels", self.channels)
        size = getattr(model, "image_size", self.image_size)
        if isinstance(size, (tuple, list)) and len(size) == 2 and size[0] == size[1]:
            size = size[0]  # (H, W), as the Sampler also reads it: a square (8, 8) is 8
        if (channels, size) != (self.channels, self.image_size):
            shown = "x".join(map(str, size)) if isinstance(size, (tuple, list)) else size  # (8, 6): 8x6
            raise ValueError(
                f"the model takes {channels}-channel {shown}px images, "
                f"the dataset has {self.channels}-channel {self.image_size}px images"
            )

    def fingerprint(self) -> dict[str, Any]:
        """What a training run records of these images in its checkpoints: their
        shape and the SHA-256 of their bytes (0.2 s for CIFAR-10), so that a
        resume on other images of the same shape is told apart."""
        images = self.images.cpu().numpy()  # (contiguous uint8: hashed in place)
        return {"shape": list(images.shape), "sha256": hashlib.sha256(images).hexdigest()}

    def __repr__(self) -> str:
        return f"ImageDataset({self.name!r}, {len(self)} x {self.channels} x {self.image_size} x {self.image_size})"


def _check_size(image_size: int | None) -> None:
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")


def _check_channels(channels: int | None) -> None:
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")


RESIZE_CHUNK = 256  # images resized at once: float32 copies of all of them took ~8x the uint8 data


def _resize(images: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """Resize the short side to ``size`` (antialiased ``mode``) and center-crop
    square, a chunk of images at a time (each image is resized on its own, so
    chunks change no value)."""
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    out = torch.empty((n, c, size, size), dtype=torch.uint8, device=images.device)
    for start in range(0, n, RESIZE_CHUNK):
        x = F.interpolate(images[start : start + RESIZE_CHUNK].float(), size=(new_h, new_w), mode=mode,
                          antialias=True, align_corners=False)
        out[start : start + RESIZE_CHUNK] = x[:, :, top : top + size, left : left + size].round().clamp(0, 255)
    return out


def _set_channels(images: torch.Tensor, channels: int | None) -> torch.Tensor:
    _check_channels(channels)
    if channels is None or channels == images.shape[1]:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    # ITU-R 601 luma in Pillow's fixed point (its "L" conversion, which image
    # folders go through): (19595 R + 38470 G + 7471 B + 2^15) >> 16. A float luma
    # rounded half to even was a level off on ties (157.5: Pillow's 157, 158).
    weights = torch.tensor([19595, 38470, 7471], dtype=torch.int32, device=images.device).view(1, 3, 1, 1)
    return ((images.int() * weights).sum(1, keepdim=True, dtype=torch.int32) + (1 << 15)).bitwise_right_shift(16).to(torch.uint8)


def _check_fits(count: int, shape: Sequence[int], source: object) -> None:
    """Refuse uint8 images that cannot fit in the memory left before they are
    made: a large --image-size filled memory image by image until the
    kernel's OOM killer ended the process."""
    check_fits_in_memory(count * int(np.prod(shape)),
                         f"holding {count} images of {'x'.join(map(str, shape))} from {source}")


def _finish(images: torch.Tensor, name: str, image_size: int | None, channels: int | None,
            labels: torch.Tensor | None = None) -> ImageDataset:
    _check_size(image_size)
    if image_size is not None:
        _check_fits(len(images), (channels or images.shape[1], image_size, image_size), name)
        images = _resize(images, image_size)
    return ImageDataset(_set_channels(images, channels), name=name, labels=labels)


# ---------------------------------------------------------------- digits


def load_digits(image_size: int | None = 8) -> ImageDataset:
    """The 1,797 8x8 handwritten digits bundled with scikit-learn (no download),
    grey levels 0..16 mapped to round(v * 255 / 16), one channel, with their
    labels.

    Any other ``image_size`` resizes them bilinearly (antialiased when
    shrinking) — only when asked, as every doubling quadruples the cost of
    training. Bilinear because the digits are smooth pen strokes sampled
    coarsely: nearest would hand the model 8x8 blocks to learn, and bicubic
    overshoots at the strokes' edges (halos clipped at 0 and 255)."""
    from sklearn.datasets import load_digits as sklearn_digits

    _check_size(image_size)
    digits = sklearn_digits()
    images = torch.from_numpy(np.round(digits.images * 255 / 16).astype(np.uint8))[:, None]
    if image_size is not None and image_size != 8:
        images = _resize(images, image_size, mode="bilinear")
    return ImageDataset(images, name="digits", labels=torch.from_numpy(digits.target).long())


# ---------------------------------------------------------------- image folders


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively and through symlinked folders
    (each real folder once, so a link loop ends), sorted; hidden files and
    folders (``.name``, e.g. macOS ``._x.png`` resource forks) are skipped.
    A broken link of an image's name is an error: skipped, it would drop an
    image the folder says it holds without a word."""
    files, broken, seen = [], [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        stat = os.stat(root)
        if (stat.st_dev, stat.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # a linked folder's files: under the first name in order
        for name in names:
            path = Path(root) / name
            if not name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES:
                if path.is_file():
                    files.append(path)
                elif path.is_symlink() and not path.exists():
                    broken.append(path)
    if broken:
        broken.sort()
        more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
        raise FileNotFoundError(f"image folder {folder}: {broken[0]} is a broken symbolic link{more}")
    return sorted(files)


_WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _read_image(file: Path, mode: str) -> torch.Tensor:
    """One image file as uint8 C x H x W (its first frame, upright per its EXIF
    orientation, transparent parts composited over black, converted to Pillow
    ``mode``)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(file) as image:
            image.seek(0)
            image = ImageOps.exif_transpose(image)
            if image.mode == "F":  # (a TIFF's) convert would clip every value to 0..255: a [0, 1] image came out black
                raise ValueError("its pixels are 32-bit floats (Pillow mode F), of no known range: save it with "
                                 "8- or 16-bit integer pixels")
            if image.mode in _WIDE_GREY_MODES:  # 16-bit grey: scale to 8 bits (Pillow's convert would clip at 255)
                wide = np.asarray(image, dtype=np.float64)
                low, high = (int(wide.min()), int(wide.max())) if wide.size else (0, 0)
                if low < 0 or high > 65535:  # mode I's 32 bits: clipped to white, silently
                    raise ValueError(f"its pixels are 32-bit integers (Pillow mode I) from {low} to {high}, beyond "
                                     "16 bits, of no known range: save it with 8- or 16-bit integer pixels")
                key = image.info.get("transparency")  # a transparent grey level (PNG tRNS), lost with the mode
                image = Image.fromarray(np.round(wide * (255 / 65535)).astype(np.uint8), "L")
                if isinstance(key, int):
                    image.putalpha(Image.fromarray(np.where(wide == key, 0, 255).astype(np.uint8), "L"))
            if "A" in image.getbands() or "transparency" in image.info:
                # Over black: what lies under a transparent pixel is whatever the saving
                # tool left there, and two images that look the same must load the same.
                image = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", image.size, (0, 0, 0, 255)), image)
            array = np.asarray(image.convert(mode))
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, ... for broken files
        raise ValueError(f"cannot read image {file}: {type(error).__name__}: {error}") from error
    return torch.from_numpy(array.copy()).reshape(array.shape[0], array.shape[1], -1).permute(2, 0, 1)


def load_image_folder(
    path: str | os.PathLike, image_size: int | None = None, channels: int | None = None, *, progress: bool = False
) -> ImageDataset:
    """Every image file (png, jpg, jpeg, bmp, webp, gif: the first frame; tif, tiff) under
    ``path``, recursively (through symlinked folders too), in sorted order, as RGB
    (or grey with ``channels=1``), transparent parts composited over black.

    With ``image_size`` each image's short side is resized to it (antialiased
    bicubic) and the center square cropped; without, all images must share
    one square size. ``progress``: a progress bar for folders of
    PROGRESS_MIN_FILES images or more (some seconds of reading, minutes for
    tens of thousands)."""
    _check_size(image_size)
    _check_channels(channels)
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"image folder {folder} is not a folder")
    files = _image_files(folder)
    if not files:
        raise ValueError(f"image folder {folder} holds no images (looked for {', '.join(IMAGE_SUFFIXES)}, recursively)")
    mode = "L" if channels == 1 else "RGB"
    count = len(files)  # (files becomes a progress bar)
    if image_size is not None:
        _check_fits(count, (1 if channels == 1 else 3, image_size, image_size), folder)
    # One tensor filled image by image, made once the first image gives the size
    # (a list of images and their stack held every image twice).
    images, first_size = None, None
    if progress and count >= PROGRESS_MIN_FILES:
        files = progress_bar(files, desc="loading images", unit="image")
    for index, file in enumerate(files):
        x = _read_image(file, mode)
        if image_size is not None:
            x = _resize(x[None], image_size)[0]
        elif first_size is None:
            first_size = (x.shape[1:], file)
        elif x.shape[1:] != first_size[0]:
            (h, w), (h0, w0) = x.shape[1:], first_size[0]
            raise ImageSizeError(f"images in {folder} have different sizes ({first_size[1].name} is {w0}x{h0}, "
                                 f"{file.name} is {w}x{h})")
        if images is None:
            _check_fits(count, x.shape, folder)
            images = torch.empty((count, *x.shape), dtype=x.dtype)
        images[index] = x
    return ImageDataset(images, name=folder.resolve().name)


# ---------------------------------------------------------------- CIFAR-10


def load_cifar10(path: str | os.PathLike, train: bool = True) -> ImageDataset:
    """CIFAR-10 as its python version is kept on disk: the ``cifar-10-batches-py``
    folder, its parent, or the ``cifar-10-python.tar.gz`` archive (read in
    place, nothing extracted). ``train`` picks ``data_batch_1..5`` (50,000
    images) or ``test_batch`` (10,000). 3 x 32 x 32 images with labels."""
    images, labels = read_cifar10(Path(path), train)
    return ImageDataset(torch.from_numpy(images), name="cifar10" if train else "cifar10-test",
                        labels=torch.from_numpy(labels))


# ---------------------------------------------------------------- arrays


def _channel_axis(shape: tuple[int, ...]) -> str:
    """'last' or 'first' for a 4-d image array: channels last (our samples.npz)
    when both readings are possible, unless only channels-first gives square
    images; refused when neither does."""
    last_ok, first_ok = shape[3] in (1, 3, 4), shape[1] in (1, 3)
    if last_ok and first_ok and shape[1] != shape[2]:
        if shape[2] == shape[3]:
            return "first"  # e.g. N x 3 x 4 x 4: channels last would read 3x4 images
        # Neither reading gives square images (N x 3 x 8 x 4: 3x8 RGBA or 8x4 RGB?):
        # image_size would resize either without a word, so the wrong one silently.
        raise ValueError(f"cannot tell the channel axis of shape {shape}: N x H x W x C reads {shape[1]}x{shape[2]} "
                         f"images, N x C x H x W reads {shape[2]}x{shape[3]} images, and neither is square; "
                         "crop or resize them to square images first")
    if last_ok:
        return "last"
    if first_ok:
        return "first"
    raise ValueError(f"cannot tell the channel axis of shape {shape}: expected N x H x W x C (C 1, 3 or 4) "
                     "or N x C x H x W (C 1 or 3)")


def _check_array_fits(header: tuple[tuple[int, ...], np.dtype] | None, source: str) -> None:
    """Refuse an array (from its .npy ``header``) that cannot fit in the memory
    left with the working copies of ``_array_to_nchw``."""
    if header is None:  # no .npy: np.load says what is wrong
        return
    shape, dtype = header
    # the array, a float32 (or wider) working copy of a float one, the uint8 images
    work = max(dtype.itemsize, 4) if np.issubdtype(dtype, np.floating) else 0
    check_fits_in_memory(math.prod(shape) * (dtype.itemsize + work + 1),
                         f"reading {source} ({'x'.join(map(str, shape))} {dtype})")


def _array_to_nchw(array: np.ndarray, source: str) -> torch.Tensor:
    """uint8 N x C x H x W from N x H x W, N x H x W x C (C 1/3/4, alpha
    dropped) or N x C x H x W (C 1/3), holding uint8 (or other integers in
    0..255) or floats in [0, 1] or [-1, 1] (any negative value means [-1, 1]; a minimum
    in (-0.5, 0) is refused as ambiguous)."""
    if array.ndim == 3:
        if array.shape[2] in (1, 3, 4) and array.shape[1] != array.shape[2]:  # grey images 1 pixel wide are none
            raise ValueError(f"{source}: shape {array.shape} looks like one H x W x C image, not N x H x W grey "
                             "images: add the batch axis (array[None])")
        array = array[..., None]
    if array.ndim != 4:
        raise ValueError(
            f"{source}: expected N x H x W, N x H x W x C or N x C x H x W images, got shape {array.shape}"
        )
    try:
        axis = _channel_axis(array.shape)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None
    if axis == "last":
        array = array[..., :3].transpose(0, 3, 1, 2)  # drops alpha
    if array.size == 0:  # no images, or images of 0 pixels
        raise ValueError(f"{source}: holds no images (shape {array.shape})")
    if array.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(array))
    if np.issubdtype(array.dtype, np.integer):
        lo, hi = int(array.min()), int(array.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"{source}: integer images must lie in 0..255, got values in {lo}..{hi}")
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.uint8))
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{source}: images must be uint8, integers in 0..255 or floats, got {array.dtype}")
    lo, hi = float(array.min()), float(array.max())
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1 or hi > 1:
        # repr, not .4g: a value one ulp past 1 would print as 1
        raise ValueError(f"{source}: float images must lie in [0, 1] or [-1, 1], got values in [{lo!r}, {hi!r}]")
    if -0.5 < lo < 0:  # a [0, 1] range that undershoots (a resize's ringing), or [-1, 1] without dark pixels?
        raise ValueError(f"{source}: float images in [{lo:.4g}, {hi:.4g}] are ambiguous: any negative value means "
                         "[-1, 1], yet nothing is darker than a quarter grey there; clip [0, 1] images "
                         "(np.clip(a, 0, 1)) or map them to [-1, 1] yourself")
    # One working copy, changed in place (a temporary per operation held three
    # copies of a large float array at once); float16 would round badly.
    work_dtype = np.result_type(array.dtype, np.float32)
    if lo < 0:  # [-1, 1]
        work = np.add(array, 1, dtype=work_dtype)
        work /= 2
        work *= 255
    else:
        work = np.multiply(array, 255, dtype=work_dtype)
    np.round(work, out=work)
    return torch.from_numpy(np.ascontiguousarray(work.astype(np.uint8)))


def load_array(path: str | os.PathLike, key: str | None = None, *, image_size: int | None = None,
               channels: int | None = None) -> ImageDataset:
    """Images from a ``.npy`` file or a ``.npz`` archive (array ``key``; by
    default ``images``, else ``arr_0`` (the first array ``np.savez`` was given
    unnamed, as in guided-diffusion's sample and reference batches), else its
    only array; a ``.npy`` file holds one array, and ``key`` does not apply to it).

    Layouts: N x H x W (grey), N x H x W x C (C 1, 3 or 4: alpha dropped) or
    N x C x H x W (C 1 or 3); channels last wins when both fit (as in
    ``samples.npz``) unless only channels-first gives square images; when
    neither reading gives square images, the shape is refused. Values:
    uint8 (or integers in 0..255) or floats in [0, 1] or [-1, 1] — floats with
    any negative value are read as [-1, 1], others as [0, 1]; values outside
    [-1, 1], and a minimum in (-0.5, 0) (a [0, 1] range that undershoots, or
    [-1, 1] without dark pixels?), are an error. One H x W x C image needs its
    batch axis. ``image_size``/``channels`` resize and convert."""
    _check_size(image_size)
    _check_channels(channels)
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a .npy/.npz array file")
    if not path.is_file():
        raise FileNotFoundError(f"array file {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY" and not magic.startswith(b"PK"):  # numpy would call anything else a pickle
        raise ValueError(f"cannot read {path} as a .npy/.npz array file: it is neither (no .npy or zip header)")
    try:
        if magic.startswith(b"PK"):
            with open_npz(path) as loaded:
                keys = list(loaded.keys())
                if key is None:  # arr_0: np.savez's first unnamed array (guided-diffusion's batches: images, labels)
                    key = next((k for k in ("images", "arr_0") if k in keys), keys[0] if len(keys) == 1 else None)
                    if key is None:
                        raise KeyError(f"{path} holds arrays {keys}: name the images 'images' (what the command "
                                       "line reads), or pass key= to load_array")
                elif key not in keys:
                    raise KeyError(f"{path} has no array {key!r}; it holds arrays {keys}")
                _check_array_fits(npz_member_header(loaded, key), f"{path}'s array {key!r}")
                array = loaded[key]
        else:
            with open(path, "rb") as f:
                _check_array_fits(npy_header(f), str(path))
            array = np.load(path, allow_pickle=False)
    except KeyError as error:
        raise ValueError(error.args[0]) from None
    except MemoryLimitError:
        raise
    except Exception as error:  # not an npy/npz file, truncated, object arrays, ...
        raise ValueError(f"cannot read {path} as a .npy/.npz array file: {type(error).__name__}: {error}") from error
    if not isinstance(array, np.ndarray):  # numpy gives a zip member without the .npy header as bytes
        raise ValueError(f"cannot read {path} as a .npy/.npz array file: its member {key!r} is not a .npy array")
    return _finish(_array_to_nchw(array, str(path)), path.stem, image_size, channels)


# ---------------------------------------------------------------- dispatch


def load_dataset(
    spec: str | os.PathLike, *, image_size: int | None = None, channels: int | None = None, progress: bool = False
) -> ImageDataset:
    """The dataset ``spec`` names: ``"digits"``, a ``.npy``/``.npz`` file, a
    CIFAR-10 python folder (or its parent) or archive (the training batches),
    or a folder of images. ``image_size`` resizes (short side, then a center
    crop; digits: bilinear) and ``channels`` (1 or 3) converts. ``progress``:
    a bar while a large folder of images loads (load_image_folder)."""
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec must be a str or path ({_ACCEPTED}), got {type(spec).__name__}")
    _check_size(image_size)
    _check_channels(channels)
    if not str(spec).strip():  # Path("") is the current folder: never what an empty spec means
        raise ValueError(f"dataset spec is empty: expected {_ACCEPTED}")
    if isinstance(spec, str) and spec == "digits":  # (a Path("digits") names a folder)
        from .distributed import rank_and_world  # (here: it imports the sampler, which loading data does not need)

        if os.path.exists("digits") and rank_and_world()[0] == 0:  # a folder of the user's, which "digits" does not load
            warn("'digits' is the bundled scikit-learn set, not the ./digits found here: pass ./digits to load that")
        digits = load_digits(image_size)
        return _finish(digits.images, digits.name, None, channels, digits.labels)
    path = Path(spec)
    if path.suffix.lower() in ARRAY_SUFFIXES:
        return load_array(path, image_size=image_size, channels=channels)
    if not path.exists():
        raise FileNotFoundError(f"dataset {str(spec)!r} not found: expected {_ACCEPTED}")
    if is_cifar10(path):
        data = load_cifar10(path)
        return _finish(data.images, data.name, image_size, channels, data.labels)
    if path.is_dir():
        return load_image_folder(path, image_size, channels, progress=progress)
    raise ValueError(f"dataset {str(spec)!r} is not a dataset this loader reads: expected {_ACCEPTED}")
