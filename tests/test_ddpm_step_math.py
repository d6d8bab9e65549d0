"""The reverse step's math: the reference against diffusion.p_mean_variance (Ho
et al. 2020 eq. 11 and the clipped-x0 posterior), DDIM against Song et al.
2021 eq. 12, and both against diffusers' DDPMScheduler/DDIMScheduler; the
clipped step on every backend where float32 coefficients overflow."""

from __future__ import annotations

import pytest
import torch

from conftest import backend_params
from ddpm_fast import NoiseSchedule, diffusion, ops

SCHEDULE = NoiseSchedule("linear", timesteps=1000)


def test_reference_is_the_diffusion_math():
    # x_{t-1} = mean + sigma z of diffusion.p_mean_variance, in float64 from the paper's
    # formulas, for both forms and both variances.
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    eps = torch.randn_like(x)
    z = torch.randn_like(x)
    t = torch.tensor([0, 1, 500, 999])
    for variance in ("fixed_small", "fixed_large"):
        for clip in (False, True):
            p = diffusion.p_mean_variance(SCHEDULE, eps, x, t, variance=variance, clip_denoised=clip)
            nonzero = (t != 0).double().reshape(-1, 1, 1, 1)
            want = p.mean + nonzero * p.variance.sqrt() * z
            got = ops.ddpm_step(x.float(), eps.float(), t, SCHEDULE, variance=variance, clip_denoised=clip, noise=z.float(), backend="reference")
            torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("kind", [dict(variance="fixed_large"), dict(variance="fixed_small"), dict(eta=0.5)], ids=str)
def test_clipped_step_where_abar_underflows_float32_coefficients(device, backend, kind):
    # abar_999 = 4.9e-134 on this schedule: 1/sqrt(abar) overflows float32, and the
    # clipped x0 was inf - inf = NaN. Against float64 (x0 saturates to +-1 there).
    schedule = NoiseSchedule("linear", timesteps=1000, beta_end=0.5)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64) * 2
    eps, z = (torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(2))
    for t in (999, 600, 1):
        got = ops.ddpm_step(x.float().to(device), eps.float().to(device), t, schedule, clip_denoised=True,
                            noise=z.float().to(device), backend=backend, **kind).cpu().double()
        ab, ab_prev = schedule.alphas_cumprod[t], schedule.alphas_cumprod_prev[t]
        x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
        if "eta" in kind:  # Song et al. eq. 12, eps recomputed from the clipped x0
            sigma = kind["eta"] * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt()
            want = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).sqrt() * (x - ab.sqrt() * x0) / (1 - ab).sqrt() + sigma * z
        else:
            p = diffusion.p_mean_variance(schedule, eps, x, t, variance=kind["variance"], clip_denoised=True)
            want = p.mean + p.variance.sqrt() * z
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"t={t}")


def test_ddim_eta0_is_deterministic():
    x = torch.randn(3, 2, 5, 5)
    eps = torch.randn_like(x)
    t = torch.tensor([999, 300, 0])
    a = ops.ddpm_step(x, eps, t, SCHEDULE, eta=0.0, seed=1, backend="reference")
    assert torch.equal(a, ops.ddpm_step(x, eps, t, SCHEDULE, eta=0.0, seed=2, backend="reference"))


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_matches_song_et_al(eta, clip):
    # Song et al. (2021) eq. 12 with sigma of eq. 16, in float64 from the given z;
    # clipped, eps is recomputed from the clipped x_0 (as guided-diffusion's
    # ddim_sample does). Observed error ~7e-7 (x_{t-1} up to ~5).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 5, 5, generator=g, dtype=torch.float64) * 1.5
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    z = torch.randn(x.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([999, 300, 1, 0])
    got = ops.ddpm_step(x.float(), eps.float(), t, SCHEDULE, eta=eta, clip_denoised=clip, noise=z.float(), backend="reference")
    ab = SCHEDULE.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    ab_prev = SCHEDULE.alphas_cumprod_prev[t].reshape(-1, 1, 1, 1)
    x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
    if clip:
        assert ((x0 < -1) | (x0 > 1)).any() and (x0.abs() < 1).any()  # the clip is exercised
        x0 = x0.clamp(-1, 1)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
    sigma = eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt()
    want = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).sqrt() * eps + sigma * z
    torch.testing.assert_close(got.double(), want, atol=5e-6, rtol=2e-6)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip", [False, True])
def test_agrees_with_diffusers_scheduler(variance, clip, monkeypatch):
    # diffusers' DDPMScheduler.step given the same z (its randn_tensor patched to
    # return ours), run on float64 inputs. Its coefficient tables are float32, and
    # 1 - abar_t loses ~1e-4 relative to cancellation at small t, so it agrees with
    # us to 5e-4; we agree with the float64 formula (diffusion.p_mean_variance) to 1e-6.
    diffusers = pytest.importorskip("diffusers")
    import diffusers.schedulers.scheduling_ddpm as scheduling_ddpm

    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type=variance, clip_sample=clip)
    scheduler.set_timesteps(1000)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g)
    eps = torch.randn(2, 3, 8, 8, generator=g)
    for t in (999, 500, 10, 1, 0):
        z = ops.randn(x.shape, 42, t * x.numel(), backend="reference")
        monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **kw: z.reshape(shape).double())
        want = scheduler.step(eps.double(), t, x.double()).prev_sample
        got = ops.ddpm_step(x, eps, t, SCHEDULE, variance=variance, clip_denoised=clip, noise=z, backend="reference")
        torch.testing.assert_close(got.double(), want, atol=5e-4, rtol=0)
        p = diffusion.p_mean_variance(SCHEDULE, eps.double(), x.double(), t, variance=variance, clip_denoised=clip)
        exact = p.mean + (t > 0) * p.variance.sqrt() * z.double()
        torch.testing.assert_close(got.double(), exact, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [False, True])
def test_respaced_ddim_agrees_with_diffusers_ddim_scheduler(eta, clip):
    # diffusers' DDIMScheduler.step over 50 "leading" timesteps (0, 20, ..., 980)
    # given the same z, against our step on the schedule respaced to them. With
    # clipping, eps is recomputed from the clipped x_0 in both (diffusers'
    # use_clipped_model_output=True; its default keeps the raw eps). Its tables
    # are float32, hence 5e-4 (as for DDPMScheduler above).
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=clip,
                                        set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    scheduler.set_timesteps(50)
    timesteps = sorted(scheduler.timesteps.tolist())
    assert timesteps == list(range(0, 1000, 20))
    respaced = SCHEDULE.respace(timesteps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g) * 1.5
    eps = torch.randn(2, 3, 8, 8, generator=g)
    for k in (49, 30, 1, 0):
        z = ops.randn(x.shape, 42, k * x.numel(), backend="reference")
        want = scheduler.step(eps.double(), timesteps[k], x.double(), eta=eta, use_clipped_model_output=True,
                              variance_noise=z.double()).prev_sample
        got = ops.ddpm_step(x, eps, k, respaced, eta=eta, clip_denoised=clip, noise=z, backend="reference")
        torch.testing.assert_close(got.double(), want, atol=5e-4, rtol=0, msg=f"step {k}")
