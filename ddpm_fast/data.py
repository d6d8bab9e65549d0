"""Datasets of images: the bundled 8x8 digits, folders of image files, the
CIFAR-10 python batches, and ``.npy``/``.npz`` arrays.

Every loader returns an ``ImageDataset``: uint8 N x C x H x W in memory (a
quarter of float32's size, so whole datasets fit on the GPU), scaled to
[-1, 1] float32 (x / 127.5 - 1, as in the paper) when read.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ImageDataset", "load_digits", "load_image_folder", "load_cifar10", "load_array", "load_dataset"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = ("test_batch",)


class ImageDataset(torch.utils.data.Dataset):
    """Square uint8 images N x C x H x W (C 1 or 3), read as float in [-1, 1]."""

    def __init__(self, images: torch.Tensor, *, name: str = "images", labels: torch.Tensor | None = None) -> None:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 N x C x H x W tensor, got {getattr(images, 'dtype', type(images))} "
                             f"{tuple(getattr(images, 'shape', ()))}")
        n, c, h, w = images.shape
        if n == 0:
            raise ValueError(f"dataset {name!r} holds no images")
        if c not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, got {c} (shape {tuple(images.shape)})")
        if h != w:
            raise ValueError(f"images must be square, got {h}x{w}: pass image_size to resize and center-crop")
        if labels is not None and labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        self.images = images.contiguous()
        self.labels = labels
        self.name = name
        self.channels = c
        self.image_size = h

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index].float() / 127.5 - 1

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        """Images ``indices`` as one float32 batch in [-1, 1]."""
        return self.images[indices].float() / 127.5 - 1

    def __repr__(self) -> str:
        return f"ImageDataset({self.name!r}, {len(self)} x {self.channels} x {self.image_size} x {self.image_size})"


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the short side to ``size`` (antialiased bicubic) and center-crop square."""
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(images.float(), size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return x[:, :, top : top + size, left : left + size].round().clamp(0, 255).to(torch.uint8)


def _set_channels(images: torch.Tensor, channels: int | None) -> torch.Tensor:
    if channels is None or channels == images.shape[1]:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if channels == 1:  # ITU-R 601 luma, as Pillow's "L" conversion
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise ValueError(f"channels must be 1 or 3, got {channels!r}")


def _finish(images: torch.Tensor, name: str, image_size: int | None, channels: int | None,
            labels: torch.Tensor | None = None) -> ImageDataset:
    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        images = _resize(images, image_size)
    return ImageDataset(_set_channels(images, channels), name=name, labels=labels)


def load_digits(image_size: int | None = None) -> ImageDataset:
    """The 1,797 8x8 handwritten digits bundled with scikit-learn (no download),
    grey levels 0..16 mapped to 0..255, one channel, with their labels. With
    ``image_size`` they are upscaled (antialiased bicubic) — only when asked, as
    every doubling quadruples the cost of training."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.from_numpy(np.round(digits.images * 255 / 16).astype(np.uint8))[:, None]
    return _finish(images, "digits", image_size, None, torch.from_numpy(digits.target).long())


def load_image_folder(path: str | os.PathLike, image_size: int | None = None, channels: int | None = None) -> ImageDataset:
    """Every image file under ``path`` (recursively, in sorted order; the first
    frame of a GIF), as RGB (or grey with ``channels=1``). Without ``image_size``
    all images must share one square size."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"image folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    mode = "L" if channels == 1 else "RGB"
    tensors = []
    for file in files:
        try:
            with Image.open(file) as image:
                array = np.asarray(image.convert(mode))
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"cannot read image {file}: {error}") from error
        x = torch.from_numpy(array.copy()).reshape(array.shape[0], array.shape[1], -1).permute(2, 0, 1)
        tensors.append(_resize(x[None], image_size)[0] if image_size is not None else x)
    sizes = {tuple(t.shape[1:]) for t in tensors}
    if len(sizes) > 1:
        raise ValueError(f"images in {folder} have different sizes {sorted(sizes)[:4]}...: pass image_size to resize them")
    return _finish(torch.stack(tensors), folder.name, None, channels)


def _read_cifar_batches(path: Path, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(N x 3072 uint8, N labels) from a cifar-10-batches-py folder or its .tar.gz."""
    blobs: dict[str, bytes] = {}
    if path.is_file():
        try:
            with tarfile.open(path) as archive:
                for member in archive.getmembers():
                    if Path(member.name).name in names and member.isfile():
                        blobs[Path(member.name).name] = archive.extractfile(member).read()
        except (tarfile.TarError, OSError) as error:
            raise ValueError(f"cannot read CIFAR-10 archive {path}: {error}") from error
    else:
        folder = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
        blobs = {name: (folder / name).read_bytes() for name in names if (folder / name).is_file()}
    missing = [name for name in names if name not in blobs]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 batches {', '.join(missing)} not found in {path}")
    data, labels = [], []
    for name in names:
        try:
            batch = pickle.load(io.BytesIO(blobs[name]), encoding="bytes")
            data.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3072))
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
        except Exception as error:  # a corrupt pickle can raise almost anything
            raise ValueError(f"CIFAR-10 batch {name} in {path} is corrupt: {error}") from error
    return np.concatenate(data), np.concatenate(labels)


def load_cifar10(path: str | os.PathLike, train: bool = True) -> ImageDataset:
    """CIFAR-10 as its python version is kept on disk: the ``cifar-10-batches-py``
    folder, its parent, or the ``cifar-10-python.tar.gz`` archive (read in place)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"CIFAR-10 path {path} does not exist")
    data, labels = _read_cifar_batches(path, _CIFAR_TRAIN if train else _CIFAR_TEST)
    images = torch.from_numpy(data).reshape(-1, 3, 32, 32)  # R, G, B planes, each row-major
    return ImageDataset(images, name="cifar10" if train else "cifar10-test", labels=torch.from_numpy(labels))


def _array_to_nchw(array: np.ndarray, source: str) -> torch.Tensor:
    """uint8 N x C x H x W from N x H x W, N x H x W x C (C 1/3/4) or N x C x H x W
    (C 1/3), uint8 or float in [0, 1] / [-1, 1]."""
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise ValueError(f"{source}: expected N x H x W (x C) images, got shape {array.shape}")
    if array.shape[-1] in (1, 3, 4):  # channels last, as our samples.npz: preferred when ambiguous
        array = array[..., :3] if array.shape[-1] == 4 else array
        array = array.transpose(0, 3, 1, 2)
    elif array.shape[1] not in (1, 3):
        raise ValueError(f"{source}: cannot tell the channel axis of shape {array.shape} (need 1 or 3 channels)")
    if array.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(array))
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{source}: images must be uint8 or float, got {array.dtype}")
    lo, hi = float(array.min()), float(array.max())
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1 or hi > 1:
        raise ValueError(f"{source}: float images must lie in [0, 1] or [-1, 1], got values in [{lo:.3g}, {hi:.3g}]")
    unit = (array + 1) / 2 if lo < 0 else array  # any negative value means the [-1, 1] convention
    return torch.from_numpy(np.round(unit * 255).astype(np.uint8))


def load_array(path: str | os.PathLike, key: str | None = None, *, image_size: int | None = None,
               channels: int | None = None) -> ImageDataset:
    """Images from a ``.npy`` file or a ``.npz`` archive (``key``, else ``images``,
    else its only array)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"array file {path} does not exist")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ValueError(f"cannot read {path}: {error}") from error
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.keys())
            chosen = key or ("images" if "images" in keys else keys[0] if len(keys) == 1 else None)
            if chosen not in keys:
                raise ValueError(f"{path} holds arrays {keys}: pass key= (or name one 'images')")
            array = loaded[chosen]
    else:
        array = loaded
    return _finish(_array_to_nchw(array, str(path)), path.stem, image_size, channels)


def _is_cifar(path: Path) -> bool:
    if path.is_file():
        return path.name.endswith((".tar.gz", ".tgz")) and "cifar" in path.name.lower()
    return (path / "data_batch_1").is_file() or (path / "cifar-10-batches-py").is_dir()


def load_dataset(spec: str | os.PathLike, *, image_size: int | None = None, channels: int | None = None) -> ImageDataset:
    """``digits``, a ``.npy``/``.npz`` file, a CIFAR-10 folder or archive, or a folder of images."""
    if str(spec) == "digits":
        digits = load_digits()
        return _finish(digits.images, "digits", image_size, channels, digits.labels)
    path = Path(spec)
    if path.suffix in (".npy", ".npz"):
        return load_array(path, image_size=image_size, channels=channels)
    if path.exists() and _is_cifar(path):
        data = load_cifar10(path)
        return _finish(data.images, data.name, image_size, channels, data.labels)
    if path.is_dir():
        return load_image_folder(path, image_size, channels)
    raise FileNotFoundError(
        f"dataset {str(spec)!r} not found: expected 'digits', a .npy/.npz file, "
        "a CIFAR-10 python folder or archive, or a folder of images"
    )
