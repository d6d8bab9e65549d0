"""How much memory this process can still take: a guard for allocations whose
size a number in a file or an option sets (a schedule of 10^8 timesteps), which
Linux grants and then answers by killing the process, with no message; and the
.npz/.npy readers' shared steps (headers read before the data, the file's opening)."""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

try:
    import resource
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]

__all__ = ["MemoryLimitError", "available_memory", "check_fits_in_memory", "check_unpacked_fits", "format_size",
           "npy_header", "npz_member_header", "open_npz"]

# Read where present (Linux); elsewhere the bound is unknown and nothing is refused.
_MEMINFO = Path("/proc/meminfo")
# A container's own limit, which MemAvailable does not show: the limit and usage
# files of cgroup v2, then v1, and the field of their memory.stat that holds the
# inactive page cache, which usage counts and the kernel drops on demand (as `docker stats` does).
_CGROUP = Path("/sys/fs/cgroup")
_CGROUP_FILES = (
    ("memory.max", "memory.current", "memory.stat", "inactive_file"),
    ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat", "total_inactive_file"),
)
_STATUS = Path("/proc/self/status")


def _kib_fields(path: Path, names: tuple[str, ...]) -> dict[str, int]:
    """The ``Name:  123 kB`` fields of a /proc file, in bytes."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines:
        name, _, rest = line.partition(":")
        if name in names and rest.split()[:1] and rest.split()[0].isdigit():
            fields[name] = int(rest.split()[0]) * 1024
    return fields


def _stat_field(path: Path, name: str) -> int:
    """The ``name value`` field of a cgroup's memory.stat (0 where it is missing)."""
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


class MemoryLimitError(ValueError):
    """A size refused because it cannot fit in the memory left: a ValueError
    that loaders pass on as it is, not as a damaged file."""


def available_memory() -> int | None:
    """Bytes this process can still allocate and use: the least of the
    machine's available memory and free swap, its cgroup's remaining limit
    (its inactive page cache counted as free) and its address-space limit
    (``ulimit -v``); None where none is known."""
    bounds = []
    meminfo = _kib_fields(_MEMINFO, ("MemAvailable", "SwapFree"))
    if "MemAvailable" in meminfo:
        bounds.append(meminfo["MemAvailable"] + meminfo.get("SwapFree", 0))
    for limit_file, usage_file, stat_file, cache_field in _CGROUP_FILES:
        try:
            limit = (_CGROUP / limit_file).read_text().strip()
            if limit.isdigit() and int(limit) < 1 << 62:  # v2 says "max", v1 a huge number, when unlimited
                used = int((_CGROUP / usage_file).read_text()) - _stat_field(_CGROUP / stat_file, cache_field)
                bounds.append(int(limit) - used)
        except (OSError, ValueError):
            pass
    soft = resource.getrlimit(resource.RLIMIT_AS)[0] if resource is not None else None
    size = _kib_fields(_STATUS, ("VmSize",)).get("VmSize")
    if soft is not None and soft != resource.RLIM_INFINITY and size is not None:
        bounds.append(soft - size)
    return max(0, min(bounds)) if bounds else None


def check_fits_in_memory(need: int, what: str) -> None:
    """Raise ValueError if ``need`` bytes (for ``what``) exceed ``available_memory()``.
    Needs below 1 GiB pass without a look (no files read for ordinary sizes)."""
    if need < 1 << 30:
        return
    free = available_memory()
    if free is not None and need > free:
        raise MemoryLimitError(f"{what} needs about {need / 2**30:.1f} GiB of memory; "
                               f"this process has {free / 2**30:.1f} GiB available")


def check_unpacked_fits(path: str | os.PathLike, what: str) -> None:
    """Refuse a zip archive (torch.save's format) whose members, unpacked,
    cannot fit in the memory left: torch.load inflates compressed members, so a
    file of kilobytes can ask for gigabytes. Anything else passes: its loader
    says what is wrong with it."""
    try:
        with zipfile.ZipFile(path) as archive:
            need = sum(member.file_size for member in archive.infolist())
    except (OSError, zipfile.BadZipFile):
        return
    check_fits_in_memory(need, f"{what} ({need} bytes unpacked)")


def npy_header(npy: BinaryIO) -> tuple[tuple[int, ...], np.dtype] | None:
    """The shape and dtype a .npy stream's header declares, read before its
    data (numpy allocates the whole array first, and a compressed .npz member
    can be far larger than its file); None where the stream is no .npy of
    format 1.0 or 2.0 (its loader says what is wrong; 3.0, utf-8 field names,
    is no image's or statistic's)."""
    magic = npy.read(8)
    version = tuple(magic[6:])
    if not magic.startswith(b"\x93NUMPY") or version not in ((1, 0), (2, 0)):
        return None
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(npy)
    return shape, dtype


@contextlib.contextmanager
def open_npz(path: str | os.PathLike) -> Iterator[np.lib.npyio.NpzFile]:
    """The .npz archive ``path`` (no pickles), for the readers that check its
    members' headers first. Its file is opened and closed here: np.load(path)
    of a zip that is not one leaves the file it opened to the garbage collector
    (an "unclosed file" ResourceWarning, and a file descriptor held until then)."""
    with open(path, "rb") as f, np.load(f, allow_pickle=False) as archive:
        yield archive


def npz_member_header(archive: np.lib.npyio.NpzFile, key: str) -> tuple[tuple[int, ...], np.dtype] | None:
    """``npy_header`` of the array ``key`` of an open .npz archive."""
    member = f"{key}.npy" if f"{key}.npy" in archive.zip.namelist() else key
    with archive.zip.open(member) as npy:
        return npy_header(npy)


def format_size(count: int) -> str:
    """``count`` bytes in words: "1.5 GiB", "3.0 MiB", "1.2 KiB", "100 bytes"."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"
