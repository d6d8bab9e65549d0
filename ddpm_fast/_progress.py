"""Progress bars for long work: tqdm.auto's (a widget in a notebook, text
elsewhere). A text bar redraws ten times a second, which suits a terminal but
not a log: where stderr is not a terminal (output redirected, a batch job) it
redraws every 30 s instead, so that a day of training leaves some thousands of
lines in its log rather than megabytes of carriage returns. tqdm still draws
the bar's first and last state.

Work done in batches (sample_sharded, evaluate_bpd) draws one bar per batch,
each over that batch's timesteps; ``batch_of`` names the batch in each bar's
description ("sampling, batch 2/5"), so the whole run's progress shows too."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

LOG_INTERVAL_S = 30.0  # seconds between redraws of a text bar that is not on a terminal

# (batch index from 0, batch count) of the work now under way; None: one batch, or none named
_BATCH: ContextVar[tuple[int, int] | None] = ContextVar("ddpm_fast_progress_batch", default=None)


def progress_bar(iterable: Any = None, **kwargs: Any) -> Any:
    """``tqdm.auto.tqdm(iterable, **kwargs)``, redrawn every LOG_INTERVAL_S
    seconds where stderr is not a terminal (unless kwargs set mininterval)."""
    from tqdm.auto import tqdm

    if not _draws_a_widget(tqdm) and not _is_terminal(sys.stderr):
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    batch = _BATCH.get()
    if batch is not None and kwargs.get("desc"):
        kwargs["desc"] = f"{kwargs['desc']}, batch {batch[0] + 1}/{batch[1]}"
    return tqdm(iterable, **kwargs)


@contextmanager
def batch_of(index: int, count: int) -> Iterator[None]:
    """Within it, a bar's description names batch ``index`` (from 0) of
    ``count``; nothing is added where ``count`` is 1."""
    token = _BATCH.set((index, count) if count > 1 else None)
    try:
        yield
    finally:
        _BATCH.reset(token)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty (None, a stand-in), or closed
        return False


def _draws_a_widget(bar_class: type) -> bool:
    """Whether tqdm.auto chose its notebook widget (a Jupyter kernel)."""
    return any("notebook" in cls.__module__ for cls in bar_class.__mro__)
