"""GroupNorm+SiLU forward and forward+backward: every backend against eager
F.silu(F.group_norm(...)) and its torch.compile, on the DDPM U-Net's shapes.

Floor (forward): one read of x and one write of y.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ddpm_fast import _extension, ops
from ddpm_fast.ops._backend import triton_available

from conftest import check_relative_error, compiled_per_case

GROUPS = 32
CPU_SHAPES = [(32, 128, 32, 32), (8, 256, 16, 16)]
GPU_SHAPES = [(128, 128, 32, 32), (128, 256, 16, 16), (128, 256, 8, 8), (128, 256, 4, 4), (32, 128, 256, 256)]


def eager(x, w, b):
    return F.silu(F.group_norm(x, GROUPS, w, b))


def make(shape, dtype, layout, device, grad=False):
    x = torch.randn(shape, device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(shape[1], device=device, dtype=dtype)
    b = torch.randn(shape[1], device=device, dtype=dtype)
    return [t.requires_grad_(grad) for t in (x, w, b)]


def forward_fn(impl, x, w, b):
    if impl == "eager":
        return lambda: eager(x, w, b)
    if impl == "compile":
        fn = compiled_per_case(eager, (x.shape, x.stride(), x.dtype, x.device.type, x.requires_grad))
        return lambda: fn(x, w, b)
    return lambda: ops.group_norm_silu(x, GROUPS, w, b, backend=impl)


def check(impl, fn, x, w, b, grads: bool = False) -> None:
    """The result of fn (the output, or the gradients) against eager PyTorch's
    in float32 on the same values: as whole tensors, since a bfloat16 gradient
    of the weight (a sum over N x H x W values, in the hundreds) is off by
    bfloat16's rounding there, ours less than eager's (0.25% against 0.35%)."""
    exact = [t.detach().float().requires_grad_(t.requires_grad) for t in (x, w, b)]
    got, want = fn(), (train_fn if grads else forward_fn)("eager", *exact)()
    limit = 1e-5 if x.dtype == torch.float32 else 2e-2
    for k, (g, h) in enumerate(zip(got, want) if grads else [(got, want)]):
        check_relative_error(g, h, limit, f"group_norm_silu {impl}{f' gradient {k}' if grads else ''}")


def train_fn(impl, x, w, b):
    """Forward and backward, the gradients returned rather than accumulated
    into x.grad, w.grad, b.grad: as a training step after zero_grad(set_to_none=True)
    sees it. (.backward() in a loop would add into the previous call's grads
    from the second call on: one more kernel over 3 x |x| bytes per call.)"""
    forward = forward_fn(impl, x, w, b)
    # In x's memory format, as a channels_last network's backward hands it over
    # (an NCHW dy made both sides convert layouts: 1.6x the time, in bf16 on the CPU)
    dy = torch.empty_like(x).normal_(generator=torch.Generator(x.device).manual_seed(7))

    def run():
        return torch.autograd.grad(forward(), (x, w, b), dy)

    return run


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("impl", ["eager", "compile", "cpu"])
def test_cpu_forward(benchmark, shape, layout, impl):
    if impl == "cpu" and not _extension.AVAILABLE:
        pytest.skip("extension not built")
    tensors = make(shape, torch.float32, layout, "cpu")
    fn = forward_fn(impl, *tensors)
    check(impl, fn, *tensors)
    benchmark.group = f"group_norm_silu forward cpu {'x'.join(map(str, shape))} {layout}"
    benchmark(fn)


@pytest.mark.parametrize("shape", [(128, 32, 8, 8), (128, 32, 16, 16), (32, 128, 32, 32)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["eager", "cpu"])
def test_cpu_forward_backward(benchmark, shape, impl):
    """Through autograd, as training runs it (the first shape is of the demo's size)."""
    if impl == "cpu" and not _extension.AVAILABLE:
        pytest.skip("extension not built")
    tensors = make(shape, torch.float32, "contiguous", "cpu", grad=True)
    fn = train_fn(impl, *tensors)
    check(impl, fn, *tensors, grads=True)
    benchmark.group = f"group_norm_silu forward+backward cpu {'x'.join(map(str, shape))}"
    benchmark(fn)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("passes", ["forward", "forward+backward"])
@pytest.mark.parametrize("impl", ["eager", "cpu"])
def test_cpu_bf16(benchmark, layout, passes, impl):
    """bfloat16 at 32x128x32x32, as CPU autocast hands it to the U-Net's GroupNorms."""
    if impl == "cpu" and not _extension.AVAILABLE:
        pytest.skip("extension not built")
    tensors = make((32, 128, 32, 32), torch.bfloat16, layout, "cpu", grad=passes != "forward")
    fn = (forward_fn if passes == "forward" else train_fn)(impl, *tensors)
    check(impl, fn, *tensors, grads=passes != "forward")
    benchmark.group = f"group_norm_silu {passes} cpu bf16 32x128x32x32 {layout}"
    benchmark(fn)


GPU_IMPLS = ["eager", "compile", "cuda", "triton"]


def _gpu_skip(impl):
    if impl == "cuda" and not _extension.WITH_CUDA:
        pytest.skip("CUDA kernels not built")
    if impl == "triton" and not triton_available():
        pytest.skip("triton missing")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_gpu_forward(record_gpu, shape, dtype, layout, impl):
    _gpu_skip(impl)
    x, w, b = make(shape, dtype, layout, "cuda")
    fn = forward_fn(impl, x, w, b)
    check(impl, fn, x, w, b)
    case = f"gn_silu fwd {'x'.join(map(str, shape))} {str(dtype)[6:]} {'cl' if layout == 'channels_last' else 'nchw'}"
    record_gpu(case, impl, fn, bytes_moved=2 * x.numel() * x.element_size())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gpu_forward_split_path(record_gpu, monkeypatch, dtype, layout):
    """The large-image shape on the CUDA split path (two reads), which the
    cluster path (sm_90+, one read) replaces where it runs: its row beside
    `cuda`'s shows what the cluster path gains (the same where it does not run)."""
    _gpu_skip("cuda")
    monkeypatch.setenv("DDPM_FAST_GN_CLUSTER", "0")
    shape = (32, 128, 256, 256)
    x, w, b = make(shape, dtype, layout, "cuda")
    fn = forward_fn("cuda", x, w, b)
    check("cuda_split", fn, x, w, b)
    case = f"gn_silu fwd {'x'.join(map(str, shape))} {str(dtype)[6:]} {'cl' if layout == 'channels_last' else 'nchw'}"
    record_gpu(case, "cuda_split", fn, bytes_moved=2 * x.numel() * x.element_size())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_gpu_forward_backward(record_gpu, impl):
    _gpu_skip(impl)
    x, w, b = make((128, 128, 32, 32), torch.float32, "contiguous", "cuda", grad=True)
    fn = train_fn(impl, x, w, b)
    check(impl, fn, x, w, b, grads=True)
    # Floor: forward reads x, writes y; backward reads dy and x, writes dx.
    record_gpu("gn_silu fwd+bwd 128x128x32x32 fp32", impl, fn, bytes_moved=5 * x.numel() * 4)
