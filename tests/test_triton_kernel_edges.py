"""Edge cases of the Triton kernels reached by calling their ops directly
(torch.ops.ddpm_fast.*_triton), found by mutation testing: cases the public
ops cannot reach on the CPU (a CPU timestep is range-checked on the host) or
that the reference comparisons leave open. Expected values come from formulas
or the reference backend, never from the kernels."""

from __future__ import annotations

import pytest
import torch

from conftest import HAS_CUDA, gpu_if_present
from ddpm_fast import NoiseSchedule, ops
from ddpm_fast.ops._backend import load_triton_ops, triton_available, triton_launch_device

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs Triton")
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from ddpm_fast.kernels.rounding import to_element_type  # noqa: E402  (after conftest set TRITON_INTERPRET)

SCHEDULE = NoiseSchedule("linear", timesteps=1000)
T = SCHEDULE.num_timesteps
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _ops():
    load_triton_ops()
    return torch.ops.ddpm_fast


def _table_followed_by(table: torch.Tensor, filler: float) -> torch.Tensor:
    """``table`` as the first rows of a longer buffer whose next row is the
    finite ``filler``: a kernel that read one row past the end would get a
    plausible number rather than whatever memory happens to follow."""
    pad = torch.full((1,) + table.shape[1:], filler, dtype=table.dtype)
    return torch.cat([table, pad]).to(DEVICE)[: table.shape[0]]


@gpu_if_present
@pytest.mark.parametrize("drawn", [False, True], ids=["given", "drawn"])
def test_q_sample_kernel_gives_out_of_range_timesteps_nan(drawn):
    """t outside [0, T) (a device t is not range-checked) turns its sample into
    NaN, t = T included: the table's row T is not read."""
    x0 = torch.rand(4, 3, 2, 2, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    t = torch.tensor([-1, 0, T, 5], device=DEVICE)
    sqrt_ab = _table_followed_by(SCHEDULE.sqrt_alphas_cumprod.float(), 0.5)
    sqrt_1m_ab = _table_followed_by(SCHEDULE.sqrt_one_minus_alphas_cumprod.float(), 0.5)
    with torch.no_grad(), triton_launch_device(x0.device):
        if drawn:
            x_t, _ = _ops().q_sample_randn_triton(x0, t, sqrt_ab, sqrt_1m_ab, 3, 0)
        else:
            x_t = _ops().q_sample_triton(x0, t, sqrt_ab, sqrt_1m_ab, torch.zeros_like(x0))
    assert x_t[[0, 2]].isnan().all() and x_t[[1, 3]].isfinite().all()
    if not drawn:  # noise 0: x_t = sqrt(abar_t) x0
        want = SCHEDULE.sqrt_alphas_cumprod.float()[[0, 5]].reshape(2, 1, 1, 1).to(DEVICE) * x0[[1, 3]]
        torch.testing.assert_close(x_t[[1, 3]], want, atol=0, rtol=0)


@gpu_if_present
@pytest.mark.parametrize("clip", [False, True], ids=["unclipped", "clipped"])
def test_ddpm_step_kernel_gives_out_of_range_timesteps_nan(clip):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 2, 2, generator=g).to(DEVICE)
    eps = torch.randn(4, 3, 2, 2, generator=g).to(DEVICE)
    t = torch.tensor([-1, 0, T, 5], device=DEVICE)
    table = _table_followed_by(SCHEDULE.step_table("fixed_large", device="cpu").float(), 0.5)
    out = torch.empty_like(x)
    with torch.no_grad(), triton_launch_device(x.device):
        _ops().ddpm_step_triton_(x, eps, t, table, torch.zeros_like(x), 0, 0, 12, 0, clip, out, None)
    assert out[[0, 2]].isnan().all() and out[[1, 3]].isfinite().all()


@triton.jit
def _to_element_type_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(y_ptr + i, to_element_type(tl.load(x_ptr + i), y_ptr.dtype.element_ty))


@gpu_if_present
def test_bfloat16_rounding_keeps_signalling_nans_nan():
    """A float32 NaN with the quiet bit clear and a payload only in the low 16
    bits is, truncated to bfloat16, an infinity: round_to_bfloat16 sets the
    quiet bit (bit 22) so that it stays NaN on every cast."""
    bits = [0x7F800001, 0xFF800001, 0x7F80FFFF, 0x7F808000, 0x7F800000, 0xFF800000, 0x3F800000]
    x = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32).to(DEVICE)
    x = torch.cat([x, x.new_zeros(8 - x.numel())])
    y = torch.empty(8, dtype=torch.bfloat16, device=DEVICE)
    with triton_launch_device(x.device):
        _to_element_type_kernel[(1,)](x, y, BLOCK=8)
    y = y.cpu().float()
    assert y[:4].isnan().all()
    assert y[4:7].tolist() == [float("inf"), float("-inf"), 1.0]


@gpu_if_present
def test_raw_randn_op_default_sample_stride_is_one_stream():
    """fill_randn_triton_'s sample_stride 0 (its default), as the C++ op's
    (test_cpp_glue_mutants): element j of sample n takes counter offset +
    n * per_sample + j, the stream of a flat tensor."""
    out = torch.empty(3, 5, 7, device=DEVICE)
    with triton_launch_device(out.device):
        _ops().fill_randn_triton_(out, 21, 9)
    torch.testing.assert_close(out.cpu(), ops.randn((3, 5, 7), 21, 9, backend="reference"), atol=2e-6, rtol=2e-6)


@gpu_if_present
def test_randn_kernel_writes_nothing_past_its_output():
    """An output that is a view of a larger buffer, 1031 elements (not a
    multiple of the block): the elements after it are left alone (a store mask
    of p <= numel wrote one more, which corrupted the heap only by chance)."""
    buf = torch.full((1040,), 7.0, device=DEVICE)
    with triton_launch_device(buf.device):
        _ops().fill_randn_triton_(buf[:1031], 3, 0, 0)
    torch.testing.assert_close(buf[:1031].cpu(), ops.randn(1031, 3, backend="reference"), atol=2e-6, rtol=2e-6)
    assert (buf[1031:] == 7.0).all()


@gpu_if_present
@pytest.mark.parametrize("with_model_input", [False, True], ids=["out", "out_and_model_input"])
def test_ddpm_step_kernel_writes_nothing_past_its_outputs(with_model_input):
    """out (and out_model_input) given as views of larger buffers, 1035 elements
    (not a multiple of the block): the elements after them are left alone."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, 3, 23, generator=g).to(DEVICE)
    eps = torch.randn(5, 3, 3, 23, generator=g).to(DEVICE)
    out_buf = torch.full((x.numel() + 16,), 7.0, device=DEVICE)
    mi_buf = torch.full((x.numel() + 16,), 7.0, device=DEVICE)
    out = out_buf[: x.numel()].view(x.shape)
    mi = mi_buf[: x.numel()].view(x.shape) if with_model_input else None
    with torch.no_grad():
        ops.ddpm_step(x, eps, 500, SCHEDULE, seed=1, out=out, out_model_input=mi, backend="triton")
    want = ops.ddpm_step(x.cpu(), eps.cpu(), 500, SCHEDULE, seed=1, backend="reference")
    torch.testing.assert_close(out.cpu(), want, atol=1e-5, rtol=2e-6)
    assert (out_buf[x.numel():] == 7.0).all()
    if with_model_input:
        assert (mi_buf[x.numel():] == 7.0).all()


def test_an_exported_program_with_triton_ops_loads_where_they_are_registered(tmp_path):
    """The *_triton ops are registered on the first Triton call, so a fresh
    process that only imported ddpm_fast could not load an exported program
    holding one; ops.load_triton_ops() (the README's advice) registers them."""
    import subprocess
    import sys

    class Fused(torch.nn.Module):
        def forward(self, x):
            return ops.group_norm_silu(x, 2, backend="triton")

    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0), device=DEVICE)
    torch.export.save(torch.export.export(Fused(), (x,)), tmp_path / "fused.pt2")
    torch.save((x.cpu(), Fused()(x).cpu()), tmp_path / "io.pt")
    load = (f"x, y = torch.load({str(tmp_path / 'io.pt')!r}); "
            f"program = torch.export.load({str(tmp_path / 'fused.pt2')!r}).module(); "
            f"print(torch.equal(program(x.to({DEVICE!r})).cpu(), y))")
    done = subprocess.run([sys.executable, "-c", f"import torch, ddpm_fast; ddpm_fast.ops.load_triton_ops(); {load}"],
                          capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "True", done.stderr[-2000:]
