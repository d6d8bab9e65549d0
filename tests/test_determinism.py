"""The same seed gives bitwise-identical results on the same backend and device,
run after run: ops.randn, q_sample, ddpm_step, group_norm_silu (forward and
backward) and Sampler samples, twice in one process, in fresh processes, and
with 1 vs 2 torch threads (the CPU kernels split their work over torch's intra-op threads; no
element's value may depend on the split).

Bitwise (torch.equal), not "close": reproducibility from a seed is a promise
of the noise design (shared/DESIGN.md, "Noise that does not depend on the
backend"), and nothing in an elementwise kernel may depend on the schedule of
its threads.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from conftest import device_backends
from ddpm_fast import NoiseSchedule, Sampler, ops

SCHEDULE = NoiseSchedule("linear", timesteps=20)
KERNEL_BACKENDS = [b for d, b in device_backends() if d == "cpu"]
# The C++ kernels parallelize over threads; the reference runs on torch's own
# (also threaded) ops. The Triton interpreter runs one program at a time, so
# threads change nothing there: it is checked run against run only, on small inputs.
THREADED = ["reference"] + [b for b in KERNEL_BACKENDS if b == "cpu"]
ALL = ["reference"] + KERNEL_BACKENDS


SPLIT = False  # set by the thread tests: shapes large enough to be split


def big(backend: str) -> tuple[int, ...]:
    """With SPLIT, large enough for the C++ kernels (grain: 1024 elements) and
    torch's own ops (32768) to split across 2 threads; else small (the reference
    Philox and the Triton interpreter are slow)."""
    return (4, 8, 48, 40) if SPLIT and backend != "triton" else (3, 4, 7, 9)


@pytest.fixture
def restore_threads(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "SPLIT", True)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def assert_bitwise(a, b) -> None:
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert_bitwise(u, v)
        return
    assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
    # equal_nan: a NaN is reproduced as a NaN (torch.equal treats NaN != NaN).
    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), "not bitwise identical"


def twice(fn, threads: tuple[int, int] | None = None):
    """fn() run twice (with the given thread counts, if any); both results."""
    results = []
    for n in threads or (None, None):
        if n is not None:
            torch.set_num_threads(n)
        results.append(fn())
    return results


def data(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ------------------------------------------------------------------------- ops


def randn_call(backend):
    shape = big(backend)
    return lambda: ops.randn(shape, 2**63 + 12345, offset=77, backend=backend)


def q_sample_call(backend, given_noise=False, dtype=torch.float32):
    shape = big(backend)
    x0, t = data(shape, 1, dtype), torch.arange(shape[0]) * 5
    noise = data(shape, 2, dtype) if given_noise else None
    seed, offset = (None, 0) if given_noise else (99, 3)
    return lambda: ops.q_sample(x0, t, SCHEDULE, noise=noise, seed=seed, offset=offset, backend=backend)


def ddpm_step_call(backend, clip=False, eta=None, variance="fixed_large", eps_dtype=torch.float32):
    shape = big(backend)
    x, eps, t = data(shape, 3), data(shape, 4, eps_dtype), torch.tensor([0, 4, 11, 19])[: shape[0]]
    model_input = torch.empty(shape, dtype=torch.bfloat16).to(memory_format=torch.channels_last)

    def call():
        out = ops.ddpm_step(x, eps, t, SCHEDULE, variance=variance, clip_denoised=clip, eta=eta, seed=-5,
                            sample_stride=1 << 32, step_stride=shape[1] * shape[2] * shape[3],
                            out_model_input=model_input, backend=backend)
        return out, model_input.clone()

    return call


def group_norm_silu_call(backend, dtype=torch.float32, channels_last=False):
    shape = big(backend)
    x = data(shape, 5, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight, bias, add = data(shape[1], 6), data(shape[1], 7), data(shape[:2], 8)

    def call():
        xs, ws, bs, adds = (v.clone().requires_grad_() for v in (x, weight, bias, add))
        y = ops.group_norm_silu(xs, shape[1] // 2, ws, bs, add=adds, backend=backend)
        y.backward(data(shape, 9, dtype).to(memory_format=torch.channels_last) if channels_last else data(shape, 9, dtype))
        return y.detach(), xs.grad, ws.grad, bs.grad, adds.grad

    return call


OPS = {
    "randn": randn_call,
    "q_sample-drawn": q_sample_call,
    "q_sample-given-bf16": lambda b: q_sample_call(b, True, torch.bfloat16),
    "ddpm_step-large": ddpm_step_call,
    "ddpm_step-small-clip-bf16-eps": lambda b: ddpm_step_call(b, True, None, "fixed_small", torch.bfloat16),
    "ddpm_step-ddim": lambda b: ddpm_step_call(b, True, 0.7),
    "group_norm_silu": group_norm_silu_call,
    "group_norm_silu-channels-last-bf16": lambda b: group_norm_silu_call(b, torch.bfloat16, True),
}


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("name", list(OPS))
def test_op_twice_in_one_process(name, backend):
    first, second = twice(OPS[name](backend))
    assert_bitwise(first, second)


@pytest.mark.parametrize("backend", THREADED)
@pytest.mark.parametrize("name", list(OPS))
def test_op_one_vs_two_threads(name, backend, restore_threads):
    one, two = twice(OPS[name](backend), threads=(1, 2))
    assert_bitwise(one, two)


def test_seed_none_follows_torch_manual_seed():
    x0 = data((2, 3, 4, 4), 0)
    runs = []
    for _ in range(2):
        torch.manual_seed(1234)
        runs.append(ops.q_sample(x0, 3, SCHEDULE, backend="reference"))
    assert_bitwise(runs[0], runs[1])


def test_different_seeds_differ():
    # The equality above is not vacuous.
    assert not torch.equal(ops.randn((64,), 1), ops.randn((64,), 2))
    assert not torch.equal(ops.randn((64,), 1), ops.randn((64,), 1, offset=64))


# --------------------------------------------------------------------- Sampler


def make_sampler(backend: str, **kwargs) -> Sampler:
    # A model whose output depends on t, in bfloat16 (the sampler casts its input).
    def model(x, t):
        return (0.3 * x + 0.01 * t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))).to(torch.bfloat16)

    return Sampler(model, SCHEDULE, backend=backend, device="cpu", cuda_graph=False, **kwargs)


SAMPLER_RUNS = {
    "ddpm": dict(),
    "ddpm-small-unclipped-respaced": dict(sampler=dict(variance="fixed_small", clip_denoised=False), steps=7),
    "ddim": dict(eta=0.5, steps=5),
    "channels-last-bf16-input": dict(sampler=dict(channels_last=True, dtype=torch.bfloat16), steps=6),
}


def sample_call(backend, run, n=None, first_sample=0):
    cfg = SAMPLER_RUNS[run]
    shape = (4, 6, 8, 8) if backend != "triton" else (2, 2, 3, 3)
    sampler = make_sampler(backend, **cfg.get("sampler", {}))
    kwargs = {k: v for k, v in cfg.items() if k != "sampler"}
    size = shape if n is None else (n, *shape[1:])
    return lambda: sampler.sample(size, seed=2024, first_sample=first_sample, progress=False, **kwargs)


def digest(backends: list[str]) -> str:
    """SHA-256 of every op's and sampler run's results (bytes, dtypes, shapes
    and strides) on ``backends``."""
    h = hashlib.sha256()

    def feed(value) -> None:
        if isinstance(value, (tuple, list)):
            for item in value:
                feed(item)
            return
        h.update(repr((value.dtype, tuple(value.shape), value.stride())).encode())
        h.update(value.detach().contiguous().view(torch.uint8).numpy().tobytes())

    for backend in backends:
        for name in OPS:
            feed(OPS[name](backend)())
        for run in SAMPLER_RUNS:
            feed(sample_call(backend, run)())
    return h.hexdigest()


DIGEST_SCRIPT = """
import sys
import torch
torch.set_num_threads(int(sys.argv[1]))
sys.path.insert(0, sys.argv[2])
import test_determinism
test_determinism.SPLIT = True  # shapes the kernels split over threads
print(test_determinism.digest(sys.argv[3:]))
"""


def test_run_after_run_in_fresh_processes(monkeypatch):
    """Separate processes (other hash seeds, 1 and 2 threads, shapes split over
    them) and this one give bitwise the same results: nothing carries over from
    a process's state (the in-process tests could miss a value cached at import)."""
    monkeypatch.setattr(sys.modules[__name__], "SPLIT", True)
    backends = THREADED
    want = digest(backends)
    tests = str(pathlib.Path(__file__).parent)
    for threads, hash_seed in ((1, "1"), (2, "2")):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": str(threads)}
        run = subprocess.run([sys.executable, "-c", DIGEST_SCRIPT, str(threads), tests, *backends],
                             capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.strip() == want, (threads, hash_seed)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("run", list(SAMPLER_RUNS))
def test_sampler_twice_in_one_process(backend, run):
    first, second = twice(sample_call(backend, run))
    assert torch.isfinite(first).all()
    assert_bitwise(first, second)


@pytest.mark.parametrize("backend", THREADED)
@pytest.mark.parametrize("run", list(SAMPLER_RUNS))
def test_sampler_one_vs_two_threads(backend, run, restore_threads):
    one, two = twice(sample_call(backend, run), threads=(1, 2))
    assert_bitwise(one, two)


@pytest.mark.parametrize("backend", THREADED)
def test_sampler_sample_does_not_depend_on_its_batch(backend):
    # Sample i is the same drawn in a batch of 4 or alone (first_sample=i), bitwise.
    batch = sample_call(backend, "ddim")()
    alone = sample_call(backend, "ddim", n=1, first_sample=2)()
    assert_bitwise(batch[2:3].contiguous(), alone)


def test_sampler_seeds_differ():
    assert not torch.equal(make_sampler("reference").sample((1, 2, 2, 2), seed=1, steps=3, progress=False),
                           make_sampler("reference").sample((1, 2, 2, 2), seed=2, steps=3, progress=False))


def _gpu_backend(backend: str) -> None:
    from ddpm_fast import _extension
    from ddpm_fast.ops._backend import triton_available

    if backend == "cuda" and not _extension.WITH_CUDA:
        pytest.skip("the CUDA kernels are not built")
    if backend == "triton" and not triton_available():
        pytest.skip("triton missing")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "cuda", "triton"])
def test_ops_and_sampler_run_bitwise_alike_on_the_gpu(backend):
    """Issue 7's determinism on the GPU: every op (the norm with its backward,
    whose weight and bias gradients are reductions) and a whole chain, twice."""
    _gpu_backend(backend)
    g = torch.Generator().manual_seed(0)
    shape = (8, 16, 33, 35)
    x, eps = (torch.randn(shape, generator=g).cuda() for _ in range(2))
    t = torch.randint(0, SCHEDULE.num_timesteps, (shape[0],), generator=g).cuda()
    weight, bias, add, dy = torch.randn(16, generator=g).cuda(), torch.randn(16, generator=g).cuda(), \
        torch.randn(8, 16, generator=g).cuda(), torch.randn(shape, generator=g).cuda()

    def norm():
        xs, ws, bs, adds = (v.clone().requires_grad_() for v in (x, weight, bias, add))
        y = ops.group_norm_silu(xs, 4, ws, bs, add=adds, backend=backend)
        return (y.detach(), *torch.autograd.grad(y, (xs, ws, bs, adds), dy))

    calls = {
        "randn": lambda: ops.randn(shape, 7, 3, device="cuda", backend=backend),
        "q_sample": lambda: ops.q_sample(x, t, SCHEDULE, seed=99, backend=backend),
        "ddpm_step": lambda: ops.ddpm_step(x, eps, t, SCHEDULE, seed=5, backend=backend),
        "group_norm_silu": norm,
    }
    for name, call in calls.items():
        assert_bitwise(call(), call())
    sampler = Sampler(lambda x_t, t: 0.1 * x_t, SCHEDULE, sample_shape=(3, 8, 8), device="cuda", backend=backend)
    assert_bitwise(sampler.sample(6, seed=3, progress=False), sampler.sample(6, seed=3, progress=False))


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [True, False], ids=["graphs", "loop"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_sampling_on_two_streams_at_once_equals_sampling_in_turn(backend, cuda_graph):
    """Issue 7: two Samplers' chains queued on two CUDA streams, overlapping,
    give what each gives alone. With graphs (120 steps capture them) the
    capture synchronizes the device, so the chains overlap little; the plain
    loop queues both chains without a sync, each step's work (about 150 MB
    moved) longer than its launch, so the streams run at once."""
    _gpu_backend(backend)
    schedule = NoiseSchedule("linear", timesteps=120)
    model = lambda x_t, t: 0.1 * x_t  # noqa: E731
    samplers = [Sampler(model, schedule, sample_shape=(3, 64, 64), device="cuda", backend=backend, cuda_graph=cuda_graph)
                for _ in range(2)]
    alone = [s.sample(1024, seed=seed, progress=False) for s, seed in zip(samplers, (1, 2))]
    streams = [torch.cuda.Stream() for _ in range(2)]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    together = []
    for sampler, stream, seed in zip(samplers, streams, (1, 2)):
        with torch.cuda.stream(stream):
            together.append(sampler.sample(1024, seed=seed, progress=False))
    for stream in streams:
        torch.cuda.current_stream().wait_stream(stream)
    for got, want in zip(together, alone):
        assert_bitwise(got, want)
