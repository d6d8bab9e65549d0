"""q_sample with in-kernel noise: every backend against the eager and compiled
peers (torch.randn-based, a different stream) and our reference (same stream).

Floor: read x0, write x_t and eps (3 x element size per element).
"""

from __future__ import annotations

import pytest
import torch

from ddpm_fast import NoiseSchedule, _extension, ops
from ddpm_fast.ops._backend import triton_available

from conftest import check_close, check_standard_normal, compiled_per_case

SCHEDULE = NoiseSchedule("linear")
CPU_SHAPES = [(128, 3, 32, 32), (8, 1, 512, 512)]
GPU_CASES = [
    ((128, 3, 32, 32), torch.float32),
    ((8, 4, 512, 512), torch.float32),  # 8.4M elements
    ((8, 4, 1024, 1024), torch.float32),  # 33.5M
    ((16, 4, 1024, 1024), torch.float32),  # 67M
    ((8, 4, 1024, 1024), torch.bfloat16),
]


def eager_peer(x0, t, sqrt_ab, sqrt_1m_ab):
    """What a user writes in plain PyTorch."""
    eps = torch.randn_like(x0)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    return sqrt_ab[t].reshape(shape) * x0 + sqrt_1m_ab[t].reshape(shape) * eps, eps


def inputs(shape, dtype, device):
    """x0, t and the coefficient tables in x0's dtype (the peers then compute,
    and write x_t, in that dtype, as ours does)."""
    x0 = torch.rand(shape, device=device).mul(2).sub(1).to(dtype)
    t = torch.randint(0, SCHEDULE.num_timesteps, (shape[0],), device=device)
    tables = (SCHEDULE.table(name, device).to(dtype) for name in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"))
    return x0, t, *tables


def check(impl, result, x0, t, a, b) -> None:
    """Ours against the reference (the same noise stream); a peer against
    its own formula, with its own noise checked to be N(0, 1)."""
    x_t, eps = result
    what = f"q_sample {impl}"
    assert x_t.dtype == x0.dtype, f"{what}: x_t is {x_t.dtype}, not x0's {x0.dtype}"
    if impl in ("eager", "compile"):
        check_standard_normal(eps, what)
        check_close(x_t, eager_formula(x0, t, a, b, eps), what)
    else:
        want = ops.q_sample(x0, t, SCHEDULE, seed=1, backend="reference")
        check_close(x_t, want[0], what)
        check_close(eps, want[1], what)


def eager_formula(x0, t, a, b, eps):
    shape = (-1,) + (1,) * (x0.dim() - 1)
    return a[t].reshape(shape) * x0 + b[t].reshape(shape) * eps


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["eager", "compile", "reference", "cpu"])
def test_cpu(benchmark, shape, impl):
    if impl == "cpu" and not _extension.AVAILABLE:
        pytest.skip("extension not built")
    x0, t, a, b = inputs(shape, torch.float32, "cpu")
    benchmark.group = f"q_sample cpu {'x'.join(map(str, shape))}"
    if impl == "eager":
        fn = lambda: eager_peer(x0, t, a, b)  # noqa: E731
    elif impl == "compile":
        peer = compiled_per_case(eager_peer, ("cpu", shape))
        fn = lambda: peer(x0, t, a, b)  # noqa: E731
    else:
        fn = lambda: ops.q_sample(x0, t, SCHEDULE, seed=1, backend=impl)  # noqa: E731
    check(impl, fn(), x0, t, a, b)
    benchmark(fn)


GPU_IMPLS = ["eager", "compile", "reference", "cuda", "triton"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-{str(c[1])[6:]}")
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_gpu(record_gpu, case, impl):
    shape, dtype = case
    if impl == "cuda" and not _extension.WITH_CUDA:
        pytest.skip("CUDA kernels not built")
    if impl == "triton" and not triton_available():
        pytest.skip("triton missing")
    x0, t, a, b = inputs(shape, dtype, "cuda")
    if impl == "eager":
        fn = lambda: eager_peer(x0, t, a, b)  # noqa: E731
    elif impl == "compile":
        peer = compiled_per_case(eager_peer, ("cuda", shape, dtype))
        fn = lambda: peer(x0, t, a, b)  # noqa: E731
    else:
        fn = lambda: ops.q_sample(x0, t, SCHEDULE, seed=1, backend=impl)  # noqa: E731
    check(impl, fn(), x0, t, a, b)
    case_name = f"q_sample {'x'.join(map(str, shape))} {str(dtype)[6:]}"
    record_gpu(case_name, impl, fn, bytes_moved=3 * x0.numel() * x0.element_size())
