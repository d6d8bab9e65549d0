"""Edge cases of backend resolution, argument checks and randn that the other
tests left open (found by mutation testing). CPU-only: a cuda device object is
only resolved, never used, so no GPU is needed."""

from __future__ import annotations

import pytest
import torch

from ddpm_fast import NoiseSchedule, _extension, ops
from ddpm_fast.ops import BackendUnavailableError, _args, _backend

CUDA = torch.device("cuda")


@pytest.fixture
def fresh_resolution(monkeypatch):
    """An empty resolution cache and no DDPM_FAST_BACKEND: the answers below
    depend on patched availability, which the cache would hide."""
    monkeypatch.setattr(_backend, "_RESOLVED", {})
    monkeypatch.delenv("DDPM_FAST_BACKEND", raising=False)
    return monkeypatch


@pytest.mark.parametrize("value, on", [
    (None, False), ("0", False), ("off", False), ("", False), ("1", True), ("YES", True), ("y", True),
])
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value, on):
    """Unset means compiled mode: with the interpreter assumed, CPU tensors would
    be sent to Triton in a process that imports triton compiled."""
    if value is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", value)
    assert _backend._interpret_variable() is on


def test_cpu_backend_is_refused_for_cuda_tensors(fresh_resolution):
    """The C++ CPU kernels must not be chosen for tensors on another device."""
    with pytest.raises(BackendUnavailableError, match="backend 'cpu' is unavailable for cuda tensors"):
        _backend.resolve_backend("cpu", CUDA, "op")


@pytest.mark.parametrize("with_cuda", [False, True])
def test_cuda_backend_needs_the_cuda_kernels(fresh_resolution, with_cuda):
    """backend='cuda' needs an extension built with its CUDA kernels; auto
    then prefers it, and falls back to Triton (or the reference) without it."""
    fresh_resolution.setattr(_extension, "AVAILABLE", True)
    fresh_resolution.setattr(_extension, "WITH_CUDA", with_cuda)
    fresh_resolution.setattr(_backend, "triton_available", lambda: True)
    if with_cuda:
        assert _backend.resolve_backend("cuda", CUDA, "op") == "cuda"
        assert _backend.resolve_backend("auto", CUDA, "op") == "cuda"
    else:
        with pytest.raises(BackendUnavailableError, match="built without its CUDA kernels"):
            _backend.resolve_backend("cuda", CUDA, "op")
        assert _backend.resolve_backend("auto", CUDA, "op") == "triton"


def test_without_triton_the_triton_backend_is_refused(fresh_resolution):
    """backend='triton' names the missing package; auto falls back to the reference."""
    fresh_resolution.setattr(_extension, "WITH_CUDA", False)
    fresh_resolution.setattr(_backend, "triton_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="triton is not installed"):
        _backend.resolve_backend("triton", CUDA, "op")
    assert _backend.resolve_backend("auto", CUDA, "op") == "reference"


def test_cuda_backend_without_the_extension_names_the_load_error(fresh_resolution):
    """The message names the actual cause (the extension did not load), not a build option."""
    fresh_resolution.setattr(_extension, "AVAILABLE", False)
    fresh_resolution.setattr(_extension, "WITH_CUDA", False)
    fresh_resolution.setattr(_extension, "LOAD_ERROR", "hidden by the test")
    with pytest.raises(BackendUnavailableError, match=r"extension is not loaded \(hidden by the test\)"):
        _backend.resolve_backend("cuda", CUDA, "op")


def test_a_cached_triton_answer_follows_the_interpreter_mode(fresh_resolution):
    """The resolution cache is keyed by the interpreter mode: a CPU 'triton'
    answer given in interpreter mode must not be served once it is off."""
    cpu = torch.device("cpu")
    fresh_resolution.setattr(_backend, "triton_available", lambda: True)
    fresh_resolution.setattr(_backend, "triton_interpreting", lambda: True)
    assert _backend.resolve_backend("triton", cpu, "op") == "triton"
    fresh_resolution.setattr(_backend, "triton_interpreting", lambda: False)
    with pytest.raises(BackendUnavailableError, match="backend .triton. is unavailable for cpu tensors"):
        _backend.resolve_backend("triton", cpu, "op")


def test_an_overlap_is_measured_in_bytes_not_elements():
    """out shifted by 40 of x_t's 72 float32 elements overlaps its last 32: the
    memory spans must count bytes (a span of numel bytes would miss it)."""
    buf = torch.randn(112)
    x = buf[:72].view(2, 4, 3, 3)
    out = buf[40:112].view(2, 4, 3, 3)
    with pytest.raises(ValueError, match="out partially overlaps x_t"):
        ops.ddpm_step(x, torch.randn(2, 4, 3, 3), 4, NoiseSchedule("linear", timesteps=10), seed=9, out=out,
                      backend="reference")


def test_the_env_var_is_read_trimmed_and_in_any_case(fresh_resolution):
    """DDPM_FAST_BACKEND=' Reference' plus a newline (as a file or a shell quote
    leaves it, a capital) still names a backend."""
    fresh_resolution.setenv("DDPM_FAST_BACKEND", " Reference\n")
    assert _backend.resolve_backend("auto", torch.device("cpu"), "op") == "reference"


def test_a_one_entry_device_timestep_becomes_0_d():
    """Off the CPU (where t is not read), a one-entry t is still every sample's
    timestep: returned 0-d, as on the CPU."""
    x = torch.empty(3, 2, device="meta")
    t = _args.as_timesteps(torch.tensor([4], device="meta", dtype=torch.int32), x, 10, "op")
    assert t.shape == () and t.dtype == torch.int64


def test_randn_takes_a_list_shape():
    """A shape given as a list (as torch.randn takes it) is accepted."""
    got = ops.randn([2, 3], seed=5, backend="reference")
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, ops.randn((2, 3), seed=5, backend="reference"), rtol=0, atol=0)
