"""``ddpm-fast info``: the environment, and every available backend of every op
checked against the reference on this machine."""

from __future__ import annotations

import platform

import torch

from . import __version__, _extension, ops
from .ops._backend import triton_available, triton_interpreting
from .schedules import NoiseSchedule

__all__ = ["report"]


def _self_check(device: torch.device) -> list[tuple[str, str, str]]:
    """(op, backend, verdict) for each backend available on ``device``."""
    schedule = NoiseSchedule("linear")
    x = torch.rand(4, 3, 17, 13, generator=torch.Generator().manual_seed(0)) * 2 - 1
    t = torch.tensor([0, 10, 500, 999])
    z_ref = ops.randn(x.shape, 1, backend="reference")
    xt_ref, _ = ops.q_sample(x, t, schedule, seed=1, backend="reference")
    rows = []
    candidates = ["cpu", "triton"] if device.type == "cpu" else ["cuda", "triton"]
    for backend in candidates:
        try:
            ops.resolve_backend(backend, device, "info")
        except RuntimeError as error:
            rows.append(("*", backend, f"unavailable: {error}"))
            continue
        z = ops.randn(x.shape, 1, device=device, backend=backend).cpu()
        xt, _ = ops.q_sample(x.to(device), t.to(device), schedule, seed=1, backend=backend)
        for op, got, want in (("randn", z, z_ref), ("q_sample", xt.cpu(), xt_ref)):
            err = (got - want).abs().max().item()
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
        print(f"auto backend on {device.type}: {ops.resolve_backend('auto', device, 'info')}")
        for op, backend, verdict in _self_check(device):
            print(f"  {op:9s} {backend:8s} {verdict}")
            ok &= "MISMATCH" not in verdict
    return 0 if ok else 1
