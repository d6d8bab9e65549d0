"""The Sampler on a toy whose exact reverse process is known: data from one
Gaussian N(mu, s^2) per dimension, for which the optimal noise predictor is
eps*(x_t, t) = sqrt(1 - abar_t) (x_t - sqrt(abar_t) mu) / (abar_t s^2 + 1 - abar_t)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from conftest import backend_params
import ddpm_fast.sampler as sampler_module
from ddpm_fast import NoiseSchedule, Sampler, ops
from ddpm_fast.sampler import _SAMPLE_STRIDE, respaced_timesteps

SCHEDULE = NoiseSchedule("linear")
MU, S = 0.5, 0.2

# On a GPU the Sampler captures CUDA graphs (test_sampler_cuda_graph.py tests
# that path): a capture that failed and fell back to the plain loop is an error
# here too, so that these tests check the path a GPU user runs.
pytestmark = pytest.mark.filterwarnings("error:ddpm_fast. CUDA graph capture failed:RuntimeWarning")


class GaussianOracle:
    """The exact eps-predictor for N(MU, std^2) data (std S unless given);
    elementwise, so a sample's output never depends on the rest of its batch."""

    def __init__(self, schedule: NoiseSchedule = SCHEDULE, dtype=torch.float32, std: float = S):
        self.abar = schedule.alphas_cumprod.to(dtype)
        self.variance = std * std
        self.tables: dict[torch.device, torch.Tensor] = {}  # abar on each device it ran on
        self.seen = []

    def __call__(self, x, t):
        self.seen.append((x.dtype, x.is_contiguous(), tuple(t.shape)))
        # Copied to the device once, on the first call (the Sampler's warm-up,
        # before capture): a copy from pageable host memory syncs the stream,
        # which a CUDA graph capture forbids.
        table = self.tables.get(x.device)
        if table is None:
            table = self.tables[x.device] = self.abar.to(x.device)
        a = table[t].reshape(-1, *([1] * (x.dim() - 1)))
        return ((1 - a).sqrt() * (x.to(a.dtype) - a.sqrt() * MU) / (a * self.variance + 1 - a)).to(x.dtype)


def exact_chain_moments(steps: int | None, variance: str) -> tuple[float, float]:
    """The mean and variance of the chain's output under the oracle, exactly: each
    ancestral step (Ho et al. eq. 11, on the respaced betas 1 - abar_t/abar_s of
    Nichol & Dhariwal sec. 4) is linear in x_t plus Gaussian noise, so from
    x_T ~ N(0, 1) the moments follow in closed form (float64 numpy, betas rebuilt)."""
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    ts = list(range(1000)) if steps is None else respaced_timesteps(1000, steps)
    mean, var = 0.0, 1.0
    for i in range(len(ts) - 1, -1, -1):
        a, a_prev = abar[ts[i]], abar[ts[i - 1]] if i > 0 else 1.0
        beta = 1 - a / a_prev
        c = np.sqrt(1 - a) / (a * S * S + 1 - a)  # eps*(x) = c (x - sqrt(a) MU)
        gain = (1 - beta / np.sqrt(1 - a) * c) / np.sqrt(1 - beta)
        shift = beta / np.sqrt(1 - a) * c * np.sqrt(a) * MU / np.sqrt(1 - beta)
        noise_var = 0.0 if i == 0 else (beta * (1 - a_prev) / (1 - a) if variance == "fixed_small" else beta)
        mean, var = gain * mean + shift, gain * gain * var + noise_var
    return mean, var


@pytest.mark.parametrize("steps", [None, 50, 10])
@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_ancestral_sampling_recovers_the_data_distribution(variance, steps):
    sampler = Sampler(GaussianOracle(), SCHEDULE, variance=variance, clip_denoised=False, sample_shape=(1, 8, 8))
    x = sampler.sample(2048, seed=0, steps=steps, progress=False).double()
    # 131072 independent values (the oracle is elementwise): the sample moments
    # are the chain's exact ones within 5 standard errors (~3e-3 for the mean,
    # ~2e-3 for the std), which tells the variances and the respacing apart.
    mean, var = exact_chain_moments(steps, variance)
    assert abs(x.mean().item() - mean) < 5 * (var / x.numel()) ** 0.5
    assert abs(x.std().item() - var**0.5) < 5 * (var / (2 * x.numel())) ** 0.5
    if steps is None:  # and the full chain recovers the data (fixed_small runs ~2% narrow)
        assert abs(mean - MU) < 1e-3 and abs(var**0.5 - S) < 0.01


@pytest.mark.parametrize("steps", [100, 50])
def test_ddim_eta0_is_deterministic_and_is_ddim(steps):
    sampler = Sampler(GaussianOracle(), SCHEDULE, clip_denoised=False, sample_shape=(1, 4, 4))
    x = sampler.sample(64, seed=3, steps=steps, eta=0.0, progress=False)
    assert torch.equal(x, sampler.sample(64, seed=3, steps=steps, eta=0.0, progress=False))
    # An independent float64 DDIM (Song et al. eq. 12, sigma = 0) from the same x_T.
    ts = respaced_timesteps(1000, steps)
    # sample i's stream starts at counter i << 32 (the layout sampler.py documents), x_T in slot len(ts)
    y = ops.randn((64, 1, 4, 4), 3, len(ts) * 16, sample_stride=1 << 32, backend="reference").double()
    oracle, abar = GaussianOracle(dtype=torch.float64), SCHEDULE.alphas_cumprod
    for i in range(len(ts) - 1, -1, -1):
        a = abar[ts[i]]
        a_prev = abar[ts[i - 1]] if i > 0 else torch.tensor(1.0, dtype=torch.float64)
        eps = oracle(y, torch.full((64,), ts[i]))
        x0 = (y - (1 - a).sqrt() * eps) / a.sqrt()
        y = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    torch.testing.assert_close(x.double(), y, atol=1e-5, rtol=1e-5)


def test_seed_reproducibility_and_batch_independence():
    sampler = Sampler(GaussianOracle(), SCHEDULE, sample_shape=(2, 3, 3))
    batch = sampler.sample(8, seed=11, steps=40, progress=False)
    assert torch.equal(batch, sampler.sample(8, seed=11, steps=40, progress=False))
    assert not torch.equal(batch, sampler.sample(8, seed=12, steps=40, progress=False))
    # Sample i is the same alone, in a smaller batch, or as a shard's member.
    assert torch.equal(batch[:3], sampler.sample(3, seed=11, steps=40, progress=False))
    assert torch.equal(batch[5:6], sampler.sample(1, seed=11, steps=40, first_sample=5, progress=False))


def test_seed_none_follows_torch_manual_seed():
    sampler = Sampler(GaussianOracle(), SCHEDULE, sample_shape=(1, 2, 2))
    torch.manual_seed(0)
    a = sampler.sample(4, steps=10, progress=False)
    torch.manual_seed(0)
    assert torch.equal(a, sampler.sample(4, steps=10, progress=False))


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("variance, clip, eta", [("fixed_large", True, None), ("fixed_small", False, None),
                                                 ("fixed_large", True, 0.0), ("fixed_small", False, 0.5)])
def test_backends_agree(device, backend, variance, clip, eta):
    kw = dict(variance=variance, clip_denoised=clip, sample_shape=(2, 5, 3), device=device)
    run = dict(seed=4, steps=25, eta=eta, progress=False)
    ours = Sampler(GaussianOracle(), SCHEDULE, backend=backend, **kw).sample(6, **run)
    ref = Sampler(GaussianOracle(), SCHEDULE, backend="reference", **kw).sample(6, **run)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_model_sees_its_dtype_format_and_original_timesteps():
    oracle = GaussianOracle()
    timesteps = []
    model = lambda x, t: (timesteps.append(t.clone()), oracle(x, t))[1]  # noqa: E731
    sampler = Sampler(model, SCHEDULE, dtype=torch.bfloat16, channels_last=True, sample_shape=(3, 4, 4))
    x = sampler.sample(2, seed=0, steps=5, progress=False)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 4, 4)
    assert all(dtype == torch.bfloat16 and not contiguous and shape == (2,) for dtype, contiguous, shape in oracle.seen)
    assert [int(t[0]) for t in timesteps] == [999, 749, 500, 250, 0]


@pytest.mark.parametrize("device,backend", [("cpu", "reference"), *backend_params()])
def test_channels_last_sampling_gives_the_same_samples(monkeypatch, device, backend):
    # The noise follows the logical index in either memory format, so keeping the
    # chain channels_last (no eps copy, no transposed model-input writes) changes nothing.
    formats = []

    def step(x_t, eps, *args, **kwargs):
        formats.append((x_t.is_contiguous(), eps.is_contiguous(), kwargs["out_model_input"].is_contiguous()))
        return ddpm_step(x_t, eps, *args, **kwargs)

    ddpm_step = ops.ddpm_step
    monkeypatch.setattr(ops, "ddpm_step", step)
    kw = dict(clip_denoised=True, sample_shape=(3, 5, 4), device=device, backend=backend, cuda_graph=False)
    nchw = Sampler(GaussianOracle(), SCHEDULE, **kw).sample(3, seed=8, steps=20, progress=False)
    assert formats == [(True, True, True)] * 20
    formats.clear()
    x, pictures = Sampler(GaussianOracle(), SCHEDULE, channels_last=True, **kw).sample(
        3, seed=8, steps=20, progress=False, return_intermediates=10
    )
    assert formats == [(False, False, False)] * 20  # x, eps and the model input all channels_last
    assert torch.equal(x, nchw) and x.is_contiguous()
    assert all(p.x_t.is_contiguous() and p.pred_x0.is_contiguous() for p in pictures)


def test_channels_last_defaults_to_the_models_weights():  # ddpm_fast.nn.has_channels_last_weights
    def convs(*sizes) -> torch.nn.Module:  # (in, out, kernel) convolutions
        return torch.nn.Sequential(*(torch.nn.Conv2d(i, o, k) for i, o, k in sizes))

    model = convs((3, 8, 3), (8, 3, 1))
    assert Sampler(model, SCHEDULE, sample_shape=(3, 8, 8)).channels_last is False
    model = model.to(memory_format=torch.channels_last)
    assert Sampler(model, SCHEDULE, sample_shape=(3, 8, 8)).channels_last is True
    assert Sampler(model, SCHEDULE, channels_last=False, sample_shape=(3, 8, 8)).channels_last is False
    # Weights that are both (1x1 kernels, one input channel) say nothing; functions have none.
    one_by_one = convs((1, 8, 1), (8, 3, 1)).to(memory_format=torch.channels_last)
    assert Sampler(one_by_one, SCHEDULE, sample_shape=(1, 8, 8)).channels_last is False
    assert Sampler(GaussianOracle(), SCHEDULE, sample_shape=(3, 8, 8)).channels_last is False


def test_intermediates():
    sampler = Sampler(GaussianOracle(), SCHEDULE, sample_shape=(1, 4, 4))
    x, pictures = sampler.sample(3, seed=1, return_intermediates=250, progress=False)
    assert [p.t for p in pictures] == [750, 500, 250, 0]
    assert torch.equal(pictures[-1].x_t, x)
    assert all(p.pred_x0.shape == x.shape and p.pred_x0.abs().max() <= 1 for p in pictures)
    assert torch.equal(x, sampler.sample(3, seed=1, progress=False))


@pytest.mark.parametrize("clip", [False, True])
def test_intermediates_hold_the_x0_each_step_implied(clip):
    """A picture's pred_x0 is the x0 that the model's eps implied at its step
    (eq. 4 solved for x0, clipped as the chain clips), from the chain's state
    before that step: the previous picture's x_t when every step is recorded.
    (The model eps = 0.1 x implies x0 far outside [-1, 1], so clipping shows.)"""
    ts = respaced_timesteps(1000, 10)
    sampler = Sampler(lambda x, t: 0.1 * x, SCHEDULE, clip_denoised=clip, sample_shape=(1, 4, 4))
    x, pictures = sampler.sample(3, seed=1, steps=10, return_intermediates=1, progress=False)
    assert [p.t for p in pictures] == list(range(9, -1, -1)) and [p.timestep for p in pictures] == ts[::-1]
    abar = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))
    for before, picture in zip(pictures, pictures[1:]):
        a, x_t = abar[picture.timestep], before.x_t.double()
        x0 = (x_t - (1 - a).sqrt() * 0.1 * x_t) / a.sqrt()
        assert x0.abs().max() > 1
        torch.testing.assert_close(picture.pred_x0.double(), x0.clamp(-1, 1) if clip else x0, atol=1e-5, rtol=1e-5)


def test_pred_x0_where_abar_is_below_float32s_range():
    """Where abar_t < ~1e-77, 1 / sqrt(abar_t) overflows float32: the x0 the
    pictures hold is then +-inf, clipped to +-1, as diffusion.predict_x0_from_eps
    gives it. The Sampler's own difference of two products made inf - inf = NaN
    pictures there (the samples themselves were finite)."""
    schedule = NoiseSchedule("const", timesteps=400, beta_end=0.5)  # abar_399 = 2^-400, about 4e-121
    sampler = Sampler(lambda x, t: 0.5 * x, schedule, clip_denoised=True, sample_shape=(1, 2, 2))
    x, pictures = sampler.sample(2, seed=0, return_intermediates=1, progress=False)
    first = pictures[0]  # the step from t = 399, whose eps 0.5 x_T implies x0 = 0.5 x_T / sqrt(abar_399)
    assert first.t == 399 and torch.isfinite(x).all()
    assert first.pred_x0.abs().eq(1).all(), first.pred_x0


@pytest.mark.parametrize("clip", [False, True])
def test_pred_x0_of_a_model_whose_eps_is_its_input(clip):
    """eps that shares memory with the model's input (x.mul_(s), or x itself):
    pred_x0 was computed after the step had written the next model input
    there, so it was made from x_{t-1} (errors of 2 on [-1, 1]); samples and
    x_t were right."""
    results = []
    for model in (lambda x, t: 0.1 * x, lambda x, t: x.mul_(0.1)):
        sampler = Sampler(model, SCHEDULE, clip_denoised=clip, sample_shape=(1, 4, 4))
        results.append(sampler.sample(2, seed=0, steps=10, return_intermediates=1, progress=False))
    (x, pictures), (x_aliased, pictures_aliased) = results
    assert torch.equal(x, x_aliased)
    for p, q in zip(pictures, pictures_aliased):
        assert torch.equal(p.x_t, q.x_t) and torch.equal(p.pred_x0, q.pred_x0), p.t


def test_defaults_follow_the_model_as_it_is_when_sampling():
    """dtype, channels_last and device were read from the model once, when the
    Sampler was made: a model cast to bfloat16 after was fed float32 ("Input
    type (float) and bias type (c10::BFloat16) should be the same")."""
    class Conv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            # (4 -> 1: its channels_last weight differs from a contiguous one)
            self.conv = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Conv2d(4, 1, 3, padding=1))

        def forward(self, x, t):
            seen.append(x.dtype)
            return self.conv(x)

    seen = []
    model = Conv()
    schedule = NoiseSchedule("linear", timesteps=10)
    sampler = Sampler(model, schedule, sample_shape=(1, 8, 8))
    fixed = Sampler(model, schedule, sample_shape=(1, 8, 8), dtype=torch.float32, channels_last=False)
    model.to(torch.bfloat16).to(memory_format=torch.channels_last)
    assert (sampler.dtype, sampler.channels_last, sampler.device) == (torch.bfloat16, True, torch.device("cpu"))
    x = sampler.sample(2, seed=0, progress=False)
    assert x.dtype == torch.float32 and x.isfinite().all() and set(seen) == {torch.bfloat16}
    assert (fixed.dtype, fixed.channels_last) == (torch.float32, False)  # given ones stay
    model.double()
    with pytest.raises(TypeError, match=r"the model's parameters are torch.float64.*model.float\(\)\), or pass dtype= if it casts its input itself"):
        sampler.sample(2, seed=0, progress=False)
    with pytest.raises(TypeError, match="the model's parameters are torch.float64"):  # when made, too
        Sampler(model, schedule, sample_shape=(1, 8, 8))
    Sampler(model, schedule, sample_shape=(1, 8, 8), dtype=torch.float32)  # dtype= feeds it float32


def test_non_finite_samples_are_reported():
    """A model that returns NaN at one step gives NaN samples; sample() says so."""
    def model(x, t):
        return torch.where(t.view(-1, 1, 1, 1) == 999, float("nan"), 0.1 * x)

    sampler = Sampler(model, SCHEDULE, sample_shape=(1, 2, 2))
    with pytest.warns(RuntimeWarning, match="8 of 8 sample values are NaN or Inf"):
        x = sampler.sample(2, seed=0, steps=10, progress=False)
    assert torch.isnan(x).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Sampler(lambda x, t: 0.1 * x, SCHEDULE, sample_shape=(1, 2, 2)).sample(2, seed=0, steps=10, progress=False)


def test_progress_bar_runs_and_counts_every_step(capsys):
    Sampler(GaussianOracle(), SCHEDULE, sample_shape=(1, 2, 2)).sample(2, seed=0, steps=5, progress=True)
    err = capsys.readouterr().err
    assert "sampling" in err and "5/5" in err


@pytest.mark.parametrize("n", [1, 3])
def test_the_model_gets_timesteps_it_may_change_in_place(n):
    """t was a stride-0 view of one value: a model changing it in place (t.clamp_)
    failed for N > 1 only, and a kernel reading N values from its pointer would read
    past the one it held."""
    seen = []

    def model(x, t):
        seen.append((t.is_contiguous(), t.stride(), t.dtype, t.shape))
        t.clamp_(max=999)
        return 0.1 * x

    Sampler(model, SCHEDULE, sample_shape=(1, 2, 2)).sample(n, seed=0, steps=3, progress=False)
    assert seen == [(True, (1,), torch.int64, torch.Size([n]))] * 3


def test_progress_must_be_a_bool():
    with pytest.raises(TypeError, match="progress must be a bool, got 'no'"):
        Sampler(GaussianOracle(), SCHEDULE, sample_shape=(1, 2, 2)).sample(2, seed=0, steps=2, progress="no")


class TestBadInput:
    def test_constructor(self):
        with pytest.raises(TypeError, match="callable"):
            Sampler("model", SCHEDULE)
        with pytest.raises(TypeError, match="NoiseSchedule"):
            Sampler(GaussianOracle(), "linear")
        with pytest.raises(ValueError, match="variance"):
            Sampler(GaussianOracle(), SCHEDULE, variance="learned")
        with pytest.raises(ValueError, match="backend"):
            Sampler(GaussianOracle(), SCHEDULE, backend="fastest")
        with pytest.raises(TypeError, match="dtype"):
            Sampler(GaussianOracle(), SCHEDULE, dtype=torch.float64)
        # Each was a raw error at sample() ('int' object is not iterable, ...), or read as True.
        for bad in (5, "ab", (1, 2.0, 2), (1, 0, 2), ()):
            with pytest.raises(ValueError, match="sample_shape must be a sequence of positive ints"):
                Sampler(GaussianOracle(), SCHEDULE, sample_shape=bad)
        for name in ("clip_denoised", "cuda_graph", "channels_last"):
            with pytest.raises(TypeError, match=f"{name} must be a bool"):
                Sampler(GaussianOracle(), SCHEDULE, **{name: "no"})

    def test_warnings_point_at_the_caller(self):
        """Not at torch.no_grad's wrapper in torch/utils/_contextlib.py."""
        sampler = Sampler(lambda x, t: torch.full_like(x, float("nan")), SCHEDULE, sample_shape=(1, 2, 2))
        with pytest.warns(RuntimeWarning, match="NaN or Inf") as seen:
            sampler.sample(1, seed=0, steps=2, progress=False)
        assert [w.filename for w in seen] == [__file__]

    @pytest.mark.parametrize(
        "args,kwargs,error,match",
        [
            ((4,), {}, ValueError, "sample_shape"),
            (((4,),), {}, ValueError, r"\(N, \.\.\.\)"),
            (((0, 1, 2, 2),), {}, ValueError, "positive"),
            (("four",), {}, TypeError, "n_or_shape"),
            (((2, 1, 2, 2),), dict(steps=0), ValueError, "steps"),
            (((2, 1, 2, 2),), dict(steps=1001), ValueError, "steps"),
            (((2, 1, 2, 2),), dict(eta=-1.0), ValueError, "eta"),
            (((2, 1, 2, 2),), dict(seed="x"), TypeError, "seed"),
            (((2, 1, 2, 2),), dict(first_sample=-1), ValueError, "first_sample"),
            (((2, 1, 2, 2),), dict(return_intermediates=0), ValueError, "return_intermediates"),
        ],
    )
    def test_sample_arguments(self, args, kwargs, error, match):
        with pytest.raises(error, match=match):
            Sampler(GaussianOracle(), SCHEDULE).sample(*args, progress=False, **kwargs)

    def test_model_returning_the_wrong_shape(self):
        sampler = Sampler(lambda x, t: x[:, :1], SCHEDULE, sample_shape=(2, 2, 2))
        with pytest.raises(ValueError, match="expected eps of shape"):
            sampler.sample(2, seed=0, steps=3, progress=False)


@pytest.mark.parametrize("steps,eta", [(None, None), (4, None), (4, 0.0)])
def test_schedule_with_an_undefined_step_is_refused_before_sampling(steps, eta):
    calls = []
    model = lambda x, t: calls.append(1) or torch.zeros_like(x)  # noqa: E731
    sampler = Sampler(model, NoiseSchedule("jsd", timesteps=10), sample_shape=(1, 4, 4))
    with pytest.raises(ValueError, match="undefined at timestep"):
        sampler.sample(2, seed=0, steps=steps, eta=eta, progress=False)
    assert not calls


def test_numpy_integers_are_counts_as_ints_are():
    """Counts read from arrays or configs (np.int64) were refused as 'not an
    int'; bools and floats still are."""
    sampler = Sampler(lambda x, t: torch.zeros_like(x), NoiseSchedule("linear", timesteps=np.int64(10)))
    want = sampler.sample((2, 1, 4, 4), seed=3, steps=5, first_sample=1, return_intermediates=2, progress=False)
    got = sampler.sample((np.int64(2), np.int32(1), 4, 4), seed=np.int64(3), steps=np.int16(5),
                         first_sample=np.uint8(1), return_intermediates=np.int64(2), progress=False)
    assert torch.equal(got[0], want[0]) and len(got[1]) == len(want[1])
    for bad in (True, 5.0, np.float64(5)):
        with pytest.raises(ValueError, match="steps must be an int"):
            sampler.sample((2, 1, 4, 4), steps=bad, progress=False)


@pytest.mark.parametrize("scheduler, setting", [
    ("ddim", dict(timestep_spacing="leading", eta=0.0)), ("ddim", dict(timestep_spacing="trailing", eta=0.0)),
    ("ddim", dict(timestep_spacing="leading", eta=0.5)), ("ddim", dict(timestep_spacing="trailing", eta=0.5)),
    ("ddpm", dict(variance="fixed_small")), ("ddpm", dict(variance="fixed_large")),
])
@pytest.mark.parametrize("clip", [False, True])
def test_whole_chains_equal_diffusers_schedulers(scheduler, setting, clip, monkeypatch):
    """50 steps of diffusers' DDIMScheduler (alpha 1 after the last step, the
    clipped x0's eps) or DDPMScheduler ('leading' timesteps), given our noise
    stream (x_T in slot K, step i's z in slot i), against the Sampler over the
    same timesteps: the chain's timestep map, noise slots and last step, which
    the single-step comparisons (test_ddpm_step_math.py) do not see."""
    diffusers = pytest.importorskip("diffusers")
    import diffusers.schedulers.scheduling_ddpm as scheduling_ddpm

    shape, seed = (4, 2, 4, 4), 5
    oracle = GaussianOracle(dtype=torch.float64, std=0.9)  # data wide enough that x0 is clipped
    z = lambda i: ops.randn(shape, seed, i * 32, sample_stride=_SAMPLE_STRIDE, backend="reference").double()  # noqa: E731
    common = dict(num_train_timesteps=1000, beta_schedule="linear", clip_sample=clip, steps_offset=0)
    if scheduler == "ddim":
        theirs = diffusers.DDIMScheduler(set_alpha_to_one=True, timestep_spacing=setting["timestep_spacing"], **common)
        step = lambda eps, t, x, i: theirs.step(eps, t, x, eta=setting["eta"], use_clipped_model_output=True,  # noqa: E731
                                                variance_noise=z(i)).prev_sample
        ours = dict(eta=setting["eta"])
    else:
        theirs = diffusers.DDPMScheduler(variance_type=setting["variance"], timestep_spacing="leading", **common)

        def step(eps, t, x, i):
            monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **kw: z(i).reshape(shape))
            return theirs.step(eps, t, x).prev_sample

        ours = dict(variance=setting["variance"])
    theirs.set_timesteps(50)
    timesteps = sorted(theirs.timesteps.tolist())
    x = z(len(timesteps))
    for t in reversed(timesteps):
        x = step(oracle(x, torch.full((shape[0],), t)), t, x, timesteps.index(t))
    monkeypatch.setattr(sampler_module, "respaced_timesteps", lambda num_timesteps, steps: list(timesteps))
    sampler = Sampler(oracle, SCHEDULE, sample_shape=shape[1:], clip_denoised=clip,
                      **{k: v for k, v in ours.items() if k == "variance"})
    got = sampler.sample(shape[0], seed=seed, steps=50, eta=ours.get("eta"), progress=False)
    assert not clip or (x.abs() > 1 - 1e-9).any()  # the data is wide enough for clipping to matter
    torch.testing.assert_close(got.double(), x, atol=1e-4, rtol=1e-4)


def test_respacing_ends_one_step_and_every_step():
    """steps=1 is the one step from T-1 (where x_T is) to x_0, not from 0; steps=T
    is the whole chain, the same samples as steps=None."""
    assert respaced_timesteps(1000, 1) == [999] and respaced_timesteps(1000, 1000) == list(range(1000))
    schedule = NoiseSchedule("linear", timesteps=10)
    seen = []
    sampler = Sampler(lambda x, t: (seen.append(int(t[0])), 0.1 * x)[1], schedule, sample_shape=(1, 2, 2))
    sampler.sample(2, seed=0, steps=1, progress=False)
    assert seen == [9]
    seen.clear()
    full = sampler.sample(2, seed=0, steps=10, progress=False)
    assert seen == list(range(9, -1, -1))
    torch.testing.assert_close(full, sampler.sample(2, seed=0, progress=False), atol=1e-6, rtol=1e-6)


def test_respacing_rounds_half_way_timesteps_as_round_does():
    """README: timesteps round(i (T-1) / (K-1)), Python's round (half to even, as
    numpy's and so diffusers' linspace spacing): 4.5 -> 4, 2.5 -> 2, 1.5 -> 2. A
    half-up rounding moves those steps (and so every sample of such a chain)."""
    assert respaced_timesteps(10, 3) == [0, 4, 9]
    assert respaced_timesteps(6, 3) == [0, 2, 5]
    assert respaced_timesteps(4, 3) == [0, 2, 3]
    assert respaced_timesteps(1000, 3) == [0, 500, 999]


def test_a_chain_past_a_samples_2_32_noise_counters_is_refused():
    """The K steps and x_T (slot K) take (K + 1) * D counters of a sample's 2^32:
    at K * D <= 2^32 < (K + 1) * D, x_T would run into the next sample's stream."""
    per_sample = 2**32 // 1000  # 1000 * D fits in 2^32, 1001 * D does not

    def never_called(x, t):
        raise AssertionError("the model ran although the chain's noise does not fit")

    sampler = Sampler(never_called, NoiseSchedule("linear", timesteps=1000), sample_shape=(1, per_sample))
    with pytest.raises(ValueError, match=r"exceed a sample's 2\^32 noise counters"):
        sampler.sample(1, seed=0, progress=False)


class _Reached(Exception):
    """Raised by the model: the chain started (the bound check let it through)."""


def test_a_chain_that_exactly_fills_a_samples_noise_counters_runs():
    """The bound is (K + 1) * D <= 2^32: at equality the K steps and x_T (slot K)
    use counters 0 .. 2^32 - 1 of the sample's stream, all its own, so the chain
    must run (the test before checks the refusal one step past it)."""
    steps, per_sample = (1 << 16) - 1, 1 << 16
    assert (steps + 1) * per_sample == _SAMPLE_STRIDE

    def model(x, t):
        raise _Reached

    sampler = Sampler(model, NoiseSchedule("linear", timesteps=steps), clip_denoised=False, sample_shape=(1, per_sample))
    with pytest.raises(_Reached):
        sampler.sample(1, seed=0, progress=False)
    too_long = Sampler(model, NoiseSchedule("linear", timesteps=steps + 1), clip_denoised=False, sample_shape=(1, per_sample))
    with pytest.raises(ValueError, match=r"exceed a sample's 2\^32 noise counters"):
        too_long.sample(1, seed=0, progress=False)


def test_infinite_samples_are_reported_too():
    """Inf, not only NaN: an unclipped chain of a model returning inf ends at -inf."""
    sampler = Sampler(lambda x, t: torch.full_like(x, float("inf")), SCHEDULE, clip_denoised=False, sample_shape=(1, 2, 2))
    with pytest.warns(RuntimeWarning, match="8 of 8 sample values are NaN or Inf"):
        x = sampler.sample(2, seed=0, steps=3, progress=False)
    assert (x == -float("inf")).all()


def test_defaults_are_fixed_large_and_clipped():
    """The documented defaults: variance fixed_large (sigma_t^2 = beta_t), clip_denoised on."""
    kw = dict(sample_shape=(1, 4, 4))
    run = dict(seed=0, steps=10, progress=False)
    model = lambda x, t: 0.1 * x  # noqa: E731  (implies x0 outside [-1, 1]: clipping shows)
    default = Sampler(model, SCHEDULE, **kw).sample(4, **run)
    assert torch.equal(default, Sampler(model, SCHEDULE, variance="fixed_large", clip_denoised=True, **kw).sample(4, **run))
    assert not torch.equal(default, Sampler(model, SCHEDULE, variance="fixed_small", **kw).sample(4, **run))


def test_sample_shape_defaults_from_a_models_image_size():
    """A model's in_channels and image_size (an int, or (H, W))."""
    model = GaussianOracle()
    model.in_channels, model.image_size = 2, (4, 6)
    assert Sampler(model, SCHEDULE).sample_shape == (2, 4, 6)
    model.image_size = 5
    assert Sampler(model, SCHEDULE).sample_shape == (2, 5, 5)


def test_device_defaults_to_the_models():
    """Not CUDA-if-available: a model's parameters on a device say where to sample
    (the meta device shows it without a GPU)."""
    model = torch.nn.Conv2d(1, 1, 1, device="meta")
    assert Sampler(model, SCHEDULE, sample_shape=(1, 2, 2)).device == torch.device("meta")
    assert Sampler(model, SCHEDULE, sample_shape=(1, 2, 2), device="cpu").device == torch.device("cpu")


class DropoutModel(torch.nn.Module):  # eps = dropout(0.1 x_t), in training mode as made
    def __init__(self, p: float):
        super().__init__()
        self.dropout = torch.nn.Dropout(p)

    def forward(self, x, t):
        return self.dropout(0.1 * x)


def test_dropout_warning_points_at_the_caller():
    """As the NaN warning does: not at torch.no_grad's wrapper; and p = 0 is no dropout."""
    with pytest.warns(RuntimeWarning, match="active dropout") as seen:
        Sampler(DropoutModel(0.5), SCHEDULE, sample_shape=(1, 2, 2)).sample(1, seed=0, steps=2, progress=False)
    assert [w.filename for w in seen] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        Sampler(DropoutModel(0.0), SCHEDULE, sample_shape=(1, 2, 2)).sample(1, seed=0, steps=2, progress=False)


def test_dropout_warning_looks_past_the_models_own_mode():
    """An eval model with one dropout module put back into training (as
    model.eval(); model.dropout.train()) still draws masks: warned of, by the
    Sampler and by evaluate_bpd (the model's own mode alone had silenced both);
    an eval model without such a module is not."""
    from ddpm_fast.sampler import _dropout_active

    model = DropoutModel(0.5).eval()
    assert not _dropout_active(model)
    model.dropout.train()
    with pytest.warns(RuntimeWarning, match="active dropout"):
        Sampler(model, SCHEDULE, sample_shape=(1, 2, 2)).sample(1, seed=0, steps=2, progress=False)
    assert _dropout_active(model)
