"""Argument checks shared by the public API (the ops have theirs in ops/_args.py)."""

from __future__ import annotations

import numbers

__all__ = ["is_int"]


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer: a Python int or numpy's (counts read
    from arrays or configs), but not a bool (True is no count). (The exact-type
    test goes first: the ABC check costs almost a microsecond, paid on every op call.)"""
    return type(value) is int or (not isinstance(value, bool) and isinstance(value, numbers.Integral))
