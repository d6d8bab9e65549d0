"""Argument checks shared by the public API (the ops have theirs in ops/_args.py)."""

from __future__ import annotations

import numbers

import torch

__all__ = ["is_int", "check_bool", "type_name", "WIDENED_TIMESTEP_DTYPES"]

# Unsigned timestep dtypes that few ops take (min/max do not): widened to int64
# first. (A uint64 from 2^63 on wraps negative, which fails the range check.)
WIDENED_TIMESTEP_DTYPES = (torch.uint16, torch.uint32, torch.uint64)


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer: a Python int or numpy's (counts read
    from arrays or configs), but not a bool (True is no count). (The exact-type
    test goes first: the ABC check costs almost a microsecond, paid on every op call.)"""
    return type(value) is int or (not isinstance(value, bool) and isinstance(value, numbers.Integral))


def type_name(value: object) -> str:
    """``value``'s type for an error message, qualified unless built in: numpy's
    bool is "numpy.bool", not a "bool" that a flag "must be"."""
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def check_bool(value: object, name: str) -> None:
    """A flag must be a bool: ``bool("no")`` would be True, and 0 or None could
    mean a default."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
