"""Shared benchmark machinery (``pytest benchmarks/ --benchmark-only``).

CPU timings come from pytest-benchmark itself. GPU timings are CUDA-event
medians from ``triton.testing.do_bench`` (warm-up, L2 flushed before every
run); the pytest-benchmark rows of GPU tests include a synchronize per call
and are only a cross-check. Each GPU row is also set against the memory floor
(bytes that must move / measured copy bandwidth) and printed in one table at
the end of the run.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@functools.lru_cache(maxsize=None)
def compiled_per_case(fn: Callable, case: tuple) -> Callable:
    """torch.compile(fn) for one benchmark case (shape, dtype, layout, ...),
    with static shapes: one compiled function reused across shapes would get
    dynamic-shape kernels from the second shape on, a weaker baseline than a
    user who compiles for one shape gets."""
    _raise_recompile_limit()
    return torch.compile(fn, dynamic=False)


@functools.lru_cache(maxsize=None)
def _raise_recompile_limit() -> None:
    # Dynamo keeps compiled code per Python code object, whichever
    # torch.compile wrapper it came from, and past recompile_limit (8) entries
    # it runs the function eagerly, with only a logged warning: the
    # GroupNorm+SiLU peer alone has 21 GPU cases. Raise the limit, and make a
    # hit an error rather than an eager row under the name "compile".
    import torch._dynamo

    config = torch._dynamo.config
    if hasattr(config, "recompile_limit"):
        config.recompile_limit = 64
    else:  # its older name
        config.cache_size_limit = 64
    if hasattr(config, "fail_on_recompile_limit_hit"):
        config.fail_on_recompile_limit_hit = True


@dataclass
class GpuRow:
    case: str  # op and shape
    impl: str  # implementation
    median_us: float
    floor_us: float
    baseline: str  # impl the speed-up is measured against


@dataclass
class GpuTable:
    rows: list[GpuRow] = field(default_factory=list)
    copy_gbps: float | None = None

    def speedup(self, row: GpuRow) -> float | None:
        base = [r for r in self.rows if r.case == row.case and r.impl == row.baseline]
        return base[0].median_us / row.median_us if base else None


TABLE = GpuTable()


def gpu_median_us(fn) -> float:
    from triton.testing import do_bench

    return 1000.0 * do_bench(fn, warmup=50, rep=200, return_mode="median")


@pytest.fixture(scope="session")
def copy_bandwidth_gbps() -> float:
    """Device-to-device copy bandwidth: 2 x 512 MiB moved per copy."""
    src = torch.empty(128 * 2**20, device="cuda")
    dst = torch.empty_like(src)
    us = gpu_median_us(lambda: dst.copy_(src))
    TABLE.copy_gbps = 2 * src.numel() * 4 / (us * 1e-6) / 1e9
    return TABLE.copy_gbps


@pytest.fixture
def record_gpu(benchmark, copy_bandwidth_gbps):
    """Time fn on the GPU, add a row to the summary table, and let
    pytest-benchmark time it too (synchronized)."""

    def record(case: str, impl: str, fn, bytes_moved: int, baseline: str = "eager") -> GpuRow:
        median = gpu_median_us(fn)
        floor = bytes_moved / (copy_bandwidth_gbps * 1e9) * 1e6
        row = GpuRow(case, impl, median, floor, baseline)
        TABLE.rows.append(row)
        benchmark.extra_info.update(median_us=median, floor_us=floor, floor_fraction=floor / median)

        def synced():
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(synced, rounds=20, warmup_rounds=3)
        return row

    return record


def pytest_terminal_summary(terminalreporter):
    if not TABLE.rows:
        return
    tr = terminalreporter
    tr.section("ddpm_fast GPU summary (CUDA-event medians)")
    tr.write_line(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {TABLE.copy_gbps:.0f} GB/s")
    tr.write_line(f"{'case':44s} {'impl':16s} {'median us':>10s} {'floor us':>9s} {'% floor':>8s} {'speed-up':>9s}")
    for row in TABLE.rows:
        speedup = TABLE.speedup(row)
        tr.write_line(
            f"{row.case:44s} {row.impl:16s} {row.median_us:10.2f} {row.floor_us:9.2f} "
            f"{100 * row.floor_us / row.median_us:7.0f}% {'' if speedup is None else f'{speedup:8.2f}x':>9s}"
        )
