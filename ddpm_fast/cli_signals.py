"""SIGTERM for the command line (``timeout``, ``docker stop``, a batch system
ending a job, torchrun stopping its ranks): handled as Ctrl-C is, with exit
status 143 (128 + 15) instead of 130. By default SIGTERM ended the process
without a word."""

from __future__ import annotations

import signal
from typing import NoReturn


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: every Ctrl-C path applies."""


def stopped(stop: KeyboardInterrupt) -> tuple[str, int]:
    """How a command stopped by ``stop`` says so, and its exit status."""
    return ("terminated (SIGTERM)", 143) if isinstance(stop, Terminated) else ("interrupted", 130)


def _raise_terminated(signum: int, frame: object) -> NoReturn:
    # A second SIGTERM ends the process at once, as before: the handler runs
    # only between Python bytecodes, so a rank stuck in a collective (a dead
    # peer) would otherwise ignore every further one.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated()


def catch_sigterm() -> object:
    """Have SIGTERM raise Terminated; returns the handler it replaced, for
    restore_sigterm. None where it sets none: off the main thread (signals
    cannot be set there) or where the handler was set outside Python (it could
    not be put back)."""
    try:
        if signal.getsignal(signal.SIGTERM) is None:
            return None
        return signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread
        return None


def restore_sigterm(previous: object) -> None:
    """Put back the handler catch_sigterm replaced (if it replaced one)."""
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
