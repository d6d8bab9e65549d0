"""Sampler edges the main tests do not reach: the up-front refusal of undefined
steps checks the step the chain will run (DDIM at eta=0, clipped or not), the
2^31 sample bound is exclusive, the progress bar is closed however the chain
ends and absent without progress, flags refuse ints, and the CUDA-graph path
(torch.cuda faked, as in test_sampler_cuda_graph.py) joins its side stream,
keeps the caller's autocast, and falls back on any failed capture."""

from __future__ import annotations

import warnings

import pytest
import torch

import ddpm_fast.sampler as sampler_module
from ddpm_fast import NoiseSchedule, Sampler, graph_capture
from test_sampler import SCHEDULE, GaussianOracle
from test_sampler_cuda_graph import FakeCuda, FakeGraphContext, FakeStream

# abar_t falls below 1e-308 from t = 24 (1/abar_t overflows float64; it is 0
# from t = 25), while alpha_t = 2^-52 stays positive: the unclipped ancestral
# step (1/sqrt(alpha_t) columns) is defined there, every form through
# 1/sqrt(abar_t) (clipped x0, DDIM) is not.
UNDERFLOWING = NoiseSchedule(betas=torch.tensor([1e-4] * 5 + [1 - 2**-52] * 25, dtype=torch.float64))


def never_called(x, t):
    raise AssertionError("the model ran although the chain should have been refused")


def test_ddim_at_eta_zero_is_checked_as_ddim_not_as_ancestral():
    """eta=0.0 is DDIM (falsy, but given): its undefined steps refuse the run
    before the model runs, as the ancestral step's check alone would not."""
    sampler = Sampler(never_called, UNDERFLOWING, clip_denoised=False, sample_shape=(1, 2, 2))
    with pytest.raises(ValueError, match="undefined at timestep 24"):
        sampler.sample(2, seed=0, eta=0.0, progress=False)


def test_unclipped_ancestral_chain_is_not_refused_for_the_clipped_forms_undefined_steps():
    """The check follows clip_denoised: the unclipped step never divides by
    sqrt(abar_t), so it runs (and here, with eps = x_t, stays finite)."""
    sampler = Sampler(lambda x, t: x.clone(), UNDERFLOWING, clip_denoised=False, sample_shape=(1, 2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        x = sampler.sample(2, seed=0, progress=False)
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match="undefined at timestep 24"):  # clipped: x0 needs 1/sqrt(abar_t)
        Sampler(never_called, UNDERFLOWING, sample_shape=(1, 2, 2)).sample(2, seed=0, progress=False)


def test_first_sample_bound_is_exclusive():
    """first_sample + N must stay below 2^31 (sample 2^31 - 1's noise counters
    would reach 2^63): N = 1 at first_sample = 2^31 - 2 is the last run allowed."""
    sampler = Sampler(lambda x, t: 0.1 * x, NoiseSchedule("linear", timesteps=10), sample_shape=(1, 2, 2))
    with pytest.raises(ValueError, match=r"first_sample \+ N must stay below 2\^31"):
        sampler.sample(1, seed=0, steps=1, first_sample=2**31 - 1, progress=False)
    assert sampler.sample(1, seed=0, steps=1, first_sample=2**31 - 2, progress=False).shape == (1, 1, 2, 2)


@pytest.mark.parametrize("bad", [{"steps": 11}, {"eta": -1.0}, {"first_sample": -1}, {"return_intermediates": 0}])
def test_a_refused_call_without_a_seed_leaves_torchs_generator_alone(bad):
    """seed=None drew its seed from torch's generator before the arguments were checked."""
    sampler = Sampler(never_called, NoiseSchedule("linear", timesteps=10), sample_shape=(1, 2, 2))
    state = torch.get_rng_state()
    with pytest.raises(ValueError):
        sampler.sample(1, progress=False, **bad)
    assert torch.equal(torch.get_rng_state(), state)


def test_other_refused_calls_without_a_seed_leave_torchs_generator_alone():
    """A model cast to float64 since the Sampler was made, and sample_sharded's
    steps and eta, were refused after the seed was drawn; so were evaluate_bpd's
    too many noise counters."""
    from ddpm_fast.data import ImageDataset
    from ddpm_fast.distributed import sample_sharded
    from ddpm_fast.evaluate import evaluate_bpd

    model = torch.nn.Conv2d(1, 1, 1)
    sharded = Sampler(lambda x, t: model(x), NoiseSchedule("linear", timesteps=10), sample_shape=(1, 2, 2))
    images = ImageDataset(torch.zeros(1, 3, 1024, 1024, dtype=torch.uint8))
    calls = [
        (ValueError, lambda: sample_sharded(sharded, 2, seed=None, batch_size=2, steps=11, progress=False)),
        (ValueError, lambda: sample_sharded(sharded, 2, seed=None, batch_size=2, eta=-1.0, progress=False)),
        (ValueError, lambda: evaluate_bpd(model, images, NoiseSchedule("linear", timesteps=2000), seed=None, progress=False)),
    ]
    sampler = Sampler(model, NoiseSchedule("linear", timesteps=10), sample_shape=(1, 2, 2))
    model.double()
    calls.append((TypeError, lambda: sampler.sample(1, progress=False)))
    for error, call in calls:
        state = torch.get_rng_state()
        with pytest.raises(error):
            call()
        assert torch.equal(torch.get_rng_state(), state)


def test_progress_bar_is_closed_after_a_run_and_after_an_error(monkeypatch):
    """The bar is closed however the chain ends (an open tqdm bar redraws
    itself after the traceback or the next output)."""
    bars = []

    class Bar:
        def __init__(self, total):
            self.total, self.n, self.closed = total, 0, False
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            self.closed = True

    monkeypatch.setattr(sampler_module, "_progress", lambda total, on: Bar(total))
    schedule = NoiseSchedule("linear", timesteps=10)
    Sampler(lambda x, t: 0.1 * x, schedule, sample_shape=(1, 2, 2)).sample(2, seed=0, progress=True)
    assert (bars[0].total, bars[0].n, bars[0].closed) == (10, 10, True)

    calls = []

    def failing(x, t):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return 0.1 * x

    with pytest.raises(KeyboardInterrupt):
        Sampler(failing, schedule, sample_shape=(1, 2, 2)).sample(2, seed=0, progress=True)
    assert (bars[1].n, bars[1].closed) == (2, True)


def test_graph_path_joins_the_side_stream_before_replaying(monkeypatch):
    """The warm-up and capture run on a side stream; the caller's stream must
    wait for it before the replays and the plain steps queued there (else, on a
    GPU, they race the warm-up's writes to x)."""
    fake = FakeCuda(monkeypatch)
    monkeypatch.setattr(FakeStream, "wait_stream", lambda self, other: fake.log.append(("wait", self.name, other.name)))
    Sampler(fake.model(GaussianOracle()), SCHEDULE, sample_shape=(1, 2, 2)).sample(2, seed=0, steps=120, progress=False)
    events = [e[:2] if e[0] in ("model", "capture") else e for e in fake.log]
    waits = [i for i, e in enumerate(events) if e == ("wait", "caller", "side1")]
    first_replay = events.index(("replay",))
    assert events.index(("wait", "side1", "caller")) < events.index(("model", "side1"))  # side waits for x_T
    assert waits and events.index(("capture", "side1")) < waits[0] < first_replay


@pytest.mark.parametrize("enabled, dtype", [(True, torch.bfloat16), (False, torch.float16), (True, torch.float16)])
def test_graph_autocast_is_the_callers_without_its_cache(monkeypatch, enabled, dtype):
    """The context the warm-up and capture run under: CUDA autocast as the
    caller has it (on or off, its dtype), only with the weight cache off.
    (torch.cuda faked as available so that torch.autocast keeps what it is
    given on a CPU machine.)"""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    was = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", enabled)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        with graph_capture.autocast_without_cache():
            inside = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
                      torch.is_autocast_cache_enabled())
    finally:
        torch.set_autocast_enabled("cuda", was[0])
        torch.set_autocast_dtype("cuda", was[1])
    assert inside == (enabled, dtype, False)


def test_no_progress_bar_without_progress(capsys):
    """progress=False draws nothing (True draws the bar: test_sampler.py)."""
    Sampler(lambda x, t: 0.1 * x, NoiseSchedule("linear", timesteps=10), sample_shape=(1, 2, 2)).sample(
        2, seed=0, progress=False
    )
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_capture_failing_with_any_exception_falls_back(monkeypatch):
    """Not only RuntimeError: whatever a model raises during capture only (here
    a ValueError, with torch's capture_end then succeeding, so that the
    ValueError itself leaves torch.cuda.graph) is a failed capture: warned, the
    allocator's pool closed, and the plain loop's samples returned."""

    class CleanEnd(FakeGraphContext):  # capture_end succeeds: no CUDA error was queued
        def __exit__(self, *args):
            self.fake.capturing = False
            self.stream_ctx.__exit__(None, None, None)
            return False  # the model's own exception propagates

    fake = FakeCuda(monkeypatch, real_capture=True)

    def graph(cuda_graph, pool=None, stream=None, **kwargs):
        fake.pools.append(pool)
        return CleanEnd(fake, stream)

    monkeypatch.setattr(torch.cuda, "graph", graph)
    oracle = GaussianOracle()

    def model(x, t):
        if fake.capturing:
            raise ValueError("cannot trace this under capture")
        return oracle(x, t)

    kw = dict(sample_shape=(1, 2, 2))
    with pytest.warns(RuntimeWarning, match="capture failed .*ValueError: cannot trace"):
        x = Sampler(fake.model(model), SCHEDULE, **kw).sample(2, seed=0, steps=120, progress=False)
    plain = Sampler(GaussianOracle(), SCHEDULE, cuda_graph=False, **kw)
    assert torch.equal(x, plain.sample(2, seed=0, steps=120, progress=False))
    assert len(fake.ended_pools) == 1


@pytest.mark.parametrize("name", ["clip_denoised", "cuda_graph", "progress"])
def test_flags_refuse_ints(name):
    """A flag takes True or False only: 1 is refused as "yes" is."""
    schedule = NoiseSchedule("linear", timesteps=10)
    with pytest.raises(TypeError, match=f"{name} must be a bool, got 1"):
        if name == "progress":
            Sampler(never_called, schedule, sample_shape=(1, 2, 2)).sample(1, progress=1)
        else:
            Sampler(never_called, schedule, sample_shape=(1, 2, 2), **{name: 1})
