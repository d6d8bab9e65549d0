"""The ``ddpm-fast`` command line's option types and checks: each bad value is
a one-line usage error (exit status 2) raised before any work starts."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch

from ._memory import format_size

T = TypeVar("T")


class UsageError(Exception):
    """Bad input from the command line: reported in one line, exit status 2."""


class OnOff(argparse.BooleanOptionalAction):
    """A ``--name`` / ``--no-name`` flag whose help states its default itself.
    Python 3.10's BooleanOptionalAction appends " (default: True)" to any help
    when the default is not None, a second and differently worded default
    beside ours; later Pythons append nothing, so this keeps the help as given."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, help=help, **kwargs)
        self.help = help


def integer(text: str, low: int, expected: str, bits: int = 63) -> int:
    """An integer option of at least ``low`` and below 2^bits (beyond 2^63,
    counts failed later with an OverflowError traceback); anything else (not a
    number too) says what was expected."""
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
    if value >= 2**bits:
        raise argparse.ArgumentTypeError(f"must be {expected} below 2^{bits}, got {text!r}")
    return value


def positive(text: str) -> int:
    return integer(text, 1, "a positive integer")


def non_negative(text: str) -> int:
    return integer(text, 0, "an integer >= 0")


def seed_below(bits: int) -> Callable[[str], int]:
    """A --seed type: an integer in [0, 2^bits) (the run's seeds are int64, the
    noise streams' uint64), checked while parsing."""

    def seed(text: str) -> int:
        try:
            return integer(text, 0, f"an integer in [0, 2^{bits})", bits)
        except argparse.ArgumentTypeError:  # said once: "in [0, 2^64)", not "... below 2^64" too
            raise argparse.ArgumentTypeError(f"must be an integer in [0, 2^{bits}), got {text!r}") from None

    return seed


def path(text: str) -> str:
    """A path given on the command line, ``~`` expanded (the shell leaves the
    one of ``--out=~/run`` alone: a folder named "~" appeared). An empty one
    would mean the current folder (Path("") is "."), which nobody means."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return os.path.expanduser(text)


def device(text: str) -> str:
    """A device this machine has: checked while parsing, so that a typo or a
    missing GPU is an argument error, not a traceback from deep in torch."""
    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: expected cpu, cuda or cuda:K") from None
    if parsed.type not in ("cpu", "cuda") or (parsed.type == "cpu" and parsed.index not in (None, 0)):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}: expected cpu, cuda or cuda:K")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine (use --device cpu)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def check_output_folder(path: str | os.PathLike, option: str = "--out", files: Sequence[str] = ()) -> None:
    """Fail before any training or sampling if ``path`` cannot be a folder we
    write into: it (or a parent) is a file, one of the ``files`` to be written
    there is a folder, or its nearest existing folder takes no new file (tried
    with a temporary file: os.access says yes to root, and on read-only or
    special file systems). Nothing is left behind."""
    out = Path(path).absolute()
    if out.exists() and not out.is_dir():
        raise UsageError(f"{option} {path} is a file, not a folder")
    for name in files:
        if (out / name).is_dir():
            raise UsageError(f"{option} {path}: {out / name} is a folder, so the file {name} cannot be written there")
    existing = _nearest_existing(path, option)
    if not existing.is_dir():
        raise UsageError(f"{option} {path}: {existing} is a file, not a folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=".ddpm-fast-probe-", dir=existing)
    except OSError as error:
        raise UsageError(f"{option} {path}: no file can be created in {existing} ({error.strerror or error})") from None
    os.close(handle)
    os.unlink(probe)


def check_free_space(path: str | os.PathLike, need: int, what: str, option: str = "--out") -> None:
    """Fail before the work if the disk under ``path`` (its nearest existing
    folder) has less than ``need`` bytes free for ``what``: a full disk was
    found only when the result of hours of sampling was written."""
    existing = _nearest_existing(path, option)
    try:
        free = shutil.disk_usage(existing).free
    except OSError:  # not known here: the write will tell
        return
    if need > free:
        raise UsageError(f"{option} {path}: {what} needs {format_size(need)} of disk, and {existing} has "
                         f"{format_size(free)} free")


def _nearest_existing(path: str | os.PathLike, option: str) -> Path:
    """``path`` (absolute) or its nearest parent that exists: where a folder to
    be made there would go, and whose disk it would be on."""
    existing = Path(path).absolute()
    while not existing.exists():
        if existing.is_symlink():  # a link to nowhere: creating the folder there fails, after the run
            raise UsageError(f"{option} {path}: {existing} is a broken symbolic link (to {os.readlink(existing)})")
        existing = existing.parent
    return existing


def option_errors(make: Callable[..., T]) -> Callable[..., T]:
    """``make`` with its errors in the command line's words: TrainConfig.grad_clip
    (or a bare sample_steps) becomes --grad-clip (--sample-steps)."""

    def call(*args, **kwargs) -> T:
        try:
            return make(*args, **kwargs)
        except (ValueError, TypeError) as error:
            text = re.sub(r"\bTrainConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(error))
            text = re.sub(r"^(sample_steps|samples)\b", lambda m: "--" + m.group(1).replace("_", "-"), text)
            raise UsageError(text) from error  # the cause stays for DDPM_FAST_DEBUG=1's traceback

    return call
