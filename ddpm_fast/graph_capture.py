"""Capturing a CUDA graph of work that may fail to capture (a model that
syncs, or anything else capture cannot record), leaving the caller's stream,
autocast and allocator as they were. Used by the Sampler's graph path."""

from __future__ import annotations

from typing import Callable

import torch


class CaptureFailed(RuntimeError):
    """A capture that failed; the message names the first error."""


def autocast_without_cache() -> torch.autocast:
    """CUDA autocast as the caller has it (on or off, its dtype), with the weight cache off."""
    return torch.autocast(
        "cuda", enabled=torch.is_autocast_enabled("cuda"), dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False
    )


def capture(steps: Callable[[], None], stream: "torch.cuda.Stream") -> "torch.cuda.CUDAGraph":
    """A CUDA graph of the work ``steps()`` queues, captured on ``stream`` (which
    ran the warm-up). Capture records that work without running it, so a failed
    capture changes nothing. Raises CaptureFailed naming the first error."""
    graph = torch.cuda.CUDAGraph()
    # The capture's memory pool, named here (capture would make one itself) so
    # that a failed capture can be closed: end_allocating_to_pool.
    pool = torch.cuda.graph_pool_handle()
    cause: list[str] = []
    try:
        # torch.cuda.graph's exit ends the capture before it restores the caller's
        # stream; when capture_end raises, as it does after anything failed during
        # capture, the thread would stay on the capture stream. This outer context
        # restores the caller's stream whatever happens.
        with torch.cuda.stream(stream):
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                try:
                    steps()
                except Exception as error:  # the cause (capture_end then fails "due to a previous error")
                    cause.append(f"{type(error).__name__}: {error}")
                    raise
    except Exception as error:  # a model that syncs, or anything else capture cannot record
        end_allocating_to_pool(pool)
        raise CaptureFailed(cause[0] if cause else f"{type(error).__name__}: {error}") from error
    return graph


def end_allocating_to_pool(pool: tuple[int, int]) -> None:
    """After a failed capture, stop the caching allocator sending this thread's
    allocations to the capture's pool. torch before 2.12 (pytorch#180395, so the
    GPU machine's 2.11) skips that when capture_end fails, and the allocator's next
    synchronize (empty_cache, for one) then aborts the process on its
    captures_underway.empty() assertion. Where capture_end did stop it, the
    allocator refuses (it is not recording to the pool), which is as it should be."""
    end = (getattr(torch._C, "_cuda_endAllocateToPool", None)
           or getattr(torch._C, "_cuda_endAllocateCurrentStreamToPool", None))  # its name before torch 2.8
    if end is not None:
        try:
            end(torch.cuda.current_device(), pool)
        except RuntimeError:  # not recording to that pool: capture_end (or capture_begin's failure) saw to it
            pass
