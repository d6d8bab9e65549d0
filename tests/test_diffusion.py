"""ddpm_fast.diffusion against independent float64 numpy formulas
(Ho et al. 2020, shared/DESIGN.md "The math, once").

Expectations are rebuilt in numpy from the betas; the code under test is only
ever the thing being checked. The bound in bits/dim has its own file,
test_bits_per_dim.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import host_to_device_copies
from ddpm_fast import NoiseSchedule
from ddpm_fast import diffusion as D
from ddpm_fast.schedules import TABLES

T = 40
SCHEDULES = {
    "linear": (NoiseSchedule("linear", timesteps=T, beta_start=1e-4, beta_end=0.05), np.linspace(1e-4, 0.05, T)),
    "cosine": (NoiseSchedule("cosine", timesteps=T), None),
}
_s = np.arange(T + 1) / T
_ab = np.cos((_s + 0.008) / 1.008 * np.pi / 2) ** 2
SCHEDULES["cosine"] = (SCHEDULES["cosine"][0], np.minimum(1 - _ab[1:] / _ab[:-1], 0.999))
SHAPE = (4, 3, 5, 6)
TOL = dict(rtol=1e-11, atol=1e-12)


def np_tables(b: np.ndarray) -> dict[str, np.ndarray]:
    a = 1.0 - b
    ab = np.cumprod(a)
    abp = np.concatenate([[1.0], ab[:-1]])
    pv = b * (1.0 - abp) / (1.0 - ab)
    return dict(
        b=b, a=a, ab=ab, abp=abp, pv=pv,
        c1=b * np.sqrt(abp) / (1.0 - ab),
        c2=(1.0 - abp) * np.sqrt(a) / (1.0 - ab),
        large=np.concatenate([[pv[1]], b[1:]]),
    )


def data(seed: int, shape=SHAPE, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale


def t_cases(n: int):
    """(t as passed, per-sample int index array): an int at both ends and inside,
    and per-sample int64 / int32 tensors covering 0 and T-1."""
    per = np.array([0, T - 1, 7, 23][:n])
    return [
        (0, np.zeros(n, int)),
        (T - 1, np.full(n, T - 1)),
        (13, np.full(n, 13)),
        (torch.tensor(per, dtype=torch.int64), per),
        (torch.tensor(per, dtype=torch.int32), per),
        (torch.tensor(5), np.full(n, 5)),  # 0-d tensor
    ]


def col(v: np.ndarray, ndim: int = len(SHAPE)) -> np.ndarray:
    """Per-sample values shaped to broadcast over (N, C, H, W)."""
    return v.reshape((-1,) + (1,) * (ndim - 1))


def close(got: torch.Tensor, want: np.ndarray, **tol) -> None:
    assert got.dtype == torch.float64
    g = np.broadcast_to(got.numpy(), want.shape) if got.shape != want.shape else got.numpy()
    np.testing.assert_allclose(g, want, **(tol or TOL))


params = pytest.mark.parametrize("sched", list(SCHEDULES))
t_params = pytest.mark.parametrize("case", range(6))


# ---------------------------------------------------------------- forward process


@params
@t_params
def test_q_sample_and_q_mean_variance(sched, case):
    """x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps; q(x_t|x0) = N(sqrt(abar) x0, 1-abar)."""
    s, b = SCHEDULES[sched]
    tb = np_tables(b)
    t, ti = t_cases(SHAPE[0])[case]
    x0, eps = data(0), data(1)
    ab = col(tb["ab"][ti])
    x0n, epsn = x0.numpy(), eps.numpy()
    out = D.q_sample(s, x0, t, eps)
    assert out.dtype == torch.float64 and out.shape == SHAPE
    close(out, np.sqrt(ab) * x0n + np.sqrt(1 - ab) * epsn)
    mean, var, logvar = D.q_mean_variance(s, x0, t)
    close(mean, np.sqrt(ab) * x0n)
    close(var, np.broadcast_to(1 - ab, SHAPE))
    close(logvar, np.broadcast_to(np.log(1 - ab), SHAPE))


def test_q_sample_float32_stays_float32():
    """float32 inputs give float32 outputs, equal to the float64 result to float32 rounding."""
    s, _ = SCHEDULES["linear"]
    x0, eps = data(0), data(1)
    t = torch.tensor([0, 3, T - 1, 20])
    out = D.q_sample(s, x0.float(), t, eps.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), D.q_sample(s, x0, t, eps), rtol=1e-6, atol=1e-6)


# Why: at the end of a T=1000 chain abar ~ 4e-5, so log(1 - abar) ~ -abar; taken as
# log of a rounded 1 - abar it keeps only ~1e-7 / abar of its digits (1.5e-4 relative
# in float32), which the prior term L_T reads.
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-14), (torch.float32, 1e-7)])
def test_q_log_variance_exact_where_abar_is_small(dtype, rtol):
    s = NoiseSchedule("linear", timesteps=1000)
    ab = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    t = torch.tensor([999, 900, 500])
    _, _, logvar = D.q_mean_variance(s, torch.zeros(3, 2, dtype=dtype), t)
    assert logvar.dtype == dtype
    np.testing.assert_allclose(logvar.double().numpy().ravel(), np.log1p(-ab[[999, 900, 500]]), rtol=rtol, atol=0.0)


# Why: a one-element t (shape (1,)) is a scalar timestep for the whole batch, as
# diffusers passes it; it must broadcast, not be refused as "one entry per sample".
def test_one_element_t_broadcasts_over_the_batch():
    s, b = SCHEDULES["linear"]
    ab = np_tables(b)["ab"][13]
    x0, eps = data(0), data(1)
    close(D.q_sample(s, x0, torch.tensor([13]), eps), np.sqrt(ab) * x0.numpy() + np.sqrt(1 - ab) * eps.numpy())
    mean, _, logvar = D.q_mean_variance(s, x0, torch.tensor([13], dtype=torch.int32))
    close(mean, np.sqrt(ab) * x0.numpy())
    close(logvar, np.full(SHAPE, np.log(1 - ab)))


@params
@t_params
def test_q_posterior(sched, case):
    """q(x_{t-1}|x_t,x0): mean c1 x0 + c2 x_t, variance beta~_t, log-variance with
    beta~_1 standing in for beta~_0 = 0."""
    s, b = SCHEDULES[sched]
    tb = np_tables(b)
    t, ti = t_cases(SHAPE[0])[case]
    x0, xt = data(2), data(3)
    mean, var, logvar = D.q_posterior_mean_variance(s, x0, xt, t)
    close(mean, col(tb["c1"][ti]) * x0.numpy() + col(tb["c2"][ti]) * xt.numpy())
    close(var, np.broadcast_to(col(tb["pv"][ti]), SHAPE))
    logpv = np.log(np.where(ti == 0, tb["pv"][1], tb["pv"][ti]))
    close(logvar, np.broadcast_to(col(logpv), SHAPE))


@params
@t_params
def test_predict_x0_eps_round_trip(sched, case):
    """x0_hat = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps, and predict_eps_from_x0 inverts it;
    applied to q_sample's output they recover x0 and eps."""
    s, b = SCHEDULES[sched]
    tb = np_tables(b)
    t, ti = t_cases(SHAPE[0])[case]
    x0, eps = data(4), data(5)
    xt = D.q_sample(s, x0, t, eps)
    ab = col(tb["ab"][ti])
    x0_hat = D.predict_x0_from_eps(s, xt, t, eps)
    close(x0_hat, np.sqrt(1 / ab) * xt.numpy() - np.sqrt(1 / ab - 1) * eps.numpy())
    close(x0_hat, x0.numpy(), rtol=1e-9, atol=1e-9)
    close(D.predict_eps_from_x0(s, xt, t, x0_hat), eps.numpy(), rtol=1e-9, atol=1e-9)
    close(D.predict_eps_from_x0(s, xt, t, x0), eps.numpy(), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- reverse process


@params
@t_params
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_p_mean_variance_eps(sched, case, variance):
    """eps-model, unclipped: mean (x_t - beta/sqrt(1-abar) eps)/sqrt(alpha) (eq. 11), which
    is algebraically the posterior mean of x0_hat; clipped: c1 clip(x0_hat) + c2 x_t.
    Variances: beta~_t (fixed_small) or [beta~_1, beta_1, ..., beta_{T-1}] (fixed_large)."""
    s, b = SCHEDULES[sched]
    tb = np_tables(b)
    t, ti = t_cases(SHAPE[0])[case]
    xt, eps = data(6), data(7, scale=2.0)
    xtn, epsn = xt.numpy(), eps.numpy()
    ab, a, c1, c2 = (col(tb[k][ti]) for k in ("ab", "a", "c1", "c2"))
    x0_hat = np.sqrt(1 / ab) * xtn - np.sqrt(1 / ab - 1) * epsn

    p = D.p_mean_variance(s, eps, xt, t, mean_type="eps", variance=variance)
    eq11 = (xtn - col(tb["b"][ti]) / np.sqrt(1 - ab) * epsn) / np.sqrt(a)
    close(p.mean, eq11)
    close(p.pred_x0, x0_hat)
    # eq. 11 and the posterior-mean form agree (float64, to 1e-10)
    np.testing.assert_allclose(eq11, c1 * x0_hat + c2 * xtn, rtol=1e-10, atol=1e-10)
    close(p.mean, c1 * x0_hat + c2 * xtn, rtol=1e-10, atol=1e-10)

    pc = D.p_mean_variance(s, eps, xt, t, mean_type="eps", variance=variance, clip_denoised=True)
    assert np.abs(x0_hat).max() > 1  # the clip is exercised
    close(pc.pred_x0, np.clip(x0_hat, -1, 1))
    close(pc.mean, c1 * np.clip(x0_hat, -1, 1) + c2 * xtn)

    want_var = tb["pv"][ti] if variance == "fixed_small" else tb["large"][ti]
    want_logvar = np.log(np.where(ti == 0, tb["pv"][1], want_var))
    for out in (p, pc):
        assert out.variance.shape == out.log_variance.shape == SHAPE
        close(out.variance, np.broadcast_to(col(want_var), SHAPE))
        close(out.log_variance, np.broadcast_to(col(want_logvar), SHAPE))


def test_fixed_large_at_t0_is_posterior_variance_1():
    """The original code uses beta~_1, not beta_1, as the fixed_large variance at t = 0."""
    s, b = SCHEDULES["linear"]
    pv1 = np_tables(b)["pv"][1]
    p = D.p_mean_variance(s, data(0), data(1), 0, variance="fixed_large")
    np.testing.assert_allclose(p.variance.numpy(), pv1, rtol=1e-12)
    assert not np.allclose(pv1, b[0])


@params
@pytest.mark.parametrize("clip", [False, True])
def test_p_mean_variance_x0(sched, clip):
    """x0-model: pred_x0 is the output (clipped if asked) and the mean its posterior mean."""
    s, b = SCHEDULES[sched]
    tb = np_tables(b)
    t, ti = t_cases(SHAPE[0])[3]
    xt, x0 = data(8), data(9, scale=1.5)
    want_x0 = np.clip(x0.numpy(), -1, 1) if clip else x0.numpy()
    p = D.p_mean_variance(s, x0, xt, t, mean_type="x0", variance="fixed_small", clip_denoised=clip)
    close(p.pred_x0, want_x0)
    close(p.mean, col(tb["c1"][ti]) * want_x0 + col(tb["c2"][ti]) * xt.numpy())


@pytest.mark.parametrize("x_dtype, out_dtype", [(torch.float32, torch.bfloat16), (torch.float64, torch.float32)])
def test_p_mean_variance_gives_pred_x0_in_the_computation_dtype(x_dtype, out_dtype):
    """An x0-model's output in another dtype is cast to x_t's dtype, in which
    everything is computed (float64 in, float64 out): pred_x0 is not the
    model's tensor as it came, clipped or not."""
    s = SCHEDULES["linear"][0]
    x_t = torch.linspace(-2, 2, 16, dtype=x_dtype).reshape(2, 1, 2, 4)
    out = torch.linspace(-1.5, 1.5, 16).reshape(2, 1, 2, 4).to(out_dtype)
    for clip in (False, True):
        p = D.p_mean_variance(s, out, x_t, 3, mean_type="x0", clip_denoised=clip)
        assert p.pred_x0.dtype == p.mean.dtype == x_dtype


# Why: with float64 input and an int t, the variances and log-variances came
# back as views of the schedule's own tables (the .to() was a no-op), so a
# caller's in-place edit (var.sqrt_(), a clamp_) rewrote the schedule for every
# later call: q_mean_variance, the posterior, p_mean_variance and bits/dim.
def test_returned_rows_are_not_views_of_the_schedule():
    s = NoiseSchedule("linear", timesteps=10)
    tables = {name: getattr(s, name).clone() for name in TABLES}
    x0 = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    x_t = torch.ones_like(x0)
    for result in (D.q_mean_variance(s, x0, 5), D.q_posterior_mean_variance(s, x0, x_t, 5)):
        for value in result:
            value.add_(1.0)
    for variance in ("fixed_large", "fixed_small"):
        p = D.p_mean_variance(s, torch.zeros(1), torch.ones(1, dtype=torch.float64), 5, variance=variance)
        p.variance.clamp_(min=0.5)
        p.log_variance.zero_()
    D.extract(s.one_minus_alphas_cumprod, 5, x0).mul_(3.0)
    for name, before in tables.items():
        assert torch.equal(getattr(s, name), before), name


# ---------------------------------------------------------------- likelihood pieces


def test_normal_kl_closed_form():
    """KL(N(m1,s1^2)||N(m2,s2^2)) = log(s2/s1) + (s1^2 + (m1-m2)^2)/(2 s2^2) - 1/2."""
    m1, m2 = data(10, (50,)), data(11, (50,))
    lv1, lv2 = data(12, (50,)), data(13, (50,))
    s1, s2 = np.exp(0.5 * lv1.numpy()), np.exp(0.5 * lv2.numpy())
    want = np.log(s2 / s1) + (s1**2 + (m1.numpy() - m2.numpy()) ** 2) / (2 * s2**2) - 0.5
    close(D.normal_kl(m1, lv1, m2, lv2), want, rtol=1e-12, atol=1e-14)
    # identical Gaussians: 0 up to rounding of (-1 + lv2) - lv1 + 1
    assert D.normal_kl(m1, lv1, m1, lv1).abs().max().item() < 1e-15


@pytest.mark.parametrize("mean", [0.0, 0.3, -0.97, 1.0])
@pytest.mark.parametrize("scale", [0.003, 0.05, 0.5, 3.0])
def test_discretized_likelihood_sums_to_one(mean, scale):
    """The 256 bins x = -1 + 2k/255 (edge bins open to +-inf) carry all the mass;
    an interior bin's mass is close to the exact Gaussian mass (tanh CDF approx.)."""
    x = torch.tensor([-1 + 2 * k / 255 for k in range(256)], dtype=torch.float64)
    ll = D.discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, math.log(scale)))
    assert ll.dtype == torch.float64 and torch.all(ll <= 1e-12)
    assert ll.exp().sum().item() == pytest.approx(1.0, abs=1e-8)
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    k = 128
    exact = phi((x[k].item() + 1 / 255 - mean) / scale) - phi((x[k].item() - 1 / 255 - mean) / scale)
    assert ll[k].exp().item() == pytest.approx(exact, rel=1e-2, abs=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_discretized_likelihood_keeps_its_tails_in_low_precision(dtype):
    """A bin 4-6 standard deviations out: 16- and 32-bit inputs give float64's log p
    (in their own dtype). Computed in float32, the CDF difference cancelled: -16.64
    instead of -16.77 at -5 sd, -15.94 at +5 sd, -27.63 (the clamp) instead of -24.53 at 6."""
    x = torch.zeros(5, dtype=torch.float64)
    means = torch.tensor([0.2, -0.2, 0.25, -0.25, 0.3], dtype=torch.float64)
    log_scales = torch.full_like(x, math.log(0.05))
    want = D.discretized_gaussian_log_likelihood(x, means, log_scales)
    got = D.discretized_gaussian_log_likelihood(x.to(dtype), means.to(dtype), log_scales.to(dtype))
    assert got.dtype == dtype
    exact_inputs = D.discretized_gaussian_log_likelihood(x, means.to(dtype).double(), log_scales.to(dtype).double())
    np.testing.assert_allclose(got.double().numpy(), exact_inputs.to(dtype).double().numpy(), rtol=0, atol=0)
    if dtype == torch.float32:
        np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=1e-6)


def test_loss_simple_is_per_sample_mse():
    eps, pred = data(14), data(15)
    want = ((eps.numpy() - pred.numpy()) ** 2).mean(axis=(1, 2, 3))
    got = D.loss_simple(eps, pred)
    assert got.shape == (SHAPE[0],) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    assert torch.all(D.loss_simple(eps, eps) == 0)


# ---------------------------------------------------------------- bad input

S, _ = SCHEDULES["linear"]


def test_bad_mean_type_and_variance():
    x = data(0)
    with pytest.raises(ValueError, match="mean_type"):
        D.p_mean_variance(S, x, x, 3, mean_type="v")
    with pytest.raises(ValueError, match="variance"):
        D.p_mean_variance(S, x, x, 3, variance="learned")


def test_shape_mismatch():
    x = data(0)
    with pytest.raises(ValueError, match="shape"):
        D.p_mean_variance(S, x[:, :, :, :-1], x, 3)
    with pytest.raises(ValueError, match="shape"):
        D.p_mean_variance(S, x[:1], x, 3)  # broadcastable, still an error
    with pytest.raises(ValueError, match="shape"):
        D.loss_simple(x, x[:1])
    with pytest.raises(ValueError, match="noise has shape"):
        D.q_sample(S, x[:1], 3, x)  # broadcastable noise is still an error


@pytest.mark.parametrize("t", [T, -1, 10**6, torch.tensor([0, 1, T, 2]), torch.tensor([-1, 0, 0, 0]), torch.tensor(T)])
def test_t_out_of_range(t):
    with pytest.raises(ValueError, match="out of range"):
        D.q_sample(S, data(0), t, data(1))
    with pytest.raises(ValueError, match="out of range"):
        D.p_mean_variance(S, data(0), data(1), t)


@pytest.mark.parametrize("t", [torch.zeros(4, 1, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), torch.zeros(5, dtype=torch.int64)])
def test_t_wrong_shape(t):
    with pytest.raises(ValueError, match="one entry per sample"):
        D.q_sample(S, data(0), t, data(1))


@pytest.mark.parametrize("t", [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor(3.0), 3.0, torch.tensor([True] * 4), True])
def test_t_float_dtype(t):
    with pytest.raises(TypeError, match="integer"):
        D.q_sample(S, data(0), t, data(1))


def test_t_of_any_integer_type():
    """numpy integers and integer tensors of any width are timesteps, as in ops."""
    x, noise = data(0), data(1)
    want = D.q_sample(S, x, torch.tensor([3, 5, 0, 39]), noise)
    assert torch.equal(D.q_sample(S, x, torch.tensor([3, 5, 0, 39], dtype=torch.uint8), noise), want)
    assert torch.equal(D.q_sample(S, x, torch.tensor([3, 5, 0, 39], dtype=torch.int16), noise), want)
    for dtype in (torch.uint16, torch.uint32, torch.uint64):  # min/max of these were not implemented
        assert torch.equal(D.q_sample(S, x, torch.tensor([3, 5, 0, 39], dtype=dtype), noise), want)
    with pytest.raises(ValueError, match="out of range"):  # 2^63 + 3 wraps negative as int64
        D.q_sample(S, x, torch.tensor([2**63 + 3, 5, 0, 39], dtype=torch.uint64), noise)
    assert torch.equal(D.q_sample(S, x, np.int64(7), noise), D.q_sample(S, x, 7, noise))
    with pytest.raises(TypeError, match="got numpy.float64"):
        D.q_sample(S, x, np.float64(7), noise)


# ---------------------------------------------------------------- device tables


@pytest.mark.parametrize("name", TABLES)
def test_cached_tables_give_extract_bitwise(name):
    """The functions read the schedule's tables through _extract (a copy per
    device, cached): bitwise what extract gives from the table itself."""
    sched = SCHEDULES["cosine"][0]
    table = getattr(sched, name)
    x = data(0).float()
    for t, _ in t_cases(SHAPE[0]):
        assert torch.equal(D._extract(sched, name, t, x), D.extract(table, t, x)), t


def test_vb_terms_copy_the_tables_to_the_device_once():
    """The vlb loss reads ~8 tables per step: each used to be copied to the
    device on every call (a synchronizing host-to-device copy). Meta tensors
    stand in for the device."""
    sched = NoiseSchedule("linear", timesteps=T)
    x0, x_t, out = (torch.randn(SHAPE, device="meta") for _ in range(3))
    t = torch.tensor([0, 3, 9, T - 1], device="meta")

    def step():
        D.vb_terms_bpd(sched, out, x0, x_t, t)
        D.q_mean_variance(sched, x0, 5)  # an int t: the table on x's device too

    assert host_to_device_copies(step)[1] > 0
    assert host_to_device_copies(step)[1] == 0


def test_device_tables_follow_changes_to_the_schedule():
    """A table changed in place or replaced is copied again; the copies live on
    the schedule, so they go with it."""
    import gc
    import weakref

    sched = NoiseSchedule("linear", timesteps=T)
    meta = torch.device("meta")
    first = D._device_table(sched, "betas", meta)
    assert D._device_table(sched, "betas", meta) is first
    sched.betas.mul_(1.0)  # in place: a new version
    second = D._device_table(sched, "betas", meta)
    assert second is not first and D._device_table(sched, "betas", meta) is second
    sched.betas = sched.betas.clone()  # replaced
    assert D._device_table(sched, "betas", meta) is not second
    assert D._device_table(sched, "sqrt_alphas_cumprod", torch.device("cpu")) is sched.sqrt_alphas_cumprod  # no copy
    alive = weakref.ref(sched)
    del sched
    gc.collect()
    assert alive() is None


def test_device_tables_of_an_inference_mode_schedule():
    with torch.inference_mode():
        sched = NoiseSchedule("linear", timesteps=T)
        in_mode = D._device_table(sched, "betas", torch.device("meta"))
    assert D._device_table(sched, "betas", torch.device("meta")) is in_mode
    assert not in_mode.is_inference()  # usable by autograd later
    with torch.inference_mode():  # changed in place there too: a new copy
        sched.betas.mul_(2.0)
    assert D._device_table(sched, "betas", torch.device("meta")) is not in_mode
    with torch.inference_mode():  # a table replaced by an inference tensor, which has no version counter
        sched.betas = sched.betas * 1.0
    replaced = D._device_table(sched, "betas", torch.device("meta"))
    with torch.inference_mode():
        sched.betas.mul_(2.0)
    assert D._device_table(sched, "betas", torch.device("meta")) is not replaced


@pytest.mark.parametrize("t", [2, torch.tensor([2, 1])], ids=["int", "tensor"])
def test_a_schedule_made_under_inference_mode_is_differentiable_in_float64(t):
    """Its tables were inference tensors: float64 rows taken with an int t are
    the table itself, which autograd may not save ('Inference tensors cannot be
    saved for backward'), so q_sample, p_mean_variance and vb_terms_bpd failed."""
    with torch.inference_mode():
        schedule = NoiseSchedule("linear", timesteps=T)
        respaced = schedule.respace([0, 4, 9])
    for sched in (schedule, respaced):
        x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
        D.q_sample(sched, x, t, torch.zeros_like(x)).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
