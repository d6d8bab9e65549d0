"""The shared normal stream (ops.randn) against torch.randn. Floor: one write."""

from __future__ import annotations

import pytest
import torch

from ddpm_fast import _extension, ops
from ddpm_fast.ops._backend import triton_available

from conftest import check_close

N_CPU = 1 << 20
N_GPU = [1 << 20, 1 << 24, 1 << 26]


@pytest.mark.parametrize("impl", ["torch.randn", "reference", "cpu"])
def test_cpu(benchmark, impl):
    if impl == "cpu" and not _extension.AVAILABLE:
        pytest.skip("extension not built")
    benchmark.group = f"randn cpu {N_CPU}"
    if impl == "torch.randn":
        benchmark(torch.randn, N_CPU)
    else:
        check_close(ops.randn(N_CPU, 1, 0, backend=impl), ops.randn(N_CPU, 1, 0, backend="reference"), f"randn {impl}")
        benchmark(ops.randn, N_CPU, 1, 0, backend=impl)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n", N_GPU)
@pytest.mark.parametrize("impl", ["torch.randn", "cuda", "triton"])
def test_gpu(record_gpu, n, impl):
    if impl == "cuda" and not _extension.WITH_CUDA:
        pytest.skip("CUDA kernels not built")
    if impl == "triton" and not triton_available():
        pytest.skip("triton missing")
    if impl == "torch.randn":
        fn = lambda: torch.randn(n, device="cuda")  # noqa: E731
    else:
        fn = lambda: ops.randn(n, 1, 0, device="cuda", backend=impl)  # noqa: E731
        check_close(fn(), ops.randn(n, 1, 0, device="cuda", backend="reference"), f"randn {impl}")
    fn()
    record_gpu(f"randn {n}", impl, fn, bytes_moved=4 * n, baseline="torch.randn")
