"""Edge cases of NoiseSchedule / make_betas that test_schedules.py leaves open:
the (0, 1] bounds of beta_start / beta_end, a one-step schedule, and respacing a
schedule whose last abar is 0 (jsd). Expectations come from the definitions in
shared/DESIGN.md, computed here in float64 numpy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm_fast import NoiseSchedule, Sampler
from ddpm_fast.schedules import make_betas


# Why: a beta bound of exactly 0 must be refused by the bound check itself; "const"
# ignores beta_start, so nothing downstream would catch a 0 that slipped through.
@pytest.mark.parametrize("call", [
    lambda: make_betas("linear", 5, beta_start=0.0),
    lambda: make_betas("warmup10", 20, beta_start=0.0),
    lambda: NoiseSchedule("const", timesteps=5, beta_start=0.0),
    lambda: make_betas("quad", 5, beta_end=0.0),
    lambda: make_betas("linear", 5, beta_end=1.0 + 1e-12),
])
def test_beta_bounds_refuse_zero_and_above_one(call):
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
        call()


# Why: 1 is inside (0, 1] (jsd itself ends at beta = 1), so a bound of exactly 1 is valid.
def test_beta_bound_of_exactly_one_is_allowed():
    np.testing.assert_array_equal(make_betas("linear", 3, beta_start=0.5, beta_end=1.0).numpy(), [0.5, 0.75, 1.0])
    np.testing.assert_array_equal(make_betas("const", 2, beta_start=1.0, beta_end=0.25).numpy(), [0.25, 0.25])


# Why: with T = 1 there is no beta~_2 to stand in for the zero posterior variance at
# t = 0; both log-variances must then be log(beta_1) (finite, and the same as
# fixed_large), so the decoder of a one-step chain has the forward step's variance.
@pytest.mark.parametrize("beta", [0.02, 0.3])
def test_one_step_schedule_log_variances(beta):
    s = NoiseSchedule(betas=[beta])
    assert s.num_timesteps == 1
    assert s.posterior_variance.tolist() == [0.0]
    assert s.posterior_mean_coef1[0].item() == pytest.approx(1.0, rel=1e-15, abs=0.0)
    assert s.posterior_mean_coef2[0].item() == 0.0
    assert s.fixed_large_variance[0].item() == pytest.approx(beta, rel=1e-15, abs=0.0)
    assert s.posterior_log_variance_clipped[0].item() == pytest.approx(math.log(beta), rel=1e-15, abs=0.0)
    assert s.fixed_large_log_variance[0].item() == pytest.approx(math.log(beta), rel=1e-15, abs=0.0)
    assert s.step_table("fixed_small")[0, 6].item() == 0.0  # no noise on the last (only) step


# Why: abar = 0 only at the sub-chain's LAST step (jsd's beta_T = 1) leaves every step
# defined up to it, exactly like the full jsd chain; only an earlier 0 must be refused.
def test_respace_jsd_through_its_last_step():
    T = 10
    b = 1.0 / np.linspace(T, 1, T)
    ab = np.cumprod(1.0 - b)  # ab[-1] == 0 exactly: its last factor is 1 - 1
    steps = [0, 4, 9]
    sub = NoiseSchedule("jsd", timesteps=T).respace(steps)
    assert sub.timestep_map.tolist() == steps
    np.testing.assert_allclose(sub.alphas_cumprod.numpy(), ab[steps], rtol=1e-14, atol=0.0)
    assert sub.alphas_cumprod[-1].item() == 0.0
    np.testing.assert_allclose(sub.betas.numpy(), 1 - ab[steps] / np.r_[1.0, ab[steps[:-1]]], rtol=1e-13)
    assert sub.betas[-1].item() == 1.0
    # as on the full jsd chain: only the last step of the eps-form is undefined
    assert sub.undefined_steps("fixed_large", clip_denoised=True) == [2]
    # ... and a 0 before the end still leaves no sub-chain
    with pytest.raises(ValueError, match="alphas_cumprod is 0 there"):
        NoiseSchedule(betas=torch.tensor([0.1, 1.0, 0.5], dtype=torch.float64)).respace([1, 2])


# Why: where abar underflows (const 0.9: abar_t = 0.1^(t+1)) the eps-form step only
# divides by sqrt(alpha_t) = sqrt(0.1) and stays defined, but the clipped step's
# sqrt(1/abar_t - 1) overflows; undefined_steps must answer each form for itself,
# whichever was asked first (its answers are cached).
@pytest.mark.parametrize("clipped_first", [False, True])
def test_undefined_steps_depend_on_clip_denoised(clipped_first):
    T = 400
    with np.errstate(over="ignore", divide="ignore"):
        ab = np.cumprod(np.full(T, 0.1))
        want_clipped = np.nonzero(~np.isfinite(np.sqrt(1.0 / ab - 1.0)))[0].tolist()
    assert want_clipped and want_clipped[-1] == T - 1
    s = NoiseSchedule("const", timesteps=T, beta_end=0.9)
    order = [True, False] if clipped_first else [False, True]
    got = {clip: s.undefined_steps("fixed_large", clip_denoised=clip) for clip in order}
    assert got[False] == []
    assert got[True] == want_clipped


# Why: a config naming a schedule without "timesteps" means the default T = 1000
# (Ho et al.), as NoiseSchedule(name) does.
def test_from_config_defaults_to_1000_steps():
    s = NoiseSchedule.from_config({"name": "linear"})
    assert s.num_timesteps == 1000
    np.testing.assert_allclose(s.betas.numpy(), np.linspace(1e-4, 0.02, 1000), rtol=1e-15, atol=0.0)


# Why: undefined_steps handed out its cached list itself, so a caller who edited
# the answer (u.clear()) switched off the guard of every later Sampler, ddpm_step,
# bits/dim and Trainer call on that schedule: the jsd chain then ran through
# t = T-1, where alpha_t = 0, without a word.
def test_editing_undefined_steps_answer_changes_no_later_answer():
    s = NoiseSchedule("jsd", timesteps=10)
    first = s.undefined_steps("fixed_large", clip_denoised=True)
    assert first == [9]
    first.clear()
    again = s.undefined_steps("fixed_large", clip_denoised=True)
    assert again == [9]
    again.append(3)  # a hit of the cache is a copy too
    assert s.undefined_steps("fixed_large", clip_denoised=True) == [9]
    sampler = Sampler(lambda x, t: torch.zeros_like(x), s, sample_shape=(1, 2, 2))
    with pytest.raises(ValueError, match="undefined at timestep 9"):
        sampler.sample(1, seed=0, progress=False)


# ------------------------------------------------------------ tables edited in place


def test_a_table_handed_out_and_edited_in_place_is_made_again():
    """The float32 copy the kernels read, edited through table() or step_table()
    (documented read-only), stayed in every later kernel call."""
    from ddpm_fast import diffusion, ops

    schedule = NoiseSchedule("linear", timesteps=10)
    handed_out = schedule.table("sqrt_alphas_cumprod")
    handed_out.zero_()
    again = schedule.table("sqrt_alphas_cumprod")
    torch.testing.assert_close(again, schedule.sqrt_alphas_cumprod.float())
    assert schedule.table("sqrt_alphas_cumprod") is again  # made once more, not per call
    x0, noise, t = torch.rand(3, 1, 4, 4) * 2 - 1, torch.randn(3, 1, 4, 4), torch.tensor([0, 4, 9])
    schedule.table("sqrt_one_minus_alphas_cumprod").mul_(2)
    got, _ = ops.q_sample(x0, t, schedule, noise=noise, backend="cpu")
    torch.testing.assert_close(got, diffusion.q_sample(schedule, x0, t, noise), rtol=1e-6, atol=1e-6)
    step = schedule.step_table("fixed_small")
    step.fill_(float("nan"))
    assert schedule.step_table("fixed_small").isfinite().all()


def test_respace_of_a_count_says_how_to_spread_it():
    """respace(5) read like sample(steps=5): the error now says what it takes and how to get K steps."""
    with pytest.raises(TypeError, match=r"the original timesteps to keep\), got 5; for 5 evenly spread steps: "
                                        r"respace\(ddpm_fast\.sampler\.respaced_timesteps\(T, 5\)\)"):
        NoiseSchedule("linear", timesteps=50).respace(5)
