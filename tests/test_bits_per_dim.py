"""ddpm_fast.diffusion.bits_per_dim, the variational bound in bits/dim (Ho et
al. 2020 eqs. 5-7, 11; the discretized decoder of section 3.3), against
closed forms rebuilt in float64 numpy from the betas; and its bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm_fast import NoiseSchedule
from ddpm_fast import diffusion as D
from test_diffusion import SCHEDULES, data, np_tables

S, _ = SCHEDULES["linear"]
BPD_SCHED = NoiseSchedule("linear", timesteps=20, beta_start=1e-3, beta_end=0.2)
BPD_T = np_tables(np.linspace(1e-3, 0.2, 20))
BPD_SHAPE = (3, 2, 4, 4)


def bpd_data() -> torch.Tensor:
    """Data on the 256-level grid in [-1, 1], including both edges."""
    k = torch.randint(0, 256, BPD_SHAPE, generator=torch.Generator().manual_seed(3))
    k[0, 0, 0, 0], k[0, 0, 0, 1] = 0, 255
    return (-1 + 2 * k / 255).double()


def run_bpd(model, seed=0, **kw):
    return D.bits_per_dim(model, bpd_data(), BPD_SCHED, generator=torch.Generator().manual_seed(seed), **kw)


def oracle(x0):
    """A model that predicts eps exactly: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
    ab = torch.from_numpy(BPD_T["ab"])
    return lambda xt, t: (xt - ab[t].sqrt().view(-1, 1, 1, 1) * x0) / (1 - ab[t]).sqrt().view(-1, 1, 1, 1)


def test_bpd_structure_and_prior():
    """total = prior + sum of terms; terms[:, 0] is the decoder; all finite and >= 0;
    prior = KL(N(sqrt(abar_T) x0, 1-abar_T) || N(0,1)) / ln 2, averaged over dims."""
    r = run_bpd(lambda x, t: 0.1 * x)
    n = BPD_SHAPE[0]
    assert r.total.shape == r.prior.shape == (n,) and r.terms.shape == r.mse.shape == (n, 20)
    assert r.total.dtype == torch.float64
    np.testing.assert_allclose(r.total.numpy(), (r.prior + r.terms.sum(1)).numpy(), rtol=1e-10, atol=1e-10)
    assert torch.equal(r.decoder, r.terms[:, 0])
    assert torch.isfinite(r.terms).all() and (r.terms >= 0).all()
    m, v = math.sqrt(BPD_T["ab"][-1]) * bpd_data().numpy(), 1 - BPD_T["ab"][-1]
    kl = 0.5 * (-1 - math.log(v) + v + m**2)
    np.testing.assert_allclose(r.prior.numpy(), kl.mean(axis=(1, 2, 3)) / math.log(2), rtol=1e-12)


def test_bpd_reproducible_with_generator():
    """Same seed -> identical result; another seed -> different noise and terms."""
    model = lambda x, t: 0.1 * x  # noqa: E731
    a, b, c = run_bpd(model, 0), run_bpd(model, 0), run_bpd(model, 1)
    assert torch.equal(a.total, b.total) and torch.equal(a.terms, b.terms)
    assert not torch.equal(a.terms, c.terms)
    assert torch.equal(a.prior, c.prior)  # the prior does not depend on noise


def test_bpd_takes_its_noise_from_noise_fn():
    """noise_fn(t) supplies each timestep's noise: the same noise as a generator's
    gives the same bound; it excludes a generator, and must give x0's shape."""
    model = lambda x, t: 0.1 * x  # noqa: E731
    x0 = bpd_data()
    g = torch.Generator().manual_seed(4)
    drawn = {t: torch.randn(x0.shape, generator=g, dtype=torch.float64) for t in reversed(range(BPD_SCHED.num_timesteps))}
    got = D.bits_per_dim(model, x0, BPD_SCHED, noise_fn=drawn.__getitem__)
    want = run_bpd(model, 4)
    assert torch.equal(got.total, want.total) and torch.equal(got.terms, want.terms)
    with pytest.raises(ValueError, match="generator or noise_fn, not both"):
        D.bits_per_dim(model, x0, BPD_SCHED, generator=g, noise_fn=drawn.__getitem__)
    with pytest.raises(ValueError, match=r"noise_fn\(\d+\) must give a tensor of x0's shape"):
        D.bits_per_dim(model, x0, BPD_SCHED, noise_fn=lambda t: torch.zeros(1))


def test_bpd_on_a_respaced_schedule_calls_the_model_with_original_timesteps():
    """Index k of a respaced schedule is timestep timestep_map[k] of the model's
    training chain: the full schedule's oracle predicts eps exactly there only
    if it is called with that original timestep."""
    respaced = BPD_SCHED.respace([0, 3, 9, 14, 19])
    seen = []

    def model(x_t, t):
        seen.extend(t.tolist())
        return oracle(bpd_data())(x_t, t)

    r = D.bits_per_dim(model, bpd_data(), respaced, generator=torch.Generator().manual_seed(0))
    assert sorted(set(seen)) == [0, 3, 9, 14, 19] and r.terms.shape[1] == 5
    assert r.mse.max().item() < 1e-20


def test_bpd_oracle_closed_form():
    """With the exact eps, p's mean is the true posterior mean, so each KL term is the
    variance mismatch alone: 0 for fixed_small, and for fixed_large
    (log(s2/s1) + s1/s2 - 1)/2/ln 2 with s1 = beta~_t, s2 = beta_t. The decoder is
    -log P(bin of x0 | N(x0, beta~_1)) under the tanh CDF, per dim."""
    x0 = bpd_data()
    small = run_bpd(oracle(x0), variance="fixed_small")
    np.testing.assert_allclose(small.terms[:, 1:].numpy(), 0.0, atol=1e-10)
    np.testing.assert_allclose(small.mse.numpy(), 0.0, atol=1e-20)

    large = run_bpd(oracle(x0), variance="fixed_large")
    pv, b = BPD_T["pv"][1:], BPD_T["b"][1:]
    want = 0.5 * (np.log(b / pv) + pv / b - 1) / math.log(2)
    np.testing.assert_allclose(large.terms[:, 1:].numpy(), np.broadcast_to(want, (3, 19)), rtol=1e-9)

    # decoder at t = 0: mean x0, std sqrt(beta~_1) in both variance types
    cdf = lambda z: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))  # noqa: E731
    h = (1 / 255) / math.sqrt(BPD_T["pv"][1])
    xn = x0.numpy()
    p = np.where(np.abs(xn) > 0.999, cdf(h), cdf(h) - cdf(-h))
    dec = -np.log(p).mean(axis=(1, 2, 3)) / math.log(2)
    np.testing.assert_allclose(small.decoder.numpy(), dec, rtol=1e-9)
    np.testing.assert_allclose(large.decoder.numpy(), dec, rtol=1e-9)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_bpd_terms_of_an_imperfect_model_closed_form(variance, clip):
    """For eps_theta(x_t) = 0.1 x_t each term is the KL between the true posterior
    q(x_{t-1} | x_t, x0) and a Gaussian of another mean (Ho et al. eqs. 5-7; the
    mean of eq. 11, or with x0 clipped the posterior mean at the clipped x0), and
    the decoder scores x0's bin under N(mu_theta(x_0, 0), beta~_1); all rebuilt
    here in numpy from the betas and the same noise."""
    x0 = bpd_data()
    g = torch.Generator().manual_seed(5)
    noise = {t: torch.randn(x0.shape, generator=g, dtype=torch.float64) for t in reversed(range(20))}
    r = D.bits_per_dim(lambda x, t: 0.1 * x, x0, BPD_SCHED, variance=variance, clip_denoised=clip, noise_fn=noise.__getitem__)
    b, ab, abp, pv = (BPD_T[k] for k in ("b", "ab", "abp", "pv"))
    xn = x0.numpy()
    cdf = lambda z: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))  # noqa: E731
    for t in range(20):
        e = noise[t].numpy()
        xt = np.sqrt(ab[t]) * xn + np.sqrt(1 - ab[t]) * e
        eps = 0.1 * xt
        posterior_mean = lambda x: np.sqrt(abp[t]) * b[t] / (1 - ab[t]) * x + np.sqrt(1 - b[t]) * (1 - abp[t]) / (1 - ab[t]) * xt  # noqa: E731
        if clip:
            mean_p = posterior_mean(np.clip((xt - np.sqrt(1 - ab[t]) * eps) / np.sqrt(ab[t]), -1, 1))
        else:
            mean_p = (xt - b[t] / np.sqrt(1 - ab[t]) * eps) / np.sqrt(1 - b[t])  # eq. 11
        np.testing.assert_allclose(r.mse[:, t].numpy(), ((e - eps) ** 2).mean(axis=(1, 2, 3)), rtol=1e-10)
        if t == 0:  # the decoder: std sqrt(beta~_1) in both variance types
            h, c = (1 / 255) / np.sqrt(pv[1]), (xn - mean_p) / np.sqrt(pv[1])
            p = np.where(xn < -0.999, cdf(c + h), np.where(xn > 0.999, 1 - cdf(c - h), cdf(c + h) - cdf(c - h)))
            want = -np.log(p).mean(axis=(1, 2, 3)) / math.log(2)
        else:
            mean_q = posterior_mean(xn)
            var_p = pv[t] if variance == "fixed_small" else b[t]
            kl = 0.5 * (-1 + np.log(var_p / pv[t]) + pv[t] / var_p + (mean_q - mean_p) ** 2 / var_p)
            want = kl.mean(axis=(1, 2, 3)) / math.log(2)
        np.testing.assert_allclose(r.terms[:, t].numpy(), want, rtol=1e-9, err_msg=f"t={t}")
    assert (r.terms[:, 1:] > 1e-3).all()  # the mean mismatch counts: far from the oracle's terms


def test_float32_where_abar_underflows_float32_coefficients():
    """abar_999 = 4.9e-134: 1/sqrt(abar) overflows float32. The implied x0 is then
    +-inf (clipped to +-1), not inf - inf = NaN, and float32 data gets the
    float64 bound to float32 accuracy."""
    schedule = NoiseSchedule("linear", timesteps=1000, beta_end=0.5)
    x, eps = data(20, scale=2.0), data(21)
    for t in (999, 600):
        got = D.p_mean_variance(schedule, eps.float(), x.float(), t, clip_denoised=True).mean
        want = D.p_mean_variance(schedule, eps, x, t, clip_denoised=True).mean
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    # 1/sqrt(abar_738) = 1.5e34: finite in float32, and the unclipped x0 is float64's to
    # float32's rounding of the difference x_t - eps (a cap at 2^100, as the step tables',
    # shrank it 1e4-fold)
    assert 2.0**100 < schedule.sqrt_recip_alphas_cumprod[738] < torch.finfo(torch.float32).max
    got = D.predict_x0_from_eps(schedule, x.float(), 738, eps.float())
    np.testing.assert_allclose(got.numpy(), D.predict_x0_from_eps(schedule, x, 738, eps).numpy(), rtol=1e-4)
    x0 = bpd_data()
    g = torch.Generator().manual_seed(6)
    noise = {t: torch.randn(x0.shape, generator=g, dtype=torch.float64) for t in range(1000)}
    got = D.bits_per_dim(lambda x, t: 0.1 * x, x0.float(), schedule, noise_fn=lambda t: noise[t].float())
    want = D.bits_per_dim(lambda x, t: 0.1 * x, x0, schedule, noise_fn=noise.__getitem__)
    np.testing.assert_allclose(got.total.numpy(), want.total.numpy(), rtol=1e-4)
    # eps = x_t, the optimum where abar_t ~ 0: the implied x0 is 0 in float64, and was
    # inf * 0 = NaN in float32 (every term from such timesteps on: a NaN bound)
    got = D.bits_per_dim(lambda x, t: x.clone(), x0.float(), schedule, noise_fn=lambda t: noise[t].float())
    want = D.bits_per_dim(lambda x, t: x.clone(), x0, schedule, noise_fn=noise.__getitem__)
    np.testing.assert_allclose(got.total.numpy(), want.total.numpy(), rtol=1e-4)


def test_bpd_better_model_scores_lower():
    """The exact-eps model beats a zero model and a 0.1*x model; an x0-oracle matches it."""
    x0 = bpd_data()
    best = run_bpd(oracle(x0)).total
    assert torch.all(best < run_bpd(lambda x, t: torch.zeros_like(x)).total)
    assert torch.all(best < run_bpd(lambda x, t: 0.1 * x).total)
    x0_oracle = run_bpd(lambda x, t: x0.clone(), mean_type="x0")
    np.testing.assert_allclose(x0_oracle.total.numpy(), best.numpy(), rtol=1e-8)
    assert x0_oracle.mse.abs().max().item() == 0  # an x0 model's mse is against x0, not the noise


# ---------------------------------------------------------------- bad input


def test_bpd_bad_mean_type():
    with pytest.raises(ValueError, match="mean_type"):
        D.bits_per_dim(lambda x, t: x, bpd_data(), BPD_SCHED, mean_type="start_x")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bpd_of_16_bit_data_is_that_of_its_256_levels(dtype):
    """16-bit floats cannot hold k / 127.5 - 1 (bfloat16 misses by up to a quarter
    of a bin): the bound of such data is that of the levels it stands for, not of
    the off-grid values (bfloat16 moved the total by 0.006 bits/dim)."""
    model = lambda x, t: 0.1 * x  # noqa: E731
    x0 = bpd_data().float()
    assert not torch.equal(x0.to(dtype).float(), x0)  # off the grid as stored
    want = D.bits_per_dim(model, x0, BPD_SCHED, generator=torch.Generator().manual_seed(0))
    got = D.bits_per_dim(model, x0.to(dtype), BPD_SCHED, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got.total, want.total) and torch.equal(got.terms, want.terms)


def test_bpd_bad_x0():
    with pytest.raises(ValueError, match="non-empty batch"):
        D.bits_per_dim(lambda x, t: x, torch.zeros(5, dtype=torch.float64), BPD_SCHED)
    with pytest.raises(TypeError, match="floating"):
        D.bits_per_dim(lambda x, t: x, torch.zeros(2, 3, dtype=torch.int64), BPD_SCHED)


@pytest.mark.parametrize("scale", [1.01, 127.5, -2.0])
def test_bpd_refuses_data_outside_minus_one_one(scale):
    """The decoder bins [-1, 1] data (uint8 / 127.5 - 1); other data got a bound
    of hundreds of bits/dim silently. Checked before the model runs."""
    never = lambda x, t: pytest.fail("the model ran on data outside [-1, 1]")  # noqa: E731
    with pytest.raises(ValueError, match=r"x0 must be data in \[-1, 1\]"):
        D.bits_per_dim(never, bpd_data() * scale, BPD_SCHED)
    with pytest.raises(ValueError, match=r"x0 must be data in \[-1, 1\] .*nan"):
        D.bits_per_dim(never, torch.full(BPD_SHAPE, float("nan")), BPD_SCHED)


def test_bpd_allows_float_error_at_the_edges():
    x0 = bpd_data()
    x0[0, 0, 0, 0], x0[0, 0, 0, 1] = -1 - 1e-7, 1 + 1e-7
    assert torch.isfinite(D.bits_per_dim(lambda x, t: 0.1 * x, x0, BPD_SCHED).total).all()


def test_bpd_refuses_a_model_output_that_is_not_a_tensor():
    """A model returning (eps, extra) failed with AttributeError ('tuple' object has no
    attribute 'shape'); p_mean_variance and vb_terms_bpd, which bits_per_dim calls, say so."""
    with pytest.raises(TypeError, match=r"model output must be a torch.Tensor of x_t's shape \(3, 2, 4, 4\), got a tuple"):
        run_bpd(lambda x, t: (0.1 * x, None))
    x = data(0)
    with pytest.raises(TypeError, match="model output must be a torch.Tensor .*got a dict"):
        D.vb_terms_bpd(S, {"sample": x}, x, x, 3)
    with pytest.raises(TypeError, match="model output must be a torch.Tensor .*got a list"):
        D.p_mean_variance(S, x.tolist(), x, 3)


def test_bits_per_dim_refuses_eps_where_x0_is_undefined():
    """jsd's abar_{T-1} = 0: x0 from eps divides by zero there (NaN before this check);
    an x0-predicting model is still evaluated."""
    s = NoiseSchedule("jsd", timesteps=10)
    x0 = torch.rand(2, 1, 4, 4, dtype=torch.float64) * 2 - 1
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match="undefined at timestep 9"):
        D.bits_per_dim(model, x0, s, mean_type="eps")
    assert torch.isfinite(D.bits_per_dim(model, x0, s, mean_type="x0").total).all()


@pytest.mark.parametrize("clip", [True, False])
def test_bits_per_dim_refuses_eps_where_only_abar_underflows(clip):
    """const beta 0.9 over 400 steps: abar underflows to 0 from t = 308 while
    alpha_t stays 0.1, so only x0 from eps (which every term needs, clipped or
    not) is undefined there; a check of the unclipped step alone passes it, and
    the bound came out NaN."""
    s = NoiseSchedule("const", timesteps=400, beta_end=0.9)
    x0 = torch.rand(2, 1, 4, 4, dtype=torch.float64) * 2 - 1
    model = lambda x, t: x.clone()  # noqa: E731
    with pytest.raises(ValueError, match="undefined at timestep 308"):
        D.bits_per_dim(model, x0, s, mean_type="eps", clip_denoised=clip)
    assert torch.isfinite(D.bits_per_dim(model, x0, s, mean_type="x0", clip_denoised=clip).total).all()


@pytest.mark.parametrize("x, mean", [(-1.0, 1.0), (1.0, -1.0)], ids=["left-edge", "right-edge"])
def test_decoder_likelihood_of_an_edge_bin_far_off_is_floored_not_infinite(x, mean):
    """The edge bin's CDF underflows to 0 ten standard deviations (of 2^-5...)
    away: log 0 gave -inf bits/dim and NaN gradients in the vlb/hybrid losses;
    the original floors it at 1e-12."""
    x = torch.tensor([x], dtype=torch.float64)
    mean = torch.tensor([mean], dtype=torch.float64, requires_grad=True)
    log_p = D.discretized_gaussian_log_likelihood(x, mean, torch.tensor([-5.0], dtype=torch.float64))
    assert log_p.item() == pytest.approx(math.log(1e-12))
    log_p.sum().backward()
    assert torch.isfinite(mean.grad).all()


@pytest.mark.parametrize("t, error, message", [
    (-1, ValueError, r"timestep -1 is out of range \[0, 10\)"),  # indexing would wrap to the last entry
    (10, ValueError, r"timestep 10 is out of range \[0, 10\)"),
    (torch.tensor([0, 10]), ValueError, r"timesteps out of range \[0, 10\): min 0, max 10"),
    (True, TypeError, "t must be an int or an integer tensor, got a bool"),
    (torch.tensor([0.5, 1.0]), TypeError, "got a torch.float32 tensor"),
    (torch.tensor([1, 2, 3]), ValueError, r"one entry per sample \(2\), got shape \(3,\)"),
])
def test_public_extract_checks_its_timesteps(t, error, message):
    with pytest.raises(error, match=message):
        D.extract(torch.arange(10.0), t, torch.zeros(2, 3))


# Why: vb_terms_bpd takes an int t as well as a tensor; at t = 0 the term must be the
# decoder NLL (eq. 5's L_0), not a KL, whichever form t comes in.
@pytest.mark.parametrize("t", [0, 1, 19])
def test_vb_terms_int_t_is_the_same_term_as_tensor_t(t):
    x0 = bpd_data()
    noise = data(7, BPD_SHAPE)
    t_vec = torch.full((BPD_SHAPE[0],), t, dtype=torch.int64)
    x_t = D.q_sample(BPD_SCHED, x0, t_vec, noise)
    out = oracle(x0)(x_t, t_vec)  # the exact eps: p's mean is the true posterior mean
    got_int, _ = D.vb_terms_bpd(BPD_SCHED, out, x0, x_t, t, variance="fixed_large")
    got_vec, _ = D.vb_terms_bpd(BPD_SCHED, out, x0, x_t, t_vec, variance="fixed_large")
    pv, b = BPD_T["pv"], BPD_T["b"]
    if t == 0:  # -log P(bin of x0 | N(x0, beta~_1)) per dim, tanh CDF
        cdf = lambda z: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))  # noqa: E731
        h = (1 / 255) / math.sqrt(pv[1])
        xn = x0.numpy()
        want = -np.log(np.where(np.abs(xn) > 0.999, cdf(h), cdf(h) - cdf(-h))).mean(axis=(1, 2, 3)) / math.log(2)
    else:  # same mean: the variance mismatch KL(N(., beta~_t) || N(., beta_t)) alone
        want = np.full(BPD_SHAPE[0], 0.5 * (np.log(b[t] / pv[t]) + pv[t] / b[t] - 1) / math.log(2))
    np.testing.assert_allclose(got_vec.numpy(), want, rtol=1e-9)
    np.testing.assert_allclose(got_int.numpy(), want, rtol=1e-9)
