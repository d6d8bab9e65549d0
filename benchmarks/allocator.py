"""glibc malloc settings for fair CPU timings (BENCHMARKS.md, "The two MALLOC_
variables"): eager code allocates fresh 4-32 MB temporaries on every call, and
whether they come from reused heap pages or from freshly mapped ones (a page
fault per 4 KiB) depends on malloc's self-adjusting mmap threshold, that is on
what the process freed before. Eager q_sample at 8x1x512x512 took 13.4 ms with
8,160 page faults a call in a fresh process and 6.4 ms with none after other
benchmarks had run, in the same command. Raising both thresholds keeps freed
pages for reuse in every case, as MALLOC_MMAP_THRESHOLD_=1000000000
MALLOC_TRIM_THRESHOLD_=2147483647 in the environment would."""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt's parameter numbers (malloc.h) and the values set
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 1_000_000_000  # allocations below 1 GB come from the heap
TRIM_THRESHOLD = 2**31 - 1  # freed heap memory is kept, up to 2 GiB (mallopt takes an int)
VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_pages() -> str:
    """Set both thresholds through glibc's mallopt, unless the environment sets
    either (the caller's choice wins); returns what was done, for the header."""
    if any(name in os.environ for name in VARIABLES):
        return "malloc thresholds: from the environment"
    if not sys.platform.startswith("linux"):
        return "malloc thresholds: not set (not Linux)"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "malloc thresholds: not set (no mallopt)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return "malloc thresholds: set (freed pages kept for reuse)" if done else "malloc thresholds: refused by mallopt"
