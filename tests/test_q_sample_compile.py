"""q_sample under torch.compile (fullgraph, dynamic shapes, inductor),
torch.library.opcheck of its ops, and inside CUDA graph capture."""

from __future__ import annotations

import io

import pytest
import torch

from conftest import assert_one_graph_for_every_height, gpu_if_present, requires_extension
from ddpm_fast import NoiseSchedule, _extension, ops
from test_q_sample import SCHEDULE, _op_args


def test_int_timestep_inside_a_graph_capture_is_not_cached(monkeypatch):
    """A first int t inside a (here pretended) CUDA graph capture: the cached
    arange would only be written when the graph replays, so t is a fill instead."""
    import importlib

    _args = importlib.import_module("ddpm_fast.ops._args")
    monkeypatch.setattr(_args, "_TIMESTEPS", {})
    assert not _args._capturing(torch.device("cpu"))
    monkeypatch.setattr(_args, "_capturing", lambda device: True)
    t = _args._timestep_scalar(7, 10, torch.device("cpu"))
    assert t.item() == 7 and t.dim() == 0 and not _args._TIMESTEPS
    monkeypatch.setattr(_args, "_capturing", lambda device: False)
    assert _args._timestep_scalar(7, 10, torch.device("cpu")).item() == 7
    assert list(_args._TIMESTEPS) == [(torch.device("cpu"), 10)]


@pytest.mark.gpu
@pytest.mark.skipif(not _extension.WITH_CUDA, reason="the CUDA kernels are not built")
def test_int_timestep_first_used_inside_a_cuda_graph_capture():
    schedule = NoiseSchedule("linear", timesteps=323)  # a step count no other test caches
    x = torch.randn(2, 3, 4, 4, device="cuda")
    ops.q_sample(x, torch.tensor(0, device="cuda"), schedule, seed=1, backend="cuda")  # tables on the device
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured, _ = ops.q_sample(x, 7, schedule, seed=1, backend="cuda")
    # Before any replay, an int t must not read a timestep the capture left unwritten.
    eager, _ = ops.q_sample(x, 300, schedule, seed=1, backend="cuda")
    assert torch.equal(eager, ops.q_sample(x, torch.tensor(300, device="cuda"), schedule, seed=1, backend="cuda")[0])
    graph.replay()
    assert torch.equal(captured, ops.q_sample(x, torch.tensor(7, device="cuda"), schedule, seed=1, backend="cuda")[0])


@requires_extension
def test_opcheck_cpp_ops():
    x, t, (a, b) = _op_args()
    torch.library.opcheck(torch.ops.ddpm_fast.q_sample_randn.default, (x, t, a, b, 3, 10))
    torch.library.opcheck(torch.ops.ddpm_fast.q_sample.default, (x, t, a, b, torch.randn_like(x)))
    x_cl = x.to(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.ddpm_fast.q_sample_randn.default, (x_cl, t, a, b, 3, 10))


@gpu_if_present
def test_opcheck_triton_ops():
    pytest.importorskip("triton")
    from ddpm_fast.kernels import q_sample  # noqa: F401

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, t, (a, b) = _op_args(device)
    torch.library.opcheck(
        torch.ops.ddpm_fast.q_sample_randn_triton.default, (x, t, a, b, 3, 10), test_utils=("test_schema", "test_faketensor")
    )
    torch.library.opcheck(
        torch.ops.ddpm_fast.q_sample_triton.default, (x, t, a, b, torch.randn_like(x)), test_utils=("test_schema", "test_faketensor")
    )


@requires_extension
def test_torch_compile_fullgraph_traces_through_the_op():
    def noisy(x, t):
        xt, eps = ops.q_sample(x, t, SCHEDULE, seed=5, backend="cpu")
        return xt * 2 + eps

    x, t, _ = _op_args()
    compiled = torch.compile(noisy, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, t), noisy(x, t))


@requires_extension
@pytest.mark.parametrize("op", ["q_sample", "ddpm_step"])
def test_torch_export_leaves_the_schedule_fit_for_eager_calls(op):
    """torch.export (non-strict) runs the wrappers on fake tensors: the table a
    schedule cached then was a fake one, and later eager calls on that schedule
    read memory never written (errors up to 1e30) or returned a FakeTensor."""
    x, t = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([5, 7])

    def call(schedule):
        if op == "q_sample":
            return ops.q_sample(x, t, schedule, seed=2, backend="cpu")[0]
        return ops.ddpm_step(x, x, t, schedule, seed=2, backend="cpu")

    exported_on = NoiseSchedule("linear")

    class Step(torch.nn.Module):
        def forward(self, x, t):
            return call(exported_on)

    exported = torch.export.export(Step(), (x, t), strict=False)  # torch 2.7 defaulted to strict
    want = call(NoiseSchedule("linear"))
    got = call(exported_on)
    assert type(got) is torch.Tensor
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(exported.module()(x, t), want, atol=0, rtol=0)
    # saved and loaded back (the step's no_grad region made a node that load refused)
    saved = io.BytesIO()
    torch.export.save(exported, saved)
    saved.seek(0)
    torch.testing.assert_close(torch.export.load(saved).module()(x, t), want, atol=0, rtol=0)


def test_a_fake_tensor_trace_leaves_no_fake_tensor_in_a_cache(monkeypatch):
    """make_fx and FakeTensorMode are neither torch.compile nor export: the
    timestep arange, a schedule's float32 tables (q_sample's) and diffusion's device copies
    made under them were fake ones, kept and handed to later eager calls (a
    FakeTensor back, or 'Please convert all Tensors to FakeTensors' for good)."""
    import importlib

    from torch._subclasses.fake_tensor import FakeTensorMode

    from ddpm_fast import diffusion

    _args = importlib.import_module("ddpm_fast.ops._args")
    monkeypatch.setattr(_args, "_TIMESTEPS", {})
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    calls = {
        "q_sample": lambda s, x: ops.q_sample(x, 3, s, seed=1, backend="reference")[0],
        "diffusion.q_sample": lambda s, x: diffusion.q_sample(s, x, 3, x),
    }
    traced_on = NoiseSchedule("linear", timesteps=10)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        for call in calls.values():
            call(traced_on, mode.from_tensor(x))
        # A fake cuda tensor needs no GPU on torch 2.11 on; 2.7 and 2.8 asked for a driver.
        if torch.cuda.is_available() or torch.__version__ >= "2.11":
            on_gpu = torch.empty(2, 3, 4, 4, device="cuda")
            diffusion.q_sample(traced_on, on_gpu, 3, on_gpu)
    assert not _args._TIMESTEPS and not traced_on.__dict__.get("_extract_tables")
    for name, call in calls.items():
        got = call(traced_on, x)
        assert type(got) is torch.Tensor, name
        torch.testing.assert_close(got, call(NoiseSchedule("linear", timesteps=10), x), atol=0, rtol=0)


@requires_extension
def test_cpp_op_compiles_for_a_dynamic_image_size():
    """q_sample_randn's offset was a plain int in its schema and in its C++
    autograd kernel: a shape-derived offset pinned a compiled graph to one
    image size (with mark_dynamic: a ConstraintViolationError)."""
    def noisy(x):
        return ops.q_sample(x, torch.tensor([3, 7]), SCHEDULE, seed=5, offset=x.shape[2] * 7, backend="cpu")[0]

    assert_one_graph_for_every_height(noisy, lambda height: (torch.randn(2, 3, height, 5),))


@pytest.mark.parametrize("op", ["q_sample", "ddpm_step"])
def test_compiled_reference_refuses_out_of_range_cpu_timesteps(op):
    """Eager checks a CPU t's range; compiled, the check was left to the CPU
    kernel, so the reference backend gave NaN silently."""
    def call(x, t):
        if op == "q_sample":
            return ops.q_sample(x, t, SCHEDULE, seed=5, backend="reference")[0]
        return ops.ddpm_step(x, x, t, SCHEDULE, seed=5, backend="reference")

    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 4, 4)
    assert compiled(x, torch.tensor([5, 6])).isfinite().all()
    with pytest.raises(RuntimeError, match=r"timesteps must lie in \[0, 1000\)"):
        compiled(x, torch.tensor([5, 1500]))


_REFERENCE_UNDER_INDUCTOR = """
import functools, torch
from ddpm_fast import NoiseSchedule, ops
S = NoiseSchedule("linear")

def noisy(x, t, seed):
    xt, eps = ops.q_sample(x, t, S, seed=seed, backend="reference")
    return xt, eps, ops.ddpm_step(x, eps, t, S, seed=seed, backend="reference")

x, t = torch.randn(2, 3, 4, 5), torch.tensor([3, 700])
for seed in (1, (1 << 63) + 5):
    compiled = torch.compile(functools.partial(noisy, seed=seed), fullgraph=True)  # inductor
    for got, want in zip(compiled(x, t), noisy(x, t, seed)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
"""


def test_inductor_compiles_the_reference_noise_quickly_and_alike():
    """Inductor inlined the 10 Philox rounds into one expression rebuilt at
    every use: this compile had not ended after 7 minutes (now a few seconds;
    in a process of its own, so that a regression fails rather than hangs).
    Seeds at and above 2^63 pass to the op as their int64 bits."""
    import subprocess
    import sys

    try:
        done = subprocess.run([sys.executable, "-c", _REFERENCE_UNDER_INDUCTOR], capture_output=True, text=True,
                              timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("inductor did not compile the reference noise in 240 s")
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("seed", [5, 1, 1 << 32], ids=["seed-5", "seed-1", "seed-high-half-1"])
def test_torch_compile_inductor_on_gpu(backend, seed):
    """Every op that draws noise, under inductor. A seed half equal to 1 is a
    constant in inductor's build of a Triton kernel (whatever the kernel's
    do_not_specialize says), which the noise kernels did not compile with."""
    def noisy(x, t):
        xt, eps = ops.q_sample(x, t, SCHEDULE, seed=seed, backend=backend)
        x_prev = ops.ddpm_step(xt, eps, t, SCHEDULE, seed=seed, backend=backend)
        return xt * 2 + eps + x_prev + ops.randn(x.shape, seed, 0, device=x.device, backend=backend)

    x, t, _ = _op_args("cuda")
    compiled = torch.compile(noisy, fullgraph=True)
    torch.testing.assert_close(compiled(x, t), noisy(x, t))
