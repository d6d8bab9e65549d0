"""The Sampler on a toy whose exact reverse process is known: data from one
Gaussian N(mu, s^2) per dimension, for which the optimal noise predictor is
eps*(x_t, t) = sqrt(1 - abar_t) (x_t - sqrt(abar_t) mu) / (abar_t s^2 + 1 - abar_t)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from conftest import backend_params
import ddpm_fast.sampler as sampler_module
from ddpm_fast import NoiseSchedule, Sampler, _extension, ops
from ddpm_fast.ops._backend import triton_available
from ddpm_fast.sampler import _SAMPLE_STRIDE, _NoBar, respaced_timesteps

SCHEDULE = NoiseSchedule("linear")
MU, S = 0.5, 0.2

# A CUDA-graph test that silently fell back to the plain loop would compare the
# plain loop with itself: here a failed capture is an error (pytest.warns, where
# a test expects one, still records it).
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
    y = ops.randn((64, 1, 4, 4), 3, len(ts) * 16, sample_stride=_SAMPLE_STRIDE, backend="reference").double()
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
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16, got torch.float64"):
        sampler.sample(2, seed=0, progress=False)


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


def test_progress_bar_runs(capsys):
    Sampler(GaussianOracle(), SCHEDULE, sample_shape=(1, 2, 2)).sample(2, seed=0, steps=5, progress=True)
    assert "sampling" in capsys.readouterr().err


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


def graph_backends() -> list:
    """The kernel backends a CUDA graph captures: GPU tests, skipped where not built."""
    built = {"cuda": _extension.WITH_CUDA, "triton": triton_available()}
    return [
        pytest.param(b, marks=[pytest.mark.gpu, pytest.mark.skipif(not built[b], reason=f"no {b} backend")])
        for b in built
    ]


@pytest.mark.parametrize("backend", graph_backends())
@pytest.mark.parametrize(
    "steps,eta",
    # 1000 steps: many replays; 120: two replays of 50 and leftover plain steps; DDIM.
    [(None, None), (120, None), (120, 0.0)],
)
def test_cuda_graph_equals_plain_loop(backend, steps, eta):
    kw = dict(clip_denoised=True, sample_shape=(3, 8, 8), device="cuda", backend=backend)
    run = dict(seed=2, steps=steps, eta=eta, progress=False)
    oracle = GaussianOracle()
    graphed = Sampler(oracle, SCHEDULE, cuda_graph=True, **kw).sample(16, **run)
    plain = Sampler(GaussianOracle(), SCHEDULE, cuda_graph=False, **kw).sample(16, **run)
    assert torch.equal(graphed, plain)
    # The model ran in Python for the 3 warm-up steps, the capture of 50 and the
    # leftover steps only: the replays did the rest.
    total = steps or 1000
    assert len(oracle.seen) == 3 + 50 + (total - 3) % 50


@pytest.mark.parametrize("backend", graph_backends())
def test_cuda_graph_of_the_unet_equals_plain_loop(backend):
    """The configuration the Sampler's defaults run: the U-Net (fused
    GroupNorm+SiLU with the time-embedding add, attention) in bf16
    channels_last, its input written by the step (out_model_input)."""
    from ddpm_fast.models import UNet

    torch.manual_seed(0)
    model = UNet.tiny(image_size=8, in_channels=3).cuda().eval().to(torch.bfloat16).to(memory_format=torch.channels_last)
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    kw = dict(dtype=torch.bfloat16, channels_last=True, device="cuda", backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to the plain loop, no non-finite samples
        graphed = Sampler(model, SCHEDULE, cuda_graph=True, **kw).sample(16, seed=5, steps=120, progress=False)
    assert len(calls) == 3 + 50 + (120 - 3) % 50  # the replays ran the rest
    plain = Sampler(model, SCHEDULE, cuda_graph=False, **kw).sample(16, seed=5, steps=120, progress=False)
    assert torch.equal(graphed, plain)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_graph_on_a_device_that_is_not_the_current_one():
    # Streams and graphs made on the current device (cuda:0) would capture nothing
    # of the work on cuda:1: the replays would do nothing and return about x_T.
    kw = dict(clip_denoised=True, sample_shape=(3, 8, 8), device="cuda:1")
    with torch.cuda.device(0):
        graphed = Sampler(GaussianOracle(), SCHEDULE, **kw).sample(16, seed=2, steps=120, progress=False)
        assert torch.cuda.current_device() == 0
    plain = Sampler(GaussianOracle(), SCHEDULE, cuda_graph=False, **kw).sample(16, seed=2, steps=120, progress=False)
    assert graphed.device == torch.device("cuda:1") and torch.equal(graphed, plain)


@pytest.mark.gpu
@pytest.mark.parametrize("weight_cache", ["off", "on"], ids=["sampler", "pre-fix-control"])
def test_cuda_graph_does_not_read_the_callers_autocast_cache(monkeypatch, weight_cache):
    """A graph captured under the caller's autocast must not read the weight casts
    autocast cached in the warm-up: autocast frees them when the caller's block
    exits, while the replays may still be queued. Here they are: the model sleeps
    on the GPU every step (~10 ms, ~1 s for the 100 replayed steps), so sample()
    returns and the block exits long before the replays run. The freed casts'
    blocks belong to the warm-up's (side) stream, the only stream the caching
    allocator hands them out on again: the test takes that stream, fills all its
    free blocks with NaN while the replays are queued, and only then waits for
    the samples. The Sampler (cache off in warm-up and capture; the graph owns its
    casts) must then equal the plain loop; the control reruns the same probe on
    the pre-fix Sampler (cache on: the graph reads the warm-up's cached cast), for
    which the probe must see different samples, or it could not catch the bug."""

    class SlowThroughConv(torch.nn.Module):  # the oracle, then a 1x1 identity conv that autocast runs in bfloat16
        def __init__(self):
            super().__init__()
            self.oracle = GaussianOracle()
            self.conv = torch.nn.Conv2d(3, 3, 1, bias=False)
            torch.nn.init.dirac_(self.conv.weight)
            self.sleep_cycles = 0

        def forward(self, x, t):
            if self.sleep_cycles:
                torch.cuda._sleep(self.sleep_cycles)  # a kernel: captured, and replayed every step
            return self.conv(self.oracle(x, t))

    model = SlowThroughConv().cuda()
    kw = dict(sample_shape=(3, 8, 8), clip_denoised=False)  # unclipped: a NaN weight reaches the samples
    run = dict(seed=1, steps=120, progress=False)  # 3 warm-up steps, 2 replays of 50, 17 plain steps
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = Sampler(model, SCHEDULE, cuda_graph=False, **kw).sample(4, **run)
    assert torch.isfinite(plain).all()

    if weight_cache == "on":  # the Sampler before the fix: warm-up and capture under the caller's cache
        monkeypatch.setattr(sampler_module, "_autocast_without_cache", contextlib.nullcontext)
    streams = []

    def recording_stream(*args, _stream=torch.cuda.Stream, **kwargs):
        streams.append(_stream(*args, **kwargs))
        return streams[-1]

    monkeypatch.setattr(torch.cuda, "Stream", recording_stream)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # few free blocks left over from other tests: a short fill below
    model.sleep_cycles = 20_000_000  # ~10 ms a step at the H100/H200 clocks
    with torch.autocast("cuda", dtype=torch.bfloat16):
        graphed = Sampler(model, SCHEDULE, **kw).sample(4, **run)
    # The block has exited: with the cache on, the cached casts are free now.
    # The Sampler's side stream is the first made (a torch.cuda.graph may also make its
    # class-wide default capture stream through the patch, on a process's first capture).
    side = streams[0]
    poison, reserved = [], torch.cuda.memory_reserved()
    with torch.cuda.stream(side):  # 512-byte NaN blocks until the stream's free blocks run out (a new segment)
        while torch.cuda.memory_reserved() == reserved and len(poison) < 1 << 16:
            poison += [torch.full((256,), float("nan"), dtype=torch.bfloat16, device="cuda") for _ in range(64)]
    assert torch.cuda.memory_reserved() > reserved, "the side stream's free blocks did not run out"
    assert not torch.cuda.current_stream().query(), "the chain finished before the probe: it would show nothing"
    if weight_cache == "off":
        assert torch.equal(graphed, plain)
    else:
        assert not torch.equal(graphed, plain), "the probe did not see the pre-fix Sampler's use-after-free"


@pytest.mark.gpu
def test_cuda_graph_falls_back_when_capture_fails():
    def syncing_model(x, t):
        _ = t.max().item()  # a host sync: not capturable
        return torch.zeros_like(x)

    sampler = Sampler(syncing_model, SCHEDULE, sample_shape=(1, 4, 4), device="cuda")
    caller = torch.cuda.current_stream()
    with pytest.warns(RuntimeWarning, match="capture failed") as record:
        x = sampler.sample(2, seed=0, steps=120, progress=False)  # long enough for graphs
    assert "previous error" not in str(record[0].message)  # the sync's error, not capture_end's
    assert torch.cuda.current_stream() == caller
    assert torch.isfinite(x).all()
    assert sampler.cuda_graph is False  # remembered: the next call does not try again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(sampler.sample(2, seed=0, steps=120, progress=False), x)


@pytest.mark.parametrize("steps,eta", [(None, None), (4, None), (4, 0.0)])
def test_schedule_with_an_undefined_step_is_refused_before_sampling(steps, eta):
    calls = []
    model = lambda x, t: calls.append(1) or torch.zeros_like(x)  # noqa: E731
    sampler = Sampler(model, NoiseSchedule("jsd", timesteps=10), sample_shape=(1, 4, 4))
    with pytest.raises(ValueError, match="undefined at timestep"):
        sampler.sample(2, seed=0, steps=steps, eta=eta, progress=False)
    assert not calls


# ---------------------------------------------------------------------------
# The graph path's logic on the CPU, with torch.cuda faked (the GPU tests above
# check that real graphs compute the same samples).


class FakeCuda:
    """Enough of torch.cuda for the Sampler's graph path to run on CPU tensors.

    Queued work runs at once, except what a capture records: a fake graph runs
    the recorded steps on each replay (as a real capture records work without
    running it). ``log`` lists, in order, model calls (with the stream and the
    device they ran under), warm-up and capture streams, replays, event records
    and syncs, and progress-bar updates.
    """

    def __init__(self, monkeypatch, real_capture: bool = False):
        self.log: list[tuple] = []
        self.current = FakeStream("caller")  # the current stream
        self.device = None  # the current device, as torch.cuda.device set it
        self.streams = self.events = self.captures = 0
        self.capturing = False
        monkeypatch.setattr(sampler_module, "_on_cuda", lambda x: True)
        if real_capture:  # the Sampler's _capture, on a fake torch.cuda.graph and allocator
            self.pools: list[tuple] = []  # the pools captures were given
            self.ended_pools: list[tuple] = []  # (device, pool) of each _cuda_endAllocateToPool call
            self.end_pool_raises = False  # as torch >= 2.12 does after a failed capture_end
            monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda *args, **kwargs: object())
            monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, 100 + len(self.pools)))
            monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
            monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", self.end_allocate_to_pool, raising=False)
            monkeypatch.setattr(torch.cuda, "graph", self.graph)
        else:
            monkeypatch.setattr(sampler_module, "_capture", self.capture)
        monkeypatch.setattr(sampler_module, "_progress", lambda total, on: FakeBar(self.log) if on else _NoBar())
        monkeypatch.setattr(torch.cuda, "Stream", self.new_stream)
        monkeypatch.setattr(torch.cuda, "stream", self.stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.current)
        monkeypatch.setattr(torch.cuda, "device", self.use_device)
        monkeypatch.setattr(torch.cuda, "Event", self.new_event)

    def new_event(self, *args, **kwargs):
        self.events += 1
        return FakeEvent(self.log, self.events)

    def new_stream(self, *args, **kwargs):
        self.streams += 1
        return FakeStream(f"side{self.streams}")

    def stream(self, stream):
        return FakeStreamContext(self, stream)

    @contextlib.contextmanager
    def use_device(self, device):
        previous, self.device = self.device, torch.device(device)
        try:
            yield
        finally:
            self.device = previous

    def graph(self, graph, pool=None, stream=None, **kwargs):
        self.pools.append(pool)
        return FakeGraphContext(self, stream)

    def end_allocate_to_pool(self, device, pool):
        self.ended_pools.append((device, pool))
        if self.end_pool_raises:
            raise RuntimeError("endAllocatePool: not currently recording to mempool_id")

    def capture(self, steps, stream):
        self.captures += 1
        self.log.append(("capture", stream.name))
        self.autocast_cache_at_capture = torch.is_autocast_cache_enabled()
        return FakeGraph(steps, self.log)

    def model(self, oracle):
        def model(x, t):
            self.log.append(("model", str(self.current), self.device, torch.is_autocast_cache_enabled()))
            return oracle(x, t)

        return model


class FakeStreamContext:
    """torch.cuda.stream: sets the current stream; its exit restores the previous one."""

    def __init__(self, fake, stream):
        self.fake, self.stream = fake, stream

    def __enter__(self):
        self.previous, self.fake.current = self.fake.current, self.stream

    def __exit__(self, *args):
        self.fake.current = self.previous


class FakeGraphContext:
    """torch.cuda.graph as torch (2.11 to 2.14) writes it: enter the capture
    stream, begin capture; on exit end the capture, which raises after any failure
    during capture, and only then restore the previous stream."""

    def __init__(self, fake, stream):
        self.fake, self.stream_ctx = fake, fake.stream(stream)

    def __enter__(self):
        self.stream_ctx.__enter__()
        self.fake.capturing = True

    def __exit__(self, *args):
        self.fake.capturing = False
        if args[0] is not None:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        self.stream_ctx.__exit__(None, None, None)


class FakeStream:
    def __init__(self, name):
        self.name = name

    def wait_stream(self, other):
        pass

    def __str__(self):
        return self.name


class FakeGraph:
    def __init__(self, steps, log):
        self.steps, self.log = steps, log

    def replay(self):
        self.log.append(("replay",))
        self.steps()


class FakeEvent:
    def __init__(self, log, number):
        self.log, self.number = log, number

    def record(self):
        self.log.append(("record", self.number))

    def synchronize(self):
        self.log.append(("sync", self.number))


class FakeBar:
    def __init__(self, log):
        self.log = log

    def update(self, n):
        self.log.append(("bar", n))

    def close(self):
        pass


def model_streams(log):
    """The streams of the model calls in ``log``, run-length encoded."""
    runs = []
    for entry in log:
        if entry[0] == "model":
            if runs and runs[-1][0] == entry[1]:
                runs[-1][1] += 1
            else:
                runs.append([entry[1], 1])
    return [tuple(r) for r in runs]


@pytest.mark.parametrize("steps", [1, 3, 4, 53, 102, 103, 120, None])
def test_graph_path_equals_the_plain_loop_on_fake_cuda(monkeypatch, steps):
    fake = FakeCuda(monkeypatch)
    kw = dict(clip_denoised=True, sample_shape=(2, 3, 3))
    run = dict(seed=5, steps=steps, progress=False)
    graphed = Sampler(fake.model(GaussianOracle()), SCHEDULE, **kw).sample(4, **run)
    assert torch.equal(graphed, Sampler(GaussianOracle(), SCHEDULE, cuda_graph=False, **kw).sample(4, **run))
    # From 103 steps (room for two replays after the warm-up): 3 real chain
    # steps on the side stream, then graphs of 50 steps replayed on the caller's
    # stream while 50 remain, then plain steps. Shorter chains: the plain loop.
    total = steps or 1000
    if total >= 103:
        replays = (total - 3) // 50
        expected = [("side1", 3), ("caller", total - 3)]
    else:
        replays = 0
        expected = [("caller", total)]
    assert model_streams(fake.log) == expected
    # ... all with the sampler's device current (torch.cuda.device), graphs or not.
    assert all(e[2] == torch.device("cpu") for e in fake.log if e[0] == "model")
    assert fake.captures == (replays > 0) and [e for e in fake.log if e[0] == "replay"] == [("replay",)] * replays


def test_failed_capture_restores_the_stream_names_its_cause_and_is_not_retried(monkeypatch):
    fake = FakeCuda(monkeypatch, real_capture=True)
    oracle = GaussianOracle()

    def syncing(x, t):
        if fake.capturing:  # as t.item() would on the GPU
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return oracle(x, t)

    kw = dict(clip_denoised=True, sample_shape=(2, 3, 3))
    sampler = Sampler(fake.model(syncing), SCHEDULE, **kw)
    plain = Sampler(GaussianOracle(), SCHEDULE, cuda_graph=False, **kw)
    with pytest.warns(RuntimeWarning, match="capture failed") as record:
        x = sampler.sample(4, seed=5, steps=120, progress=False)
    message = str(record[0].message)
    assert "not permitted when stream is capturing" in message and "previous error" not in message
    assert torch.equal(x, plain.sample(4, seed=5, steps=120, progress=False))
    # 3 warm-up steps and the failed capture on the side stream; the rest, after
    # the failure, on the caller's stream again.
    assert model_streams(fake.log) == [("side1", 4), ("caller", 117)] and str(fake.current) == "caller"
    # The failure is remembered: the next call neither warms up nor captures.
    assert sampler.cuda_graph is False
    fake.log.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = sampler.sample(4, seed=6, steps=120, progress=False)
    assert torch.equal(y, plain.sample(4, seed=6, steps=120, progress=False))
    assert model_streams(fake.log) == [("caller", 120)] and fake.streams == 1


@pytest.mark.parametrize("fixed_torch", [False, True], ids=["torch-2.11", "torch-2.12+"])
def test_failed_capture_stops_the_allocator_recording_to_its_pool(monkeypatch, fixed_torch):
    """torch before 2.12 leaves the caching allocator recording to a capture's
    pool when capture_end fails (pytorch#180395); its next synchronize aborts the
    process. The Sampler ends the recording to the pool its capture was given, on
    the current device; where torch already did, the allocator's refusal is fine."""
    fake = FakeCuda(monkeypatch, real_capture=True)
    fake.end_pool_raises = fixed_torch

    def syncing(x, t):
        if fake.capturing:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return torch.zeros_like(x)

    with pytest.warns(RuntimeWarning, match="capture failed"):
        x = Sampler(fake.model(syncing), SCHEDULE, sample_shape=(1, 2, 2)).sample(2, seed=0, steps=120, progress=False)
    assert torch.isfinite(x).all()
    assert len(fake.pools) == 1 and fake.ended_pools == [(3, fake.pools[0])]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_process_survives_a_failed_capture_and_empty_cache():
    """On the GPU, in a process of its own (an abort would take the test run with
    it): a capture that fails, then the allocator's synchronize (empty_cache)."""
    script = (
        "import torch, warnings\n"
        "from ddpm_fast import Sampler, NoiseSchedule\n"
        "def syncing(x, t):\n"
        "    _ = t.max().item()\n"
        "    return torch.zeros_like(x)\n"
        "warnings.simplefilter('ignore')\n"
        "s = Sampler(syncing, NoiseSchedule('linear'), sample_shape=(1, 4, 4), device='cuda')\n"
        "x = s.sample(2, seed=0, steps=120, progress=False)\n"
        "assert s.cuda_graph is False\n"
        "torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.synchronize()\n"
        "y = torch.ones(1 << 20, device='cuda').sum().item()\n"
        "print('ok', float(x.abs().sum()), y)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("steps", [120, 203])
def test_progress_bar_counts_a_replay_once_it_has_run(monkeypatch, steps):
    fake = FakeCuda(monkeypatch)
    sampler = Sampler(fake.model(GaussianOracle()), SCHEDULE, sample_shape=(1, 2, 2))
    sampler.sample(2, seed=0, steps=steps, progress=True)
    log = [(e[0], "abcd"[e[1] - 1]) if e[0] in ("record", "sync") else e for e in fake.log if e[0] != "model"]
    # Each replay's event is waited for once the next replay is queued (the last,
    # once the leftover plain steps are), and only then is the replay counted.
    if steps == 120:  # 3 warm-up steps, 2 replays of 50, 17 plain steps
        assert log == [
            ("bar", 3), ("capture", "side1"),
            ("replay",), ("record", "a"), ("replay",), ("record", "b"), ("sync", "a"), ("bar", 50),
            *[("bar", 1)] * 17, ("sync", "b"), ("bar", 50),
        ]
    else:  # 3 warm-up steps, 4 replays of 50
        assert log == [
            ("bar", 3), ("capture", "side1"),
            ("replay",), ("record", "a"),
            ("replay",), ("record", "b"), ("sync", "a"), ("bar", 50),
            ("replay",), ("record", "c"), ("sync", "b"), ("bar", 50),
            ("replay",), ("record", "d"), ("sync", "c"), ("bar", 50),
            ("sync", "d"), ("bar", 50),
        ]
    # Without a bar: no events, no waits.
    fake.log.clear()
    sampler.sample(2, seed=0, steps=steps, progress=False)
    assert not [e for e in fake.log if e[0] in ("record", "sync")]


def test_warm_up_and_capture_run_without_the_autocast_weight_cache(monkeypatch):
    # Cached casts made in the warm-up would be read by the graph but freed when
    # the caller's autocast block exits; uncached, the graph makes its own.
    fake = FakeCuda(monkeypatch)
    Sampler(fake.model(GaussianOracle()), SCHEDULE, sample_shape=(1, 2, 2)).sample(2, seed=0, steps=120, progress=False)
    cache = [(e[1], e[3]) for e in fake.log if e[0] == "model"]
    assert cache[:3] == [("side1", False)] * 3 and fake.autocast_cache_at_capture is False
    assert torch.is_autocast_cache_enabled()  # as it was


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
    the single-step comparisons (test_ddpm_step.py) do not see."""
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
