"""Sparse, MKL-DNN and nested tensors given to the ops and the U-Net: a
TypeError naming the argument and the layout. They failed deep inside before,
in torch's words ("unsupported memory format option Contiguous", "Could not
run 'ddpm_fast::q_sample_randn' with arguments from the 'MkldnnCPU' backend",
"Internal error: NestedTensorImpl doesn't support sizes. Please file an issue")."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import device_backends
from ddpm_fast import NoiseSchedule, diffusion, ops
from ddpm_fast.models import UNet

SCHEDULE = NoiseSchedule("linear", timesteps=10)
BACKENDS = ["reference"] + [b for d, b in device_backends() if d == "cpu"]


def _non_dense(dense: torch.Tensor, layout: str) -> torch.Tensor:
    with warnings.catch_warnings():  # (nested and CSR tensors are "prototype" / "beta" in torch)
        warnings.simplefilter("ignore")
        if layout == "sparse_coo":
            return dense.to_sparse()
        if layout == "sparse_csr":
            return dense.reshape(-1, dense.shape[-1]).to_sparse_csr()
        if layout == "mkldnn":
            return dense.to_mkldnn()
        return torch.nested.nested_tensor(list(dense.unbind()))


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(shape or (2, 4, 3, 3), generator=torch.Generator().manual_seed(0))


# (op, argument) -> the call with that argument replaced by ``bad``
CALLS = {
    ("q_sample", "x0"): lambda bad, b: ops.q_sample(bad, 1, SCHEDULE, seed=0, backend=b),
    ("q_sample", "noise"): lambda bad, b: ops.q_sample(_x(), 1, SCHEDULE, noise=bad, backend=b),
    ("ddpm_step", "x_t"): lambda bad, b: ops.ddpm_step(bad, _x(), 1, SCHEDULE, seed=0, backend=b),
    ("ddpm_step", "eps"): lambda bad, b: ops.ddpm_step(_x(), bad, 1, SCHEDULE, seed=0, backend=b),
    ("ddpm_step", "out"): lambda bad, b: ops.ddpm_step(_x(), _x(), 1, SCHEDULE, seed=0, out=bad, backend=b),
    ("group_norm_silu", "x"): lambda bad, b: ops.group_norm_silu(bad, 2, backend=b),
    ("group_norm_silu", "weight"): lambda bad, b: ops.group_norm_silu(_x(), 2, bad, backend=b),
    ("group_norm_silu", "add"): lambda bad, b: ops.group_norm_silu(_x(), 2, add=bad, backend=b),
}
SHAPES = {"weight": (4,), "add": (2, 4)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr", "mkldnn", "nested"])
@pytest.mark.parametrize("op,name", CALLS)
def test_a_non_dense_tensor_is_refused_naming_the_argument(op, name, layout, backend):
    shape = SHAPES.get(name, (2, 4, 3, 3))
    if layout == "sparse_csr" and len(shape) == 1:
        pytest.skip("a CSR tensor has two or more dimensions")
    if layout == "nested" and len(shape) == 1:
        pytest.skip("a nested tensor's components have one or more dimensions")
    bad = _non_dense(_x(*shape), layout)
    with pytest.raises(TypeError, match=rf"^{op}: {name} must be a dense \(strided\) tensor, got a {layout} tensor"):
        CALLS[op, name](bad, backend)


@pytest.mark.parametrize("layout", ["sparse_coo", "mkldnn", "nested"])
def test_the_unet_refuses_a_non_dense_input(layout):
    model = UNet.tiny(image_size=8, in_channels=1)
    with pytest.raises(TypeError, match=rf"^UNet: x must be a dense \(strided\) tensor, got a {layout} tensor"):
        model(_non_dense(_x(2, 1, 8, 8), layout), torch.tensor([1, 2]))


TIMESTEP_CALLS = {
    "q_sample": lambda t: ops.q_sample(_x(), t, SCHEDULE, seed=0),
    "ddpm_step": lambda t: ops.ddpm_step(_x(), _x(), t, SCHEDULE, seed=0),
    "diffusion": lambda t: diffusion.q_sample(SCHEDULE, _x(), t, _x()),
    "UNet": lambda t: UNet.tiny(image_size=8, in_channels=1)(_x(2, 1, 8, 8), t),
}


@pytest.mark.parametrize("layout", ["sparse_coo", "nested"])
@pytest.mark.parametrize("op", TIMESTEP_CALLS)
def test_non_dense_timesteps_are_refused_naming_t(op, layout):
    """(Before: "Could not run 'aten::aminmax' with arguments from the
    'SparseCPU' backend", or the nested tensor's internal error.)"""
    t = torch.tensor([1, 2]).to_sparse() if layout == "sparse_coo" else _non_dense(torch.tensor([[1], [2]]), layout)
    with pytest.raises(TypeError, match=rf"^{op}: t must be a dense \(strided\) tensor, got a {layout} tensor"):
        TIMESTEP_CALLS[op](t)


def test_a_dense_view_still_runs():
    """The check reads the layout only: strided views (a transpose's, a slice's) pass."""
    x = _x(2, 4, 6, 3).transpose(2, 3)[:, :, 1:]
    torch.testing.assert_close(ops.group_norm_silu(x, 2), ops.group_norm_silu(x.contiguous(), 2))
