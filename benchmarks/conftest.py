"""Shared benchmark machinery (``pytest benchmarks/ --benchmark-only``).

CPU timings come from pytest-benchmark itself. GPU timings are CUDA-event
medians (``gpu_median_us``: warm-up, then each run timed alone after a read of
256 MB has emptied L2 of its inputs), and beside them a back-to-back time: N
calls between two CUDA events, no flush, so that host launch costs show where
a case is launch-bound (the flush queued ahead of each start event hides
those shorter than its own ~60-85 us on the GPU). The pytest-benchmark rows of GPU tests include a synchronize per call
and are only a cross-check. Each GPU row is also set against its floor (bytes
that must move / measured copy bandwidth; for the U-Net's bf16 and training rows
also FLOPs / measured bf16 matrix rate; none for the fp32 U-Net row, whose
matrix rate is not measured), printed in one table at the end of the
run, and, where DDPM_FAST_GPU_ROWS names a file (benchmarks/run_gpu.sh sets
it), appended to it as a JSON line as soon as it is measured, so that a run
stopped at a time limit keeps the rows it had.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
_ALLOCATOR = ["malloc thresholds: not set"]


def pytest_configure(config) -> None:
    # Before any timing, the same malloc state for ours and the peers; here, not at
    # import, so that the tests that import this file leave their process's malloc alone.
    from allocator import keep_freed_pages

    _ALLOCATOR[0] = keep_freed_pages()


def pytest_report_header(config) -> str:
    return f"ddpm_fast benchmarks: {_ALLOCATOR[0]}"


def _no_cxx_compiler(error: BaseException | None) -> bool:
    """Whether inductor found no working C++ compiler somewhere in error's chain."""
    seen = set()
    while error is not None and id(error) not in seen:
        if type(error).__name__ == "InvalidCxxCompiler":
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A torch.compile peer on a machine without a C++ compiler for inductor
    skips, saying so, rather than failing (the diffusers peers skip where
    diffusers is missing); any other compile error still fails."""
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and report.failed and _no_cxx_compiler(call.excinfo.value):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0,
                           "Skipped: torch.compile found no working C++ compiler (inductor's cpp.cxx): its peer rows skip")


# Every benchmark first checks that what it times computes the right thing
# (against our reference, or the peers' own formula), so that a fast wrong
# kernel, a stale graph or a broken compile cannot win. Per-dtype tolerances
# of those checks:
CHECK_TOLERANCE = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}


def check_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Fail the benchmark unless ``got`` matches ``want`` (in want's dtype's tolerance)."""
    torch.testing.assert_close(got.float(), want.float(), **CHECK_TOLERANCE[want.dtype],
                               msg=lambda m: f"{what}: wrong result, not timed: {m}")


def check_relative_error(got: torch.Tensor, want: torch.Tensor, limit: float, what: str) -> None:
    """Fail unless |got - want| / |want| (whole-tensor norms) stays below limit:
    for model outputs, whose elements near 0 make elementwise tolerances moot."""
    error = ((got.float() - want.float()).norm() / want.float().norm()).item()
    if not error < limit:  # NaN fails too
        pytest.fail(f"{what}: relative error {error:.3g} above {limit}: wrong result, not timed")


def check_standard_normal(z: torch.Tensor, what: str) -> None:
    """Fail unless z looks like standard normal noise (mean and standard
    deviation within a few standard errors): for peers that draw their own."""
    z = z.float()
    n = z.numel()
    mean, std = z.mean().item(), z.std().item()
    if not (abs(mean) < 6 / n**0.5 and abs(std - 1) < 6 / (2 * n) ** 0.5 + 1e-3):
        pytest.fail(f"{what}: its noise has mean {mean:.4g} and std {std:.4g} over {n} values: not N(0, 1), not timed")


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
    median_us: float  # gpu_median_us: L2 emptied before each run
    floor_us: float | None  # None where no floor is computed
    baseline: str | None  # impl the speed-up is measured against
    back_to_back_us: float | None = None  # per call, N calls back to back, no flush


@dataclass
class GpuTable:
    rows: list[GpuRow] = field(default_factory=list)
    copy_gbps: float | None = None
    matmul_tflops: float | None = None
    device: str | None = None

    def speedup(self, row: GpuRow) -> float | None:
        base = [r for r in self.rows if r.case == row.case and r.impl == row.baseline]
        return base[0].median_us / row.median_us if base else None


TABLE = GpuTable()


def add_gpu_row(row: GpuRow, test: str) -> GpuRow:
    """Add a row to the summary table and, where DDPM_FAST_GPU_ROWS is set,
    append it to that file at once (opened and closed per row: nothing waits
    in a buffer if the process is killed)."""
    TABLE.rows.append(row)
    TABLE.device = TABLE.device or torch.cuda.get_device_name()
    path = os.environ.get("DDPM_FAST_GPU_ROWS")
    if path:
        record = {**asdict(row), "test": test, "copy_gbps": TABLE.copy_gbps, "matmul_tflops": TABLE.matmul_tflops,
                  "device": TABLE.device, "torch": torch.__version__}
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    return row


def median_s(benchmark) -> float | None:
    """pytest-benchmark's median of the last pedantic run, in seconds; None
    under --benchmark-disable, which runs each benchmark once, untimed."""
    return None if benchmark.stats is None else benchmark.stats.stats.median


# Larger than any GPU's L2 (50 MB on the H100, 60 MB on the H200).
_FLUSH_ELEMENTS = 64 * 2**20  # float32: 256 MB


@functools.cache
def _flush_buffer() -> torch.Tensor:
    return torch.randn(_FLUSH_ELEMENTS, device="cuda")


def gpu_median_us(fn: Callable[[], object], warmup_ms: float = 25.0, rep_ms: float = 200.0) -> float:
    """The median of fn's runs, each between two CUDA events after L2 was
    emptied of fn's data by reading a 256 MB buffer, in microseconds. A read,
    not triton.testing.do_bench's zero_() of its buffer: a write leaves L2 full
    of dirty lines, whose write-back the timed run would pay (up to L2's size,
    some 15 us, against a 22 us floor for the U-Net's largest GroupNorm).
    After a warm-up of about ``warmup_ms``, runs for about ``rep_ms`` (10 to 1000)."""
    flush = _flush_buffer()
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(5):
        fn()
    end.record()
    end.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(int(min(1000, max(1, warmup_ms / estimate_ms)))):
        fn()
    runs = int(min(1000, max(10, rep_ms / estimate_ms)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    for begin, finish in zip(starts, ends):
        flush.sum()
        begin.record()
        fn()
        finish.record()
    torch.cuda.synchronize()
    return 1000.0 * statistics.median(b.elapsed_time(f) for b, f in zip(starts, ends))


def back_to_back_us(fn, median_us: float, budget_us: float = 10_000.0) -> float:
    """Per-call time of n calls of fn queued back to back between two CUDA
    events, after a warm-up, without an L2 flush: the GPU starts idle, so a
    launch-bound fn is timed at its host cost, as a loop of calls sees it. n
    fills about budget_us (5 to 200 calls); the median of 3 such runs."""
    n = int(min(200, max(5, budget_us // max(median_us, 1.0))))
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        times.append(1000.0 * start.elapsed_time(end) / n)
    return sorted(times)[1]


def time_gpu(fn) -> tuple[float, float]:
    """(median, back-to-back per-call time), in microseconds."""
    median = gpu_median_us(fn)
    return median, back_to_back_us(fn, median)


@pytest.fixture(scope="session")
def copy_bandwidth_gbps() -> float:
    """Device-to-device copy bandwidth: 2 x 512 MiB moved per copy."""
    src = torch.randn(128 * 2**20, device="cuda")  # data, not whatever fresh memory holds (zeros, often)
    dst = torch.empty_like(src)
    us = gpu_median_us(lambda: dst.copy_(src))
    TABLE.copy_gbps = 2 * src.numel() * 4 / (us * 1e-6) / 1e9
    return TABLE.copy_gbps


@pytest.fixture(scope="session")
def matmul_tflops() -> float:
    """Dense bf16 matrix rate: products of two random 8192 x 8192 matrices
    (2 x 8192^3 FLOPs each). Measured, as the bandwidth is: the spec's 989
    TFLOP/s on the H100 is not reached on random data."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    us = gpu_median_us(lambda: a @ b)
    TABLE.matmul_tflops = 2 * 8192**3 / (us * 1e-6) / 1e12
    return TABLE.matmul_tflops


def flop_floor_us(flops: float, tflops: float) -> float:
    return flops / (tflops * 1e12) * 1e6


@pytest.fixture
def record_gpu(benchmark, copy_bandwidth_gbps, request):
    """Time fn on the GPU, add a row to the summary table, and let
    pytest-benchmark time it too (synchronized). The floor is the bytes over
    the copy bandwidth or, given ``flops``, the FLOPs over the bf16 matrix
    rate where that is longer; ``bytes_moved=None``: no floor (a row bound by
    a rate we do not measure, the fp32 U-Net's matrix work)."""

    def record(case: str, impl: str, fn, bytes_moved: int | None, baseline: str = "eager",
               flops: float | None = None) -> GpuRow:
        median, b2b = time_gpu(fn)
        floor = None if bytes_moved is None else bytes_moved / (copy_bandwidth_gbps * 1e9) * 1e6
        if floor is not None and flops is not None:
            floor = max(floor, flop_floor_us(flops, request.getfixturevalue("matmul_tflops")))
        row = add_gpu_row(GpuRow(case, impl, median, floor, baseline, b2b), request.node.nodeid)
        benchmark.extra_info.update(median_us=median, back_to_back_us=b2b)
        if floor is not None:
            benchmark.extra_info.update(floor_us=floor, floor_fraction=floor / median)

        def synced():
            fn()
            torch.cuda.synchronize()

        # One pytest-benchmark group per case: its (ratio) column then
        # compares the impls of one case, not randn with the U-Net.
        benchmark.group = case
        benchmark.pedantic(synced, rounds=20, warmup_rounds=3)
        return row

    return record


def _gpu_run_order(item) -> float:
    """Where a GPU benchmark runs in a session: 0 ours (and the op
    benchmarks' other non-compiled rows), 1 the model benchmarks' eager peers
    (their speed-up baselines), 2 the torch.compile peers: the ops' (the step's
    and q_sample's before GroupNorm+SiLU's 21 cases, so that a time limit cuts
    those rather than the few the step's targets quote), and diffusers' U-Net
    at batch 128 and in training (the bar issue 6 sets), 3 the other model
    compile peers. Compiling the CIFAR U-Net takes 30-60 s, an op peer a few
    seconds per case."""
    params = item.callspec.params if hasattr(item, "callspec") else {}
    impl = str(params.get("impl", "ours"))
    module = getattr(item, "module", None)
    name = module.__name__ if module is not None else ""
    model = name in ("test_bench_unet", "test_bench_train")
    if "compile" not in impl:
        return 1 if model and not (impl.startswith("ours") and "reference" not in impl) else 0
    if not model:
        return 2.5 if name == "test_bench_group_norm_silu" else 2
    return 2 if impl.startswith("diffusers") and params.get("batch", 128) == 128 else 3


def pytest_collection_modifyitems(config, items):
    # GPU benchmarks in the order of _gpu_run_order, so that a time-limited
    # run (benchmarks/run_gpu.sh) measures our kernels, our U-Net step,
    # sampling and training throughput, and the eager baselines before the slow
    # torch.compile peers. A stable sort: within a class the collected order
    # stays; the CPU benchmarks keep theirs.
    items.sort(key=lambda item: _gpu_run_order(item) if item.name.startswith("test_gpu") else 0)


def pytest_terminal_summary(terminalreporter):
    if not TABLE.rows:
        return
    tr = terminalreporter
    tr.section("ddpm_fast GPU summary (CUDA-event medians)")
    copy = "not measured" if TABLE.copy_gbps is None else f"{TABLE.copy_gbps:.0f} GB/s"
    rate = "not measured" if TABLE.matmul_tflops is None else f"{TABLE.matmul_tflops:.0f} TFLOP/s"
    tr.write_line(f"device: {TABLE.device}, torch {torch.__version__}, copy bandwidth {copy}, bf16 matmul {rate}")
    tr.write_line("median: CUDA events, L2 emptied (a 256 MB read) before each run (rows without a floor, whole sampling chains: pytest-benchmark's)")
    tr.write_line("b2b: per call, calls back to back (host launch costs included, L2 warm); % floor, speed-up: of the median")
    tr.write_line(f"{'case':44s} {'impl':26s} {'median us':>10s} {'b2b us':>10s} {'floor us':>9s} {'% floor':>8s} {'speed-up':>9s}")

    def fmt(value: float | None, spec: str, width: int) -> str:
        return f"{'-' if value is None else format(value, spec):>{width}s}"

    for row in TABLE.rows:
        speedup = TABLE.speedup(row)
        percent = "-" if row.floor_us is None else f"{100 * row.floor_us / row.median_us:.0f}%"
        tr.write_line(
            f"{row.case:44s} {row.impl:26s} {row.median_us:10.2f} {fmt(row.back_to_back_us, '.2f', 10)} "
            f"{fmt(row.floor_us, '.2f', 9)} {percent:>8s} {'' if speedup is None else f'{speedup:8.2f}x':>9s}"
        )
