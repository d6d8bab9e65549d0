"""Sampler behaviours that a second mutation round found untested: the
respacing's rounding of half-way timesteps, and the noise-counter bound's
exact edge (a chain whose K steps and x_T fill a sample's 2^32 counters)."""

from __future__ import annotations

import pytest

from ddpm_fast import NoiseSchedule, Sampler
from ddpm_fast.sampler import _SAMPLE_STRIDE, respaced_timesteps


def test_respacing_rounds_half_way_timesteps_as_round_does():
    """README: timesteps round(i (T-1) / (K-1)), Python's round (half to even, as
    numpy's and so diffusers' linspace spacing): 4.5 -> 4, 2.5 -> 2, 1.5 -> 2. A
    half-up rounding moves those steps (and so every sample of such a chain)."""
    assert respaced_timesteps(10, 3) == [0, 4, 9]
    assert respaced_timesteps(6, 3) == [0, 2, 5]
    assert respaced_timesteps(4, 3) == [0, 2, 3]
    assert respaced_timesteps(1000, 3) == [0, 500, 999]


class _Reached(Exception):
    """Raised by the model: the chain started (the bound check let it through)."""


def test_a_chain_that_exactly_fills_a_samples_noise_counters_runs():
    """The bound is (K + 1) * D <= 2^32: at equality the K steps and x_T (slot K)
    use counters 0 .. 2^32 - 1 of the sample's stream, all its own, so the chain
    must run (test_sampler.py checks the refusal one step past it)."""
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
