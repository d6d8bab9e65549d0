"""The reverse step: every backend against what a user writes without us (the
eps-form update with torch.randn_like, eager and under torch.compile), our
reference (same noise stream) and diffusers' DDPMScheduler.step.

Floor: read x_t and eps, write x_{t-1} (12 bytes per element in fp32).
Also the whole 1000-step chain with a trivial model (GPU: launch-bound or not).
"""

from __future__ import annotations

import pytest
import torch

from ddpm_fast import NoiseSchedule, Sampler, _extension, ops
from ddpm_fast.ops._backend import triton_available

from conftest import GpuRow, add_gpu_row, check_close, check_standard_normal, compiled_per_case, median_s

SCHEDULE = NoiseSchedule("linear")
T_STEP = 500
CPU_SHAPES = [(128, 3, 32, 32), (8, 1, 512, 512)]
GPU_SHAPES = [(256, 3, 32, 32), (128, 3, 32, 32), (8, 4, 512, 512), (8, 4, 1024, 1024)]


def eager_peer(x, eps, coef):
    """x_{t-1} = (x_t - beta/sqrt(1-abar) eps)/sqrt(alpha) + sigma z, in plain PyTorch."""
    a, b, sigma = coef
    return a * (x - b * eps) + sigma * torch.randn_like(x)


def peer_coefficients(t):
    return (float(SCHEDULE.sqrt_recip_alphas[t]), float(SCHEDULE.eps_coef[t]), float(SCHEDULE.fixed_large_variance[t].sqrt()))


def diffusers_step_fn(x, eps):
    try:
        import diffusers
    except ImportError:  # not installed, or broken (importorskip lets the latter error out)
        pytest.skip("diffusers is not installed: its peer rows skip")
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_large", clip_sample=False)
    scheduler.set_timesteps(1000)
    return lambda: scheduler.step(eps, T_STEP, x).prev_sample


def make_fn(impl, x, eps):
    if impl == "eager":
        coef = peer_coefficients(T_STEP)
        return lambda: eager_peer(x, eps, coef)
    if impl == "compile":
        coef, fn = peer_coefficients(T_STEP), compiled_per_case(eager_peer, (x.shape, x.dtype, x.device.type))
        return lambda: fn(x, eps, coef)
    if impl == "diffusers":
        return diffusers_step_fn(x, eps)
    # A new output each call, as the peers allocate theirs.
    return lambda: ops.ddpm_step(x, eps, T_STEP, SCHEDULE, seed=1, backend=impl)


def check(impl, x_prev, x, eps):
    """Ours against the reference (the same noise stream); a peer's noise,
    recovered from its result through the step's formula, must be N(0, 1)."""
    what = f"ddpm_step {impl}"
    if impl in ("eager", "compile", "diffusers"):
        a, b, sigma = peer_coefficients(T_STEP)
        check_standard_normal((x_prev - a * (x - b * eps)) / sigma, what)
    else:
        check_close(x_prev, ops.ddpm_step(x, eps, T_STEP, SCHEDULE, seed=1, backend="reference"), what)


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["eager", "compile", "diffusers", "reference", "cpu"])
def test_cpu(benchmark, shape, impl):
    if impl == "cpu" and not _extension.AVAILABLE:
        pytest.skip("extension not built")
    x, eps = torch.randn(shape), torch.randn(shape)
    fn = make_fn(impl, x, eps)
    check(impl, fn(), x, eps)
    benchmark.group = f"ddpm_step cpu {'x'.join(map(str, shape))}"
    benchmark(fn)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["eager", "compile", "diffusers", "reference", "cuda", "triton"])
def test_gpu(record_gpu, shape, impl):
    if impl == "cuda" and not _extension.WITH_CUDA:
        pytest.skip("CUDA kernels not built")
    if impl == "triton" and not triton_available():
        pytest.skip("triton missing")
    x, eps = torch.randn(shape, device="cuda"), torch.randn(shape, device="cuda")
    fn = make_fn(impl, x, eps)
    check(impl, fn(), x, eps)
    record_gpu(f"ddpm_step {'x'.join(map(str, shape))} fp32", impl, fn, bytes_moved=12 * x.numel())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["loop", "graph"])
def test_gpu_chain_trivial_model(benchmark, copy_bandwidth_gbps, cuda_graph, request):  # the fixture: the row's copy_gbps
    """1000 steps of 256x3x32x32 with model(x, t) = 0.1 x: the chain's cost per step."""
    sampler = Sampler(lambda x, t: x * 0.1, SCHEDULE, sample_shape=(3, 32, 32), device="cuda", cuda_graph=cuda_graph)

    def run():
        sampler.sample(256, seed=0, progress=False)
        torch.cuda.synchronize()

    run()
    plain = Sampler(lambda x, t: x * 0.1, SCHEDULE, sample_shape=(3, 32, 32), device="cuda", cuda_graph=False, backend="reference")
    # The timed chain itself (256 samples) against the plain loop on the reference backend.
    check_close(sampler.sample(256, seed=0, progress=False), plain.sample(256, seed=0, progress=False), "sampler chain")
    benchmark.group = "sampler chain 1000 steps 256x3x32x32"
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    median = median_s(benchmark)
    if median is not None:
        benchmark.extra_info["us_per_step"] = median * 1e6 / 1000
        add_gpu_row(GpuRow("sampler chain 1000 steps 256x3x32x32 x*0.1", "graph" if cuda_graph else "loop",
                           median * 1e6, None, None), request.node.nodeid)
