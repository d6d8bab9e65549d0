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
