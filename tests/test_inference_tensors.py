"""Tensors made under torch.inference_mode (timesteps, a time embedding, an
input) taken by a differentiated call of an op outside it, as the reference
backend takes them: the kernel backends' autograd saved them as given, which
an inference tensor cannot be ("Inference tensors cannot be saved for
backward"), so the fused ops raised where the reference ran."""

from __future__ import annotations

import pytest
import torch

from conftest import backend_params
from ddpm_fast import NoiseSchedule, ops

SCHEDULE = NoiseSchedule("linear", timesteps=1000)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("drawn", [True, False])
def test_q_sample_takes_timesteps_made_under_inference_mode(device, backend, drawn):
    with torch.inference_mode():
        t = torch.tensor([4, 900], device=device)
    x = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)
    noise = None if drawn else torch.randn(x.shape, device=device, requires_grad=True)
    xt, _ = ops.q_sample(x, t, SCHEDULE, noise=noise, seed=1 if drawn else None, backend=backend)
    xt.sum().backward()
    rows = t.clone()
    a = SCHEDULE.table("sqrt_alphas_cumprod", device)[rows].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x.grad, a.expand_as(x))
    if not drawn:
        b = SCHEDULE.table("sqrt_one_minus_alphas_cumprod", device)[rows].reshape(-1, 1, 1, 1)
        torch.testing.assert_close(noise.grad, b.expand_as(x))


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("frozen", ["x", "add"])
def test_group_norm_silu_takes_an_input_made_under_inference_mode(device, backend, frozen):
    g = torch.Generator().manual_seed(0)
    values = {"x": torch.randn(2, 6, 5, 3, generator=g), "weight": torch.randn(6, generator=g) + 1,
              "bias": torch.randn(6, generator=g), "add": torch.randn(2, 6, generator=g), "dy": torch.randn(2, 6, 5, 3, generator=g)}
    values = {k: v.to(device) for k, v in values.items()}
    grads = {}
    for which in ("reference", backend):
        args = {k: v.clone() for k, v in values.items() if k != "dy"}
        with torch.inference_mode():
            args[frozen] = values[frozen].clone()
        leaves = [args[k].requires_grad_() for k in args if k != frozen]
        y = ops.group_norm_silu(args.pop("x"), 3, args.pop("weight"), args.pop("bias"), add=args.pop("add"), backend=which)
        grads[which] = torch.autograd.grad(y, leaves, values["dy"])
    for got, want in zip(grads[backend], grads["reference"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
