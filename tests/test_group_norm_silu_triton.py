"""The Triton kernels of GroupNorm+SiLU (on the GPU, or in Triton's CPU
interpreter): the split path, data far from the mean, and the plan."""

from __future__ import annotations

import importlib

import pytest
import torch

from conftest import HAS_CUDA, gpu_if_present
from ddpm_fast import ops
from ddpm_fast.ops._backend import triton_available
from group_norm_silu_helpers import (
    CASES, assert_bfloat16_rounded_once, assert_matches_reference, inputs, layout_cases, reference,
)


requires_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"


# The split path's cases: CASES but 1x32x16x16, whose 64 (NCHW) and 256
# (channels_last) position tiles took 9-25 s a case in the interpreter (130 s
# of CI's 12 minutes of tests); the others run 3 to 49 position tiles through
# the same code.
SPLIT_CASES = [c for c in CASES if c[0] != (1, 32, 16, 16)]


@requires_triton
@gpu_if_present
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout,case", layout_cases(SPLIT_CASES))
@pytest.mark.parametrize("affine,with_add,act", [(True, True, True), (False, False, False)])
def test_triton_split_path_matches_reference(triton_split_path, dtype, layout, case, affine, with_add, act):
    shape, groups = case
    cl = layout == "channels_last"
    s = 1 if len(shape) < 3 else int(torch.tensor(shape[2:]).prod())
    p = triton_split_path.plan(shape[1], s, groups, dtype.itemsize, cl)
    assert not p.fused and p.pos_tiles == -(-s // p.block_s)
    assert not triton_split_path.plan(shape[1], s, groups, dtype.itemsize, cl, backward=True).fused
    assert_matches_reference(TRITON_DEVICE, "triton", dtype, layout, case, affine, with_add, act)


@requires_triton
@gpu_if_present
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_triton_split_path_rounds_bfloat16_once(triton_split_path, layout):
    """The split path's normalize and backward kernels store y and dx rounded
    to nearest, as the fused kernels do."""
    for backward in (False, True):
        assert not triton_split_path.plan(8, 36, 2, 2, layout == "channels_last", backward=backward).fused
    assert_bfloat16_rounded_once(TRITON_DEVICE, "triton", layout, (2, 8, 6, 6), 2)


@requires_triton
@gpu_if_present
@pytest.mark.parametrize("path", ["fused", pytest.param("split", marks=pytest.mark.slow)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_triton_large_mean_against_float64(request, path, layout):
    """Data far from zero (mean 1000, spread 2): the fused path's two-pass
    variance and the split path's per-tile moments must not cancel."""
    if path == "split":
        request.getfixturevalue("triton_split_path")
    x, w, b, add = inputs((2, 12, 9, 11), torch.float32, layout, TRITON_DEVICE, True, True)
    x = (x + 1000.0).contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, add)]
    y = ops.group_norm_silu(leaves[0], 4, leaves[1], leaves[2], add=leaves[3], backend="triton")
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(TRITON_DEVICE)
    y.backward(dy)
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in (x, w, b, add)]
    y_ref = reference(ref_leaves[0], 4, ref_leaves[1], ref_leaves[2], ref_leaves[3], True)
    y_ref.backward(dy.cpu().double())
    # float32 x near 1000 is itself rounded to 6e-5: the reference sees the same rounded values.
    torch.testing.assert_close(y.cpu().double(), y_ref, atol=2e-4, rtol=2e-4)
    for name, got, want in zip(("x", "weight", "bias", "add"), leaves, ref_leaves):
        scale = max(1.0, want.grad.abs().max().item())
        torch.testing.assert_close(got.grad.cpu().double() / scale, want.grad / scale, atol=2e-4, rtol=2e-4, msg=name)


@gpu_if_present
@requires_triton
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("with_add", [False, True], ids=["no-add", "add"])
def test_triton_split_path_first_value_far_from_the_mean(triton_split_path, layout, with_add):
    """N(0, 1) data but h = 1e3 at each group's first value: the split path's
    statistics stay within float32 rounding of float64 truth. Its partial sums
    used to be shifted by that first value, and their float32 cancellation cost
    rstd 2e-4 to 3e-4 (relative) here and the mean 1e-4 (absolute), more in
    larger groups; per-tile moments combined in float64 give 7e-8 and 2e-8."""
    shape, groups = (2, 4, 32, 32), 2
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=gen)
    add = torch.randn(shape[:2], generator=gen) if with_add else None
    x[:, ::2, 0, 0] = 1e3 - (add[:, ::2] if with_add else 0.0)  # h = 1e3 at (channel 0, position 0) of each group
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    assert not triton_split_path.plan(shape[1], 32 * 32, groups, 4, layout == "channels_last").fused
    h = x.double() if add is None else x.double() + add.double()[:, :, None, None]
    want_mean = h.reshape(2, groups, -1).mean(-1)
    want_rstd = (h.reshape(2, groups, -1).var(-1, unbiased=False) + 1e-5).rsqrt()
    y, mean, rstd = torch.ops.ddpm_fast.group_norm_silu_triton(
        x.to(TRITON_DEVICE), None, None, None if add is None else add.to(TRITON_DEVICE), groups, 1e-5, True)
    torch.testing.assert_close(rstd.cpu().double(), want_rstd, atol=0.0, rtol=1e-5)
    torch.testing.assert_close(mean.cpu().double(), want_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(y.cpu().double(), reference(h, groups, None, None, None, True), atol=1e-5, rtol=1e-5)


@requires_triton
@gpu_if_present
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("height,width", [(64, 64), (63, 65)], ids=["whole-tiles", "partial-last-tile"])
def test_triton_split_path_large_mean_at_real_tile_sizes(layout, height, width):
    """N(0, 1) data plus 1e4 with the split path's real tiles (hundreds of
    positions each): each tile's float sum of h carries a rounding of order
    1e4 ulp into the combination unless the tile writes its deviations' sum
    too (26bc414, without it, was 3e-5 off in rstd here). 63 x 65 leaves the
    last tile one position short: its deviations must be taken from its own
    rows' mean (a mean over the whole tile's length cancelled the same way)."""
    shape, groups = (1, 8, height, width), 1
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4)) + 1e4
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    gn = importlib.import_module("ddpm_fast.kernels.group_norm_silu")
    p = gn.plan(shape[1], height * width, groups, 4, layout == "channels_last")
    assert not p.fused and p.pos_tiles > 1
    assert (height * width) % p.block_s == (0 if height == width else p.block_s - 1)
    want_var, want_mean = torch.var_mean(x.double().reshape(1, groups, -1), -1, unbiased=False)
    want_rstd = (want_var + 1e-5).rsqrt()
    _, mean, rstd = torch.ops.ddpm_fast.group_norm_silu_triton(x.to(TRITON_DEVICE), None, None, None, groups, 1e-5, True)
    assert ((rstd.cpu().double() - want_rstd).abs() / want_rstd).max().item() < 2e-6
    # A float32 mean near 1e4 is itself rounded to 1e-3 (half an ulp: 5e-4).
    assert (mean.cpu().double() - want_mean).abs().max().item() <= 5e-4


@gpu_if_present
@requires_triton
def test_triton_op_statistics_of_empty_groups_are_nan():
    """test_op_statistics_of_empty_groups_are_nan of the raw Triton op (it
    returned torch.empty's memory)."""
    importlib.import_module("ddpm_fast.kernels.group_norm_silu")  # registers the op
    x = torch.randn(2, 32, 0, 8, device=TRITON_DEVICE)
    y, mean, rstd = torch.ops.ddpm_fast.group_norm_silu_triton(x, None, None, None, 8, 1e-5, True)
    assert y.shape == x.shape and mean.shape == rstd.shape == (2, 8)
    assert mean.isnan().all() and rstd.isnan().all()


class TestTritonPlan:
    """How the Triton kernels cut the benchmark shapes into programs."""

    @pytest.fixture
    def gn(self):
        pytest.importorskip("triton")
        return importlib.import_module("ddpm_fast.kernels.group_norm_silu")

    # (C, H*W, G): the U-Net's GroupNorms at N = 128, then the large-image shape.
    UNET = [(128, 1024, 32), (256, 256, 32), (256, 64, 32), (256, 16, 32), (512, 64, 32), (64, 1024, 32)]

    @pytest.mark.parametrize("c,s,g", UNET)
    @pytest.mark.parametrize("elem_bytes", [4, 2])
    @pytest.mark.parametrize("channels_last", [False, True])
    @pytest.mark.parametrize("backward", [False, True])
    def test_unet_shapes_read_once(self, gn, c, s, g, elem_bytes, channels_last, backward):
        p = gn.plan(c, s, g, elem_bytes, channels_last, backward)
        assert p.fused and p.pos_tiles == 1
        assert p.block_s >= s and p.block_c >= p.groups_per_tile * (c // g)
        assert p.block_c * p.block_s <= (gn.MAX_TILE_BACKWARD if backward else gn.MAX_TILE)
        assert p.col_tiles * p.groups_per_tile >= g
        if channels_last:  # a tile row fills a 32-byte sector, unless that would overflow the tile
            row_bytes = p.groups_per_tile * (c // g) * elem_bytes
            assert row_bytes >= 32 or 2 * p.block_c * p.block_s > (gn.MAX_TILE_BACKWARD if backward else gn.MAX_TILE)

    @pytest.mark.parametrize("channels_last", [False, True])
    def test_large_images_split(self, gn, channels_last):
        p = gn.plan(128, 256 * 256, 32, 2, channels_last)
        assert not p.fused and p.col_tiles * p.block_c >= 128 and p.pos_tiles * p.block_s >= 256 * 256
        assert p.block_c * p.block_s <= gn.SPLIT_TILE

    def test_wide_groups_split(self, gn):
        assert not gn.plan(1024, 16, 1, 4, False).fused  # 1024 channels in one group

    # (C, H*W, G) that take the split path: a large image, a 2048 x 2048 image, wide groups.
    SPLIT = [(128, 256 * 256, 32), (64, 2048 * 2048, 32), (1024, 16, 1)]

    @pytest.mark.parametrize("c,s,g", SPLIT)
    @pytest.mark.parametrize("elem_bytes", [4, 2])
    @pytest.mark.parametrize("channels_last", [False, True])
    def test_split_tiles_read_whole_sectors(self, gn, c, s, g, elem_bytes, channels_last):
        """A split tile's contiguous run in memory (its channels in a
        channels_last row, its positions in an NCHW column) fills a 32-byte
        sector, as the fused plan's rows do: the layouts' channel counts
        swapped (4 channels a channels_last row, 8 bytes of bfloat16) gave
        right results at a quarter of a sector a load (found by mutation)."""
        p = gn.plan(c, s, g, elem_bytes, channels_last)
        assert not p.fused
        run = p.block_c if channels_last else p.block_s
        assert run * elem_bytes >= gn.MIN_ROW_BYTES, (p, run * elem_bytes)
        assert p.block_c * p.block_s <= gn.SPLIT_TILE
        assert p.col_tiles * p.block_c >= c and p.pos_tiles * p.block_s >= s


@requires_triton
@pytest.mark.parametrize("shape,channels_last", [((1, 64, 2048, 2048), True), ((1, 32, 8192, 8193), False), ((512, 512, 64, 64), False)])
def test_launch_grids_stay_within_cuda_limits(monkeypatch, shape, channels_last):
    """Every launch's grid fits CUDA's limits (2^31 - 1 programs on the first
    axis, 65535 on the others): the split path's position tiles passed 65535 on
    the second axis for large images. Launches recorded, not run, on meta tensors."""
    gn = importlib.import_module("ddpm_fast.kernels.group_norm_silu")
    grids = []

    class Record:
        def __init__(self, kernel):
            pass

        def __getitem__(self, grid):
            grids.append(tuple(grid))
            return lambda *args, **kwargs: None

    monkeypatch.setattr(gn, "launchable", Record)
    x = torch.empty(shape, dtype=torch.float16, device="meta")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y, mean, rstd = torch.ops.ddpm_fast.group_norm_silu_triton(x, None, None, None, 32, 1e-5, True)
    torch.ops.ddpm_fast.group_norm_silu_triton_backward(torch.empty_like(x), x, None, None, None, mean, rstd, 32, True)
    assert len(grids) == 4  # the split path, forward and backward: two launches each
    for grid in grids:
        assert grid[0] < 2**31 and all(d <= 65535 for d in grid[1:]), grid


if triton_available():
    import triton
    import triton.language as tl

    _gn_kernels = importlib.import_module("ddpm_fast.kernels.group_norm_silu")

    @triton.jit
    def _split_pid_probe(out_ptr, TILES, BLOCK_S: tl.constexpr):
        row, t = _gn_kernels._split_pid(TILES)
        tl.store(out_ptr, row)
        tl.store(out_ptr + 1, t * BLOCK_S)  # a tile's first position, as _tile computes it


@requires_triton
@pytest.mark.skipif(HAS_CUDA, reason="moves the interpreter's program ids; the GPU's huge-tensor tests run the kernels")
def test_split_tiles_past_2_31_positions_are_indexed_in_64_bits(monkeypatch):
    """One channel of more than 2^31 positions (1 x 1 x 46341 x 46341): the last
    position tiles start past 2^31. In int32 that start wrapped negative, so the
    split kernels read (and wrote) about 2^31 elements before the tensor. The
    interpreter runs the last programs of that launch, their ids moved there."""
    import numpy as np
    from triton.runtime import interpreter

    from ddpm_fast.ops._backend import triton_interpreting

    if not triton_interpreting() or not hasattr(interpreter.InterpreterBuilder, "create_get_program_id"):
        pytest.skip("needs Triton's interpreter (and its program-id hook)")
    s = 46341 * 46341
    plan = _gn_kernels.plan(1, s, 1, 4, False)
    assert not plan.fused and plan.pos_tiles * plan.block_s >= s > 2**31
    first = [0]
    real = interpreter.InterpreterBuilder.create_get_program_id

    def moved(self, axis):
        handle = real(self, axis)
        return interpreter.TensorHandle(np.array([handle.data[0] + first[0]], dtype=np.int32), tl.int32)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_get_program_id", moved)
    out = torch.zeros(2, dtype=torch.int64)
    for pid in (plan.pos_tiles - 2, plan.pos_tiles - 1, 3 * plan.pos_tiles - 1):  # rows 0 and 2
        first[0] = pid
        _split_pid_probe[(1,)](out, plan.pos_tiles, BLOCK_S=plan.block_s)
        assert out.tolist() == [pid // plan.pos_tiles, (pid % plan.pos_tiles) * plan.block_s]


@requires_triton
@pytest.mark.skipif(HAS_CUDA, reason="reverses the interpreter's program order")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fused_programs_write_only_their_own_channels(monkeypatch, layout):
    """Groups of 3 channels: a fused tile is a power of two wide, wider than
    its groups, and its last columns are the next program's channels, which it
    must neither write (forward y, backward dx) nor count. The interpreter runs
    a launch's programs in order, so that the next program would overwrite such
    a write; here it runs them in reverse, as a GPU may."""
    import numpy as np
    from triton.runtime import interpreter

    from ddpm_fast.ops._backend import triton_interpreting

    if not triton_interpreting() or not hasattr(interpreter.InterpreterBuilder, "create_get_program_id"):
        pytest.skip("needs Triton's interpreter (and its program-id hook)")
    monkeypatch.setattr(_gn_kernels, "TARGET_TILE", 1)  # as few groups a program as a row's 32 bytes allow

    def reversed_id(self, axis):
        pid = self.grid_dim[axis] - 1 - self.grid_idx[axis]
        return interpreter.TensorHandle(np.array([pid], dtype=np.int32), tl.int32)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_get_program_id", reversed_id)
    shape, groups = (2, 24, 4, 4), 8
    for backward in (False, True):
        p = _gn_kernels.plan(24, 16, groups, 4, layout == "channels_last", backward)
        assert p.fused and p.col_tiles > 1 and p.block_c > 3 * p.groups_per_tile
    assert_matches_reference(TRITON_DEVICE, "triton", torch.float32, layout, (shape, groups), True, True, True)
