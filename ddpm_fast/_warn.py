"""Warnings that name the caller's line, not ours.

A fixed ``stacklevel`` points at the user's code from one call depth only:
Trainer.train and Trainer.train_step reach the same warning through different
depths, and a warning reached through torch.no_grad's wrapper needs one more
level. ``warn`` counts the frames instead: the first frame outside this package,
its Triton kernels and torch's decorator wrapper is the caller. (Python 3.12's
``skip_file_prefixes`` does this; the package supports 3.10 too.) During an
import, importlib's frames lie between: passed over too, and not counted, as
``warnings.warn`` does not count them in ``stacklevel``.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch.utils._contextlib as _torch_contextlib

_KERNELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
_INTERNAL_PREFIXES = (os.path.dirname(os.path.abspath(__file__)) + os.sep, _KERNELS + os.sep)
_INTERNAL_FILES = (os.path.abspath(_torch_contextlib.__file__),)


def _is_internal(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_INTERNAL_PREFIXES) or path in _INTERNAL_FILES


def _is_importlib(filename: str) -> bool:
    """The test ``warnings`` applies to the frames it skips ("<frozen importlib._bootstrap>")."""
    return "importlib" in filename and "_bootstrap" in filename


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)``, attributed to the first frame that
    is not the package's (the outermost one if every frame is)."""
    frame = sys._getframe(1)  # warn's caller: level 2 to warnings.warn
    level = 2
    while frame.f_back is not None and (_is_internal(frame.f_code.co_filename)
                                        or _is_importlib(frame.f_code.co_filename)):
        frame = frame.f_back
        if not _is_importlib(frame.f_code.co_filename):
            level += 1
    warnings.warn(message, category, stacklevel=level)
