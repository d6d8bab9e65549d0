"""Gaps found by mutation testing of the Triton GroupNorm+SiLU kernels
(kernels/group_norm_silu.py): the fused forward's group mask of its
statistics (killed before only by a heap-corruption abort), and the
backward's parameter gradients of an empty input."""

from __future__ import annotations

import importlib

import pytest
import torch

from conftest import HAS_CUDA, gpu_if_present
from ddpm_fast.ops._backend import triton_available
from group_norm_silu_helpers import inputs

requires_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"


def _gn():
    return importlib.import_module("ddpm_fast.kernels.group_norm_silu")


def _statistics64(h, groups, eps):
    var, mean = torch.var_mean(h.double().reshape(h.shape[0], groups, -1), -1, unbiased=False)
    return mean, (var + eps).rsqrt()


@requires_triton
@pytest.mark.skipif(HAS_CUDA, reason="reverses the interpreter's program order")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fused_programs_write_only_their_own_groups_statistics(monkeypatch, layout):
    """3 groups, 2 a program: a sample's second program holds one group in a
    tile of two, and must not store statistics for the group past the last
    (the next sample's first, or past the end of mean and rstd). In the
    interpreter's order the next sample's program overwrites such a store;
    here the programs run in reverse, as a GPU may."""
    import numpy as np
    from triton.runtime import interpreter

    from ddpm_fast.ops._backend import triton_interpreting
    import triton.language as tl

    if not triton_interpreting() or not hasattr(interpreter.InterpreterBuilder, "create_get_program_id"):
        pytest.skip("needs Triton's interpreter (and its program-id hook)")

    def reversed_id(self, axis):
        pid = self.grid_dim[axis] - 1 - self.grid_idx[axis]
        return interpreter.TensorHandle(np.array([pid], dtype=np.int32), tl.int32)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_get_program_id", reversed_id)
    shape, groups = (3, 6, 5, 7), 3
    p = _gn().plan(6, 35, groups, 4, layout == "channels_last")
    assert p.fused and p.groups_per_tile == 2 and p.col_tiles == 2
    x, w, b, add = inputs(shape, torch.float32, layout, TRITON_DEVICE, True, True)
    _, mean, rstd = torch.ops.ddpm_fast.group_norm_silu_triton(x, w, b, add, groups, 1e-5, True)
    want_mean, want_rstd = _statistics64(x.cpu() + add.cpu()[:, :, None, None], groups, 1e-5)
    torch.testing.assert_close(mean.cpu().double(), want_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd.cpu().double(), want_rstd, atol=1e-5, rtol=1e-5)


@requires_triton
@gpu_if_present
def test_triton_backward_of_an_empty_input_gives_zero_parameter_gradients():
    """H = 0: no values, so the weight, bias and add gradients are zero (sums
    over nothing), not the backward's uninitialized memory."""
    from conftest import poisoned_outputs

    _gn()  # registers the ops
    x = torch.randn(2, 6, 0, 4, device=TRITON_DEVICE)
    w = torch.randn(6, device=TRITON_DEVICE)
    b = torch.randn(6, device=TRITON_DEVICE)
    add = torch.randn(2, 6, device=TRITON_DEVICE)
    mean = torch.zeros(2, 3, device=TRITON_DEVICE)
    with poisoned_outputs(TRITON_DEVICE, 1024):
        dx, dw, db, dadd = torch.ops.ddpm_fast.group_norm_silu_triton_backward(
            torch.empty_like(x), x, w, b, add, mean, mean.clone(), 3, True)
    assert dx.shape == x.shape
    for name, grad in (("weight", dw), ("bias", db), ("add", dadd)):
        assert (grad == 0).all(), (name, grad)
