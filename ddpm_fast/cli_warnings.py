"""Warnings as one line each while a command runs ("ddpm-fast train: warning:
..."), as errors are, not Python's file:line and source line.

The formatter is installed while any ``cli.main`` runs and taken out when the
last one returns; a warning gets the prefix of the command running on its own
thread, and Python's format on a thread that runs none. (Each main once saved
and put back ``warnings.showwarning`` itself: two commands on two threads left
one's formatter installed for good, and each formatted the other's warnings.)"""

from __future__ import annotations

import sys
import threading
import warnings
from typing import Any, TextIO

__all__ = ["format_warnings", "restore_warnings"]

_lock = threading.Lock()
_thread = threading.local()  # .prefix: the command running on this thread, if any
_users = 0
_original: Any = None  # warnings.showwarning as the first command found it


def _write_line(text: str) -> None:
    """A line on stderr above any open progress bar, which tqdm then redraws
    below it (a plain print would land at the end of the bar's line)."""
    from tqdm import tqdm

    tqdm.write(text, file=sys.stderr)


def _show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
          file: TextIO | None = None, line: str | None = None) -> None:
    prefix = getattr(_thread, "prefix", None)
    if prefix is None:
        _original(message, category, filename, lineno, file, line)
    else:
        _write_line(f"{prefix}: warning: {message}")


def format_warnings(prefix: str) -> str | None:
    """Show this thread's warnings as ``<prefix>: warning: <message>`` until
    ``restore_warnings`` of the returned value (this thread's previous prefix)."""
    global _users, _original
    with _lock:
        if _users == 0:
            _original = warnings.showwarning
            warnings.showwarning = _show
        _users += 1
    previous = getattr(_thread, "prefix", None)
    _thread.prefix = prefix
    return previous


def restore_warnings(previous: str | None) -> None:
    global _users
    _thread.prefix = previous
    with _lock:
        _users -= 1
        if _users == 0 and warnings.showwarning is _show:  # (else someone replaced it since: theirs stays)
            warnings.showwarning = _original
