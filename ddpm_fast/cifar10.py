"""Reading CIFAR-10's python version: the ``cifar-10-batches-py`` folder, its
parent, or the ``cifar-10-python.tar.gz`` archive, read in place.

The batches are pickles; they are unpickled with only numpy arrays allowed,
so a dataset file cannot run code. ``ddpm_fast.data.load_cifar10`` wraps
what is read here in an ``ImageDataset``.
"""

from __future__ import annotations

import io
import lzma
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_FOLDER = "cifar-10-batches-py"
_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST = ("test_batch",)
# A batch is a 31 MB pickle (10,000 x 3072 bytes and their labels): a member or
# file far larger is no batch. (A sparse member of a 221-byte archive asked for
# gigabytes, the memory failure a traceback.)
_MAX_BATCH_BYTES = 64 << 20


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain containers and numpy arrays: a
    dataset file cannot run code when it is read."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's signature
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are expected)")
        return super().find_class(module, name)


def is_cifar10(path: Path) -> bool:
    """Whether an existing ``path`` looks like CIFAR-10's python version (an
    archive by its name, or a folder holding the batches or their folder)."""
    if path.is_file():
        return path.name.lower().endswith(ARCHIVE_SUFFIXES)
    return any((path / name).is_file() for name in _TRAIN + _TEST) or (path / _FOLDER).is_dir()


def _blobs(path: Path, names: tuple[str, ...]) -> tuple[dict[str, bytes], str]:
    """The raw bytes of batches ``names`` and a description of where they were."""
    if path.is_file():
        blobs: dict[str, bytes] = {}
        try:
            with tarfile.open(path) as archive:  # gzip, bz2, xz or plain, detected
                for member in archive:
                    base = member.name.rsplit("/", 1)[-1]
                    if base in names and base not in blobs and member.isfile():
                        _check_batch_size(member.size, base, f"archive {path}")
                        blobs[base] = archive.extractfile(member).read()
                # tarfile stops at the end-of-archive blocks (or, quietly, at a damaged
                # header), before a compressed stream's checksum: read on to it, so a
                # corrupt archive is an error, not wrong pixels or "batches not found".
                while archive.fileobj.read(1 << 20):
                    pass
        except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as error:
            reason = "not a tar archive (plain, gzip, bz2 or xz)" if isinstance(error, tarfile.ReadError) else (
                f"{type(error).__name__}: {' '.join(str(error).split())}")  # tarfile's messages span lines
            raise ValueError(
                f"cannot read CIFAR-10 archive {path} (expected cifar-10-python.tar.gz): {reason}"
            ) from error
        return blobs, f"archive {path}"
    folder = path / _FOLDER if (path / _FOLDER).is_dir() else path
    found = [name for name in names if (folder / name).is_file()]
    for name in found:
        _check_batch_size((folder / name).stat().st_size, name, f"folder {folder}")
    return {name: (folder / name).read_bytes() for name in found}, f"folder {folder}"


def _check_batch_size(size: int, name: str, where: str) -> None:
    if size > _MAX_BATCH_BYTES:
        raise ValueError(f"CIFAR-10 batch {name} in {where} is {size:,} bytes, more than any batch "
                         f"(about 31 MB): not CIFAR-10's python version")


def _parse_batch(blob: bytes, name: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _ArrayUnpickler(io.BytesIO(blob), encoding="bytes").load()
        if not isinstance(batch[b"data"], np.ndarray):  # as CIFAR-10's are: a list may repeat one row a million times
            raise TypeError(f"data is a {type(batch[b'data']).__name__}, not a numpy array")
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[b"labels"])
    except Exception as error:  # a corrupt pickle can raise almost anything
        raise ValueError(f"CIFAR-10 batch {name} in {where} is corrupt: {type(error).__name__}: {error}") from error
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"CIFAR-10 batch {name} in {where} is corrupt: data is {data.dtype} {data.shape}, "
                         "expected uint8 N x 3072")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"CIFAR-10 batch {name} in {where} is corrupt: {data.shape[0]} images but labels "
                         f"{labels.dtype} {labels.shape}")
    return data, labels.astype(np.int64)


def read_cifar10(path: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """The training batches (``data_batch_1..5``, 50,000 images) or the test
    batch (10,000) at ``path``: uint8 images N x 3 x 32 x 32 and int64 labels."""
    if not path.exists():
        raise FileNotFoundError(f"CIFAR-10 path {path} does not exist")
    names = _TRAIN if train else _TEST
    blobs, where = _blobs(path, names)
    missing = [name for name in names if name not in blobs]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 batches {', '.join(missing)} not found in {where} "
                                f"(expected the python version: {_FOLDER}/data_batch_1..5, test_batch)")
    parts = [_parse_batch(blobs.pop(name), name, where) for name in names]
    images = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)  # R, G, B planes, each row-major
    return images, np.concatenate([p[1] for p in parts])
