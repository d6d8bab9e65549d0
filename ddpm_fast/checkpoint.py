"""Crash-safe checkpoint folders.

A checkpoint is a folder ``<run>/checkpoint-<step>`` of plain files. It is
written whole into a hidden temporary folder beside it, every file and the
folder fsync'ed, and only then renamed into place (``os.replace`` of a folder
is atomic on POSIX); the run's ``latest`` file, itself replaced atomically,
names the newest one. A process killed at any moment therefore leaves either
the previous checkpoint or the new one, never half of one: stale temporary
folders are ignored and cleaned up by the next writer.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Callable, Mapping

__all__ = ["write_checkpoint", "latest_checkpoint", "checkpoints", "resume_order", "atomic_write", "lock_run_folder",
           "CheckpointError", "RunInUseError"]

_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-checkpoint-"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or unreadable, or could not be written."""


class RunInUseError(CheckpointError):
    """Another process is training in the run folder."""


_LOCK = ".lock"


def lock_run_folder(run_dir: str | os.PathLike) -> Callable[[], None]:
    """Hold the run folder for this process (an exclusive ``flock`` on its
    ``.lock`` file, released by the returned function or when the process ends,
    even by SIGKILL; keep that function: the lock goes with it). A second run
    started in the same folder would write its
    checkpoints and log between the first one's: it raises ``RunInUseError``.
    Where the file system has no locks, nothing is held."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return lambda: None
    path = Path(run_dir) / _LOCK
    # Never through a link (a run folder from elsewhere with .lock linking out had
    # the file it named truncated to the pid), and only into a plain file.
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise CheckpointError(f"{path} is a symbolic link; the run's lock must be a plain file: remove it") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path} is not a plain file; the run's lock must be one: remove it")
    handle = os.fdopen(fd, "r+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise RunInUseError(f"another process (pid {holder}) is training in {run_dir}: two runs in one folder "
                            "would overwrite each other's checkpoints and log; wait for it, or use another folder") from None
    except OSError:  # no locks on this file system
        handle.close()
        return lambda: None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()

    def release() -> None:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()

    return release


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp_path)`` and move the result onto ``path`` atomically."""
    path = Path(path)
    name = path.name
    if len(os.fsencode(name)) > 200:  # the temporary name must fit the 255-byte limit the target's does
        name = f"{name[:40]}-{hashlib.sha256(os.fsencode(name)).hexdigest()[:16]}"
    tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def write_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    writers: Mapping[str, Callable[[Path], None]],
    *,
    keep: int = 2,
) -> Path:
    """Write ``{file name: writer(path)}`` as checkpoint ``step`` of ``run_dir``,
    point ``latest`` at it and delete all but the newest ``keep`` checkpoints
    (``keep`` <= 0 keeps them all)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(_TMP_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in run_dir.glob(".*.tmp-*"):  # atomic_write's files (latest, the loss plot) of a killed process
        if stale.is_file():
            stale.unlink(missing_ok=True)
    tmp = run_dir / f"{_TMP_PREFIX}{step}-{os.getpid()}"
    tmp.mkdir()
    final = run_dir / f"checkpoint-{step:08d}"
    name = ""
    try:
        for name, write in writers.items():
            write(tmp / name)
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
    except Exception as error:
        # A full disk reaches here as safetensors' or torch.save's own error (not an
        # OSError; torch's reads "unexpected pos 186688 vs 186580"): said as the
        # checkpoint's, with the free space, and the partial folder's space given back.
        free = shutil.disk_usage(run_dir).free
        shutil.rmtree(tmp, ignore_errors=True)
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"cannot write checkpoint {final} ({name}): {reason} "
                              f"[{free / 2**20:.1f} MiB free on its disk]") from error
    except BaseException:  # a Ctrl-C: no partial folder left, and no error of ours
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # a resumed run writing the same step again: swap it out first
        old = run_dir / f"{_TMP_PREFIX}old-{step}-{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    atomic_write(run_dir / LATEST, lambda p: p.write_text(final.name + "\n"))
    for old in _checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _checkpoints(run_dir: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The complete checkpoints of ``run_dir`` as (step, folder), oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return [(int(_NAME.match(p.name).group(1)), p) for p in _checkpoints(run_dir)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of ``run_dir`` (None if it has none)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    pointer = run_dir / LATEST
    if pointer.is_file():
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        # Only a checkpoint-<step> folder of run_dir itself: a damaged or
        # hand-edited pointer ("", "..", "samples") must not name another folder
        # (a resume would rename it damaged-* if it failed to load).
        if _NAME.fullmatch(name) and (run_dir / name).is_dir():
            return run_dir / name
    found = _checkpoints(run_dir)  # `latest` lost: every renamed folder is complete
    return found[-1] if found else None


def resume_order(run_dir: str | os.PathLike, newest: Path | None = None) -> list[Path]:
    """The checkpoints a resume of ``run_dir`` tries, in turn: its newest
    (``newest`` where the caller resolved it, else ``latest_checkpoint``), then
    the older ones, newest first, as it falls back past damaged ones."""
    newest = latest_checkpoint(run_dir) if newest is None else newest
    if newest is None:
        return []
    return [newest, *(path for _, path in reversed(checkpoints(run_dir)) if path != newest)]
