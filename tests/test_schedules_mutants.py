"""Mutation-testing gaps in ddpm_fast/schedules.py (second round): checks that
the existing schedule tests leave open. Expectations come from the definitions
in shared/DESIGN.md (Ho et al. 2020 eqs. 6-7; Nichol & Dhariwal 2021 sec. 4),
computed here in float64, never by calling the code under test.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ddpm_fast import NoiseSchedule


# Why: a respaced config records the sub-chain's timesteps as the set that was kept
# (sorted, repeats dropped, Python ints); timesteps given as numpy integers in any
# order must still give a JSON-ready config that names exactly the kept steps.
def test_respaced_config_records_the_kept_steps_as_json_ints():
    parent = NoiseSchedule("linear", timesteps=10)
    sub = parent.respace([np.int64(7), np.int64(2), np.int64(7), np.int32(0)])
    assert sub.config == {"respace_of": parent.config, "timesteps": [0, 2, 7]}
    assert all(type(s) is int for s in sub.config["timesteps"])
    text = json.dumps(sub.config)  # a checkpoint writes it as JSON
    again = NoiseSchedule.from_config(json.loads(text))
    assert again.timestep_map.tolist() == [0, 2, 7] == sub.timestep_map.tolist()


# Why: a bool inside a Python list of betas is refused like a bool array (torch
# would read True as beta = 1.0, the jsd end value, and accept the schedule).
@pytest.mark.parametrize("betas", [[0.1, True], (False, 0.2), [0.1, np.True_]])
def test_bool_in_a_list_of_betas_is_refused(betas):
    with pytest.raises(TypeError, match="real numbers, got a bool"):
        NoiseSchedule(betas=betas)


# Why: undefined_steps answers from a cache keyed by eta, and True == 1.0 with
# the same hash: a bool eta asked after eta=1.0 found 1.0's answer instead of
# the TypeError it gets on a fresh schedule.
def test_a_bool_eta_is_refused_after_a_cached_float_one():
    s = NoiseSchedule("linear", timesteps=10)
    assert s.undefined_steps("ddim", eta=1.0) == []
    with pytest.raises(TypeError, match="eta must be a number, got bool"):
        s.undefined_steps("ddim", eta=True)


# Why: a respaced step's beta = 1 - abar_t / abar_s, taken from the ratio once
# 1 - abar is large: (om_t - om_s) / abar_s would divide om's rounding by a tiny
# abar_s (1e-3 at t = 819 of the linear schedule) and lose ~3 digits of beta.
def test_respaced_betas_keep_their_digits_where_abar_is_small():
    b = np.linspace(1e-4, 0.02, 1000)
    ab = np.cumprod(1 - b)
    steps = [0, 500, 819, 820, 999]
    sub = NoiseSchedule("linear", timesteps=1000).respace(steps)
    want = 1 - ab[steps[1:]] / ab[steps[:-1]]
    np.testing.assert_allclose(sub.betas[1:].numpy(), want, rtol=1e-13)
