"""The CUDA GroupNorm+SiLU cluster path (sm_90+: a group too large for one
block's shared memory held in a thread-block cluster's, x read once and y
written once, x and dy read once in the backward;
csrc/cuda/group_norm_silu_cluster_kernels.cuh) against float64, on the GPU. Below compute capability 9.0 the same shapes take the split path
and are checked the same way. Its logic runs without a GPU in
tests/test_cuda_kernels_emulated.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_CUDA, requires_extension
from ddpm_fast import ops
from group_norm_silu_helpers import TOL, assert_far_first_value_statistics, assert_matches_reference, case_id, reference

pytestmark = [pytest.mark.gpu, requires_extension]


def has_clusters() -> bool:
    return HAS_CUDA and torch.cuda.get_device_capability() >= (9, 0)


def cuda_kernel_names(fn) -> list[str]:
    """The names of the CUDA kernels fn() launches (the profiler's)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def raw(x, w, b, add, groups, act=True):
    return torch.ops.ddpm_fast.group_norm_silu(x, w, b, add, groups, 1e-5, act)


def float64_reference(x, w, b, add, groups, act):
    h = x.double() + (add.double()[:, :, None, None] if add is not None else 0.0)
    var, mean = torch.var_mean(h.reshape(h.shape[0], groups, -1), -1, unbiased=False)
    y = F.group_norm(h, groups, None if w is None else w.double(), None if b is None else b.double(), 1e-5)
    return (F.silu(y) if act else y), mean, (var + 1e-5).rsqrt()


# The issue's U-Net layer (32 x 128 x 256 x 256, 32 groups: 4 channels of 65536
# positions a group, 512 KB of bfloat16, 1 MB of float32) at 2 samples.
ISSUE_SHAPE = (2, 128, 256, 256)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("affine,with_add,act", [(True, True, True), (False, False, False)])
def test_cluster_path_issue_shape(dtype, layout, affine, with_add, act):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(ISSUE_SHAPE, generator=g) * 2 + 0.5).to(dtype).cuda()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(128, generator=g) + 1).cuda() if affine else None
    b = torch.randn(128, generator=g).cuda() if affine else None
    add = torch.randn(ISSUE_SHAPE[:2], generator=g).cuda() if with_add else None
    y, mean, rstd = raw(x, w, b, add, 32, act)
    want_y, want_mean, want_rstd = float64_reference(x, w, b, add, 32, act)
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), want_y, **TOL[dtype][0])
    assert ((rstd.double() - want_rstd).abs() / want_rstd).max().item() < 1e-5
    assert ((mean.double() - want_mean).abs() * want_rstd).max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cluster_path_is_taken_on_hopper(dtype, layout):
    """On sm_90+ the issue's shape runs one kernel, the cluster one; the split
    path (moments, torch's combination, normalize) elsewhere or with
    DDPM_FAST_GN_CLUSTER=0."""
    x = torch.randn(ISSUE_SHAPE, device="cuda").to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    raw(x, None, None, None, 32)  # warm up: the launch checks are cached
    names = cuda_kernel_names(lambda: raw(x, None, None, None, 32))
    if not names:
        pytest.skip("the profiler saw no CUDA kernels")
    cluster = [n for n in names if "forward_cluster_kernel" in n]
    if has_clusters():
        assert len(cluster) == 1 and not any("moments_kernel" in n for n in names), names
    else:
        assert not cluster and any("moments_kernel" in n for n in names), names


def test_cluster_path_matches_split_path(monkeypatch):
    """The cluster and split paths agree to float32 rounding (both combine
    moments about per-slice means in double)."""
    x = (torch.randn(ISSUE_SHAPE, generator=torch.Generator().manual_seed(4)) + 3).cuda()
    y1, mean1, rstd1 = raw(x, None, None, None, 32)
    monkeypatch.setenv("DDPM_FAST_GN_CLUSTER", "0")
    y2, mean2, rstd2 = raw(x, None, None, None, 32)
    torch.testing.assert_close(mean1, mean2, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rstd1, rstd2, atol=0, rtol=1e-6)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cluster_path_is_deterministic(layout):
    x = torch.randn(ISSUE_SHAPE, device="cuda", dtype=torch.bfloat16)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    first = raw(x, None, None, None, 32)
    for _ in range(3):
        for a, b in zip(first, raw(x, None, None, None, 32)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cluster_path_first_value_far_from_the_mean(channels_last):
    """One group of 4 x 256 x 256 values, its first 3e3 in N(0, 1) data: the
    statistics to float32 accuracy (the slices' moments about their own means,
    combined in double by Chan's formula: nothing cancels)."""
    assert_far_first_value_statistics((1, 4, 256, 256), channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "case",
    [
        ((2, 12, 257, 131), 3),  # 4 channels of 33667 positions a group: no packets, a partial last slice
        ((2, 10, 199, 211), 5),  # 2 channels a group, prime H and W
        ((1, 64, 128, 128), 4),  # 16 channels of 16384 positions a group: 1 MB of float32, 8 blocks
        ((2, 32, 160, 160), 32),  # one channel a group; channels_last tiles pack 4 or 8 groups (16-byte rows)
    ],
    ids=case_id,
)
def test_cluster_path_forward_and_backward(dtype, layout, case):
    """Odd shapes, through ops.group_norm_silu's autograd (the backward from the
    cluster path's statistics) against a float32 reference."""
    assert_matches_reference("cuda", "cuda", dtype, layout, case, True, True, True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cluster_backward_issue_shape(dtype, layout):
    """The backward at the issue's layer (2 samples) against float64 autograd.
    16-bit x and dy fit a cluster (x and dy of a group over 8 blocks); float32
    does not, and takes the split backward."""
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(ISSUE_SHAPE, generator=g) * 2 + 0.5).to(dtype)
    dy = torch.randn(ISSUE_SHAPE, generator=g).to(dtype)
    w, b = torch.randn(128, generator=g) + 1, torch.randn(128, generator=g)
    add = torch.randn(ISSUE_SHAPE[:2], generator=g)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    leaves = [t.cuda().contiguous(memory_format=fmt) if t.dim() == 4 else t.cuda() for t in (x, w, b, add)]
    leaves = [t.requires_grad_() for t in leaves]
    y = ops.group_norm_silu(leaves[0], 32, leaves[1], leaves[2], add=leaves[3], act=True, backend="cuda")
    dyc = dy.cuda().contiguous(memory_format=fmt)
    kernels = cuda_kernel_names(lambda: y.backward(dyc))
    ref = [t.detach().double().requires_grad_() for t in leaves]
    reference(ref[0], 32, ref[1], ref[2], ref[3], True).backward(dyc.double())
    for name, got, want in zip(("x", "weight", "bias", "add"), leaves, ref):
        scale = max(1.0, want.grad.abs().max().item())
        torch.testing.assert_close(got.grad.double() / scale, want.grad / scale, **TOL[dtype][1], msg=name)
    if kernels:
        cluster = any("backward_cluster_kernel" in n for n in kernels)
        assert cluster == (has_clusters() and dtype != torch.float32), kernels
