"""One forward of the DDPM U-Net (one sampling step's eps_theta(x_t, t)): our
fused model (eager, under torch.compile, and replayed as a CUDA graph, as the
Sampler runs it) against our reference path and diffusers' UNet2DModel (eager
fp32, eager bf16, eager bf16 channels_last, the last also under torch.compile
and replayed as a CUDA graph), all
with the same weights (ours converted with ``UNet.from_diffusers``; without
diffusers our rows run alone, on our own seeded weights). Speed-ups are against
diffusers in our rows' dtype and layout (bf16 channels_last on the GPU). Every
row's output is first checked against our float32 reference path. On the GPU,
also the whole 1000-step sampling of 128 CIFAR-sized images with the Sampler.

GPU: the paper's CIFAR-10 model (35.7M parameters) at batch 1 and 128.
Floor (bf16 rows): reading the weights once plus x in and eps out, or the
FLOPs at the measured bf16 matrix rate where that is longer (batch 128,
compute-bound); the fp32 row has none (its matrix rate, TF32's, is not
measured: the bytes alone gave it a floor 45x below the FLOPs'). ``extra_info``
also carries the FLOP count and the TFLOP/s reached.
CPU: the same layout at a quarter of the width (32..64 channels, 8 groups),
batch 8, float32, NCHW and channels_last for both sides (torch.compile is left
out: minutes to compile on a small CPU).
"""

from __future__ import annotations

import functools

import pytest
import torch

from ddpm_fast import _extension
from ddpm_fast.models import UNet

from conftest import GpuRow, add_gpu_row, check_relative_error, median_s

try:  # the peers' model; our rows run without it
    import diffusers
except ImportError:  # not installed, or broken
    diffusers = None

CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
    norm_num_groups=32, attention_head_dim=None,
)
NARROW = {**CIFAR10, "block_out_channels": (32, 64, 64, 64), "norm_num_groups": 8}
CONFIGS = {"cifar10": CIFAR10, "narrow": NARROW}
# The same layouts as our own UNet, for runs without diffusers.
OURS = {
    "cifar10": dict(ch=128, num_groups=32),
    "narrow": dict(ch=32, num_groups=8),
}


@functools.lru_cache(maxsize=None)
def weights(name: str) -> dict[str, torch.Tensor]:
    """One set of (random) weights per config, shared by every implementation."""
    torch.manual_seed(0)
    return diffusers.UNet2DModel(**CONFIGS[name]).state_dict()


def build(impl: str, name: str, device: str) -> torch.nn.Module:
    """``impl``'s model with the config's shared weights: diffusers' (ours
    converted from them), or, without diffusers, our own seeded ones."""
    if impl.startswith("diffusers") and diffusers is None:
        pytest.skip("diffusers is not installed: its peer rows skip")
    if diffusers is None:
        torch.manual_seed(0)
        model = UNet(in_channels=3, image_size=32, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                     dropout=0.0, eps=1e-6, reference="reference" in impl, **OURS[name])
    else:
        theirs = diffusers.UNet2DModel(**CONFIGS[name])
        theirs.load_state_dict(weights(name))
        model = UNet.from_diffusers(theirs, reference="reference" in impl) if impl.startswith("ours") else theirs
    model = model.to(device).eval()
    if "bf16" in impl:
        model = model.to(torch.bfloat16)
    if "_cl" in impl:
        model = model.to(memory_format=torch.channels_last)
    return model


def forward_fn(impl: str, name: str, device: str, batch: int):
    """A no-grad callable running one forward of ``impl``, and its eager model."""
    model = build(impl, name, device)
    dtype = torch.bfloat16 if "bf16" in impl else torch.float32
    x, t = inputs(batch, device)
    x = x.to(dtype)
    if "_cl" in impl:
        x = x.to(memory_format=torch.channels_last)
    # dynamic=False: the model's forward code is shared by batch 1 and 128, and
    # without it the second batch size would be compiled with a dynamic batch.
    run = torch.compile(model, fullgraph=impl.startswith("ours"), dynamic=False) if impl.endswith("compile") else model
    if impl.startswith("diffusers"):
        call = lambda: run(x, t).sample  # noqa: E731
    else:
        call = lambda: run(x, t)  # noqa: E731
    if impl.endswith("graph"):
        call = _graphed(call)

    def fn():
        with torch.no_grad():
            return call()

    return fn, model, x, t


def inputs(batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The same x_t and t for every implementation (float32; cast per impl)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x.to(device), t.to(device)


@functools.lru_cache(maxsize=None)
def reference_output(name: str, device: str, batch: int) -> torch.Tensor:
    """Our reference path in float32 on inputs(): what every row must compute."""
    model = build("ours_reference_fp32", name, device)
    with torch.no_grad():
        return model(*inputs(batch, device)).float()


def check(impl: str, out: torch.Tensor, name: str, device: str, batch: int) -> None:
    """A row's eps against the float32 reference: to float rounding in float32
    (TF32 convolutions on a GPU), to bfloat16's in bfloat16 (a wrong kernel is
    off by about 1)."""
    limit = 0.1 if "bf16" in impl else (2e-2 if device == "cuda" else 1e-4)
    check_relative_error(out, reference_output(name, device, batch), limit, f"unet {impl}")


def _graphed(call):
    """call() (a forward on fixed inputs) captured once as a CUDA graph; the
    callable returned replays it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):  # warm up outside the graph (cuDNN, the allocator)
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = call()

    def replay():
        graph.replay()
        return out

    return replay


CPU_IMPLS = ["diffusers_fp32", "diffusers_fp32_cl", "ours_reference_fp32", "ours_fused_fp32", "ours_fused_fp32_cl"]


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_cpu_unet_forward(benchmark, impl):
    if impl.startswith("ours_fused") and not _extension.AVAILABLE:
        pytest.skip("extension not built")
    fn, *_ = forward_fn(impl, "narrow", "cpu", 8)
    check(impl, fn(), "narrow", "cpu", 8)
    benchmark.group = "unet forward cpu narrow(32-64ch) 8x3x32x32 fp32"
    benchmark(fn)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_sample_cifar10_128_images(benchmark, copy_bandwidth_gbps, request):  # the fixture: the row's copy_gbps
    """The Sampler's default chain (1000 steps, CUDA graphs) on the CIFAR-10
    model, bf16 channels_last, 128 images: issue 5's target is 7 s. First of
    this file's GPU benchmarks (benchmarks/conftest.py orders them: ours, then
    the eager peers, then the torch.compile peers; benchmarks/run_gpu.sh runs
    this file before test_bench_train.py), so that a time-limited run reaches it."""
    from ddpm_fast import NoiseSchedule, Sampler

    model = build("ours_fused_bf16_cl", "cifar10", "cuda")
    sampler = Sampler(model, NoiseSchedule("linear"), channels_last=True, sample_shape=(3, 32, 32))
    timed = []

    def run():
        timed.append(sampler.sample(128, seed=0, progress=False))
        torch.cuda.synchronize()

    # Warm up (cuDNN, the allocator) on the graph path: chains from 103 steps on are captured.
    sampler.sample(128, seed=0, steps=110, progress=False)
    benchmark.group = "sampling cifar10 128 images 1000 steps bf16 cl"
    benchmark.pedantic(run, rounds=1, iterations=1)
    # The timed chain against the plain loop on the reference backend, same model
    # and noise (a look at the samples alone passed any model: the clipped x0 of
    # the last step lies in [-1, 1] whatever it is). The two round differently
    # in bf16, so a whole-tensor relative error, not elementwise closeness.
    plain = Sampler(model, NoiseSchedule("linear"), channels_last=True, sample_shape=(3, 32, 32), cuda_graph=False,
                    backend="reference")
    check_relative_error(timed[-1], plain.sample(128, seed=0, progress=False), 5e-2, "sampling")
    median = median_s(benchmark)
    if median is not None:
        benchmark.extra_info["s_per_chain"] = median
        add_gpu_row(GpuRow("sampling cifar10 128 images 1000 steps", "Sampler (graphs)", median * 1e6, None, None),
                    request.node.nodeid)


GPU_IMPLS = [  # the graph peer: what a user can do for diffusers' model, as the Sampler does for ours
    "diffusers_fp32", "diffusers_bf16", "diffusers_bf16_cl", "diffusers_bf16_cl_graph", "diffusers_bf16_cl_compile",
    "ours_reference_bf16_cl", "ours_fused_bf16_cl", "ours_fused_bf16_cl_compile", "ours_fused_bf16_cl_graph",
]


def _flops(model, x, t) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t)
    return counter.get_total_flops()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch", [1, 128])
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_gpu_unet_forward(record_gpu, benchmark, impl, batch):
    fn, model, x, t = forward_fn(impl, "cifar10", "cuda", batch)
    for _ in range(3):  # compile and warm up
        out = fn()
    check(impl, out, "cifar10", "cuda", batch)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    flops = _flops(model, x, t)
    row = record_gpu(
        f"unet fwd cifar10 b{batch}", impl, fn,
        # Like for like: our rows are bf16 channels_last, as this peer.
        bytes_moved=weight_bytes + 2 * x.numel() * x.element_size() if "bf16" in impl else None,
        baseline="diffusers_bf16_cl", flops=flops,  # the measured matrix rate is bf16's: fp32 gets no floor
    )
    benchmark.extra_info.update(gflop=flops / 1e9, tflops=flops / (row.median_us * 1e-6) / 1e12)

