"""The diffusion math of Ho et al. (2020), in plain PyTorch.

Equation numbers cite the DDPM paper. Coefficients come from a
``NoiseSchedule``'s float64 tables and are cast to the computation dtype
(float64 for float64 inputs, else float32), so float64 inputs give float64
results end to end. Timesteps ``t`` are zero-based: an int or an int64 tensor
with one entry per sample.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from ._checks import (
    WIDENED_TIMESTEP_DTYPES, check_bool, check_dense, host_readable, is_traced, outside_transforms, type_name,
)
from ._progress import progress_bar
from .schedules import NoiseSchedule

__all__ = [
    "MeanType",
    "VarianceType",
    "extract",
    "q_mean_variance",
    "q_sample",
    "q_posterior_mean_variance",
    "predict_x0_from_eps",
    "predict_eps_from_x0",
    "PMeanVariance",
    "p_mean_variance",
    "normal_kl",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "loss_simple",
    "prior_bpd",
    "vb_terms_bpd",
    "BitsPerDim",
    "bits_per_dim",
]

MeanType = Literal["eps", "x0"]
VarianceType = Literal["fixed_small", "fixed_large"]
_LN2 = math.log(2.0)
_DATA_TOLERANCE = 1e-6  # float error allowed on bits_per_dim's [-1, 1] data


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def extract(table: torch.Tensor, t: int | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``table[t]`` shaped to broadcast against ``x`` (one value per sample).

    The table is copied to t's device on each call; the functions below read a
    schedule's tables through a copy cached per device instead (``_extract``).
    """
    t = _check_timesteps(t, table.numel(), x)
    return _rows(table, t, x)


def _extract(schedule: NoiseSchedule, name: str, t: int | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``extract(getattr(schedule, name), t, x)`` from the table's float64 copy
    on t's device (x's for an int t), made once per device (``_device_table``)."""
    _check_schedule(schedule)
    t = _check_timesteps(t, schedule.num_timesteps, x)
    return _rows(_device_table(schedule, name, t.device if isinstance(t, torch.Tensor) else x.device), t, x)


def _check_schedule(schedule: object) -> None:
    if not isinstance(schedule, NoiseSchedule):  # a name such as "linear" failed on a missing attribute
        raise TypeError(f"schedule must be a NoiseSchedule (e.g. NoiseSchedule('linear')), got {type(schedule).__name__}")


def _check_timesteps(t: int | torch.Tensor, num_steps: int, x: torch.Tensor) -> int | torch.Tensor:
    """t checked, as an int or an integer tensor (a numpy integer becomes an int)."""
    if isinstance(t, bool) or (isinstance(t, torch.Tensor) and t.dtype == torch.bool):
        raise TypeError("t must be an int or an integer tensor, got a bool")
    if isinstance(t, numbers.Integral):
        t = int(t)
        if not 0 <= t < num_steps:
            raise ValueError(f"timestep {t} is out of range [0, {num_steps})")
        return t
    if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex():
        kind = type(t)
        got = f"a {t.dtype} tensor" if isinstance(t, torch.Tensor) else (
            kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}")
        raise TypeError(f"t must be an int or an integer tensor, got {got}")
    check_dense(t, "diffusion", "t")
    if t.dim() > 1 or (t.dim() == 1 and t.numel() not in (1, x.shape[0])):
        raise ValueError(f"t must be a scalar or have one entry per sample ({x.shape[0]}), got shape {tuple(t.shape)}")
    if t.dtype in WIDENED_TIMESTEP_DTYPES:
        t = t.to(torch.int64)
    if t.device.type == "cpu" and t.numel():
        values = host_readable(t)  # (every sample's, where vmap batches t)
        if values.min() < 0 or values.max() >= num_steps:
            raise ValueError(f"timesteps out of range [0, {num_steps}): min {values.min().item()}, max {values.max().item()}")
    return t


def _rows(table: torch.Tensor, t: int | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``table[t]`` (t already checked) in x's computation dtype on x's device,
    shaped to broadcast against x. (index_select: indexing with a 0-d device
    tensor would read it on the host.) Never a view of ``table``: a caller's
    in-place edit of a returned variance rewrote the schedule for every later call."""
    if isinstance(t, int):
        return table[t].to(x.device, _compute_dtype(x), copy=True)
    values = table.to(t.device).index_select(0, t.reshape(-1).long()).reshape(t.shape)
    values = values.to(x.device, _compute_dtype(x))
    if values.dim() == 1:
        values = values.reshape((-1,) + (1,) * (x.dim() - 1))
    return values


def _device_table(schedule: NoiseSchedule, name: str, device: torch.device) -> torch.Tensor:
    """The schedule's float64 table ``name`` on ``device``, copied there once per
    device and kept on the schedule (so it goes with it): copying it on every
    call was a synchronizing host-to-device copy, about 8 per training step with
    the vlb loss and one per table and timestep in bits_per_dim. A table
    replaced or changed in place since its copy was made is copied again."""
    source = getattr(schedule, name)
    if source.device == device:
        return source
    if torch.compiler.is_compiling():  # traced: no cache to keep up
        return source.to(device)
    # An inference tensor has no version counter, yet inference mode may change
    # it in place: its stamp is a copy of its values (on the host, where a
    # schedule's tables live: comparing them is cheap there).
    inference = source.is_inference()
    copies = schedule.__dict__.setdefault("_extract_tables", {})
    cached = copies.get((name, device))
    if cached is not None and cached[0] is source:
        stamp = cached[1]
        if (torch.equal(stamp, source) if inference else stamp == source._version):
            return cached[2]
    with torch.inference_mode(False), outside_transforms():  # usable by autograd, even when first asked for under inference mode
        copy = source.to(device)
    if is_traced(copy):  # under make_fx or FakeTensorMode: not for later calls
        return copy
    copies[(name, device)] = (source, source.clone() if inference else source._version, copy)
    return copy


def q_mean_variance(
    schedule: NoiseSchedule, x0: torch.Tensor, t: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and log-variance of q(x_t | x_0) (eq. 4)."""
    mean = _extract(schedule, "sqrt_alphas_cumprod", t, x0) * x0
    variance = _extract(schedule, "one_minus_alphas_cumprod", t, x0)
    log_variance = _extract(schedule, "log_one_minus_alphas_cumprod", t, x0)
    return mean, variance, log_variance


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: int | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (eq. 4), in x0's dtype."""
    if not x0.is_floating_point():  # x_t in x0's dtype: an integer x0 would truncate it
        raise TypeError(f"x0 must be a floating tensor, got {x0.dtype}")
    if noise.shape != x0.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)} but x0 has {tuple(x0.shape)}")
    a = _extract(schedule, "sqrt_alphas_cumprod", t, x0)
    b = _extract(schedule, "sqrt_one_minus_alphas_cumprod", t, x0)
    return (a * x0.to(a.dtype) + b * noise.to(a.dtype)).to(x0.dtype)


def q_posterior_mean_variance(
    schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (eqs. 6-7)."""
    mean = _extract(schedule, "posterior_mean_coef1", t, x_t) * x0 + _extract(schedule, "posterior_mean_coef2", t, x_t) * x_t
    variance = _extract(schedule, "posterior_variance", t, x_t)
    log_variance = _extract(schedule, "posterior_log_variance_clipped", t, x_t)
    return mean, variance, log_variance


def predict_x0_from_eps(schedule: NoiseSchedule, x_t: torch.Tensor, t: int | torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (eq. 4 solved for x_0).

    As one factor 1/sqrt(abar_t) of a difference, not the difference of two
    products: where abar_t is so small that 1/sqrt(abar_t) overflows float32
    (abar_t < ~1e-77), x_0 is +-inf, which clipping takes to +-1, not inf - inf.
    That overflowed factor is float32's largest finite value instead: inf times
    a difference of 0 (eps = x_t, the optimum there) would be NaN, where float64
    gives 0; finite factors are left exact."""
    factor = _extract(schedule, "sqrt_recip_alphas_cumprod", t, x_t)
    if factor.dtype != torch.float64:
        factor = factor.clamp(max=torch.finfo(factor.dtype).max)
    return factor * (x_t - _extract(schedule, "sqrt_one_minus_alphas_cumprod", t, x_t) * eps)


def predict_eps_from_x0(schedule: NoiseSchedule, x_t: torch.Tensor, t: int | torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The eps that eq. 4 pairs with x_t and x_0: (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
    return (x_t - _extract(schedule, "sqrt_alphas_cumprod", t, x_t) * x0) / _extract(
        schedule, "sqrt_one_minus_alphas_cumprod", t, x_t
    )


@dataclass
class PMeanVariance:
    """p_theta(x_{t-1} | x_t): its mean, variance, log-variance and the x_0 it implies."""

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_x0: torch.Tensor


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def p_mean_variance(
    schedule: NoiseSchedule,
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: int | torch.Tensor,
    *,
    mean_type: MeanType = "eps",
    variance: VarianceType = "fixed_large",
    clip_denoised: bool = False,
) -> PMeanVariance:
    """The reverse-process Gaussian given the model's output (eqs. 11-12).

    ``mean_type`` says whether the model predicts eps or x_0. With
    ``clip_denoised`` the implied x_0 is clipped to [-1, 1] and the mean is the
    posterior mean of eq. 7; without it, an eps-model's mean is eq. 11.
    """
    _check_choice("mean_type", mean_type, ("eps", "x0"))
    _check_choice("variance", variance, ("fixed_small", "fixed_large"))
    check_bool(clip_denoised, "clip_denoised")
    if not isinstance(model_output, torch.Tensor):  # a model returning a tuple or a dict, say
        raise TypeError(
            f"model output must be a torch.Tensor of x_t's shape {tuple(x_t.shape)}, got a {type(model_output).__name__}"
        )
    if model_output.shape != x_t.shape:
        raise ValueError(f"model output has shape {tuple(model_output.shape)}, x_t has {tuple(x_t.shape)}")
    if not model_output.is_floating_point():  # an integer eps was cast and used as one
        raise TypeError(f"model output must be a floating tensor, got {model_output.dtype}")
    dtype = _compute_dtype(x_t)
    x_t = x_t.to(dtype)
    model_output = model_output.to(dtype)
    if variance == "fixed_small":
        var = _extract(schedule, "posterior_variance", t, x_t)
        log_var = _extract(schedule, "posterior_log_variance_clipped", t, x_t)
    else:
        var = _extract(schedule, "fixed_large_variance", t, x_t)
        log_var = _extract(schedule, "fixed_large_log_variance", t, x_t)
    if mean_type == "eps":
        pred_x0 = predict_x0_from_eps(schedule, x_t, t, model_output)
    else:
        pred_x0 = model_output
    if clip_denoised:
        pred_x0 = pred_x0.clamp(-1.0, 1.0)
    if mean_type == "eps" and not clip_denoised:
        # eq. 11: (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)
        mean = _extract(schedule, "sqrt_recip_alphas", t, x_t) * (x_t - _extract(schedule, "eps_coef", t, x_t) * model_output)
    else:
        mean, _, _ = q_posterior_mean_variance(schedule, pred_x0, x_t, t)
    var, log_var = var.expand_as(x_t), log_var.expand_as(x_t)
    return PMeanVariance(mean, var, log_var, pred_x0)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF used by the original code."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log p(x) of data in [-1, 1] quantized to 256 bins of width 2/255 under a
    Gaussian (the decoder L_0, section 3.3); the edge bins extend to +-infinity.

    Computed in float64, returned in the inputs' dtype: in float32 the bins' CDF
    differences cancel once a bin's probability falls below about 1e-7 (log p of
    -16.64 instead of -16.77 at 5 standard deviations)."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, means.dtype), log_scales.dtype)
    x, means, log_scales = x.double(), means.double(), log_scales.double()
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    ).to(dtype)


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


def loss_simple(eps: torch.Tensor, eps_pred: torch.Tensor) -> torch.Tensor:
    """L_simple (eq. 14): the per-sample mean squared error between eps and its prediction."""
    if eps.shape != eps_pred.shape:
        raise ValueError(f"eps has shape {tuple(eps.shape)}, the prediction {tuple(eps_pred.shape)}")
    dtype = _compute_dtype(eps)
    return _mean_flat((eps.to(dtype) - eps_pred.to(dtype)) ** 2)


def prior_bpd(schedule: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) per sample, in bits per dimension."""
    _check_schedule(schedule)
    t = schedule.num_timesteps - 1
    mean, _, log_var = q_mean_variance(schedule, x0.to(_compute_dtype(x0)), t)
    kl = normal_kl(mean, log_var.expand_as(mean), torch.zeros_like(mean), torch.zeros_like(mean))
    return _mean_flat(kl) / _LN2


def vb_terms_bpd(
    schedule: NoiseSchedule,
    model_output: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: int | torch.Tensor,
    *,
    mean_type: MeanType = "eps",
    variance: VarianceType = "fixed_large",
    clip_denoised: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One term of the variational bound per sample, in bits per dimension. For
    the zero-based timestep t (the paper's t + 1, so ``x_t`` is the paper's
    x_{t+1}) it is the paper's L_t (eq. 5): KL(q(x_t | x_{t+1}, x_0) || p(x_t | x_{t+1}))
    for t > 0, and the decoder NLL L_0 = -log p(x_0 | x_1) at t = 0. Also returns pred_x0."""
    dtype = _compute_dtype(x_t)
    x0 = x0.to(dtype)
    true_mean, _, true_log_var = q_posterior_mean_variance(schedule, x0, x_t.to(dtype), t)
    p = p_mean_variance(schedule, model_output, x_t, t, mean_type=mean_type, variance=variance, clip_denoised=clip_denoised)
    kl = _mean_flat(normal_kl(true_mean, true_log_var.expand_as(true_mean), p.mean, p.log_variance)) / _LN2
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, p.mean, 0.5 * p.log_variance)) / _LN2
    if isinstance(t, int):
        is_first = torch.full_like(kl, t == 0, dtype=torch.bool)
    else:
        is_first = (t.to(kl.device) == 0).expand_as(kl)
    return torch.where(is_first, nll, kl), p.pred_x0


@dataclass
class BitsPerDim:
    """The variational bound per sample, in bits per dimension.

    ``total = prior + terms.sum(1)``; ``terms[:, t]`` is the paper's L_t at the
    zero-based timestep t (``vb_terms_bpd``: a KL for t > 0, the decoder L_0 at
    t = 0); ``mse[:, t]`` is the mean squared error of the model's prediction at
    timestep t (against eps, or against x_0 with ``mean_type="x0"``).
    """

    total: torch.Tensor
    prior: torch.Tensor
    terms: torch.Tensor
    mse: torch.Tensor

    @property
    def decoder(self) -> torch.Tensor:
        return self.terms[:, 0]


@torch.no_grad()
def bits_per_dim(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    mean_type: MeanType = "eps",
    variance: VarianceType = "fixed_large",
    clip_denoised: bool = True,
    generator: torch.Generator | None = None,
    noise_fn: Callable[[int], torch.Tensor] | None = None,
    progress: bool = False,
) -> BitsPerDim:
    """The full variational bound of ``x0`` (data in [-1, 1]) under ``model(x_t, t)``,
    evaluated at every timestep as the original ``calc_bpd_loop`` does.

    The noise of each timestep's q-sample comes from ``torch.randn`` with
    ``generator``, or, given ``noise_fn``, is ``noise_fn(t)`` (x0's shape): e.g.
    drawn per sample, so that how a dataset is split into batches does not
    change it (``ddpm_fast.evaluate.evaluate_bpd``). On a respaced schedule the
    bound is that of the shorter chain, and the model is called with the
    original timesteps it was trained on (``schedule.timestep_map``)."""
    _check_schedule(schedule)
    check_bool(clip_denoised, "clip_denoised")
    check_bool(progress, "progress")
    if generator is not None and noise_fn is not None:
        raise ValueError("bits_per_dim: give generator or noise_fn, not both")
    if not isinstance(x0, torch.Tensor):  # a numpy array failed on a missing .dim()
        raise TypeError(f"bits_per_dim: x0 must be a torch.Tensor of data in [-1, 1], got a {type_name(x0)}")
    if x0.dim() < 2 or x0.shape[0] == 0:
        raise ValueError(f"x0 must be a non-empty batch (N, ...), got shape {tuple(x0.shape)}")
    if not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating tensor of data in [-1, 1], got {x0.dtype}")
    # The decoder L_0 scores the 256 levels of uint8 data scaled to [-1, 1]: data
    # outside (images left in [0, 255], say) would get a meaningless bound. Checked
    # once (one sync), with room for float rounding; NaN data fails it too.
    low, high = (v.item() for v in torch.aminmax(x0))
    if not (-1 - _DATA_TOLERANCE <= low and high <= 1 + _DATA_TOLERANCE):
        raise ValueError(f"x0 must be data in [-1, 1] (uint8 images as x / 127.5 - 1), got values in [{low}, {high}]")
    if x0.dtype in (torch.float16, torch.bfloat16):
        # 16-bit floats cannot hold the levels k / 127.5 - 1 (bfloat16 misses them by up
        # to a quarter of a bin, which moved the bound by 0.006 bits/dim): back onto the
        # grid that the decoder scores.
        x0 = ((x0.float() + 1) * 127.5).round() / 127.5 - 1
    if mean_type == "eps" and variance in ("fixed_small", "fixed_large"):
        undefined = schedule.undefined_steps(variance, clip_denoised=True)  # x0 from eps, which divides by sqrt(abar_t)
        if undefined:
            raise ValueError(
                f"bits_per_dim: x0 from an eps prediction is undefined at timestep {undefined[0]} of this schedule "
                "(abar_t = 0 there, as at t = T-1 of the jsd schedule); evaluate an x0-predicting model "
                "or use a schedule whose betas stay below 1"
            )
    n, num_steps = x0.shape[0], schedule.num_timesteps
    dtype = _compute_dtype(x0)
    terms = torch.zeros(n, num_steps, dtype=dtype, device=x0.device)
    mse = torch.zeros(n, num_steps, dtype=dtype, device=x0.device)
    steps = range(num_steps - 1, -1, -1)
    if progress:
        steps = progress_bar(steps, desc="bits/dim", unit="step")
    for step in steps:
        t = torch.full((n,), step, dtype=torch.int64, device=x0.device)
        if noise_fn is not None:
            noise = noise_fn(step)
            if not isinstance(noise, torch.Tensor) or noise.shape != x0.shape:
                raise ValueError(f"bits_per_dim: noise_fn({step}) must give a tensor of x0's shape {tuple(x0.shape)}")
            noise = noise.to(device=x0.device, dtype=dtype)
        else:
            noise_device = x0.device if generator is None else generator.device
            noise = torch.randn(x0.shape, generator=generator, dtype=dtype, device=noise_device).to(x0.device)
        x_t = q_sample(schedule, x0.to(dtype), t, noise)
        # A respaced schedule's index `step` is the model's original timestep
        # timestep_map[step] (the identity for a full schedule).
        # A copy: the bound reads x_t after the call, and a model may write into its
        # input (lambda x, t: x.mul_(s), which the Sampler takes too).
        out = model(x_t.clone(), torch.full_like(t, int(schedule.timestep_map[step])))
        vb, _ = vb_terms_bpd(schedule, out, x0, x_t, t, mean_type=mean_type, variance=variance, clip_denoised=clip_denoised)
        terms[:, step] = vb
        target = noise if mean_type == "eps" else x0.to(dtype)
        mse[:, step] = _mean_flat((out.to(dtype) - target) ** 2)
    prior = prior_bpd(schedule, x0)
    return BitsPerDim(total=prior + terms.sum(dim=1), prior=prior, terms=terms, mse=mse)
