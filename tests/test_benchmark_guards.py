"""The benchmarks' own guards and numbers, checked without a GPU.

Every benchmark row first checks that what it times computes the right thing
(benchmarks/conftest.py's check_* helpers and each file's ``check``), and the
GPU rows' floors, speed-ups and medians are computed by helpers that only run
on a GPU. A guard that always passes, or a number off by a factor, passes
`pytest benchmarks/` unnoticed; these tests feed each one a wrong result (or
fake CUDA events) and check that it is caught (or computed as documented).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ddpm_fast import _extension, ops

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
FAILED = pytest.fail.Exception


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    """benchmarks/conftest.py and the benchmark modules, imported under names of
    their own: they import ``conftest`` (tests/conftest.py here) and each other."""
    saved = {name: sys.modules.get(name) for name in ("conftest", "test_bench_unet", "allocator")}
    conf = _load("_guarded_bench_conftest", BENCH / "conftest.py")
    sys.modules["conftest"] = conf
    try:
        mods = {"conftest": conf, "allocator": _load("allocator", BENCH / "allocator.py")}
        for name in ("test_bench_ddpm_step", "test_bench_q_sample", "test_bench_randn", "test_bench_group_norm_silu",
                     "test_bench_unet"):
            mods[name] = _load(f"_guarded_{name}", BENCH / f"{name}.py")
        sys.modules["test_bench_unet"] = mods["test_bench_unet"]
        mods["test_bench_train"] = _load("_guarded_test_bench_train", BENCH / "test_bench_train.py")
        mods["cpu_interleaved"] = _load("_guarded_cpu_interleaved", BENCH / "cpu_interleaved.py")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    yield SimpleNamespace(**mods)
    mods["test_bench_unet"].reference_output.cache_clear()


needs_extension = pytest.mark.skipif(not _extension.AVAILABLE, reason="extension not built")


# --- benchmarks/conftest.py: the checks ---------------------------------------------------------------------------


def test_check_close_fails_a_wrong_result(bench):
    want = torch.randn(64, generator=torch.Generator().manual_seed(0))
    bench.conftest.check_close(want * (1 + 1e-6), want, "row")  # float rounding passes
    with pytest.raises(AssertionError, match="row: wrong result, not timed"):
        bench.conftest.check_close(want + 1e-2, want, "row")
    with pytest.raises(AssertionError, match="wrong result"):  # bfloat16: off by more than its rounding
        bench.conftest.check_close((want + 0.25).bfloat16(), want.bfloat16(), "row")


def test_check_relative_error_fails_above_the_limit_and_on_nan(bench):
    want = torch.randn(64, generator=torch.Generator().manual_seed(0))
    bench.conftest.check_relative_error(want * 1.05, want, 0.1, "row")
    with pytest.raises(FAILED, match="relative error 0.2 above 0.1"):
        bench.conftest.check_relative_error(want * 1.2, want, 0.1, "row")
    with pytest.raises(FAILED, match="relative error nan"):
        bench.conftest.check_relative_error(want * float("nan"), want, 0.1, "row")


def test_check_standard_normal_fails_a_shifted_or_scaled_noise(bench):
    z = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    bench.conftest.check_standard_normal(z, "peer")
    with pytest.raises(FAILED, match="not N\\(0, 1\\)"):
        bench.conftest.check_standard_normal(z + 0.05, "peer")
    with pytest.raises(FAILED, match="not N\\(0, 1\\)"):
        bench.conftest.check_standard_normal(z * 1.05, "peer")


# --- benchmarks/conftest.py: the GPU table's numbers ------------------------------------------------------------


@pytest.fixture
def table(bench, monkeypatch):
    """A fresh summary table (on a known device), no DDPM_FAST_GPU_ROWS."""
    fresh = bench.conftest.GpuTable(device="Fake GPU")
    monkeypatch.setattr(bench.conftest, "TABLE", fresh)
    monkeypatch.delenv("DDPM_FAST_GPU_ROWS", raising=False)
    return fresh


def test_speedup_is_the_baseline_median_over_the_rows_of_the_same_case(bench, table):
    Row = bench.conftest.GpuRow
    rows = [Row("a", "eager", 10.0, None, "eager"), Row("a", "ours", 2.0, None, "eager"),
            Row("b", "eager", 100.0, None, "eager"), Row("b", "ours", 50.0, None, "eager"),
            Row("c", "ours", 5.0, None, "eager")]
    table.rows.extend(rows)
    assert [table.speedup(r) for r in rows] == [1.0, 5.0, 1.0, 2.0, None]


class FakeBenchmark:
    """pytest-benchmark's fixture, as far as the benchmarks use it."""

    def __init__(self):
        self.extra_info, self.group, self.calls = {}, None, 0

    def __call__(self, fn, *args, **kwargs):
        self.calls += 1
        return fn(*args, **kwargs)

    def pedantic(self, fn, rounds=1, iterations=1, warmup_rounds=0):
        self.calls += 1
        return fn()


def _record_gpu(bench, monkeypatch, median=20.0, b2b=30.0, gbps=1000.0, tflops=100.0):
    monkeypatch.setattr(bench.conftest, "time_gpu", lambda fn: (median, b2b))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    benchmark = FakeBenchmark()
    request = SimpleNamespace(node=SimpleNamespace(nodeid="bench::row"),
                              getfixturevalue=lambda name: {"matmul_tflops": tflops}[name])
    record = bench.conftest.record_gpu._get_wrapped_function()(benchmark, gbps, request)
    return record, benchmark


def test_record_gpu_floor_is_bytes_over_bandwidth_or_flops_over_rate_where_longer(bench, table, monkeypatch):
    record, benchmark = _record_gpu(bench, monkeypatch)
    # 2 MB at 1000 GB/s: 2 us; 1 GFLOP at 100 TFLOP/s: 10 us; the median is 20 us.
    row = record("case", "ours", lambda: None, bytes_moved=2_000_000)
    assert row.floor_us == pytest.approx(2.0) and row.median_us == 20.0 and row.back_to_back_us == 30.0
    assert benchmark.extra_info["floor_fraction"] == pytest.approx(0.1)
    row = record("case", "ours", lambda: None, bytes_moved=2_000_000, flops=1e9)
    assert row.floor_us == pytest.approx(10.0)
    assert benchmark.extra_info["floor_fraction"] == pytest.approx(0.5)
    row = record("case", "ours", lambda: None, bytes_moved=20_000_000, flops=1e9)  # 20 us of bytes: longer
    assert row.floor_us == pytest.approx(20.0)
    row = record("case", "fp32", lambda: None, bytes_moved=None, flops=1e9)  # no floor
    assert row.floor_us is None
    assert [r.floor_us is None for r in table.rows] == [False, False, False, True]


def test_measured_copy_bandwidth_and_matmul_rate(bench, table, monkeypatch):
    """2 x 512 MiB per copy and 2 x 8192^3 FLOPs per product, over the median
    (1 ms here; the tensors on the meta device: no memory, no GPU)."""
    randn = torch.randn

    def meta_randn(*args, **kwargs):
        return randn(*args, **{**kwargs, "device": "meta"})

    monkeypatch.setattr(torch, "randn", meta_randn)
    monkeypatch.setattr(bench.conftest, "gpu_median_us", lambda fn: 1000.0)
    gbps = bench.conftest.copy_bandwidth_gbps._get_wrapped_function()()
    assert gbps == pytest.approx(2 * 2**29 / 1e-3 / 1e9) == table.copy_gbps
    tflops = bench.conftest.matmul_tflops._get_wrapped_function()()
    assert tflops == pytest.approx(2 * 8192**3 / 1e-3 / 1e12) == table.matmul_tflops
    assert bench.conftest.flop_floor_us(1e12, 100.0) == pytest.approx(10_000.0)  # 1 TFLOP at 100 TFLOP/s: 10 ms


class FakeClock:
    """CUDA events on a fake clock that only the timed function advances."""

    def __init__(self, cost_ms):
        self.now, self.calls, self.log, self.cost_ms = 0.0, 0, [], cost_ms

    def fn(self):
        self.now += self.cost_ms(self.calls)
        self.calls += 1
        self.log.append("fn")

    def event_class(self):
        clock = self

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self, stream=None):
                self.t = clock.now

            def synchronize(self):
                pass

            def elapsed_time(self, end):
                return end.t - self.t

        return Event

    def install(self, bench, monkeypatch):
        monkeypatch.setattr(torch.cuda, "Event", self.event_class())
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
        flush = SimpleNamespace(sum=lambda: self.log.append("flush"))
        monkeypatch.setattr(bench.conftest, "_flush_buffer", lambda: flush)


def test_gpu_median_us_warms_up_flushes_before_each_run_and_takes_the_median(bench, monkeypatch):
    # 2 ms a call, every fourth 1 ms: the median of the timed runs is 2 ms, their minimum 1 ms.
    clock = FakeClock(lambda i: 1.0 if i % 4 == 0 else 2.0)
    clock.install(bench, monkeypatch)
    assert bench.conftest.gpu_median_us(clock.fn, warmup_ms=25.0, rep_ms=200.0) == pytest.approx(2000.0)
    first_flush = clock.log.index("flush")
    assert sum(1.0 if i % 4 == 0 else 2.0 for i in range(first_flush)) >= 25.0  # a warm-up of about warmup_ms
    timed = clock.log[first_flush:]
    assert timed == ["flush", "fn"] * (len(timed) // 2)  # the L2 emptied before every timed run
    assert 10 <= len(timed) // 2 <= 1000


def test_back_to_back_us_is_the_per_call_median_of_three_runs(bench, monkeypatch):
    # median_us 100: 100 calls a run, after 3 warm-up calls; the three runs cost 1, 3 and 2 ms a call.
    clock = FakeClock(lambda i: 0.5 if i < 3 else (1.0, 3.0, 2.0)[(i - 3) // 100])
    clock.install(bench, monkeypatch)
    assert bench.conftest.back_to_back_us(clock.fn, 100.0) == pytest.approx(2000.0)
    assert clock.calls == 303


def test_gpu_rows_file_keeps_every_row(bench, table, monkeypatch, tmp_path):
    import json

    path = tmp_path / "rows.jsonl"
    monkeypatch.setenv("DDPM_FAST_GPU_ROWS", str(path))
    table.copy_gbps = 3000.0
    for impl in ("eager", "ours"):
        bench.conftest.add_gpu_row(bench.conftest.GpuRow("case", impl, 10.0, 2.0, "eager", 12.0), f"t::{impl}")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["impl"], r["test"], r["floor_us"], r["copy_gbps"], r["device"]) for r in rows] == [
        ("eager", "t::eager", 2.0, 3000.0, "Fake GPU"), ("ours", "t::ours", 2.0, 3000.0, "Fake GPU")]


def test_summary_prints_percent_of_floor_and_speedup(bench, table):
    Row = bench.conftest.GpuRow
    table.rows.extend([Row("case", "eager", 50.0, 10.0, "eager", 60.0), Row("case", "ours", 20.0, 10.0, "eager", 25.0),
                       Row("case", "fp32", 40.0, None, "eager")])
    lines = []
    tr = SimpleNamespace(section=lambda *a, **k: None, write_line=lines.append)
    bench.conftest.pytest_terminal_summary(tr)
    rows = {line.split()[1]: line.split()[2:] for line in lines if line.startswith("case ")}
    assert rows["eager"] == ["50.00", "60.00", "10.00", "20%", "1.00x"]
    assert rows["ours"] == ["20.00", "25.00", "10.00", "50%", "2.50x"]
    assert rows["fp32"] == ["40.00", "-", "-", "-", "1.25x"]


def _item(module, impl, **params):
    return SimpleNamespace(name=f"test_gpu[{impl}]", callspec=SimpleNamespace(params={"impl": impl, **params}),
                           module=SimpleNamespace(__name__=module))


def test_gpu_run_order_ours_then_eager_peers_then_compile(bench):
    items = [
        _item("test_bench_unet", "diffusers_bf16_cl_compile", batch=1),
        _item("test_bench_group_norm_silu", "compile"),
        _item("test_bench_unet", "diffusers_bf16_cl", batch=1),
        _item("test_bench_unet", "diffusers_bf16_cl_compile", batch=128),
        _item("test_bench_q_sample", "compile"),
        _item("test_bench_unet", "ours_fused_bf16_cl", batch=1),
        _item("test_bench_q_sample", "eager"),
        SimpleNamespace(name="test_cpu[eager]", callspec=SimpleNamespace(params={"impl": "compile"}),
                        module=SimpleNamespace(__name__="test_bench_q_sample")),
    ]
    order = list(items)
    bench.conftest.pytest_collection_modifyitems(None, order)
    assert [items.index(i) for i in order] == [5, 6, 7, 2, 3, 4, 1, 0]


# --- each benchmark file's check of its rows --------------------------------------------------------------------


@needs_extension
def test_ddpm_step_check_fails_ours_on_another_noise_stream(bench, monkeypatch):
    """Ours must match the reference's noise stream; a kernel that ignored its
    seed (still N(0, 1) noise, as a peer's) passed a check against itself."""
    mod = bench.test_bench_ddpm_step
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    mod.check("cpu", mod.make_fn("cpu", x, eps)(), x, eps)
    real = ops.ddpm_step

    def wrong_seed(*args, backend="auto", seed=None, **kwargs):
        return real(*args, backend=backend, seed=seed if backend == "reference" else seed + 1, **kwargs)

    monkeypatch.setattr(ops, "ddpm_step", wrong_seed)
    with pytest.raises(AssertionError, match="ddpm_step cpu: wrong result"):
        mod.check("cpu", mod.make_fn("cpu", x, eps)(), x, eps)


@needs_extension
def test_q_sample_check_fails_ours_with_a_wrong_eps_or_dtype(bench):
    mod = bench.test_bench_q_sample
    x0, t, a, b = mod.inputs((2, 3, 8, 8), torch.float32, "cpu")
    x_t, eps = ops.q_sample(x0, t, mod.SCHEDULE, seed=1, backend="cpu")
    mod.check("cpu", (x_t, eps), x0, t, a, b)
    with pytest.raises(AssertionError, match="q_sample cpu: wrong result"):  # the eps it returns is not its noise
        mod.check("cpu", (x_t, eps + 0.1), x0, t, a, b)
    x0, t, a, b = mod.inputs((2, 3, 8, 8), torch.bfloat16, "cpu")
    x_t, eps = ops.q_sample(x0, t, mod.SCHEDULE, seed=1, backend="cpu")
    with pytest.raises(AssertionError, match="x_t is torch.float32, not x0's torch.bfloat16"):
        mod.check("cpu", (x_t.float(), eps), x0, t, a, b)


def test_q_sample_check_fails_a_peer_whose_noise_is_not_normal(bench):
    mod = bench.test_bench_q_sample
    x0, t, a, b = mod.inputs((4, 3, 32, 32), torch.float32, "cpu")
    mod.check("eager", mod.eager_peer(x0, t, a, b), x0, t, a, b)
    eps = torch.rand_like(x0)  # uniform noise, x_t from it by the formula
    with pytest.raises(FAILED, match="q_sample eager: its noise"):
        mod.check("eager", (mod.eager_formula(x0, t, a, b, eps), eps), x0, t, a, b)


@needs_extension
def test_randn_row_fails_ours_on_another_stream(bench, monkeypatch):
    mod = bench.test_bench_randn
    monkeypatch.setattr(mod, "N_CPU", 4096)
    mod.test_cpu(FakeBenchmark(), "cpu")
    real = ops.randn
    monkeypatch.setattr(ops, "randn", lambda n, seed, offset, backend="auto", **kw: real(
        n, seed, offset + (backend != "reference"), backend=backend, **kw))
    with pytest.raises(AssertionError, match="randn cpu: wrong result"):
        mod.test_cpu(FakeBenchmark(), "cpu")


def _gn_tensors(mod, grad=False):
    torch.manual_seed(0)
    return mod.make((2, 64, 4, 4), torch.float32, "contiguous", "cpu", grad=grad)


@needs_extension
def test_group_norm_silu_check_fails_a_wrong_forward_against_eager(bench, monkeypatch):
    mod = bench.test_bench_group_norm_silu
    tensors = _gn_tensors(mod)
    mod.check("cpu", mod.forward_fn("cpu", *tensors), *tensors)
    with pytest.raises(FAILED, match="group_norm_silu cpu: relative error"):  # 1% off in float32
        mod.check("cpu", lambda: mod.eager(*tensors) * 1.01, *tensors)
    real = ops.group_norm_silu
    monkeypatch.setattr(ops, "group_norm_silu", lambda *a, **k: real(*a, **k) * 1.01)  # our op wrong
    with pytest.raises(FAILED, match="group_norm_silu cpu: relative error"):
        mod.check("cpu", mod.forward_fn("cpu", *tensors), *tensors)


@needs_extension
@pytest.mark.parametrize("wrong", [0, 1, 2], ids=["dx", "dweight", "dbias"])
def test_group_norm_silu_check_fails_each_wrong_gradient(bench, wrong):
    mod = bench.test_bench_group_norm_silu
    tensors = _gn_tensors(mod, grad=True)
    fn = mod.train_fn("cpu", *tensors)
    mod.check("cpu", fn, *tensors, grads=True)

    def one_wrong():
        grads = list(fn())
        grads[wrong] = grads[wrong] * 1.1
        return tuple(grads)

    with pytest.raises(FAILED, match=f"gradient {wrong}: relative error"):
        mod.check("cpu", one_wrong, *tensors, grads=True)


@needs_extension
@pytest.mark.parametrize("with_diffusers", [True, False], ids=["diffusers", "own-weights"])
def test_unet_check_is_against_the_reference_path(bench, monkeypatch, with_diffusers):
    """A wrong fused GroupNorm+SiLU makes our fused rows fail: the reference
    output is the plain nn.GroupNorm path, not the fused model's own."""
    mod = bench.test_bench_unet
    if with_diffusers and mod.diffusers is None:
        pytest.skip("diffusers is not installed")
    if not with_diffusers:
        monkeypatch.setattr(mod, "diffusers", None)
    mod.reference_output.cache_clear()
    fn, *_ = mod.forward_fn("ours_fused_fp32", "narrow", "cpu", 1)
    out = fn()
    mod.check("ours_fused_fp32", out, "narrow", "cpu", 1)
    with pytest.raises(FAILED, match="unet ours_fused_fp32: relative error"):  # 1% off in float32
        mod.check("ours_fused_fp32", out * 1.01, "narrow", "cpu", 1)
    gn = importlib.import_module("ddpm_fast.nn.group_norm_silu")
    real = gn.group_norm_silu
    monkeypatch.setattr(gn, "group_norm_silu", lambda *a, **k: real(*a, **k) * 1.05)
    mod.reference_output.cache_clear()
    try:
        for impl in ("ours_fused_fp32", "ours_reference_fp32"):
            fn, *_ = mod.forward_fn(impl, "narrow", "cpu", 1)
            if impl == "ours_reference_fp32":  # the reference row does not use the fused op at all
                mod.check(impl, fn(), "narrow", "cpu", 1)
            else:
                with pytest.raises(FAILED, match=f"unet {impl}: relative error"):
                    mod.check(impl, fn(), "narrow", "cpu", 1)
    finally:
        mod.reference_output.cache_clear()


def _toy_training():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    return model, copy.deepcopy(model).requires_grad_(False)


@pytest.mark.parametrize("case", ["no-ema", "no-weights", "loss-1e3", "loss-nan", "loss-0"])
def test_train_check_fails_a_step_that_does_not_train(bench, case):
    model, ema = _toy_training()

    def step():
        with torch.no_grad():
            if case != "no-weights":
                model[0].weight.add_(1.0)
            if case != "no-ema":
                ema[0].weight.add_(1e-4)
        return {"loss-1e3": 1e3, "loss-nan": float("nan"), "loss-0": 0.0}.get(case, 0.9)

    with pytest.raises(FAILED, match="train step toy: "):
        bench.test_bench_train.check("toy", step, model, ema)


def test_train_check_passes_a_step_that_leaves_some_parameters(bench):
    """A step that moves some weights (and their EMA) trains: not every
    parameter need change (one without a gradient, or a frozen one)."""
    model, ema = _toy_training()

    def step():
        with torch.no_grad():
            model[1].bias.add_(1.0)
            ema[1].bias.add_(1e-4)
        return 0.9

    bench.test_bench_train.check("toy", step, model, ema)


# --- benchmarks/cpu_interleaved.py -------------------------------------------------------------------------------


def test_interleaved_compare_warms_up_alternates_and_prints_the_ratios(bench, monkeypatch, capsys):
    mod = bench.cpu_interleaved
    log = []
    fns = {name: (lambda name=name: log.append(("call", name))) for name in ("ours", "eager", "copy")}
    seconds = {"ours": 1e-3, "eager": 3e-3, "copy": 0.5e-3}
    names = {id(fn): name for name, fn in fns.items()}

    def fake_seconds(fn):
        log.append(("timed", names[id(fn)]))
        return seconds[names[id(fn)]]

    monkeypatch.setattr(mod, "_seconds", fake_seconds)
    mod.compare("op", fns["ours"], fns["eager"], rounds=2, calls=3, floor=fns["copy"], same_result=False)
    assert log[:9] == [("call", n) for n in ("ours", "eager", "copy")] * 3  # warm-up, each in turn
    assert [n for _, n in log[9:]] == (["ours"] * 3 + ["eager"] * 3 + ["copy"] * 3) * 2  # interleaved rounds
    line = capsys.readouterr().out
    assert "ours    1.000 ms" in line and "eager    3.000 ms" in line and "eager/ours  3.00x" in line
    assert "copy   0.500 ms (ours at  50% of its speed; eager/copy 6.00x)" in line


def test_interleaved_compare_does_not_time_a_wrong_pair(bench):
    """It timed whatever it was given: a peer that dropped the ResBlock's add
    (or our op gone wrong) gave a speed-up of a different computation."""
    import torch.nn.functional as F

    x = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    add = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))

    def ours():
        return ops.group_norm_silu(x, 4, add=add, backend="reference")

    bench.cpu_interleaved.compare("gn", ours, lambda: F.silu(F.group_norm(x + add[..., None, None], 4)), rounds=1, calls=1)
    with pytest.raises(AssertionError, match="gn: wrong result, not timed"):
        bench.cpu_interleaved.compare("gn", ours, lambda: F.silu(F.group_norm(x, 4)), rounds=1, calls=1)


# --- benchmarks/allocator.py and the compile peers' skip ----------------------------------------------------------

_HEAP = """
import ctypes, sys
sys.path.insert(0, sys.argv[1])
from allocator import keep_freed_pages
print(keep_freed_pages())
libc = ctypes.CDLL(None)
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size, start = 32 << 20, libc.sbrk(0)
block = libc.malloc(size)
grown = libc.sbrk(0) - start  # the heap grew for it: not a fresh mapping of its own
libc.free(block)
print(grown >= size, libc.sbrk(0) - start >= size)  # and the freed pages stay in the heap
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_the_benchmarks_keep_eager_temporaries_off_fresh_pages():
    """Eager peers' temporaries came from freshly mapped pages in a fresh
    process (eager q_sample 8x1x512x512: 8,160 page faults a call, 13.4 ms
    against 6.4 ms) or from reused ones after other benchmarks, run to run: a
    plain `pytest benchmarks/` got either. The suite sets malloc's thresholds
    itself (a 32 MiB block then comes from the heap, and stays there when
    freed), unless the environment sets them."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", _HEAP, str(BENCH)], env=env, capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout == "malloc thresholds: set (freed pages kept for reuse)\nTrue True\n", done.stdout
    done = subprocess.run([sys.executable, "-c", _HEAP, str(BENCH)], env={**env, "MALLOC_TRIM_THRESHOLD_": "0"},
                          capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout == "malloc thresholds: from the environment\nFalse False\n", done.stdout


def test_a_compile_peer_skips_where_inductor_has_no_cxx_compiler(bench):
    """It failed with InductorError: InvalidCxxCompiler; other errors still fail."""
    from torch._inductor.exc import InvalidCxxCompiler

    def raised(error: BaseException, cause: BaseException | None) -> BaseException:
        try:
            raise error from cause
        except BaseException as caught:  # noqa: BLE001 (a chain, as torch.compile raises it)
            return caught

    assert bench.conftest._no_cxx_compiler(raised(RuntimeError("InductorError"), InvalidCxxCompiler("g++")))
    assert not bench.conftest._no_cxx_compiler(raised(RuntimeError("InductorError"), ValueError("a real bug")))
    assert not bench.conftest._no_cxx_compiler(None)


@pytest.mark.slow
def test_compile_peers_without_a_cxx_compiler_skip_in_a_benchmark_run(tmp_path):
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # (an xdist worker's, which
    # pytest-benchmark reads as xdist on, and refuses --benchmark-only)
    env.update(CXX=str(tmp_path / "no-such-g++"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_bench_q_sample.py", "--benchmark-only",
                           "-k", "cpu and compile", "-p", "no:cacheprovider", "-q", "-rs"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "2 skipped" in done.stdout, done.stdout[-2000:]
    assert "torch.compile found no working C++ compiler" in done.stdout
