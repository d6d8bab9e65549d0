"""What CI's build holds: the README's test command builds the extension with
the CUDA kernels wherever torch is a CUDA build and nvcc is found, GPU or not
(issue 2), so that CI compiles and links every .cu file. A build that quietly
left them out would otherwise pass every CPU test."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from ddpm_fast import _extension

OPS = ("q_sample", "q_sample_randn", "ddpm_step_", "fill_randn_", "group_norm_silu", "group_norm_silu_backward")


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="CI's build; a local one may leave the CUDA kernels out (DDPM_FAST_CUDA=0)")
def test_ci_builds_the_cuda_kernels():
    if torch.version.cuda is None or shutil.which("nvcc") is None or os.environ.get("DDPM_FAST_CUDA") == "0":
        pytest.skip("no CUDA build of torch, or no nvcc: the CPU-only build is the right one")
    assert _extension.AVAILABLE, _extension.LOAD_ERROR
    assert _extension.WITH_CUDA, "torch is a CUDA build and nvcc is on PATH, yet the extension has no CUDA kernels"
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ddpm_fast::{op}", "CUDA"), f"{op} has no CUDA kernel"


@pytest.mark.parametrize("value, says", [("off", "CUDA kernels: no"), ("No", "CUDA kernels: no"),
                                         ("of", "DDPM_FAST_CUDA='of': expected one of")])
def test_ddpm_fast_cuda_is_read_as_a_switch(value, says):
    """'off' (or any spelling but 0/false/no) meant 'auto', which builds the
    CUDA kernels wherever nvcc is found; a misspelling is now an error."""
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "DDPM_FAST_CUDA": value}
    run = subprocess.run([sys.executable, "setup.py", "--version"], cwd=Path(__file__).parents[1], env=env,
                         capture_output=True, text=True, timeout=300)
    assert says in run.stdout + run.stderr and (run.returncode == 0) == ("expected" not in says), run.stderr[-1500:]
