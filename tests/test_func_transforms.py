"""The ops and the fused U-Net under torch.func transforms (grad, vmap, jvp).

The kernel ops' autograd is a C++ (or torch.library) autograd function, which
functorch cannot transform; under a transform ``backend="auto"`` runs the
reference instead. These tests compare what the transforms give with what
plain autograd (or a loop) gives through the kernels outside them."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, grad, jacfwd, jvp, vmap

from conftest import requires_extension
from ddpm_fast import NoiseSchedule, diffusion, ops
from ddpm_fast.models import UNet
from group_norm_silu_helpers import inputs

SCHEDULE = NoiseSchedule("linear", timesteps=20)


def _gn_inputs(dtype=torch.float32):
    """x (3, 6, 5, 7), weight, bias and add on the CPU."""
    return inputs((3, 6, 5, 7), dtype, "contiguous", "cpu", affine=True, with_add=True)


def _dual(f, x, v):
    """(f(x), its derivative along v) through dual tensors (forward-mode AD)."""
    with fwAD.dual_level():
        return fwAD.unpack_dual(f(fwAD.make_dual(x, v)))


def _central_difference(f, x, v, h=1e-6):
    return (f(x + h * v) - f(x - h * v)) / (2 * h)


@requires_extension
def test_resolve_backend_gives_reference_for_auto_inside_a_transform(monkeypatch):
    x = torch.zeros(2, 3)
    seen = {}

    def probe(xi):
        seen["auto"] = ops.resolve_backend("auto", xi.device, "probe")
        seen["cpu"] = ops.resolve_backend("cpu", xi.device, "probe")
        return xi

    assert ops.resolve_backend("auto", x.device, "probe") == "cpu"
    vmap(probe)(x)
    assert seen == {"auto": "reference", "cpu": "cpu"}  # an explicit backend is kept
    monkeypatch.setenv("DDPM_FAST_BACKEND", "cpu")  # no kernel can run under grad, whatever it names
    vmap(probe)(x)
    assert seen["auto"] == "reference"


@requires_extension
def test_group_norm_silu_grad_matches_kernel_autograd():
    x, w, b, add = _gn_inputs()

    def loss(x, w, b, add):
        return (ops.group_norm_silu(x, 3, w, b, add=add) * torch.linspace(-1, 1, x.numel()).view_as(x)).sum()

    leaves = [t.clone().requires_grad_() for t in (x, w, b, add)]
    expected = torch.autograd.grad(loss(*leaves), leaves)  # through the C++ kernels
    got = grad(loss, argnums=(0, 1, 2, 3))(x, w, b, add)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@requires_extension
def test_group_norm_silu_vmap_over_inputs_and_over_weights_matches_a_loop():
    x, w, b, _ = _gn_inputs()
    xs = torch.stack([x, 2 * x + 1])
    ws = torch.stack([w, w.flip(0)])
    got = vmap(lambda xi: ops.group_norm_silu(xi, 3, w, b))(xs)
    torch.testing.assert_close(got, torch.stack([ops.group_norm_silu(xi, 3, w, b) for xi in xs]))
    got = vmap(lambda wi: ops.group_norm_silu(x, 3, wi, b))(ws)
    torch.testing.assert_close(got, torch.stack([ops.group_norm_silu(x, 3, wi, b) for wi in ws]))


@requires_extension
def test_group_norm_silu_jvp_matches_a_central_difference_of_the_kernel():
    x, w, b, add = _gn_inputs(torch.float64)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    f = lambda x: ops.group_norm_silu(x, 3, w, b, add=add)  # noqa: E731
    _, tangent = jvp(f, (x,), (v,))
    torch.testing.assert_close(tangent, _central_difference(f, x, v), rtol=1e-6, atol=1e-6)


@requires_extension
def test_forward_mode_ad_matches_the_kernel():
    """Dual tensors (torch.autograd.forward_ad) through group_norm_silu (against a
    central difference of the kernel) and q_sample (linear in x0: f(x0 + v) - f(x0))."""
    x, w, b, add = _gn_inputs(torch.float64)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    norm = lambda x: ops.group_norm_silu(x, 3, w, b, add=add)  # noqa: E731
    torch.testing.assert_close(_dual(norm, x, v).tangent, _central_difference(norm, x, v), rtol=1e-6, atol=1e-6)
    noisy = lambda x: ops.q_sample(x, torch.tensor([2, 9, 19]), SCHEDULE, seed=4)[0]  # noqa: E731
    x, v = x.float(), v.float()
    torch.testing.assert_close(_dual(noisy, x, v).tangent, noisy(x + v) - noisy(x), rtol=1e-5, atol=1e-5)


@requires_extension
def test_q_sample_grad_and_vmap_match_the_kernel():
    x0 = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 5, 11, 19])
    weights = torch.linspace(-1, 1, x0.numel()).view_as(x0)

    def loss(x0):
        x_t, eps = ops.q_sample(x0, t, SCHEDULE, seed=3)
        return (x_t * weights).sum() + (eps**2).sum()

    leaf = x0.clone().requires_grad_()
    (expected,) = torch.autograd.grad(loss(leaf), leaf)
    torch.testing.assert_close(grad(loss)(x0), expected)
    got_xt, got_eps = vmap(lambda xi: ops.q_sample(xi, 7, SCHEDULE, seed=3))(x0)
    for i in range(x0.shape[0]):  # every slice is its own call, with the same seed
        xt_i, eps_i = ops.q_sample(x0[i], 7, SCHEDULE, seed=3)
        torch.testing.assert_close(got_xt[i], xt_i)
        torch.testing.assert_close(got_eps[i], eps_i)


@requires_extension
def test_ddpm_step_vmap_matches_a_loop():
    g = torch.Generator().manual_seed(4)
    x_t, eps = torch.randn(2, 3, 4, 6, generator=g), torch.randn(2, 3, 4, 6, generator=g)
    got = vmap(lambda xi, ei: ops.ddpm_step(xi, ei, 9, SCHEDULE, seed=5))(x_t, eps)
    expected = torch.stack([ops.ddpm_step(x_t[i], eps[i], 9, SCHEDULE, seed=5) for i in range(2)])
    torch.testing.assert_close(got, expected)


@requires_extension
@pytest.mark.filterwarnings("error:There is a performance drop")  # torch's attention under vmap: plain ops now
@pytest.mark.parametrize("per_sample", [False, True], ids=["grad", "vmap_of_grad"])
def test_fused_unet_parameter_gradients_under_torch_func(per_sample):
    """torch.func.grad over functional_call of the fused U-Net (and vmap of it:
    per-sample gradients) against loss.backward() through the kernels."""
    torch.manual_seed(0)
    model = UNet.tiny(image_size=8, in_channels=1).eval()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 999])
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, t):
        return functional_call(model, p, (x, t)).square().mean()

    if per_sample:
        got = vmap(grad(loss), in_dims=(None, 0, 0))(params, x[:, None], t[:, None])
        cases = [(x[i : i + 1], t[i : i + 1], {k: v[i] for k, v in got.items()}) for i in range(3)]
    else:
        cases = [(x, t, grad(loss)(params, x, t))]
    for xi, ti, found in cases:
        model.zero_grad()
        loss(dict(model.named_parameters()), xi, ti).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(found[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("how", ["jvp", "dual_tensors"])
def test_fused_unet_forward_mode_derivative_matches_a_central_difference(how):
    """jvp through the U-Net: its attention's fused kernel (torch's SDPA) had no
    forward-mode derivative ("Trying to use forward AD with
    _scaled_dot_product_flash_attention_for_cpu")."""
    torch.manual_seed(0)
    model = UNet.tiny(image_size=8, in_channels=1).double().eval()
    x, t = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([3, 700])
    v = torch.randn_like(x)
    f = lambda x: model(x, t)  # noqa: E731
    out, tangent = jvp(f, (x,), (v,)) if how == "jvp" else _dual(f, x, v)
    torch.testing.assert_close(out, f(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tangent, _central_difference(f, x, v), rtol=1e-6, atol=1e-6)


@requires_extension
def test_torch_compile_of_auto_still_runs_the_kernel():
    """Outside a transform the graph torch.compile traces calls the C++ op,
    not the reference (besides the op, dynamo records the transform check's
    call, whose False it took as a constant)."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    x, w, b, _ = _gn_inputs()
    recorder = EagerAndRecordGraphs()
    compiled = torch.compile(lambda x: ops.group_norm_silu(x, 3, w, b), fullgraph=True, backend=recorder)
    torch.testing.assert_close(compiled(x), ops.group_norm_silu(x, 3, w, b))
    targets = {str(n.target) for gm in recorder.graphs for n in gm.graph.nodes if n.op == "call_function"}
    expected = {"ddpm_fast.group_norm_silu", "<built-in function getitem>"}
    assert expected <= targets <= expected | {str(torch._C._are_functorch_transforms_active)}, targets


@requires_extension
def test_torch_compile_of_torch_func_grad():
    """A torch.func.grad that torch.compile traces (fullgraph) takes the
    reference inside, as in eager: the kernel's autograd would fail there."""
    x, w, b, add = _gn_inputs()

    def loss(x):
        return ops.group_norm_silu(x, 3, w, b, add=add).square().sum()

    leaf = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(loss(leaf), leaf)  # through the C++ kernels
    got = torch.compile(grad(loss), fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transform", ["functionalize", "grad"])
def test_a_transform_leaves_no_wrapped_tensor_in_a_cache(monkeypatch, transform):
    """functionalize and grad wrap even the tensors factory functions make: the
    timestep arange and a schedule's float32 tables made first under them were
    kept, and a later eager step raised ("Found a custom (non-ATen) operator
    whose output has alias annotations"; on torch 2.7 the first step under grad
    did: "Cannot access data pointer"). They are made outside the transform now."""
    import importlib

    from torch.func import functionalize

    _args = importlib.import_module("ddpm_fast.ops._args")
    monkeypatch.setattr(_args, "_TIMESTEPS", {})
    g = torch.Generator().manual_seed(6)
    x, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    calls = {
        "ddpm_step": lambda s, x: ops.ddpm_step(x, eps, 3, s, seed=1),
        "q_sample": lambda s, x: ops.q_sample(x, 3, s, seed=1)[0],
        "diffusion.q_sample": lambda s, x: diffusion.q_sample(s, x.double(), torch.tensor([3, 5]), eps.double()),
    }
    wrap = functionalize if transform == "functionalize" else (lambda f: grad(lambda x: f(x).sum()))
    traced_on = NoiseSchedule("linear", timesteps=10)
    for call in calls.values():
        wrap(lambda x, call=call: call(traced_on, x))(x)
    kept = [*_args._TIMESTEPS.values(), *(entry[0] for entry in traced_on._device_tables.values()),
            *(entry[2] for entry in traced_on.__dict__.get("_extract_tables", {}).values())]
    assert _args._TIMESTEPS and traced_on._device_tables  # made outside the transform: plain, kept
    assert not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in kept)
    for name, call in calls.items():
        torch.testing.assert_close(call(traced_on, x), call(NoiseSchedule("linear", timesteps=10), x), atol=0, rtol=0, msg=name)


# Per-sample timesteps: t batched by vmap, each sample with its own (a
# per-sample loss at a random t). The range checks read t's values on the host,
# which vmap refuses for a batched tensor ("calling .item() on a Tensor").
_T = torch.tensor([0, 5, 11, 19])
_PER_SAMPLE_CALLS = {
    "q_sample noise": lambda x, t, e: ops.q_sample(x, t, SCHEDULE, noise=e)[0],
    "q_sample seed": lambda x, t, e: ops.q_sample(x, t, SCHEDULE, seed=3),
    "ddpm_step": lambda x, t, e: ops.ddpm_step(x, e, t, SCHEDULE, seed=5),
    "ddpm_step clipped ddim": lambda x, t, e: ops.ddpm_step(x, e, t, SCHEDULE, clip_denoised=True, eta=0.5, seed=5),
    "diffusion.q_sample": lambda x, t, e: diffusion.q_sample(SCHEDULE, x, t, e),
    "diffusion.predict_x0_from_eps": lambda x, t, e: diffusion.predict_x0_from_eps(SCHEDULE, x, t, e),
    "diffusion.q_posterior_mean_variance": lambda x, t, e: diffusion.q_posterior_mean_variance(SCHEDULE, e, x, t),
    "diffusion.vb_terms_bpd": lambda x, t, e: diffusion.vb_terms_bpd(SCHEDULE, e, x.clamp(-1, 1), x, t, clip_denoised=True),
}


@pytest.mark.parametrize("t_shape", ["0-d", "(1,)"])
@pytest.mark.parametrize("name", _PER_SAMPLE_CALLS)
def test_timesteps_batched_by_vmap_match_a_loop(name, t_shape):
    call = _PER_SAMPLE_CALLS[name]
    g = torch.Generator().manual_seed(7)
    x, eps = torch.randn(4, 3, 5, 6, generator=g), torch.randn(4, 3, 5, 6, generator=g)
    shaped = (lambda t: t) if t_shape == "0-d" else (lambda t: t.reshape(1))
    got = vmap(lambda xi, ti, ei: call(xi[None], shaped(ti), ei[None]))(x, _T, eps)
    for i in range(4):  # each sample as its own call (with the same seed)
        expected = call(x[i : i + 1], shaped(_T[i]), eps[i : i + 1])
        torch.testing.assert_close(torch.utils._pytree.tree_map(lambda v: v[i], got), expected, msg=f"sample {i}")


def test_timestep_batched_by_vmap_over_one_sample():
    """A batch of one: its single value is read and served as a shared t."""
    x, eps = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    got = vmap(lambda xi, ti, ei: ops.q_sample(xi[None], ti, SCHEDULE, noise=ei[None])[0])(x, _T[2:3], eps)
    torch.testing.assert_close(got[0], ops.q_sample(x, 11, SCHEDULE, noise=eps)[0])


@pytest.mark.parametrize("bad", [20, -1])
@pytest.mark.parametrize("name", ["q_sample seed", "ddpm_step", "diffusion.q_sample"])
def test_timestep_batched_by_vmap_out_of_range_raises(name, bad):
    """Every sample's t is checked, though vmap hides the others from each call."""
    call = _PER_SAMPLE_CALLS[name]
    t = torch.tensor([3, bad, 4])
    x = torch.randn(3, 2, 4, 4)
    with pytest.raises(ValueError, match=r"out of range \[0, 20\)|must lie in \[0, 20\)"):
        vmap(lambda xi, ti, ei: call(xi[None], ti, ei[None]))(x, t, x)


def test_timesteps_batched_by_nested_vmaps():
    """Two vmap levels over a (2, 3) grid of timesteps: every level is looked under."""
    call = _PER_SAMPLE_CALLS["q_sample noise"]
    g = torch.Generator().manual_seed(8)
    x, eps = torch.randn(2, 3, 2, 4, 4, generator=g), torch.randn(2, 3, 2, 4, 4, generator=g)
    t = torch.tensor([[1, 2, 3], [4, 5, 19]])
    per_sample = vmap(vmap(lambda xi, ti, ei: call(xi[None], ti, ei[None])))
    got = per_sample(x, t, eps)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(got[i, j], call(x[i, j][None], t[i, j], eps[i, j][None]))
    with pytest.raises(ValueError, match=r"got min 1, max 20"):
        per_sample(x, t + torch.tensor([[0, 0, 0], [0, 0, 1]]), eps)


def test_timestep_batched_by_vmap_at_an_undefined_step_raises():
    """The jsd schedule's last step has beta = 1: the step is undefined there."""
    jsd = NoiseSchedule("jsd", timesteps=10)
    x = torch.randn(3, 2, 4, 4)
    with pytest.raises(ValueError, match="undefined at timestep 9"):
        vmap(lambda xi, ti: ops.ddpm_step(xi[None], xi[None], ti, jsd, seed=1))(x, torch.tensor([2, 9, 4]))


def test_per_sample_gradients_with_each_samples_own_timestep():
    """The per-sample DDPM loss (Ho et al. eq. 14) at each sample's own t, its
    parameter gradients by vmap(grad(...)), against loss.backward() per sample
    through the kernels."""
    torch.manual_seed(0)
    model = UNet.tiny(image_size=8, in_channels=1).eval()
    schedule = NoiseSchedule("linear", timesteps=1000)
    x0, eps, t = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 999])
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x0, t, eps):
        x_t, _ = ops.q_sample(x0, t, schedule, noise=eps)
        return (functional_call(model, p, (x_t, t)) - eps).square().mean()

    got = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, x0[:, None], t[:, None], eps[:, None])
    for i in range(3):
        model.zero_grad()
        loss(dict(model.named_parameters()), x0[i : i + 1], t[i : i + 1], eps[i : i + 1]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(got[name][i], p.grad, rtol=1e-4, atol=1e-6, msg=f"{name}, sample {i}")


def test_torch_compile_of_a_vmap_over_timesteps():
    """fullgraph: in the graph no range check runs under the transform (its
    assert has no vmap rule); an out-of-range t makes its own sample NaN, as on the GPU."""
    x, eps = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    f = vmap(lambda xi, ti, ei: ops.q_sample(xi[None], ti, SCHEDULE, noise=ei[None])[0])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, _T, eps), f(x, _T, eps))
    out = compiled(x, torch.tensor([3, 20, -1, 4]), eps)
    assert out[1:3].isnan().all() and not out[[0, 3]].isnan().any()


def test_noise_drawn_with_no_seed_inside_vmap_follows_vmaps_randomness_flag():
    """The seed comes from torch's generator: vmap's default refuses that, and
    randomness="same" gives every sample the same seed (so the same noise)."""
    x = torch.randn(3, 2, 4, 4)

    def draw(xi):
        return ops.q_sample(xi[None], 5, SCHEDULE)[1]

    with pytest.raises(RuntimeError, match="randomness"):
        vmap(draw)(x)
    eps = vmap(draw, randomness="same")(x)
    assert torch.equal(eps[0], eps[1]) and torch.equal(eps[0], eps[2])


_GPU = pytest.mark.gpu
_KERNEL_CALLS = {  # (the name of the argument given the tangent, the call)
    "q_sample": ("x0", lambda x, eps, backend: ops.q_sample(x, 3, SCHEDULE, seed=1, backend=backend)[0]),
    "group_norm_silu": ("x", lambda x, eps, backend: ops.group_norm_silu(x, 3, backend=backend)),
    "ddpm_step": ("x_t", lambda x, eps, backend: ops.ddpm_step(x, eps, 3, SCHEDULE, seed=1, backend=backend)),
}


@requires_extension
@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda", marks=_GPU), pytest.param("triton", marks=_GPU)])
@pytest.mark.parametrize("how", ["dual_tensors", "jvp", "jacfwd"])
@pytest.mark.parametrize("op", _KERNEL_CALLS)
def test_a_named_kernel_backend_refuses_a_forward_mode_tangent(op, how, backend):
    """No kernel has a forward-mode rule: with a backend named per call, the
    step's and the Triton ops' dropped the tangent silently (None from dual
    tensors, zeros from jvp and jacfwd); the C++ q_sample and group_norm_silu
    failed in torch's words, naming no argument."""
    device = "cpu" if backend == "cpu" else "cuda"
    g = torch.Generator().manual_seed(9)
    x, eps, v = (torch.randn(2, 6, 4, 4, generator=g).to(device) for _ in range(3))
    name, call = _KERNEL_CALLS[op]

    def f(x):
        return call(x, eps, backend)

    run = {"dual_tensors": lambda: _dual(f, x, v), "jvp": lambda: jvp(f, (x,), (v,)), "jacfwd": lambda: jacfwd(f)(x)}
    with pytest.raises(RuntimeError, match=f"{op}: {name} carries a forward-mode tangent .* the {backend} backend"):
        run[how]()


_TANGENT_ARGUMENTS = {"ddpm_step": ("eps", "noise", "out", "out_model_input"), "group_norm_silu": ("weight", "bias", "add"),
                      "q_sample": ("noise",)}


def _call_cpu_kernel(op, given):
    x = given["x"]
    if op == "ddpm_step":
        return ops.ddpm_step(x, given["eps"], 3, SCHEDULE, noise=given["noise"], out=given["out"],
                             out_model_input=given["out_model_input"], backend="cpu")
    if op == "q_sample":
        return ops.q_sample(x, 3, SCHEDULE, noise=given["noise"], backend="cpu")[0]
    return ops.group_norm_silu(x, 3, given["weight"], given["bias"], add=given["add"], backend="cpu")


@requires_extension
@pytest.mark.parametrize("op,dual", [(op, name) for op, names in _TANGENT_ARGUMENTS.items() for name in names])
def test_a_named_kernel_backend_refuses_a_tangent_on_any_argument(op, dual):
    x, w, b, add = _gn_inputs()
    g = torch.Generator().manual_seed(10)
    given = {"x": x, "weight": w, "bias": b, "add": add, "eps": torch.randn(x.shape, generator=g),
             "noise": torch.randn(x.shape, generator=g), "out": torch.empty_like(x), "out_model_input": torch.empty_like(x)}
    outside = _call_cpu_kernel(op, given).clone()
    with fwAD.dual_level():
        # no tangent anywhere: the kernel runs inside the dual level as outside it
        torch.testing.assert_close(_call_cpu_kernel(op, given), outside, rtol=0, atol=0)
        given[dual] = fwAD.make_dual(given[dual], torch.ones_like(given[dual]))
        with pytest.raises(RuntimeError, match=f"{op}: {dual} carries a forward-mode tangent"):
            _call_cpu_kernel(op, given)
