"""NoiseSchedule and make_betas against independent float64 numpy formulas.

Every expectation here is rebuilt from the definitions in shared/DESIGN.md
(Ho et al. 2020; Nichol & Dhariwal 2021 for cosine) with numpy, never by
calling the code under test.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

from ddpm_fast import NoiseSchedule
from ddpm_fast.schedules import SCHEDULES, TABLES, make_betas

RTOL = 1e-12  # float64 tables, computed by a different route (numpy vs torch)
SIZES = [10, 37, 1000]


# ---------------------------------------------------------------- references


def np_betas(name: str, T: int, start: float = 1e-4, end: float = 0.02) -> np.ndarray:
    """The float64 betas of each schedule, straight from the definitions."""
    if name == "linear":
        return np.linspace(start, end, T, dtype=np.float64)
    if name == "quad":
        return np.linspace(math.sqrt(start), math.sqrt(end), T, dtype=np.float64) ** 2
    if name == "const":
        return np.full(T, end, dtype=np.float64)
    if name in ("warmup10", "warmup50"):
        n = int(T * (0.1 if name == "warmup10" else 0.5))
        b = np.full(T, end, dtype=np.float64)
        b[:n] = np.linspace(start, end, n, dtype=np.float64)
        return b
    if name == "jsd":
        return 1.0 / np.linspace(T, 1, T, dtype=np.float64)
    if name == "cosine":
        s = np.arange(T + 1, dtype=np.float64) / T
        # Python's libm cos: numpy 1.22's float64 cos (SVML on AVX-512) is 1.5 ulp off, 6.7e-16 in beta.
        abar = np.array([math.cos(v) for v in (s + 0.008) / 1.008 * np.pi / 2]) ** 2
        return np.minimum(1.0 - abar[1:] / abar[:-1], 0.999)
    raise AssertionError(name)


def np_tables(b: np.ndarray) -> dict[str, np.ndarray]:
    """Every derived table, from betas, in float64 numpy."""
    with np.errstate(divide="ignore"):  # jsd ends with beta = 1, so abar_T = 0
        a = 1.0 - b
        ab = np.cumprod(a)
        abp = np.concatenate([[1.0], ab[:-1]])
        pv = b * (1.0 - abp) / (1.0 - ab)
        large = np.concatenate([[pv[1]], b[1:]])
        return {
            "betas": b,
            "alphas": a,
            "alphas_cumprod": ab,
            "alphas_cumprod_prev": abp,
            "sqrt_alphas_cumprod": np.sqrt(ab),
            "one_minus_alphas_cumprod": 1.0 - ab,
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ab),
            "log_one_minus_alphas_cumprod": np.log1p(-ab),  # accurate where abar is tiny
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ab),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ab - 1.0),
            "sqrt_recip_alphas": np.sqrt(1.0 / a),
            "eps_coef": b / np.sqrt(1.0 - ab),
            "posterior_variance": pv,
            "posterior_log_variance_clipped": np.log(np.concatenate([[pv[1]], pv[1:]])),
            "posterior_mean_coef1": b * np.sqrt(abp) / (1.0 - ab),
            "posterior_mean_coef2": (1.0 - abp) * np.sqrt(a) / (1.0 - ab),
            "fixed_large_variance": large,
            "fixed_large_log_variance": np.log(large),
        }


def assert_close64(got: torch.Tensor, want: np.ndarray, rtol: float = RTOL, atol: float = 0.0) -> None:
    assert got.dtype == torch.float64 and got.device.type == "cpu"
    assert tuple(got.shape) == want.shape
    np.testing.assert_allclose(got.numpy(), want, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- betas


@pytest.mark.parametrize("T", SIZES)
@pytest.mark.parametrize("name", SCHEDULES)
def test_betas_match_definition(name, T):
    """make_betas and NoiseSchedule(name) give each schedule's defined betas."""
    want = np_betas(name, T)
    # cosine: 1 - ratio loses a few ulps of relative precision on tiny betas
    atol = 1e-16 if name == "cosine" else 0.0
    assert_close64(make_betas(name, T), want, atol=atol)
    assert_close64(NoiseSchedule(name, timesteps=T).betas, want, atol=atol)


def test_linear_defaults_are_ho_et_al():
    """The default schedule is DDPM's: linear 1e-4 -> 0.02 over T = 1000."""
    s = NoiseSchedule()
    assert s.name == "linear" and s.num_timesteps == len(s) == 1000
    assert s.betas[0].item() == pytest.approx(1e-4, rel=1e-15, abs=0.0)
    assert s.betas[-1].item() == pytest.approx(0.02, rel=1e-15, abs=0.0)
    assert_close64(s.betas, np.linspace(1e-4, 0.02, 1000))


@pytest.mark.parametrize("name", ["linear", "quad", "const", "warmup10", "warmup50"])
def test_custom_beta_start_end_honoured(name):
    """beta_start / beta_end replace the defaults for the schedules that take them."""
    T, start, end = 37, 3e-3, 0.15
    want = np_betas(name, T, start, end)
    assert_close64(make_betas(name, T, beta_start=start, beta_end=end), want)
    assert_close64(NoiseSchedule(name, timesteps=T, beta_start=start, beta_end=end).betas, want)
    assert make_betas(name, T, beta_start=start, beta_end=end)[-1].item() == pytest.approx(end, rel=1e-15, abs=0.0)


@pytest.mark.parametrize("T", [10, 100, 1000])
def test_warmup_boundary(T):
    """warmupP ramps over the first int(P% * T) steps and holds beta_end after; a
    one-step ramp (T = 10, 10%) is just [beta_start], as np.linspace(a, b, 1) is."""
    for name, frac in (("warmup10", 0.1), ("warmup50", 0.5)):
        b = make_betas(name, T).numpy()
        n = int(T * frac)
        assert b[0] == pytest.approx(1e-4, rel=1e-15, abs=0.0)
        if n > 1:
            assert b[n - 1] == pytest.approx(0.02, rel=1e-15, abs=0.0)
        assert np.all(np.diff(b[:n]) > 0)
        assert np.all(b[n:] == 0.02)


@pytest.mark.parametrize("T", SIZES)
def test_cosine_clip_is_hit(T):
    """abar(1) = cos^2(pi/2) ~ 0, so the last cosine beta is capped at exactly 0.999."""
    b = make_betas("cosine", T).numpy()
    assert b[-1] == 0.999
    assert np.all(b <= 0.999) and np.all(b > 0)
    # The unclipped ratio really does exceed the cap at the end.
    ab = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert 1 - ab(1.0) / ab((T - 1) / T) > 0.999


def test_jsd_is_reciprocal_countdown():
    """jsd: 1/T, 1/(T-1), ..., 1."""
    b = make_betas("jsd", 10).numpy()
    np.testing.assert_allclose(b, [1 / k for k in range(10, 0, -1)], rtol=1e-15)


# ---------------------------------------------------------------- derived tables


@pytest.mark.parametrize("T", SIZES)
@pytest.mark.parametrize("name", SCHEDULES)
def test_derived_tables(name, T):
    """Every table of NoiseSchedule against its numpy formula (from numpy betas)."""
    s = NoiseSchedule(name, timesteps=T)
    want = np_tables(np_betas(name, T))
    assert set(want) == set(TABLES)
    for key, ref in want.items():
        got = getattr(s, key)
        try:
            assert_close64(got, ref)
        except AssertionError as e:
            raise AssertionError(f"table {key!r} ({name}, T={T}): {e}") from None


@pytest.mark.parametrize("name", SCHEDULES)
def test_zero_based_timesteps(name):
    """Index t is the paper's t+1: the first step has abar_prev = 1, a zero-variance
    posterior whose mean is x0 (c1 = 1, c2 = 0); fixed_large at t = 0 is beta~_1."""
    s = NoiseSchedule(name, timesteps=37)
    b0 = s.betas[0].item()
    assert s.alphas_cumprod[0].item() == 1.0 - b0
    assert s.alphas_cumprod_prev[0].item() == 1.0
    assert torch.equal(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])
    assert s.posterior_variance[0].item() == 0.0
    assert s.posterior_variance[1].item() > 0.0
    assert s.posterior_log_variance_clipped[0].item() == s.posterior_log_variance_clipped[1].item()
    assert s.posterior_mean_coef1[0].item() == pytest.approx(1.0, rel=1e-12)
    assert s.posterior_mean_coef2[0].item() == 0.0
    assert s.fixed_large_variance[0].item() == s.posterior_variance[1].item()
    assert torch.equal(s.fixed_large_variance[1:], s.betas[1:])


def test_custom_betas_round_trip():
    """NoiseSchedule(betas=...) gives back the same betas and the same tables, from
    a float64 tensor, a float32 tensor or a list, and copies its input."""
    ref = NoiseSchedule("quad", timesteps=37)
    given = ref.betas.clone()
    s = NoiseSchedule(betas=given)
    assert s.name == "custom" and s.num_timesteps == 37
    for key in TABLES:
        assert torch.equal(getattr(s, key), getattr(ref, key)), key
    given.fill_(0.5)  # the schedule kept its own copy
    assert torch.equal(s.betas, ref.betas)
    b32 = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float32)
    s32 = NoiseSchedule(betas=b32)
    assert s32.betas.dtype == torch.float64
    assert torch.equal(s32.betas, b32.double())
    b64 = np.array([0.1, 0.2, 0.3])  # a float64 numpy array keeps its precision
    assert_close64(NoiseSchedule(betas=b64).alphas_cumprod, np.cumprod(1 - b64))


def test_respace_keeps_alphas_cumprod_and_maps_original_timesteps():
    """A sub-chain keeps the parent's alphas_cumprod at its timesteps (Nichol &
    Dhariwal 2021, sec. 4); respacing a respaced schedule maps back to the
    first parent's timesteps (before, it mapped to the middle one's indices)."""
    parent = NoiseSchedule("linear", timesteps=100)
    ab = np.cumprod(1 - parent.betas.numpy())  # the betas themselves: test_betas_match_definition
    sub = parent.respace([0, 10, 50, 99])
    assert sub.timestep_map.tolist() == [0, 10, 50, 99]
    assert_close64(sub.alphas_cumprod, ab[[0, 10, 50, 99]])
    # beta of the sub-chain's step s -> s': 1 - abar_s' / abar_s (1 - abar_0 at the first)
    assert_close64(sub.betas, 1 - ab[[0, 10, 50, 99]] / np.r_[1.0, ab[[0, 10, 50]]], rtol=1e-10)
    subsub = sub.respace([1, 3])
    assert subsub.timestep_map.tolist() == [10, 99]
    assert_close64(subsub.alphas_cumprod, ab[[10, 99]])
    # a set of timesteps: diffusers' descending order, or repeats, give the same sub-chain
    again = parent.respace([99, 50, 10, 10, 0])
    assert again.timestep_map.tolist() == [0, 10, 50, 99] and torch.equal(again.betas, sub.betas)


@pytest.mark.parametrize("beta0", [2e-16, 6e-16, 1e-14, 1e-12])
def test_tiny_first_betas_keep_their_coefficients(beta0):
    """1 - abar_0 = beta_0 exactly, so posterior_mean_coef1[0] = 1 and
    sqrt(1 - abar_0) = eps_coef[0] = sqrt(beta_0). Computed as 1 - cumprod(1 - beta),
    a beta_0 near float64's resolution lost most of its digits (coef1[0] was 0.90 at
    2e-16: the clipped sampler's last step shrank samples by 10%)."""
    betas = torch.tensor([beta0, 0.01, 0.02], dtype=torch.float64)
    for s in (NoiseSchedule(betas=betas), NoiseSchedule(betas=betas).respace([0, 2])):
        assert s.posterior_mean_coef1[0].item() == pytest.approx(1.0, rel=1e-14, abs=0.0)
        assert s.one_minus_alphas_cumprod[0].item() == pytest.approx(beta0, rel=1e-14, abs=0.0)
        assert s.sqrt_one_minus_alphas_cumprod[0].item() == pytest.approx(beta0 ** 0.5, rel=1e-14, abs=0.0)
        assert s.eps_coef[0].item() == pytest.approx(beta0 ** 0.5, rel=1e-14, abs=0.0)
        assert s.sqrt_recipm1_alphas_cumprod[0].item() == pytest.approx((beta0 / (1 - beta0)) ** 0.5, rel=1e-14, abs=0.0)
        assert s.step_table("fixed_small")[0, 4].item() == pytest.approx(1.0, rel=1e-6)  # c1, float32
    # t = 1: 1 - (1 - b0)(1 - b1) = b0 + b1 - b0 b1, exact enough in float64
    s = NoiseSchedule(betas=betas)
    om1 = beta0 + 0.01 - beta0 * 0.01
    assert s.one_minus_alphas_cumprod[1].item() == pytest.approx(om1, rel=1e-14, abs=0.0)
    # The posterior of t = 1 takes 1 - abar_0 from the log domain, not from
    # 1 - alphas_cumprod_prev, which keeps only ~1e-16 / beta_0 of its digits (at
    # 2e-16 posterior_variance[1], so fixed_large at t = 0, the decoder's variance,
    # and posterior_mean_coef2[1] came out 11% too large).
    pv1 = 0.01 * beta0 / om1  # Ho et al. eq. 7: beta_t (1 - abar_{t-1}) / (1 - abar_t)
    coef2_1 = beta0 * math.sqrt(1 - 0.01) / om1  # (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t)
    for s in (s, s.respace([0, 1, 2])):
        assert s.posterior_variance[1].item() == pytest.approx(pv1, rel=1e-13, abs=0.0)
        assert s.posterior_mean_coef2[1].item() == pytest.approx(coef2_1, rel=1e-13, abs=0.0)
        assert s.fixed_large_variance[0].item() == pytest.approx(pv1, rel=1e-13, abs=0.0)
        assert s.posterior_log_variance_clipped[0].item() == pytest.approx(math.log(pv1), rel=1e-13, abs=0.0)


def test_respace_keeps_alphas_cumprod_exactly_where_it_is_tiny():
    """abar_t / abar_s far below 1 would lose its digits (or, below 1e-16, all
    of them) through beta = 1 - ratio: the sub-chain keeps the parent's abar
    itself, with alpha = 1 - beta kept consistent where beta rounds."""
    parent = NoiseSchedule("linear", timesteps=1000, beta_end=0.5)  # abar: 1.4e-44 at 600, 4.9e-134 at 999
    sub = parent.respace([0, 600, 999])
    assert torch.equal(sub.alphas_cumprod, parent.alphas_cumprod[[0, 600, 999]])
    np.testing.assert_allclose(sub.alphas[1:].numpy(), (parent.alphas_cumprod[[600, 999]] / parent.alphas_cumprod[[0, 600]]).numpy(), rtol=1e-15)
    assert sub.undefined_steps("fixed_large") == [] and sub.undefined_steps("ddim", clip_denoised=True) == []
    again = NoiseSchedule.from_config(json.loads(json.dumps(sub.config)))
    assert torch.equal(again.alphas_cumprod, sub.alphas_cumprod)
    # abar reaching 0 (float64 underflow) leaves no sub-chain through it: said so
    with pytest.raises(ValueError, match="alphas_cumprod is 0 there"):
        NoiseSchedule("const", timesteps=400, beta_end=0.9).respace([0, 350, 399])
    # ... or so deep in the denormals that the next kept step's abar equals it
    # (the ratio rounds to 1: a beta of 0, which was "betas must lie in (0, 1], got min 0")
    deep = NoiseSchedule("const", timesteps=7100, beta_end=0.1)
    assert deep.alphas_cumprod[7049] == deep.alphas_cumprod[7050] > 0
    with pytest.raises(ValueError, match=r"through timestep 7049: its alphas_cumprod is 2\.47e-323 there"):
        deep.respace([0, 7049, 7050])


def test_respaced_config_round_trips_through_json():
    """from_config(config) of a respaced schedule is the same sub-chain, timestep
    map included (before, it came back as a custom schedule mapping to 0..K-1,
    so a Sampler fed the model the wrong timesteps)."""
    sub = NoiseSchedule("cosine", timesteps=50).respace(range(0, 50, 7)).respace([0, 2, 5])
    again = NoiseSchedule.from_config(json.loads(json.dumps(sub.config)))
    assert again.name == sub.name and again.timestep_map.tolist() == sub.timestep_map.tolist() == [0, 14, 35]
    for key in TABLES:
        assert torch.equal(getattr(again, key), getattr(sub, key)), key


@pytest.mark.parametrize("config, error, match", [
    ({"name": "linear", "timestep": 50}, ValueError, r"got also \['timestep'\]"),  # was a 1000-step schedule
    ({"name": "cosine", "betas": [0.1, 0.2]}, ValueError, r"got also \['name'\]"),  # the name was dropped
    ({"respace_of": {"name": "linear", "timesteps": 10}, "timesteps": 3}, TypeError, "a sequence of ints"),
])
def test_from_config_refuses_what_it_would_ignore(config, error, match):
    with pytest.raises(error, match=match):
        NoiseSchedule.from_config(config)


# Why: config was the schedule's live dict, and a respaced schedule's config held
# its parent's dict itself: an edit of either (cfg["timesteps"] = 100 to build a
# variant) made the schedule's config, which checkpoints record and load_model
# rebuilds from, describe another schedule than its tables.
def test_config_is_a_copy_that_edits_do_not_reach():
    parent = NoiseSchedule("linear", timesteps=20)
    config = parent.config
    config["timesteps"] = 10
    assert NoiseSchedule.from_config(config).num_timesteps == 10
    assert parent.config["timesteps"] == 20
    child = parent.respace([0, 5, 19])
    child.config["respace_of"]["beta_end"] = 0.03
    nested = child.config
    nested["respace_of"]["timesteps"] = 10
    nested["timesteps"].append(7)
    assert parent.config == {"name": "linear", "timesteps": 20, "beta_start": None, "beta_end": None}
    assert child.config == {"respace_of": parent.config, "timesteps": [0, 5, 19]}
    assert torch.equal(NoiseSchedule.from_config(child.config).betas, child.betas)
    custom = NoiseSchedule(betas=[0.1, 0.2])
    custom.config["betas"][0] = 0.5
    assert custom.config == {"betas": [0.1, 0.2]}
    assert NoiseSchedule.from_config(json.loads(json.dumps(custom.config))).betas.tolist() == [0.1, 0.2]


def test_config_is_json_ready_for_numpy_numbers_and_respace_takes_arrays():
    """numpy's numbers are taken, and the config held them: json.dumps failed."""
    schedule = NoiseSchedule("linear", timesteps=np.int64(10), beta_start=np.float32(1e-4), beta_end=np.float64(0.02))
    again = NoiseSchedule.from_config(json.loads(json.dumps(schedule.config)))
    assert torch.equal(again.betas, schedule.betas)
    assert schedule.respace(np.array([1, 5])).timestep_map.tolist() == [1, 5]
    with pytest.raises(TypeError, match="a sequence of ints"):
        schedule.respace(torch.tensor(3))
    with pytest.raises(TypeError, match="real numbers, got a bool"):
        NoiseSchedule(betas=np.array([True, False]))


@pytest.mark.parametrize("kwargs", [dict(name="cosine"), dict(timesteps=5), dict(beta_start=1e-3), dict(beta_end=0.5)])
def test_betas_with_a_name_or_bounds_is_refused(kwargs):
    """Betas define the schedule: anything else given beside them was ignored."""
    with pytest.raises(ValueError, match="betas= alone"):
        NoiseSchedule(**kwargs, betas=[0.1, 0.2, 0.3])
    assert NoiseSchedule("linear", betas=[0.1, 0.2]).num_timesteps == 2  # the default name is no conflict


def test_custom_betas_from_python_list_keep_float64():
    """Python floats are float64 data: betas given as a list must not be rounded
    through torch's default float32 dtype on the way in."""
    s = NoiseSchedule(betas=[0.1, 0.2, 0.3])
    np.testing.assert_array_equal(s.betas.numpy(), np.array([0.1, 0.2, 0.3]))
    assert_close64(s.alphas_cumprod, np.cumprod([0.9, 0.8, 0.7]))


@pytest.mark.parametrize("name", ["betas", "alphas_cumprod", "posterior_log_variance_clipped", "eps_coef"])
def test_device_table_float32_and_cached(name):
    """table(name, device) is the float64 table rounded to float32, made once per device."""
    s = NoiseSchedule("cosine", timesteps=37)
    t = s.table(name, "cpu")
    assert t.dtype == torch.float32 and t.device.type == "cpu" and t.shape == (37,)
    np.testing.assert_array_equal(t.numpy(), getattr(s, name).numpy().astype(np.float32))
    assert s.table(name, "cpu") is t
    assert s.table(name, torch.device("cpu")) is t
    assert s.table(name) is t  # default device is the CPU


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", ["nope", "Linear", "", "sigmoid"])
def test_unknown_schedule_name(bad):
    with pytest.raises(ValueError, match="unknown beta schedule"):
        make_betas(bad, 10)
    with pytest.raises(ValueError, match="unknown beta schedule"):
        NoiseSchedule(bad, timesteps=10)


@pytest.mark.parametrize("bad", [0, -1, -1000, 2.5, 10.0, "10", None, True, 2**31, 2**63 - 1, 2**64])
def test_bad_timesteps(bad):
    """Past MAX_TIMESTEPS (2^31 - 1) torch failed with errors that named no
    argument (a storage size overflow; past 2^63, long long overflow), and the
    cosine schedule filled memory with a list of Python floats for minutes."""
    with pytest.raises(ValueError, match="timesteps must be a positive int"):
        make_betas("linear", bad)
    with pytest.raises(ValueError, match="timesteps must be a positive int"):
        NoiseSchedule("linear", timesteps=bad)


def test_no_name_no_betas():
    with pytest.raises(ValueError, match="name or betas"):
        NoiseSchedule(None)


@pytest.mark.parametrize(
    "betas, match",
    [
        ([0.1, float("nan"), 0.2], "finite"),
        ([0.1, float("inf")], "finite"),
        ([float("-inf"), 0.1], "finite"),
        ([0.0, 0.1], r"\(0, 1\]"),
        ([0.1, -0.2], r"\(0, 1\]"),
        ([0.1, 1.0 + 1e-9], r"\(0, 1\]"),
        ([[0.1, 0.2], [0.3, 0.4]], "1-d"),
        ([], "non-empty"),
        # 1 - beta rounds to 1: abar_0 = 1 and inf/NaN coefficients (were accepted)
        ([1e-17, 0.1], r"betas\[0\] = 1e-17: 1 - beta rounds to 1"),
        ([1e-20, 1e-18, 0.1], r"betas\[1\] = 1e-18: 1 - beta rounds to 1 .* through timestep 1"),
    ],
)
def test_bad_betas(betas, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule(betas=torch.tensor(betas, dtype=torch.float64))


def test_beta_of_one_is_allowed():
    """beta = 1 is in (0, 1] (jsd ends with it)."""
    assert NoiseSchedule(betas=[0.5, 1.0]).alphas_cumprod[-1].item() == 0.0


@pytest.mark.parametrize("name", ["cosine", "jsd"])
@pytest.mark.parametrize("kw", [dict(beta_start=1e-4), dict(beta_end=0.02)])
def test_fixed_schedules_reject_beta_range(name, kw):
    """cosine and jsd have no beta range; passing one is an error, not silently ignored."""
    with pytest.raises(ValueError, match="takes no beta_start/beta_end"):
        make_betas(name, 10, **kw)
    with pytest.raises(ValueError, match="takes no beta_start/beta_end"):
        NoiseSchedule(name, timesteps=10, **kw)


def test_unknown_table_name():
    s = NoiseSchedule("linear", timesteps=10)
    with pytest.raises(KeyError, match="unknown table 'nope'"):
        s.table("nope")
    with pytest.raises(KeyError, match="unknown table"):
        s.table("_device_tables")


@pytest.mark.parametrize("eta", [1.5, 3.0])
def test_ddim_eta_above_one_clamps_the_direction(eta):
    """Song et al. eq. 12: sigma_t = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1}),
    direction sqrt(1 - abar_{t-1} - sigma_t^2). Above eta = 1, sigma_t^2 exceeds
    1 - abar_{t-1} at the first steps: there the direction is 0 (clamped, as
    step_table documents) and sigma keeps its formula; elsewhere both follow it."""
    b = np_betas("linear", 1000)
    ab = np.cumprod(1 - b)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab)) * np.sqrt(1 - ab / ab_prev)
    room = 1 - ab_prev - sigma**2
    k2, k3 = 1 / np.sqrt(ab), np.sqrt(1 / ab - 1)
    table = NoiseSchedule("linear", timesteps=1000).step_table("ddim", eta=eta).double().numpy()
    columns = dict(zip(("a", "b", "k2", "k3", "c1", "c2", "sigma"), table.T))
    clamped = room < 0
    assert 0 < clamped.sum() < 999 and not clamped[0]  # both kinds of step occur
    np.testing.assert_allclose(columns["k2"], k2, rtol=1e-6)  # eta does not touch x0's coefficients
    np.testing.assert_allclose(columns["k3"], k3, rtol=1e-6)
    direction = columns["c2"] * columns["k3"] / columns["k2"]  # c2 = direction * k2 / k3
    assert np.all(direction[clamped] == 0.0)
    np.testing.assert_allclose(columns["b"][clamped], -np.sqrt(ab_prev[clamped]) * k3[clamped], rtol=1e-6)
    np.testing.assert_allclose(columns["c1"][clamped], np.sqrt(ab_prev[clamped]), rtol=1e-6)
    kept = ~clamped
    kept[0] = False  # t = 0: abar_prev = 1, so sigma = direction = 0
    np.testing.assert_allclose(direction[kept], np.sqrt(room[kept]), rtol=1e-5)
    np.testing.assert_allclose(columns["sigma"][1:], sigma[1:], rtol=1e-6)
    assert columns["sigma"][0] == 0.0 and direction[0] == 0.0


@pytest.mark.parametrize("copy_kind", ["pickle", "deepcopy", "copy"])
def test_copies_leave_the_per_device_caches_behind(copy_kind):
    """They carried the float32 tables cached per device: a schedule used on a
    GPU pickled with CUDA tensors, which a machine without one cannot load."""
    import copy
    import pickle

    schedule = NoiseSchedule("linear", timesteps=50)
    table = schedule.table("sqrt_alphas_cumprod")
    schedule.step_table("fixed_small")
    schedule.undefined_steps("fixed_small")
    from ddpm_fast import diffusion  # its float64 copies per device too (kept on the schedule: left behind too)

    diffusion.q_mean_variance(schedule, torch.zeros(2, 3, dtype=torch.float64, device="meta"), 5)
    assert schedule._extract_tables
    made = {"pickle": lambda s: pickle.loads(pickle.dumps(s)), "deepcopy": copy.deepcopy, "copy": copy.copy}[copy_kind]
    twin = made(schedule)
    assert twin._device_tables == {} and "_undefined_steps" not in vars(twin) and "_extract_tables" not in vars(twin)
    assert torch.equal(twin.table("sqrt_alphas_cumprod"), table) and twin.undefined_steps("fixed_small") == []
    assert schedule.table("sqrt_alphas_cumprod") is table  # the original keeps its own


def test_tables_of_subclass_betas_are_cached():
    """Betas of a tensor subclass made subclass tables, which the caches took
    for a trace's tensors and never kept: rebuilt (and on a GPU copied) on
    every call."""
    class Tagged(torch.Tensor):
        pass

    schedule = NoiseSchedule(betas=torch.linspace(1e-4, 0.02, 50, dtype=torch.float64).as_subclass(Tagged))
    assert type(schedule.betas) is torch.Tensor
    assert schedule.table("sqrt_alphas_cumprod") is schedule.table("sqrt_alphas_cumprod")


def test_an_eta_sweep_does_not_keep_a_table_per_eta():
    """Each distinct DDIM eta kept its T x 8 table and its undefined_steps answer
    for the schedule's life: 2000 etas held 2000 tables (69 MiB at T = 1000)."""
    schedule = NoiseSchedule("linear", timesteps=50)
    first = schedule.step_table("ddim", eta=0.0).clone()
    plain = schedule.step_table("fixed_large")
    for i in range(1, 201):
        schedule.step_table("ddim", eta=i / 200)
        schedule.undefined_steps("ddim", eta=i / 200)
    ddim_tables = [name for name, _ in schedule._device_tables if name.startswith("step:ddim:")]
    assert 1 <= len(ddim_tables) <= 64 and len(vars(schedule)["_undefined_steps"]) <= 70
    assert schedule.step_table("fixed_large") is plain  # the other kinds' tables stay
    torch.testing.assert_close(schedule.step_table("ddim", eta=0.0), first, atol=0, rtol=0)  # made again, the same
    assert schedule.undefined_steps("ddim", eta=0.5) == []


def test_the_cosine_schedule_of_many_steps_is_quick_and_matches_its_formula():
    """Its betas came from a list of Python floats: 1 s per million steps."""
    start = time.perf_counter()
    betas = make_betas("cosine", 2_000_000)
    assert time.perf_counter() - start < 1.0
    for i in (0, 1, 999_999, 1_999_999):
        abar = [math.cos(((i + k) / 2_000_000 + 0.008) / 1.008 * math.pi / 2) ** 2 for k in (0, 1)]
        assert betas[i].item() == pytest.approx(min(1 - abar[1] / abar[0], 0.999), rel=1e-12, abs=1e-18)
