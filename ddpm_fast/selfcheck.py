"""``ddpm-fast info``: the environment, and every available backend of every op
checked against the reference on this machine."""

from __future__ import annotations

import platform

import torch

from . import __version__, _extension, ops
from .ops._backend import triton_available, triton_interpreting
from .schedules import NoiseSchedule

__all__ = ["report"]

_SUMMED = ("gn_silu dw", "gn_silu db", "gn_silu dadd")


def _run_ops(x: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule, backend: str) -> dict[str, torch.Tensor]:
    """Each op's outputs on x's device (moved to the CPU): the noise stream, the
    forward process, a reverse step with drawn noise, and GroupNorm+SiLU forward
    and backward (weight, bias and add included)."""
    device = x.device
    g = torch.Generator().manual_seed(2)
    f32 = torch.float32  # whatever torch's default dtype
    eps = torch.randn(x.shape, generator=g, dtype=f32).to(device)
    h = (torch.randn(4, 6, 17, 13, generator=g, dtype=f32) * 2 + 0.5).to(device)
    w, b, add = (torch.randn(shape, generator=g, dtype=f32).to(device) for shape in ((6,), (6,), (4, 6)))
    dy = torch.randn(h.shape, generator=g, dtype=f32).to(device)
    leaves = [v.clone().requires_grad_() for v in (h, w, b, add)]
    y = ops.group_norm_silu(leaves[0], 3, leaves[1], leaves[2], add=leaves[3], backend=backend)
    y.backward(dy)
    out = {
        "randn": ops.randn(x.shape, 1, device=device, backend=backend),
        "q_sample": ops.q_sample(x, t, schedule, seed=1, backend=backend)[0],
        "ddpm_step": ops.ddpm_step(x, eps, t, schedule, seed=3, backend=backend),
        "gn_silu": y,
    }
    out.update({f"gn_silu d{name}": v.grad for name, v in zip(("x", "w", "b", "add"), leaves)})
    return {name: v.detach().cpu() for name, v in out.items()}


def _self_check(device: torch.device) -> list[tuple[str, str, str]]:
    """(op, backend, verdict) for each backend available on ``device``."""
    schedule = NoiseSchedule("linear")
    x = torch.rand(4, 3, 17, 13, generator=torch.Generator().manual_seed(0), dtype=torch.float32) * 2 - 1
    t = torch.tensor([0, 10, 500, 999])
    want = _run_ops(x, t, schedule, "reference")
    rows = []
    candidates = ["cpu", "triton"] if device.type == "cpu" else ["cuda", "triton"]
    for backend in candidates:
        try:
            ops.resolve_backend(backend, device, "info")
        except RuntimeError as error:
            rows.append(("*", backend, f"unavailable: {error}"))
            continue
        got = _run_ops(x.to(device), t.to(device), schedule, backend)
        for op, value in got.items():
            # Absolute error, except for the gradients that sum over positions:
            # relative to their largest value there.
            scale = max(1.0, want[op].abs().max().item()) if op in _SUMMED else 1.0
            err = ((value - want[op]).abs().max() / scale).item()
            rows.append((op, backend, f"{'ok' if err < 1e-5 else 'MISMATCH'} (max error {err:.1e})"))
    return rows


def report() -> int:
    """Print versions, builds and the self-check; 0 if every backend agrees."""
    print(f"ddpm_fast {__version__}, torch {torch.__version__}, Python {platform.python_version()}")
    print(f"compiled extension: {'loaded' if _extension.AVAILABLE else 'missing: ' + str(_extension.LOAD_ERROR)}")
    print(f"CUDA kernels built: {_extension.WITH_CUDA}; GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print(f"triton: {'installed' if triton_available() else 'missing'}{' (CPU interpreter)' if triton_interpreting() else ''}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    ok = True
    for device in devices:
        try:
            print(f"auto backend on {device.type}: {ops.resolve_backend('auto', device, 'info')}")
        except ops.BackendUnavailableError as error:  # DDPM_FAST_BACKEND names one that cannot run here
            print(f"auto backend on {device.type}: unavailable: {error}")
            ok = False
        for op, backend, verdict in _self_check(device):
            print(f"  {op:14s} {backend:8s} {verdict}")
            ok &= "MISMATCH" not in verdict
    return 0 if ok else 1
