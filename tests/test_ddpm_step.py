"""The fused reverse step on every backend against the reference, and the
noise-counter layout. The step's math (the papers' formulas, diffusers'
schedulers) is checked in test_ddpm_step_math.py."""

from __future__ import annotations

import pytest
import torch

from conftest import (
    DTYPES, HUGE_PER_SAMPLE, HUGE_SAMPLES, HUGE_WINDOWS, TOLERANCES, assert_one_graph_for_every_height,
    backend_params, gpu_if_present, huge_timesteps, layout_params, poisoned_outputs, requires_extension,
    skip_without_gpu_memory,
)
from ddpm_fast import NoiseSchedule, ops
from ddpm_fast.ops.randn import normal_reference

SCHEDULE = NoiseSchedule("linear", timesteps=1000)
T = SCHEDULE.num_timesteps
SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (3, 3, 17, 13), (6, 11), (4, 130, 3, 3)]
# (x_t dtype, eps dtype): the sampler keeps x_t in float32 with eps from a low-precision model.
DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
               (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16)]
FORMS = [
    dict(variance="fixed_large", clip_denoised=False),
    dict(variance="fixed_small", clip_denoised=False),
    dict(variance="fixed_large", clip_denoised=True),
    dict(variance="fixed_small", clip_denoised=True),
    dict(eta=0.0, clip_denoised=False),
    dict(eta=1.0, clip_denoised=True),
]


def form_id(form):
    return "-".join(f"{k}={v}" for k, v in form.items())


def make(shape, dtype, layout, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale).to(dtype)
    if layout == "channels_last":
        assert len(shape) == 4, "channels_last needs a 4-d shape: parametrize with conftest.layout_params"
        x = x.to(memory_format=torch.channels_last)
    return x.to(device)


def timesteps(kind, n, device):
    if kind == "per_sample":
        t = torch.randint(0, T, (n,), generator=torch.Generator().manual_seed(n))
        t[0], t[-1] = T - 1, 0
        return t.to(device)
    return {"first": 0, "last": T - 1, "mid": 400}[kind]


def tolerance(dtype):
    # x_{t-1} can be ~10x the inputs' scale near t = T-1 (1/sqrt(alpha_t) * ...),
    # where float32 rounding differences between kernels grow with it.
    tol = dict(TOLERANCES[dtype])
    tol["atol"] = max(tol["atol"], 1e-5)
    return tol


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda p: f"{str(p[0])[6:]}-{str(p[1])[6:]}")
@pytest.mark.parametrize("layout,shape", layout_params(SHAPES))
@pytest.mark.parametrize("t_kind", ["first", "last", "mid", "per_sample"])
@pytest.mark.parametrize("form", FORMS, ids=form_id)
def test_matches_reference(device, backend, dtypes, layout, shape, t_kind, form):
    x_dtype, e_dtype = dtypes
    x = make(shape, x_dtype, layout, device, 0)
    eps = make(shape, e_dtype, layout, device, 1)
    t = timesteps(t_kind, shape[0], device)
    with poisoned_outputs(device, x.numel() * 4):
        got = ops.ddpm_step(x, eps, t, SCHEDULE, seed=5, offset=7, backend=backend, **form)
    ref_t = t.cpu() if isinstance(t, torch.Tensor) else t
    want = ops.ddpm_step(x.cpu(), eps.cpu(), ref_t, SCHEDULE, seed=5, offset=7, backend="reference", **form)
    assert got.dtype == x_dtype and got.shape == x.shape
    assert got.is_contiguous() == x.is_contiguous()
    torch.testing.assert_close(got.cpu(), want, **tolerance(x_dtype))


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_given_noise_and_model_input_outputs(device, backend, layout):
    x = make((3, 5, 4, 6), torch.float32, layout, device, 0)
    eps = make((3, 5, 4, 6), torch.bfloat16, layout, device, 1)
    z = make((3, 5, 4, 6), torch.float32, layout, device, 2)
    t = torch.tensor([999, 3, 0], device=device)
    want = ops.ddpm_step(x.cpu(), eps.cpu(), t.cpu(), SCHEDULE, noise=z.cpu(), backend="reference")
    for mi_layout in ("contiguous", "channels_last"):
        for mi_dtype in DTYPES:
            mi = torch.full(x.shape, float("nan"), device=device, dtype=mi_dtype)
            if mi_layout == "channels_last":
                mi = mi.to(memory_format=torch.channels_last)
            out = ops.ddpm_step(x, eps, t, SCHEDULE, noise=z, out_model_input=mi, backend=backend)
            torch.testing.assert_close(out.cpu(), want, **tolerance(torch.float32))
            torch.testing.assert_close(mi.cpu(), want.to(mi_dtype), **TOLERANCES[mi_dtype])
            if backend in ("cpu", "triton"):  # these kernels' model input is their output rounded to its dtype
                assert torch.equal(mi.cpu(), out.cpu().to(mi_dtype))
            assert mi.is_contiguous() == (mi_layout == "contiguous") or x.shape[1] == 1


@pytest.mark.parametrize("device,backend", backend_params())
def test_in_place_update(device, backend):
    x = make((2, 3, 8, 8), torch.float32, "contiguous", device, 0)
    eps = make((2, 3, 8, 8), torch.float32, "contiguous", device, 1)
    want = ops.ddpm_step(x, eps, 500, SCHEDULE, seed=1, backend=backend)
    result = ops.ddpm_step(x, eps, 500, SCHEDULE, seed=1, out=x, backend=backend)
    assert result is x
    torch.testing.assert_close(x, want, atol=0, rtol=0)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("name", ["out", "out_model_input"])
def test_given_outputs_behave_as_aten_in_place_writes(device, backend, name):
    """The C++ op wrote through data pointers without a version bump: autograd
    then used an overwritten saved tensor silently, and a kernel wrote into a
    tensor requiring grad or an inference tensor that ATen's copy_ refuses."""
    x = make((2, 3, 4, 4), torch.float32, "contiguous", device, 0)
    eps = make((2, 3, 4, 4), torch.float32, "contiguous", device, 1)
    w = torch.ones_like(x, requires_grad=True)
    saved = torch.zeros_like(x)
    product = w * saved  # saves `saved` for backward
    with torch.no_grad():
        ops.ddpm_step(x, eps, 500, SCHEDULE, seed=1, backend=backend, **{name: saved})
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        product.sum().backward()
    leaf = torch.zeros_like(x, requires_grad=True)
    with pytest.raises(RuntimeError, match="requires grad|leaf Variable that requires grad"):
        ops.ddpm_step(x, eps, 500, SCHEDULE, seed=1, backend=backend, **{name: leaf})
    with torch.no_grad():  # allowed there, as for ATen's in-place ops
        ops.ddpm_step(x, eps, 500, SCHEDULE, seed=1, backend=backend, **{name: leaf})
    assert leaf.abs().sum() > 0
    with torch.inference_mode():
        frozen = torch.zeros_like(x)
    with pytest.raises(RuntimeError, match="(?i)inference tensor"):
        ops.ddpm_step(x, eps, 500, SCHEDULE, seed=1, backend=backend, **{name: frozen})
    with torch.inference_mode():
        ops.ddpm_step(x, eps, 500, SCHEDULE, seed=1, backend=backend, **{name: frozen})
    assert frozen.abs().sum() > 0


@pytest.mark.parametrize("device,backend", [pytest.param("cpu", "reference", id="cpu-reference"), *backend_params()])
def test_a_refused_output_leaves_the_other_unwritten(device, backend):
    """The reference step wrote out (x_t itself) and only then failed on an
    out_model_input that ATen refuses (and, written the other way round, the
    reverse); the kernel backends checked both first, and now every backend does."""
    x = make((2, 3, 4, 4), torch.float32, "contiguous", device, 0)
    eps = make((2, 3, 4, 4), torch.float32, "contiguous", device, 1)
    before = x.clone()
    leaf = torch.zeros_like(x, requires_grad=True)
    with pytest.raises(RuntimeError, match="requires grad|leaf Variable that requires grad"):
        ops.ddpm_step(x, eps, 500, SCHEDULE, seed=1, backend=backend, out=x, out_model_input=leaf)
    with torch.inference_mode():
        frozen = torch.zeros_like(x)
    with pytest.raises(RuntimeError, match="(?i)inference tensor"):
        ops.ddpm_step(x, eps, 500, SCHEDULE, seed=1, backend=backend, out=x, out_model_input=frozen)
    torch.testing.assert_close(x, before, atol=0, rtol=0)
    model_input = torch.zeros_like(x)
    # ATen refuses in-place writes into a view unbind made of a tensor requiring grad,
    # which no check of ours repeats: x_t, written first, had changed
    unbound = torch.zeros((2, *x.shape), device=x.device, requires_grad=True).clone().unbind(0)[0]
    with pytest.raises(RuntimeError, match="(?i)unbind|requires grad"):
        ops.ddpm_step(x, eps, 500, SCHEDULE, seed=1, backend=backend, out=x, out_model_input=unbound)
    torch.testing.assert_close(x, before, atol=0, rtol=0)
    leaf_view = torch.zeros((4, *x.shape[1:]), device=x.device, requires_grad=True)[:2]  # contiguous
    for refused in (leaf, frozen, leaf_view):
        with pytest.raises(RuntimeError, match="(?i)requires grad|inference tensor"):
            ops.ddpm_step(x, eps, 500, SCHEDULE, seed=1, backend=backend, out=refused, out_model_input=model_input)
    assert model_input.eq(0).all()
    # a non-leaf requiring grad: the reference records the write (ATen's copy_), a kernel refuses it
    grown = torch.zeros_like(x) * torch.ones(1, requires_grad=True)
    if backend == "reference":
        ops.ddpm_step(x, eps, 500, SCHEDULE, seed=1, backend=backend, out=grown, out_model_input=model_input)
        assert grown.grad_fn is not None and model_input.abs().sum() > 0
    else:
        with pytest.raises(RuntimeError, match="requires grad, but the"):
            ops.ddpm_step(x, eps, 500, SCHEDULE, seed=1, backend=backend, out=grown, out_model_input=model_input)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("name", ["x_t", "eps", "noise"])
def test_inputs_requiring_grad_are_differentiated_or_refused(device, backend, name):
    """A kernel backend returned a result cut from the graph, silently (the
    gradient through the step went missing). ``auto`` now takes the reference,
    which records it; a kernel backend named refuses, as for a given ``out``."""
    inputs = {key: make((2, 3, 4, 4), torch.float32, "contiguous", device, i) for i, key in enumerate(("x_t", "eps", "noise"))}
    inputs[name].requires_grad_()

    def step(b):
        return ops.ddpm_step(inputs["x_t"], inputs["eps"], 500, SCHEDULE, noise=inputs["noise"], backend=b)

    (want,) = torch.autograd.grad(step("reference").square().sum(), inputs[name])
    (got,) = torch.autograd.grad(step("auto").square().sum(), inputs[name])
    torch.testing.assert_close(got, want)
    if backend != "reference":
        with pytest.raises(RuntimeError, match=f"{name} requires grad, but the {backend} backend does not record gradients"):
            step(backend)
        with torch.no_grad():
            torch.testing.assert_close(step(backend), step("reference"))


@pytest.mark.parametrize("device,backend", backend_params())
def test_a_nan_stays_nan_in_16_bit_outputs(device, backend):
    """The Triton kernels round to bfloat16 by bits (kernels/rounding.py): a NaN
    whose payload carried into the sign bit would have come out -0."""
    x = torch.tensor([0x7FFFFFFF, 0x7FC00000, 0xFFFFFFFF], dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = x.reshape(1, 3).to(device)
    model_input = torch.zeros(1, 3, dtype=torch.bfloat16, device=device)
    ops.ddpm_step(x, torch.zeros_like(x), 5, SCHEDULE, seed=1, out_model_input=model_input, backend=backend)
    assert model_input.float().isnan().all(), model_input


@requires_extension
def test_cpp_op_compiles_for_a_dynamic_image_size():
    """Its counters (sample_stride: the elements per sample) were plain ints in
    the C++ schema: a compiled graph was pinned to one image size (with
    mark_dynamic: a ConstraintViolationError)."""
    def step(x, eps):
        return ops.ddpm_step(x, eps, torch.tensor([3, 7]), SCHEDULE, seed=1, backend="cpu")

    assert_one_graph_for_every_height(
        step, lambda height: tuple(make((2, 3, height, 5), torch.float32, "contiguous", "cpu", i) for i in (0, 1))
    )


@pytest.mark.parametrize("device,backend", backend_params())
def test_in_place_step_compiles_with_fullgraph(device, backend):
    """out=x_t and out_model_input under torch.compile(fullgraph=True): the
    in-place checks asked is_inference(), which dynamo cannot trace."""
    def step(x, eps, model_input):
        ops.ddpm_step(x, eps, 300, SCHEDULE, seed=4, out=x, out_model_input=model_input, backend=backend)
        return x * 1

    x = make((2, 3, 4, 4), torch.float32, "channels_last", device, 0)
    eps = make((2, 3, 4, 4), torch.float32, "channels_last", device, 1)
    compile_backends = ["eager"] if backend == "triton" else ["eager", "aot_eager"]  # (interpreted Triton: no AOT)
    for compile_backend in compile_backends:
        torch._dynamo.reset()
        want_x, want_mi = x.clone(), torch.empty(x.shape, dtype=torch.bfloat16, device=device)
        with torch.no_grad():
            step(want_x, eps, want_mi)
            got_x, got_mi = x.clone(), torch.empty_like(want_mi)
            out = torch.compile(step, fullgraph=True, backend=compile_backend)(got_x, eps, got_mi)
        assert torch.equal(got_x, want_x) and torch.equal(out, want_x) and torch.equal(got_mi, want_mi)


@pytest.mark.parametrize("device,backend", backend_params())
def test_no_noise_at_t0(device, backend):
    x = make((2, 3, 4, 4), torch.float32, "contiguous", device, 0)
    eps = make((2, 3, 4, 4), torch.float32, "contiguous", device, 1)
    a = ops.ddpm_step(x, eps, 0, SCHEDULE, seed=1, backend=backend)
    b = ops.ddpm_step(x, eps, 0, SCHEDULE, seed=2, backend=backend)
    c = ops.ddpm_step(x, eps, 0, SCHEDULE, noise=torch.randn_like(x) * 100, backend=backend)
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("device,backend", backend_params())
def test_noise_follows_logical_position_not_memory_order(device, backend):
    # 7 tiles of 64 pixels a sample (the CPU kernel draws channels_last noise
    # by tiles), per-sample timesteps, counters that cross 2^32.
    x = make((3, 5, 19, 23), torch.float32, "contiguous", device, 0)
    eps = make((3, 5, 19, 23), torch.float32, "contiguous", device, 1)
    t = torch.tensor([700, 3, 250], device=device)
    kw = dict(seed=4, offset=2**32 - 3000, backend=backend)
    contiguous = ops.ddpm_step(x, eps, t, SCHEDULE, **kw)
    cl = ops.ddpm_step(x.to(memory_format=torch.channels_last), eps.to(memory_format=torch.channels_last), t,
                       SCHEDULE, **kw)
    torch.testing.assert_close(cl, contiguous, atol=0, rtol=0)


@pytest.mark.parametrize("device,backend", [*backend_params(), pytest.param("cpu", "reference", id="cpu-reference")])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_drawn_noise_is_normal_at_the_documented_counters(device, backend, layout):
    """z of logical element j of sample n is normal(seed, offset + n * sample_stride
    + t_n * step_stride + j): with x_t = eps = 0 the step is sigma_t z. (A reference
    that ignored step_stride passed every other test.)"""
    zeros = make((3, 2, 5, 7), torch.float32, layout, device, 0, scale=0.0)
    t = torch.tensor([4, 731, 999])
    seed, offset, sample_stride, step_stride = 11, 5, 200, 1000
    out = ops.ddpm_step(zeros, zeros.clone(), t.to(device), SCHEDULE, seed=seed, offset=offset,
                        sample_stride=sample_stride, step_stride=step_stride, backend=backend)
    n, t4 = torch.arange(3).reshape(3, 1, 1, 1), t.reshape(3, 1, 1, 1)
    j = torch.arange(70).reshape(1, 2, 5, 7)
    sigma = SCHEDULE.betas[t4].sqrt().float()  # fixed_large, t > 0
    want = sigma * normal_reference(seed, offset + n * sample_stride + t4 * step_stride + j)
    torch.testing.assert_close(out.cpu(), want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("device,backend", backend_params())
def test_a_one_element_t_tensor_is_every_samples_timestep(device, backend):
    x, eps = (make((3, 2, 5, 7), torch.float32, "contiguous", device, seed) for seed in (0, 1))
    want = ops.ddpm_step(x, eps, 640, SCHEDULE, seed=2, backend=backend)
    got = ops.ddpm_step(x, eps, torch.tensor([640], device=device), SCHEDULE, seed=2, backend=backend)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("device,backend", backend_params())
def test_per_sample_streams_do_not_depend_on_the_batch(device, backend):
    # With sample_stride = 2^32 and offset = first_sample << 32, sample i's noise
    # depends on (seed, i, t) only: drawn alone or inside a batch, it is the same.
    x = make((5, 3, 4, 4), torch.float32, "contiguous", device, 0)
    eps = make((5, 3, 4, 4), torch.float32, "contiguous", device, 1)
    per_sample = 3 * 4 * 4
    kw = dict(seed=9, sample_stride=2**32, step_stride=per_sample, backend=backend)
    batch = ops.ddpm_step(x, eps, 700, SCHEDULE, offset=0, **kw)
    alone = ops.ddpm_step(x[3:4], eps[3:4], 700, SCHEDULE, offset=3 << 32, **kw)
    torch.testing.assert_close(alone, batch[3:4], atol=0, rtol=0)
    other_step = ops.ddpm_step(x, eps, 701, SCHEDULE, offset=0, **kw)
    assert not torch.allclose(other_step, batch)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.uint16, torch.int32, torch.uint32, torch.uint64])
def test_timesteps_of_every_integer_dtype(device, backend, dtype):
    # As int64 timesteps (uint16/32/64 are widened: torch has no min/max for them).
    x = make((3, 2, 4, 4), torch.float32, "contiguous", device, 0)
    eps = make((3, 2, 4, 4), torch.float32, "contiguous", device, 1)
    t = torch.tensor([0, 99, 127])
    want = ops.ddpm_step(x, eps, t.to(device), SCHEDULE, seed=3, backend=backend)
    got = ops.ddpm_step(x, eps, t.to(dtype).to(device), SCHEDULE, seed=3, backend=backend)
    assert torch.equal(got, want)


@pytest.mark.parametrize("device,backend", backend_params())
def test_counters_of_a_sampler_run_are_accepted(device, backend):
    # The Sampler's layout (sample_stride 2^32, step_stride the elements per sample,
    # offset first_sample << 32) up to its largest first_sample + N, 2^31 - 1: the
    # counter checks (every timestep's counters within int64) let it through.
    x = make((2, 3, 4, 4), torch.float32, "contiguous", device, 0)
    kw = dict(seed=9, sample_stride=2**32, step_stride=3 * 4 * 4, backend=backend)
    out = ops.ddpm_step(x, x, T - 1, SCHEDULE, offset=(2**31 - 3) << 32, **kw)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="offset must lie in"):
        ops.ddpm_step(x, x, T - 1, SCHEDULE, offset=(2**31 - 1) << 32, **kw)


@requires_extension
def test_opcheck_cpp_op():
    x = torch.randn(3, 2, 5, 5)
    eps = torch.randn(3, 2, 5, 5).bfloat16()
    t = torch.tensor([0, 4, 999])
    table = SCHEDULE.step_table("fixed_large")
    out = torch.empty_like(x)
    mi = torch.empty_like(x, dtype=torch.float16).to(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.ddpm_fast.ddpm_step_.default, (x, eps, t, table, None, 3, 10, 50, 0, True, out, mi))
    torch.library.opcheck(torch.ops.ddpm_fast.ddpm_step_.default, (x, eps, t, table, torch.randn_like(x), 0, 0, 50, 0, False, out, None))


@gpu_if_present
@pytest.mark.parametrize("model_input_dtype", [None, torch.float16])
def test_opcheck_triton_op(model_input_dtype):
    """With a 16-bit model_input, the fake run (opcheck, make_fx, FakeTensorMode)
    refused its own arguments: fake tensors all report address 0, so the overlap
    check saw model_input, of another dtype than out, overlap it."""
    pytest.importorskip("triton")
    from ddpm_fast.kernels import ddpm_step as _triton  # noqa: F401

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(3, 2, 5, 5, device=device)
    model_input = None if model_input_dtype is None else torch.empty_like(x, dtype=model_input_dtype)
    args = (x, x.clone(), torch.tensor([0, 4, 999], device=device), SCHEDULE.step_table("fixed_large", device=device),
            None, 3, 10, 50, 0, True, torch.empty_like(x), model_input)
    torch.library.opcheck(torch.ops.ddpm_fast.ddpm_step_triton_.default, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("device,backend", backend_params())
def test_nan_propagates_through_the_clip(device, backend):
    x = make((1, 1, 2, 2), torch.float32, "contiguous", device, 0)
    x[0, 0, 0, 0] = float("nan")
    out = ops.ddpm_step(x, torch.zeros_like(x), 500, SCHEDULE, clip_denoised=True, seed=0, backend=backend)
    assert torch.isnan(out[0, 0, 0, 0]) and torch.isfinite(out.flatten()[1:]).all()


class TestBadInput:
    x = torch.randn(2, 3, 4, 4)

    @pytest.mark.parametrize(
        "kwargs,error,match",
        [
            (dict(eps=torch.randn(2, 3, 4)), ValueError, "eps has shape"),
            (dict(eps=torch.randn(2, 3, 4, 4).double()), TypeError, "eps must be float32"),
            (dict(t=1000), ValueError, "out of range"),
            (dict(t=torch.tensor([1, 2, 3])), ValueError, "one entry per sample"),
            (dict(variance="learned"), ValueError, "variance must be one of"),
            (dict(clip_denoised=1), TypeError, "clip_denoised must be a bool"),
            (dict(eta=-0.5), ValueError, "eta must be"),
            (dict(eta=float("nan")), ValueError, "eta must be"),
            (dict(noise=torch.randn(2, 3, 4, 4), seed=1), ValueError, "not both"),
            (dict(out=torch.empty(2, 3, 4, 4, dtype=torch.float16)), TypeError, "out must have x_t's dtype"),
            (dict(out=torch.empty(2, 3, 4, 5)), ValueError, "out must have x_t's shape"),
            (dict(out=torch.empty(2, 3, 4, 4).to(memory_format=torch.channels_last)), ValueError, "memory format"),
            (dict(out_model_input=torch.empty(2, 3, 4, 4, dtype=torch.int32)), TypeError, "float32, float16 or bfloat16"),
            (dict(sample_stride=-1), ValueError, "sample_stride must lie in"),
            (dict(backend="cuda"), RuntimeError, "unavailable"),
        ],
    )
    def test_rejected(self, kwargs, error, match):
        args = dict(eps=torch.randn(2, 3, 4, 4), t=5)
        args.update(kwargs)
        eps, t = args.pop("eps"), args.pop("t")
        with pytest.raises(error, match=match):
            ops.ddpm_step(self.x, eps, t, SCHEDULE, **args)

    @requires_extension
    def test_cpp_op_checks(self):
        table = SCHEDULE.step_table("fixed_large")
        x, out = self.x, torch.empty_like(self.x)
        with pytest.raises(RuntimeError, match="out of range"):
            torch.ops.ddpm_fast.ddpm_step_(x, x, torch.tensor([0, 1000]), table, None, 0, 0, 48, 0, False, out, None)
        with pytest.raises(RuntimeError, match=r"\(T, 8\) step table"):
            torch.ops.ddpm_fast.ddpm_step_(x, x, torch.tensor(1), table[:, :7].contiguous(), None, 0, 0, 48, 0, False, out, None)
        with pytest.raises(RuntimeError, match="memory format of x_t"):
            torch.ops.ddpm_fast.ddpm_step_(x, x.to(memory_format=torch.channels_last), torch.tensor(1), table, None, 0, 0, 48, 0, False, out, None)

    @requires_extension
    def test_cpp_op_refuses_outputs_partially_overlapping_inputs(self):
        """The raw op computed wrong values silently for an out shifted over x
        (9536 of 9600 wrong) or a model_input that is x's memory in the other
        memory format; out = x itself (in place) stays allowed."""
        table = SCHEDULE.step_table("fixed_large")
        t, op = torch.tensor([1, 7]), torch.ops.ddpm_fast.ddpm_step_
        n = 2 * 3 * 40 * 40
        buf = torch.randn(n + 64)
        x, shifted = buf[:n].view(2, 3, 40, 40), buf[64:].view(2, 3, 40, 40)
        eps, z = torch.randn_like(x), torch.randn_like(x)
        x_as_channels_last = x.as_strided(x.shape, (4800, 1, 120, 3))
        cases = [  # (x_t, eps, noise, out, model_input); buf[:n] is x, buf[64:] shifted
            (x, eps, z, shifted, None),  # out over x_t
            (eps, x, z, shifted, None),  # out over eps
            (eps, z, x, shifted, None),  # out over noise
            (x, eps, z, torch.empty_like(x), x_as_channels_last),  # model_input over x_t
            (eps, z, None, x, shifted),  # model_input over out
        ]
        for x_t, e, noise, out, model_input in cases:
            with pytest.raises(RuntimeError, match="refer to a single memory location"):
                op(x_t, e, t, table, noise, 0, 0, 0, 0, False, out, model_input)
        want = ops.ddpm_step(x, eps, t, SCHEDULE, noise=z, backend="reference")
        op(x, eps, t, table, z, 0, 0, 0, 0, False, x, None)  # in place
        torch.testing.assert_close(x, want)


class TestUndefinedSteps:
    """jsd ends with beta = 1: alpha = 0 at t = T-1, where every form of the step
    divides by zero. The step refuses it (rather than returning NaN) where t is
    on the host; other timesteps and schedules are unaffected."""

    jsd = NoiseSchedule("jsd", timesteps=10)

    @pytest.mark.parametrize("kind,clip", [("fixed_large", False), ("fixed_small", True), ("ddim", False), ("ddim", True)])
    def test_listed(self, kind, clip):
        assert self.jsd.undefined_steps(kind, clip_denoised=clip) == [9]
        for name in ("linear", "cosine", "quad", "const", "warmup10"):
            assert NoiseSchedule(name, timesteps=50).undefined_steps(kind, clip_denoised=clip) == []

    @pytest.mark.parametrize("backend", ["reference", "auto"])
    @pytest.mark.parametrize("t", [9, torch.tensor(9), torch.tensor([3, 9])], ids=["int", "tensor", "per-sample"])
    def test_step_refuses(self, backend, t):
        x = torch.randn(2, 3, 4, 4)
        with pytest.raises(ValueError, match="undefined at timestep 9"):
            ops.ddpm_step(x, x, t, self.jsd, seed=0, backend=backend)

    @pytest.mark.parametrize("backend", ["reference", "auto"])
    def test_other_steps_are_finite(self, backend):
        x = torch.randn(2, 3, 4, 4)
        for clip in (False, True):
            y = ops.ddpm_step(x, x, torch.tensor([0, 8]), self.jsd, seed=0, clip_denoised=clip, backend=backend)
            assert torch.isfinite(y).all()


@pytest.mark.gpu
def test_gpu_sampler_captures_the_reference_step():
    """The reference step reads the Sampler's device step counter (a 0-d
    tensor) on the device: indexing a table with it was a host read, which
    failed every CUDA graph capture of Sampler(backend="reference")."""
    import warnings

    from ddpm_fast import Sampler

    def run(cuda_graph: bool) -> torch.Tensor:
        sampler = Sampler(lambda x, t: 0.5 * x, SCHEDULE, sample_shape=(3, 8, 8), device="cuda", backend="reference",
                          cuda_graph=cuda_graph)
        return sampler.sample(4, seed=2, steps=120, progress=False)  # long enough for graphs

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to the plain loop
        graphed = run(True)
    assert torch.equal(graphed, run(False))


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_more_than_2_to_the_31_elements(backend):
    """64-bit indexing (issue 7): windows at the start, across 2^31 and at the
    end, against the reference given the noise the stream holds there."""
    skip_without_gpu_memory()
    n = 2**31 + 2**20 + 3
    x = torch.rand(1, n, dtype=torch.float16, device="cuda")
    eps = torch.rand(1, n, dtype=torch.float16, device="cuda")
    out = ops.ddpm_step(x, eps, 123, SCHEDULE, seed=9, backend=backend)
    for start in (0, 2**31 - 500, n - 1000):
        window = slice(start, start + 1000)
        z = ops.randn((1, 1000), 9, start, backend="reference")  # one sample: counter = offset + index
        ref = ops.ddpm_step(x[:, window].cpu(), eps[:, window].cpu(), 123, SCHEDULE, noise=z, backend="reference")
        torch.testing.assert_close(out[:, window].cpu(), ref, **TOLERANCES[torch.float16])


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_more_than_2_to_the_31_elements_over_many_samples(backend):
    """Many samples with their own t (conftest's HUGE_*): the sample index,
    each sample's coefficients and its noise counters past 2^31."""
    skip_without_gpu_memory()
    x, eps = (torch.rand(HUGE_SAMPLES, HUGE_PER_SAMPLE, dtype=torch.float16, device="cuda") for _ in range(2))
    t = huge_timesteps(SCHEDULE.num_timesteps)
    out = ops.ddpm_step(x, eps, t, SCHEDULE, seed=9, backend=backend)
    for k, start in HUGE_WINDOWS:
        window, rows = slice(start, start + 1000), slice(k, k + 1)
        z = ops.randn((1, 1000), 9, k * HUGE_PER_SAMPLE + start, backend="reference")  # sample k's stream, from its start
        ref = ops.ddpm_step(x[rows, window].cpu(), eps[rows, window].cpu(), t[rows].cpu(), SCHEDULE, noise=z,
                            backend="reference")
        torch.testing.assert_close(out[rows, window].cpu(), ref, **TOLERANCES[torch.float16])


@pytest.mark.parametrize("device,backend", [*backend_params(), pytest.param("cpu", "reference", id="cpu-reference")])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's 0 * inf, selected away
def test_given_noise_is_not_read_at_t0(device, backend, value):
    """No noise at t = 0: not even a non-finite z reaches the result (0 * inf is NaN)."""
    x = make((2, 3, 4, 4), torch.float32, "contiguous", device, 0)
    eps = make((2, 3, 4, 4), torch.float32, "contiguous", device, 1)
    got = ops.ddpm_step(x, eps, 0, SCHEDULE, noise=torch.full_like(x, value), backend=backend)
    assert torch.equal(got, ops.ddpm_step(x, eps, 0, SCHEDULE, seed=1, backend=backend))


@pytest.mark.parametrize("device,backend", [*backend_params(), pytest.param("cpu", "reference", id="cpu-reference")])
def test_eps_is_read_in_its_own_dtype(device, backend):
    """bfloat16 x_t with a float32 eps: eps is not rounded to bfloat16 first
    (mid-chain, unclipped, where eps's coefficient is large enough to show it)."""
    x = make((2, 4, 16, 16), torch.bfloat16, "contiguous", device, 1)
    eps = make((2, 4, 16, 16), torch.float32, "contiguous", device, 2)
    noise = make((2, 4, 16, 16), torch.float32, "contiguous", device, 3)
    kw = dict(clip_denoised=False, noise=noise)
    got = ops.ddpm_step(x, eps, 500, SCHEDULE, backend=backend, **kw)
    want = ops.ddpm_step(x.float(), eps, 500, SCHEDULE, backend="reference", **kw).to(torch.bfloat16)
    rounded = ops.ddpm_step(x.float(), eps.bfloat16().float(), 500, SCHEDULE, backend="reference", **kw).to(torch.bfloat16)
    assert not torch.equal(want, rounded)  # the test can tell them apart
    assert (got != want).sum() < (got != rounded).sum()


@pytest.mark.parametrize("device,backend", [*backend_params(), pytest.param("cpu", "reference", id="cpu-reference")])
def test_given_noise_is_read_in_x_ts_dtype(device, backend):
    """Unlike eps, a given z is read as x_t's dtype (the documented cast: the
    kernels take noise in x_t's dtype), on every backend alike."""
    x = make((2, 4, 16, 16), torch.bfloat16, "contiguous", device, 1)
    eps = make((2, 4, 16, 16), torch.float32, "contiguous", device, 2)
    z = make((2, 4, 16, 16), torch.float32, "contiguous", device, 3) * 3
    schedule = NoiseSchedule("const", timesteps=50, beta_end=0.5)  # a large sigma, so that z's rounding shows
    got = ops.ddpm_step(x, eps, 1, schedule, noise=z, backend=backend)
    want = ops.ddpm_step(x, eps, 1, schedule, noise=z.bfloat16(), backend=backend)
    unrounded = ops.ddpm_step(x.float(), eps, 1, schedule, noise=z, backend="reference").to(torch.bfloat16)
    assert not torch.equal(want.cpu(), unrounded)  # the test can tell them apart
    assert torch.equal(got, want)


@pytest.mark.parametrize("device, backend", backend_params())
def test_a_scalar_t_draws_at_its_step_stride(device, backend):
    """The Sampler's call: one 0-d t for the batch and step_stride, so that each
    step draws its own noise (counter offset + t * step_stride + ...). A kernel
    that applied step_stride to per-sample t alone reused one step's noise in
    every step, which only the sampler's statistical test noticed."""
    x, eps = torch.randn(2, 3, 4, 4, device=device), torch.randn(2, 3, 4, 4, device=device)
    noise = dict(seed=5, offset=0, sample_stride=1000, step_stride=48)
    got = ops.ddpm_step(x, eps, torch.tensor(7, device=device), SCHEDULE, backend=backend, **noise)
    want = ops.ddpm_step(x.cpu(), eps.cpu(), torch.tensor(7), SCHEDULE, backend="reference", **noise)
    torch.testing.assert_close(got.cpu(), want)
