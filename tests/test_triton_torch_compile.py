"""The Triton backend's ops under torch.compile(fullgraph=True), and the device
their kernels launch on.

Without a GPU the kernels run in Triton's CPU interpreter, which torch.compile's
AOT tracing cannot see into (``kernels/philox.py``: ``launchable`` refuses to
be traced there), so an aot_eager or inductor graph could not run them; these tests
compile with ``backend="eager"``: dynamo traces the op wrappers (where the
loader used to break the graph) and the graph calls the registered ops. On a
GPU the same tests run the compiled kernels; test_q_sample_compile.py's
test_torch_compile_inductor_on_gpu covers inductor there.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import TOLERANCES, gpu_if_present
from ddpm_fast import NoiseSchedule, ops
from ddpm_fast.ops._backend import triton_available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCHEDULE = NoiseSchedule("linear", timesteps=1000)
_backend = importlib.import_module("ddpm_fast.ops._backend")

requires_triton = pytest.mark.skipif(not triton_available(), reason="triton missing")


def _calls(device: str):
    """(name, fn, args): one function per Triton op, each with the arithmetic
    around it that a compiled graph would hold."""
    x = torch.randn(2, 4, 3, 3, device=device)
    t = torch.tensor([3, 700], device=device)
    noise = torch.randn_like(x)
    weight, bias = torch.randn(4, device=device), torch.randn(4, device=device)

    def q_sample_drawn(x, t):
        x_t, eps = ops.q_sample(x, t, SCHEDULE, seed=5, backend="triton")
        return x_t * 2 + eps

    def q_sample_given(x, t, noise):
        x_t, _ = ops.q_sample(x, t, SCHEDULE, noise=noise, backend="triton")
        return x_t - 1

    def ddpm_step(x, t, noise):
        return ops.ddpm_step(x, noise, t, SCHEDULE, seed=9, backend="triton") * 3

    def ddpm_step_int_t(x, noise):
        return ops.ddpm_step(x, noise, 17, SCHEDULE, clip_denoised=True, seed=9, backend="triton") + 1

    def group_norm_silu(x, weight, bias):
        return ops.group_norm_silu(x + 1, 2, weight, bias, backend="triton") * 2

    return [
        ("q_sample drawn", q_sample_drawn, (x, t)),
        ("q_sample given", q_sample_given, (x, t, noise)),
        ("ddpm_step", ddpm_step, (x, t, noise)),
        ("ddpm_step int t", ddpm_step_int_t, (x, noise)),
        ("group_norm_silu", group_norm_silu, (x, weight, bias)),
    ]


@gpu_if_present
@requires_triton
@pytest.mark.parametrize("case", range(len(_calls("cpu"))), ids=[name for name, _, _ in _calls("cpu")])
def test_fullgraph_compile_traces_through_the_triton_ops(case):
    name, fn, args = _calls(DEVICE)[case]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(*args), fn(*args), rtol=0, atol=0)


@gpu_if_present
@requires_triton
def test_fullgraph_compile_differentiates_through_the_triton_ops():
    x = torch.randn(2, 4, 3, 3, device=DEVICE, requires_grad=True)
    weight = torch.randn(4, device=DEVICE, requires_grad=True)
    noise = torch.randn(2, 4, 3, 3, device=DEVICE)

    def loss(x, weight):
        x_t, _ = ops.q_sample(x, torch.tensor([3, 700], device=DEVICE), SCHEDULE, noise=noise, backend="triton")
        return ops.group_norm_silu(x_t, 2, weight, backend="triton").square().sum()

    torch._dynamo.reset()
    want = torch.autograd.grad(loss(x, weight), (x, weight))
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="eager")(x, weight), (x, weight))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@requires_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's limit: on a GPU the kernels trace")
@pytest.mark.parametrize("case", range(len(_calls("cpu"))), ids=[name for name, _, _ in _calls("cpu")])
def test_aot_tracing_under_the_interpreter_is_refused_not_wrong(case):
    """AOTAutograd cannot see into interpreted kernels: an aot_eager (or inductor)
    graph of a Triton op left its kernels out and returned unwritten memory.
    It raises instead, saying what to do."""
    name, fn, args = _calls("cpu")[case]
    torch._dynamo.reset()
    with pytest.raises(Exception, match="cannot be traced by torch.compile's AOTAutograd"):
        torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)


FIRST_USE_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from ddpm_fast import NoiseSchedule, ops
    from ddpm_fast.ops import _backend

    device = sys.argv[1]
    assert not _backend.triton_ops_loaded and "ddpm_fast.ops._triton" not in sys.modules
    schedule = NoiseSchedule("linear")

    def step(x, t, weight):
        x_t, eps = ops.q_sample(x, t, schedule, seed=5, backend="triton")
        h = ops.group_norm_silu(x_t, 2, weight, backend="triton")
        # (detached: a kernel backend refuses inputs that require grad; it records no gradient)
        return ops.ddpm_step(x_t.detach(), h.detach(), t, schedule, seed=7, backend="triton") + eps

    x = torch.randn(2, 4, 3, 3, device=device, requires_grad=True)
    t = torch.tensor([3, 700], device=device)
    weight = torch.randn(4, device=device)
    got = torch.compile(step, fullgraph=True, backend="eager")(x, t, weight)  # the first Triton call
    assert _backend.triton_ops_loaded
    torch.testing.assert_close(got, step(x, t, weight), rtol=0, atol=0)
    print("ok")
    """
)


@gpu_if_present
@requires_triton
def test_first_triton_call_inside_a_fullgraph_compile():
    """In a fresh process (the ops not yet registered), the first Triton call
    happens while dynamo traces: the loader's import runs for real there."""
    result = subprocess.run(
        [sys.executable, "-c", FIRST_USE_SCRIPT, DEVICE], capture_output=True, text=True, timeout=600, env=dict(os.environ)
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout[-3000:] + result.stderr[-6000:]


@gpu_if_present
@requires_triton
def test_triton_ops_launch_under_their_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: each op enters its tensors'
    device around the launch (checked here on the CPU by recording the calls)."""
    seen = []

    def record(device):
        seen.append(device)
        return contextlib.nullcontext()

    monkeypatch.setattr(_backend, "triton_launch_device", record)
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    ops.q_sample(x, 3, SCHEDULE, seed=1, backend="triton")
    ops.q_sample(x, 3, SCHEDULE, noise=x, backend="triton")
    ops.ddpm_step(x, x, 3, SCHEDULE, seed=1, backend="triton")
    ops.group_norm_silu(x, 2, backend="triton")
    ops.randn((2, 3), 1, device=DEVICE, backend="triton")
    assert seen == [x.device] * 5


def test_triton_launch_device_is_the_tensors_cuda_device():
    guard = _backend.triton_launch_device(torch.device("cuda", 1))  # not entered: no GPU needed
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(_backend.triton_launch_device(torch.device("cpu")), contextlib.nullcontext)


@pytest.mark.gpu
@requires_triton
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_triton_ops_on_a_device_that_is_not_current():
    """cuda:1 tensors while cuda:0 is current: the kernels must run on cuda:1
    (on device 0 they would read cuda:1 memory without peer access)."""
    torch.cuda.set_device(0)
    x = torch.randn(2, 4, 8, 8, device="cuda:1")
    t = torch.tensor([3, 700], device="cuda:1")
    w = torch.randn(4, device="cuda:1")
    grads = {}
    for backend in ("reference", "triton"):
        xx = x.clone().requires_grad_()
        y = ops.group_norm_silu(xx, 2, w, backend=backend)
        y.square().sum().backward()
        grads[backend] = (y.detach(), xx.grad)
    torch.testing.assert_close(grads["triton"][0], grads["reference"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads["triton"][1], grads["reference"][1], atol=1e-4, rtol=1e-4)
    got, _ = ops.q_sample(x, t, SCHEDULE, seed=3, backend="triton")
    want, _ = ops.q_sample(x, t, SCHEDULE, seed=3, backend="reference")
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])
    got = ops.ddpm_step(x, x, t, SCHEDULE, seed=3, backend="triton")
    want = ops.ddpm_step(x, x, t, SCHEDULE, seed=3, backend="reference")
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])
    got = ops.randn((3, 5), 4, device="cuda:1", backend="triton")
    torch.testing.assert_close(got, ops.randn((3, 5), 4, device="cuda:1", backend="reference"), **TOLERANCES[torch.float32])
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0
