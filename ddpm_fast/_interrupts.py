"""Holding a Ctrl-C back while a few steps that belong together run, or
while torch could lose its state to one.

A training step's update (optimizer, scaler, learning rate, step count, EMA)
is all applied or none of it: a KeyboardInterrupt in between (Python raises it
after the C call it arrived in, the fused Adam, say) would leave weights one
step ahead of their step count and EMA, which a Trainer continued in the same
process (a notebook's) would train on, silently.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

import torch


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Run the block with SIGINT held: a Ctrl-C during it reaches the handler
    that was in place (Python's KeyboardInterrupt, or the command line's) when
    the block ends, even by an error (which one held through a failing read
    would otherwise hide: a resume went on from an older checkpoint). Only in
    the main thread, where Python runs signal handlers, and over a Python-level
    handler; otherwise the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):  # SIG_IGN, SIG_DFL, or one installed outside Python
        yield
        return
    held: list[object] = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(frame))
    try:
        yield
    finally:  # held or not, the block's error or not: a Ctrl-C is the user's last word
        signal.signal(signal.SIGINT, handler)
        if held:
            handler(signal.SIGINT, held[0])


@contextlib.contextmanager
def default_device(device: str) -> Iterator[None]:
    """``with torch.device(device)``, SIGINT held over it (see sigint_deferred):
    a Ctrl-C that landed while torch pushed or popped the device mode lost it
    ("trying to pop from empty mode stack"), leaving a notebook's later tensors
    on that device (meta, say); and one in safetensors' loading came out as a
    ValueError, which called an intact checkpoint unreadable (and the Trainer's
    resume set it aside as damaged)."""
    with sigint_deferred(), torch.device(device):
        yield
