"""Gaps found by mutation testing of the evaluation code: evaluate_bpd against
one bits_per_dim call with each image's own noise (fast: a small conv net
instead of a U-Net), bits_per_dim's defaults and data check, and the
FID helpers' environment, path and feature checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ddpm_fast.evaluate as evaluate
import ddpm_fast.fid as fid_module
from ddpm_fast import ops
from ddpm_fast import diffusion as D
from ddpm_fast.data import ImageDataset
from ddpm_fast.evaluate import evaluate_bpd
from ddpm_fast.fid import ENV_VAR, activation_statistics, fid, frechet_distance, resolve_weights_path
from ddpm_fast.schedules import NoiseSchedule
from test_bits_per_dim import BPD_SCHED, bpd_data, run_bpd
from test_fid import images
from train_helpers import TinyEps

SCHEDULE = NoiseSchedule("linear", timesteps=6, beta_start=1e-2, beta_end=0.3)


def tiny_data(n: int = 5) -> ImageDataset:
    return ImageDataset(torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)))


def test_evaluate_bpd_is_the_bound_with_each_images_noise_at_any_batch_size():
    """Image i's noise at step t is normal(seed, i * 2^32 + t * its size + j): the
    dataset means of one bits_per_dim call with that noise, every term in its
    place, for any batch size and for n left at its default (all images)."""
    model, data = TinyEps(channels=3, image_size=4).eval(), tiny_data()
    x0 = data.batch(torch.arange(5))
    per_image = 3 * 4 * 4
    direct = D.bits_per_dim(model, x0, SCHEDULE, noise_fn=lambda t: ops.randn(x0.shape, 7, t * per_image, sample_stride=2**32))
    for batch_size in (5, 2, 1):
        got = evaluate_bpd(model, data, SCHEDULE, batch_size=batch_size, seed=7)
        assert got["images"] == 5
        assert got["total"] == pytest.approx(direct.total.double().mean().item(), rel=1e-6)
        assert got["prior"] == pytest.approx(direct.prior.double().mean().item(), rel=1e-6)
        assert got["decoder"] == pytest.approx(direct.decoder.double().mean().item(), rel=1e-6)
        assert got["vb"] == pytest.approx(direct.terms[:, 1:].double().sum(1).mean().item(), rel=1e-6)
        np.testing.assert_allclose(got["terms"], direct.terms.double().mean(0).numpy(), rtol=1e-6)


def test_evaluate_bpd_feeds_channels_last_batches_to_a_channels_last_model():
    model = TinyEps(channels=3, image_size=4).eval().to(memory_format=torch.channels_last)
    seen = []
    model.register_forward_pre_hook(lambda _, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)
                                                                and not args[0].is_contiguous()))
    evaluate_bpd(model, tiny_data(2), SCHEDULE)
    assert seen and all(seen)


def test_evaluate_bpd_may_use_every_one_of_an_images_noise_counters(monkeypatch):
    """T timesteps of P values use counters [0, T * P) of an image's 2^32: T * P equal
    to the stride still fits (a smaller stride stands in, as in test_evaluate)."""
    monkeypatch.setattr(evaluate, "_SAMPLE_STRIDE", 64)
    data = ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8))
    result = evaluate_bpd(lambda x, t: torch.zeros_like(x), data, NoiseSchedule("linear", timesteps=4), device="cpu")
    assert result["images"] == 2 and math.isfinite(result["total"])


def test_bits_per_dim_clips_by_default_as_calc_bpd_loop():
    model = lambda x, t: -2 * x  # noqa: E731  (implied x0 far outside [-1, 1])
    default = run_bpd(model)
    assert torch.equal(default.total, run_bpd(model, clip_denoised=True).total)
    assert not torch.allclose(default.total, run_bpd(model, clip_denoised=False).total)


def test_bits_per_dim_refuses_data_above_one_alone():
    """Images scaled to [0, 2] (x / 127.5 instead of x / 127.5 - 1): only the top is off."""
    x0 = bpd_data() + 1
    with pytest.raises(ValueError, match=r"x0 must be data in \[-1, 1\]"):
        D.bits_per_dim(lambda x, t: torch.zeros_like(x), x0, BPD_SCHED)


def test_an_empty_weights_variable_counts_as_unset(monkeypatch):
    """DDPM_FAST_INCEPTION_WEIGHTS= (empty) is no path: not the current folder."""
    monkeypatch.setenv(ENV_VAR, "")
    with pytest.raises(ValueError, match=f"no Inception weights given and {ENV_VAR} is not set"):
        resolve_weights_path()


def test_a_weights_path_may_start_with_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "w.pth").write_bytes(b"")
    assert resolve_weights_path("~/w.pth") == tmp_path / "w.pth"
    monkeypatch.setenv(ENV_VAR, "~/w.pth")
    assert resolve_weights_path() == tmp_path / "w.pth"


def test_non_finite_features_are_an_error():
    def features(x):  # a stand-in network whose weights went bad
        m = x.double().mean((2, 3))
        m[1, 0] = float("nan")
        return m

    with pytest.raises(ValueError, match=r"non-finite Inception features for images 0\.\.2"):
        activation_statistics(images(3, size=6), features)


def test_fid_computes_the_distance_by_the_method_asked_for(monkeypatch):
    """method='eigh' reaches frechet_distance: the scipy recipe is not run (nor needed)."""
    def features(x):
        m = x.double().mean((2, 3))
        return torch.cat([m, m[:, :1] * m[:, 1:2]], 1)

    def no_sqrtm(*args):
        raise AssertionError("sqrtm used")

    monkeypatch.setattr(fid_module, "load_inception", lambda path, device: features)
    a, b = images(6, size=6, seed=1), images(5, size=6, seed=2)
    want = frechet_distance(*activation_statistics(a, features), *activation_statistics(b, features), method="eigh")
    monkeypatch.setattr(fid_module, "_trace_sqrt_sqrtm", no_sqrtm)
    assert fid(a, b, "unused.pth", method="eigh") == pytest.approx(want, rel=1e-12, abs=0.0)


def test_only_the_diagonals_imaginary_part_is_judged(monkeypatch):
    """The trace reads the diagonal alone: an imaginary part off it (however large)
    does not change the distance and is no error."""
    from scipy import linalg

    real = linalg.sqrtm
    s1, s2 = np.diag([1.0, 2.0]), np.diag([3.0, 4.0])
    want = frechet_distance(np.zeros(2), s1, np.zeros(2), s2)
    monkeypatch.setattr(linalg, "sqrtm", lambda m, *a, **k: real(m, *a, **k) + 0.5j * (1 - np.eye(2)))
    assert frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(want, rel=1e-12)
