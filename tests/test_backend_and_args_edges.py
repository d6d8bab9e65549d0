"""Edge cases of backend resolution, argument checks and randn that the other
tests left open (found by mutation testing): the resolution cache, env vars
and error messages, overlap spans, seeds at the int64 edge, sample strides,
empty shapes and default counters. CPU-only: a cuda device object is only
resolved, never used, so no GPU is needed."""

from __future__ import annotations

import pytest
import torch

from ddpm_fast import NoiseSchedule, _extension, ops
from ddpm_fast.ops import BackendUnavailableError, _args, _backend
from ddpm_fast.ops.randn import normal_reference

CUDA = torch.device("cuda")
needs_cpp = pytest.mark.skipif(not _extension.AVAILABLE, reason="needs the C++ extension")


@pytest.fixture
def fresh_resolution(monkeypatch):
    """An empty resolution cache and no DDPM_FAST_BACKEND: the answers below
    depend on patched availability, which the cache would hide."""
    monkeypatch.setattr(_backend, "_RESOLVED", {})
    monkeypatch.delenv("DDPM_FAST_BACKEND", raising=False)
    return monkeypatch


@pytest.mark.parametrize("knobs", [True, False], ids=["triton-with-knobs", "triton-before-knobs"])
@pytest.mark.parametrize("value, on, on_before_knobs", [
    (None, False, False), ("0", False, False), ("off", False, False), ("", False, False),
    ("1", True, True), ("YES", True, False), ("y", True, False), ("true", True, False),
])
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value, on, on_before_knobs, knobs):
    """Unset means compiled mode: with the interpreter assumed, CPU tensors would
    be sent to Triton in a process that imports triton compiled. Triton before
    its knobs (3.3 and older) took only "1": "true" there means compiled mode."""
    triton = pytest.importorskip("triton")
    if knobs and not hasattr(triton, "knobs"):
        pytest.skip("the installed triton has no knobs")
    if not knobs:
        monkeypatch.delattr(triton, "knobs", raising=False)
    if value is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", value)
    assert _backend._interpret_variable() is (on if knobs else on_before_knobs)


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


@pytest.mark.parametrize("backend, variable, refusal", [
    ("triton", None, "backend .triton. is unavailable for cpu tensors"),
    ("auto", "Triton", "backend 'triton' is unavailable for cpu tensors.*DDPM_FAST_BACKEND"),
], ids=["named", "chosen-by-the-variable"])
def test_a_cached_triton_answer_follows_the_interpreter_mode(fresh_resolution, backend, variable, refusal):
    """The resolution cache is keyed by the interpreter mode: a CPU 'triton'
    answer given in interpreter mode (named, or chosen by DDPM_FAST_BACKEND for
    'auto') must not be served once it is off."""
    cpu = torch.device("cpu")
    if variable is not None:
        fresh_resolution.setenv("DDPM_FAST_BACKEND", variable)
    fresh_resolution.setattr(_backend, "triton_available", lambda: True)
    fresh_resolution.setattr(_backend, "triton_interpreting", lambda: True)
    assert _backend.resolve_backend(backend, cpu, "op") == "triton"
    fresh_resolution.setattr(_backend, "triton_interpreting", lambda: False)
    with pytest.raises(BackendUnavailableError, match=refusal):
        _backend.resolve_backend(backend, cpu, "op")


def test_a_cached_auto_answer_follows_the_variable(fresh_resolution):
    """backend='auto' answers are cached per DDPM_FAST_BACKEND: set after a first
    call, the variable still decides (and a backend it names that cannot run is refused)."""
    cpu = torch.device("cpu")
    assert _backend.resolve_backend("auto", cpu, "op") == ("cpu" if _extension.AVAILABLE else "reference")
    fresh_resolution.setenv("DDPM_FAST_BACKEND", "reference")
    assert _backend.resolve_backend("auto", cpu, "op") == "reference"
    fresh_resolution.setenv("DDPM_FAST_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="chosen by DDPM_FAST_BACKEND"):
        _backend.resolve_backend("auto", cpu, "op")


def test_the_interpreter_runs_triton_on_cpu_tensors_only(fresh_resolution):
    """TRITON_INTERPRET lets Triton take CPU tensors, not those of any other device
    (meta, mps, ...): backend='triton' for them is refused, not sent to a kernel."""
    fresh_resolution.setattr(_backend, "triton_available", lambda: True)
    fresh_resolution.setattr(_backend, "triton_interpreting", lambda: True)
    assert _backend.resolve_backend("triton", torch.device("cpu"), "op") == "triton"
    with pytest.raises(BackendUnavailableError, match="backend 'triton' is unavailable for meta tensors"):
        _backend.resolve_backend("triton", torch.device("meta"), "op")


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


def test_int_timesteps_are_views_of_one_cached_arange_per_schedule_length():
    """The arange an int t is viewed from is cached per (device, T): a second
    call reuses it (a key ignoring T would rebuild it on every call)."""
    device = torch.device("cpu")
    first = _args._timestep_scalar(3, 7, device)
    cached = _args._TIMESTEPS[(device, 7)]
    second = _args._timestep_scalar(4, 7, device)
    assert int(first) == 3 and int(second) == 4
    assert second.untyped_storage().data_ptr() == cached.untyped_storage().data_ptr()
    assert first.untyped_storage().data_ptr() == cached.untyped_storage().data_ptr()


@needs_cpp
def test_the_largest_signed_seed_is_passed_through_unchanged():
    """2^63 - 1 is already an int64 and passes unchanged; only seeds above it wrap."""
    assert _args.as_seed(2**63 - 1, "t") == 2**63 - 1
    assert _args.as_seed(2**63, "t") == -(2**63)
    want = ops.randn(8, seed=2**63 - 1, backend="reference")
    torch.testing.assert_close(ops.randn(8, seed=2**63 - 1, backend="cpu"), want, rtol=2e-6, atol=2e-6)


def test_one_sample_may_have_a_sample_stride_below_its_size():
    """Overlapping noise streams need two samples: one sample with stride 0 is fine."""
    got = ops.randn((1, 6), seed=5, sample_stride=0, backend="reference")
    torch.testing.assert_close(got, ops.randn((1, 6), seed=5, backend="reference"), rtol=0, atol=0)


def test_an_empty_batch_has_no_counters_to_overflow():
    """No element, no counter: a huge offset with a step_stride cannot overflow."""
    schedule = NoiseSchedule("linear", timesteps=1000)
    x = torch.zeros(0, 3, 4, 4)
    out = ops.ddpm_step(x, x, 5, schedule, seed=1, offset=2**63 - 1, step_stride=1, backend="reference")
    assert out.shape == x.shape


def test_randn_checks_the_backend_of_an_empty_result_too():
    """An unknown or unusable backend is refused for an empty shape too."""
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.randn((0, 4), seed=0, backend="no-such-backend")
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' is unavailable for cpu tensors"):
        ops.randn((0, 4), seed=0, device="cpu", backend="cuda")


def test_reference_randn_follows_the_sample_stride():
    """With sample_stride, sample k starts at counter offset + k * sample_stride."""
    got = ops.randn((2, 3), seed=9, offset=4, sample_stride=10, backend="reference")
    torch.testing.assert_close(got[0], ops.randn(3, seed=9, offset=4, backend="reference"), rtol=0, atol=0)
    torch.testing.assert_close(got[1], ops.randn(3, seed=9, offset=14, backend="reference"), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_randn_has_the_requested_dtype(dtype):
    """The reference path casts to the dtype asked for, as the kernels do."""
    got = ops.randn((2, 3), seed=1, dtype=dtype, backend="reference")
    assert got.dtype == dtype
    torch.testing.assert_close(got, ops.randn((2, 3), seed=1, backend="reference").to(dtype), rtol=0, atol=0)


def test_randn_counters_start_at_zero_by_default():
    """The default offset is 0: element i takes counter i."""
    want = normal_reference(2, torch.arange(5, dtype=torch.int64))
    torch.testing.assert_close(ops.randn(5, seed=2, backend="reference"), want, rtol=0, atol=0)
