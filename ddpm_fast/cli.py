"""The ``ddpm-fast`` command line.

``ddpm-fast info`` reports the environment and checks every available backend
of every op against the reference on this machine. (``train``, ``sample``,
``bpd`` and ``demo`` arrive with the issues that build them.)
"""

from __future__ import annotations

import argparse
import platform
import sys
from typing import Sequence

import torch

from . import __version__, _extension, ops
from .ops._backend import triton_available, triton_interpreting
from .schedules import NoiseSchedule


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


def _info(args: argparse.Namespace) -> int:
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddpm-fast", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"ddpm_fast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="environment, backends, and a self-check of each backend")
    info.set_defaults(run=_info)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
