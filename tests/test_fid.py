"""FID (Heusel et al. 2017): the Inception layout and the checks of a weights
file, the Fréchet distance against closed forms, activation statistics, and
the ``ddpm-fast fid`` command end to end.

The real weights (pt_inception-2015-12-05-6726825d.pth) are not available here:
a randomly initialised extractor is saved to a .pth and loaded back through
``load_inception``, which exercises the same key and shape checks.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ddpm_fast.fid as fid_module
from ddpm_fast.cli import build_parser, main
from ddpm_fast.fid import (ENV_VAR, WEIGHTS_FILE, InceptionV3FID, activation_statistics, expected_state_dict_shapes,
                           fid, frechet_distance, load_inception, preprocess)


def random_inception(seed: int = 0) -> InceptionV3FID:
    """He-initialised convolutions (so that features neither vanish nor explode
    through ~50 layers) and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = InceptionV3FID()
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.8, 1.2)
            module.bias.data.uniform_(-0.1, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return random_inception().state_dict()


@pytest.fixture(scope="module")
def weights(tmp_path_factory, state):
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_FILE
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def model(weights):
    return load_inception(weights)


def images(n: int, size: int = 12, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


# ------------------------------------------------------------ layout, loading


def test_layout_matches_the_fid_inception():
    shapes = expected_state_dict_shapes()
    # torchvision's inception_v3 has 27,161,264 parameters; less its AuxLogits head
    # (98,560 + 2,459,136 + 769,000) and with 1008 classes instead of 1000 (+ 8 x 2049):
    params = sum(int(np.prod(shape)) for key, shape in shapes.items() if not key.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert params == 27_161_264 - 3_326_696 + 8 * 2049
    assert len(shapes) == 94 * 6 + 2  # 94 BasicConv2d (conv + 5 BatchNorm entries) and fc
    assert not any(key.startswith("AuxLogits") for key in shapes)
    for key, shape in {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1), "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
        "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3), "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1), "fc.weight": (1008, 2048), "fc.bias": (1008,),
    }.items():
        assert shapes[key] == shape, key


def test_loads_a_weights_file_exactly(model, state):
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_weights_path_from_the_environment(weights, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(weights))
    assert isinstance(load_inception(None), InceptionV3FID)


def test_missing_weights_say_where_they_come_from(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=re.escape(WEIGHTS_FILE)) as error:
        load_inception(tmp_path / "nope.pth")
    assert "never downloads" in str(error.value) and ENV_VAR in str(error.value)
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(ValueError, match=f"{ENV_VAR} is not set"):
        load_inception(None)
    os.mkfifo(tmp_path / "pipe")  # it was called missing; reading it would wait for a writer
    with pytest.raises(ValueError, match=r"Inception weights .*pipe is not a regular file; give the weights file itself"):
        load_inception(tmp_path / "pipe")


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("Mixed_7c.branch_pool.conv.weight"), r"1 missing keys \(Mixed_7c\.branch_pool\.conv\.weight\)"),
    (lambda s: s.update({"AuxLogits.fc.weight": torch.zeros(1000, 768)}), r"1 unexpected keys \(AuxLogits\.fc\.weight\)"),
    (lambda s: s.update({"fc.weight": torch.zeros(1000, 2048)}), r"fc\.weight: \(1000, 2048\) in the file, expected \(1008, 2048\)"),
    # was a bare RuntimeError from load_state_dict (a traceback from the fid command)
    (lambda s: s.update({"fc.bias": s["fc.bias"].int()}), r"1 non-float weights \(fc\.bias: torch\.int32\)"),
])
def test_a_wrong_file_is_named_and_explained(tmp_path, state, edit, message):
    bad = dict(state)
    edit(bad)
    path = tmp_path / "wrong.pth"
    torch.save(bad, path)
    with pytest.raises(ValueError, match=message) as error:
        load_inception(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


class Stranger:  # an object that a weights_only load refuses
    pass


def test_unreadable_files_and_other_objects(tmp_path, state):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read .* as a PyTorch state_dict") as error:
        load_inception(garbage)
    # Not torch's advice to load with weights_only=False (unsafe, and no help for a damaged file).
    assert "weights_only" not in str(error.value) and "not a torch.save file of tensors alone" in str(error.value)
    garbage.write_bytes(b"hello world")  # pickle's own error: it was "KeyError: 101" alone
    with pytest.raises(ValueError, match=r"as a PyTorch state_dict: it is not a torch.save file, or it is damaged \(KeyError"):
        load_inception(garbage)

    pickled = tmp_path / "objects.pth"
    torch.save({"conv.weight": torch.zeros(1), "other": Stranger()}, pickled)
    with pytest.raises(ValueError, match="other objects pickled in it, which are not loaded") as error:
        load_inception(pickled)
    assert "weights_only" not in str(error.value)
    listing = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(ValueError, match="not a state_dict"):
        load_inception(listing)


def test_num_batches_tracked_is_optional(tmp_path, state):
    path = tmp_path / "no_counters.pth"
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    loaded = load_inception(path).state_dict()
    assert torch.equal(loaded["fc.weight"], state["fc.weight"])


# ------------------------------------------------------------ Fréchet distance


def test_frechet_distance_of_diagonal_gaussians_has_a_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=7), rng.normal(size=7)
    v1, v2 = rng.uniform(0.1, 3, size=7), rng.uniform(0.1, 3, size=7)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    for method in ("sqrtm", "eigh"):
        assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2), method=method) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + (2 - 3) ** 2)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_is_zero_for_identical_and_symmetric(method):
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(50, 16)), rng.normal(1, 2, size=(40, 16)) @ rng.normal(size=(16, 16))
    (mu1, s1), (mu2, s2) = (a.mean(0), np.cov(a, rowvar=False)), (b.mean(0), np.cov(b, rowvar=False))
    assert 0 <= frechet_distance(mu1, s1, mu1, s1, method=method) < 1e-8  # rounding gave -1.4e-14: never below 0
    rng = np.random.default_rng(3)
    for _ in range(20):
        x = rng.normal(size=(30, 8))
        mu, s = x.mean(0), np.cov(x, rowvar=False)
        assert frechet_distance(mu, s, mu, s, method=method) >= 0
    forward, backward = frechet_distance(mu1, s1, mu2, s2, method=method), frechet_distance(mu2, s2, mu1, s1, method=method)
    assert forward > 1 and forward == pytest.approx(backward, rel=1e-9)


def test_both_methods_agree_on_singular_covariances():
    """scipy's sqrtm from 1.13 on finds this product's root; 1.11 and 1.12
    leave an imaginary part of 1.3e-3 on its diagonal, which the reference
    recipe refuses (naming method='eigh') rather than return a wrong distance."""
    scipy = pytest.importorskip("scipy")
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(5, 64)), rng.normal(0.3, 1.5, size=(6, 64))  # rank 4 and 5 of 64
    stats = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    by_eigh = frechet_distance(*stats, method="eigh")
    if tuple(int(part) for part in scipy.__version__.split(".")[:2]) < (1, 13):
        with pytest.raises(ValueError, match=r"imaginary part of 0\.001\d+ .* try method='eigh'"):
            frechet_distance(*stats, method="sqrtm")
    else:
        assert frechet_distance(*stats, method="sqrtm") == pytest.approx(by_eigh, rel=1e-4)


def test_frechet_distance_rejects_bad_statistics():
    mu, sigma = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="one D"):
        frechet_distance(mu, sigma, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="one D"):
        frechet_distance(mu, np.eye(2), mu, sigma)
    with pytest.raises(ValueError, match="frechet_distance: sigma2 has non-finite"):
        frechet_distance(mu, sigma, mu, np.full((3, 3), np.nan))
    with pytest.raises(ValueError, match="method"):
        frechet_distance(mu, sigma, mu, sigma, method="svd")


# ------------------------------------------------------------ statistics


def test_preprocess_resizes_and_scales():
    x = preprocess(torch.from_numpy(np.full((2, 5, 5, 1), 255, np.uint8)))
    assert x.shape == (2, 3, 299, 299) and torch.allclose(x, torch.ones_like(x), rtol=0, atol=1e-6)
    same = images(1, size=299)
    assert torch.allclose(preprocess(torch.from_numpy(same))[0, 0], torch.from_numpy(same[0, :, :, 0]).float() / 127.5 - 1)


def test_statistics_are_the_sample_mean_and_covariance_at_any_batch_size():
    def mean_colour(x):  # a cheap stand-in for the network: per-channel means and a product
        m = x.double().mean((2, 3))  # float64: batch-independent rounding
        return torch.cat([m, m[:, :1] * m[:, 1:2]], 1)

    data = images(7, size=6)
    features = mean_colour(preprocess(torch.from_numpy(data))).double().numpy()
    for batch_size in (1, 3, 7, 50):
        mu, sigma = activation_statistics(data, mean_colour, batch_size=batch_size)
        np.testing.assert_allclose(mu, features.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-12)
    grey = data[..., :1]
    mu_grey, _ = activation_statistics(grey, mean_colour)
    mu_rgb, _ = activation_statistics(np.repeat(grey, 3, axis=3), mean_colour)
    np.testing.assert_array_equal(mu_grey, mu_rgb)
    mu_cpu, _ = activation_statistics(grey, mean_colour, device="cpu")  # a plain function: the CPU either way
    np.testing.assert_array_equal(mu_grey, mu_cpu)


class _OnMeta(nn.Module):
    """Weights on a device this CPU machine can name but not move off: it shows
    where activation_statistics runs a model by default, without a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(3, device="meta"))
        self.input_devices: list[torch.device] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.input_devices.append(x.device)
        return torch.arange(x.shape[0] * 2, dtype=torch.float64).reshape(-1, 2) ** 2


def test_by_default_the_model_runs_where_its_weights_are_and_is_not_moved():
    model = _OnMeta()  # a caller's CUDA Inception, say: moving it to the CPU would be a side effect and slow
    mu, sigma = activation_statistics(images(3, size=6), model, batch_size=2)
    assert model.weight.device.type == "meta" and {d.type for d in model.input_devices} == {"meta"}
    assert mu.shape == (2,) and sigma.shape == (2, 2)


def test_inception_statistics_have_the_pool3_shape(model):
    mu, sigma = activation_statistics(images(4), model, batch_size=2)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and mu.dtype == sigma.dtype == np.float64
    assert np.isfinite(sigma).all() and np.allclose(sigma, sigma.T) and np.trace(sigma) > 0
    mu_all, sigma_all = activation_statistics(images(4), model, batch_size=4)
    np.testing.assert_allclose(mu_all, mu, rtol=1e-4, atol=1e-6)


def test_grey_images_are_accepted(model):
    mu, sigma = activation_statistics(images(3, size=8, channels=1), model, batch_size=3)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((4, 8, 8, 3), np.float32), "uint8"), (np.zeros((4, 8, 8, 2), np.uint8), "C 1 or 3"),
    (np.zeros((4, 8, 8), np.uint8), "uint8 N x H x W x C"), (np.zeros((1, 8, 8, 3), np.uint8), "at least 2"),
])
def test_bad_images_are_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        activation_statistics(bad, lambda x: x.mean((2, 3)))


def test_fid_convenience_rejects_bad_images_before_loading(tmp_path):
    with pytest.raises(ValueError, match="images_b"):
        fid(images(2), images(1), tmp_path / "never-read.pth")
    with pytest.raises(ValueError, match="method must be 'sqrtm' or 'eigh', got 'svd'"):  # not after the Inception passes
        fid(images(2), images(2), tmp_path / "never-read.pth", method="svd")


def test_flipped_numpy_views_are_taken(model):
    x = images(3, size=8)
    flipped = x[:, ::-1]  # negative strides: torch.as_tensor refused them
    mu, sigma = activation_statistics(flipped, model)
    mu_copy, sigma_copy = activation_statistics(flipped.copy(), model)
    assert np.array_equal(mu, mu_copy) and np.array_equal(sigma, sigma_copy)


# ------------------------------------------------------------ command line


def test_fid_command_documents_its_options(capsys):
    with pytest.raises(SystemExit):
        main(["fid", "--help"])
    text = capsys.readouterr().out
    for action in build_parser()._subparsers._group_actions[0].choices["fid"]._actions:
        if action.option_strings and action.help:
            assert action.option_strings[-1] in text


@pytest.fixture(scope="module")
def npz_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fid-data")
    np.savez(folder / "samples.npz", images=images(5, size=8, seed=1))
    np.savez(folder / "data.npz", images=images(6, size=8, channels=1, seed=2))
    return folder / "samples.npz", folder / "data.npz"


def test_fid_command_end_to_end(weights, npz_files, capsys):
    samples, data = npz_files
    code = main(["fid", "--samples", str(samples), "--data", str(data), "--inception-weights", str(weights),
                 "-n", "3", "--batch-size", "2", "--method", "eigh", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    value = float(re.match(r"FID (\S+) \(3 samples .* vs 3 images", out).group(1))
    assert np.isfinite(value) and value > 0
    # the library's value for the same images (a transposing mutant of the command's layout change survived)
    want = fid(np.load(samples)["images"][:3], np.load(data)["images"][:3], weights, method="eigh")
    assert value == pytest.approx(want, rel=1e-4)


def test_fid_command_errors(tmp_path, npz_files, weights, monkeypatch, capsys):
    samples, data = npz_files
    monkeypatch.delenv(ENV_VAR, raising=False)
    for extra, expected in [([], ENV_VAR), (["--inception-weights", str(tmp_path / "x.pth")], WEIGHTS_FILE),
                            (["--inception-weights", str(weights), "-n", "6"], "-n 6 exceeds"),
                            (["--inception-weights", str(weights), "-n", "1"], "at least 2 images of each set, but -n gives 1")]:
        assert main(["fid", "--samples", str(samples), "--data", str(data), "--device", "cpu", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("ddpm-fast fid: error:") and expected in err
    np.savez(tmp_path / "one.npz", images=images(1, size=8))
    assert main(["fid", "--samples", str(tmp_path / "one.npz"), "--data", str(data), "--device", "cpu",
                 "--inception-weights", str(weights)]) == 2
    assert "but --samples gives 1" in capsys.readouterr().err


def test_preprocess_keeps_channels_apart_and_resizes_as_pytorch_fid():
    """Each channel stays itself (red is not grey), and the resize is pytorch-fid's:
    bilinear, align_corners=False, no antialiasing; FIDs compare with its only so."""
    red = np.zeros((2, 4, 4, 3), np.uint8)
    red[..., 0] = 255
    x = preprocess(torch.from_numpy(red))
    assert torch.allclose(x[:, 0], torch.tensor(1.0), atol=1e-6) and torch.allclose(x[:, 1:], torch.tensor(-1.0), atol=1e-6)
    # Upscaling black | white: with align_corners=False the outer 74 columns of 299 lie past
    # the pixel centres and keep the edge pixel's value (align_corners=True ramps from column 1 on).
    pair = np.zeros((2, 1, 2, 1), np.uint8)
    pair[:, :, 1] = 255
    row = preprocess(torch.from_numpy(pair))[0, 0, 0]
    assert (row[:74] == -1).all() and (row[-74:] == 1).all() and abs(row[149].item()) < 1e-6
    # Downscaling 598 -> 299 px, 2:1: output pixel i is the mean of input pixels 2i and 2i + 1
    # (antialiasing would blend in their neighbours too).
    lines = np.zeros((2, 2, 598, 1), np.uint8)
    lines[:, :, 1::4] = 255  # columns 1, 5, 9, ...
    row = preprocess(torch.from_numpy(lines))[0, 0, 0]
    assert torch.allclose(row[0::2], torch.tensor(0.0), atol=1e-6) and torch.allclose(row[1::2], torch.tensor(-1.0), atol=1e-6)


def test_fid_convenience_is_the_distance_of_the_two_sets(monkeypatch):
    """fid() on its own (the command computes the statistics itself): set a against set b."""
    def features(x):  # a cheap stand-in for the network
        m = x.double().mean((2, 3))
        return torch.cat([m, m[:, :1] * m[:, 1:2]], 1)

    monkeypatch.setattr(fid_module, "load_inception", lambda path, device: features)
    a, b = images(6, size=6, seed=1), images(5, size=6, seed=2)
    expected = frechet_distance(*activation_statistics(a, features), *activation_statistics(b, features))
    assert expected > 0
    assert fid(a, b, "unused.pth", batch_size=4) == pytest.approx(expected, rel=1e-9)
    assert fid(b, a, "unused.pth", method="eigh") == pytest.approx(expected, rel=1e-6)
    assert abs(fid(a, a, "unused.pth")) < 1e-9


def test_network_pools_as_the_fid_graph(model):
    """The FID variants the real weights need (not checkable without them otherwise):
    average pools exclude padding, Mixed_7b's pool branch averages, Mixed_7c's takes a
    max, and pool3 is the global mean of Mixed_7c's output."""
    ones = torch.ones(1, 4, 5, 5)
    assert torch.equal(fid_module._avg_pool(ones), ones)  # the borders too
    seen, handles = {}, []
    for name in ("Mixed_7b", "Mixed_7c"):
        block = getattr(model, name)
        handles.append(block.register_forward_pre_hook(lambda m, args, name=name: seen.update({name + " in": args[0]})))
        handles.append(block.branch_pool.register_forward_pre_hook(lambda m, args, name=name: seen.update({name + " pool": args[0]})))
    handles.append(model.Mixed_7c.register_forward_hook(lambda m, args, out: seen.update(out=out)))
    try:
        features = model(preprocess(torch.from_numpy(images(1, size=8))))
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(seen["Mixed_7b pool"], F.avg_pool2d(seen["Mixed_7b in"], 3, 1, 1, count_include_pad=False))
    torch.testing.assert_close(seen["Mixed_7c pool"], F.max_pool2d(seen["Mixed_7c in"], 3, 1, 1))
    torch.testing.assert_close(features, seen["out"].mean((2, 3)))


def test_half_precision_weights_load_as_float32(tmp_path, state):
    path = tmp_path / "half.pth"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, path)
    model = load_inception(path)
    assert all(p.dtype == torch.float32 for p in model.state_dict().values() if p.is_floating_point())


def test_a_large_imaginary_part_of_sqrtm_is_an_error_a_small_one_is_dropped(monkeypatch):
    """Rounding leaves |imag| <= 1e-3 on the diagonal; more means covariances too
    ill-conditioned for the recipe, which must not pass as a number."""
    from scipy import linalg

    real = linalg.sqrtm
    s1, s2 = np.diag([1.0, 2.0]), np.diag([3.0, 4.0])
    want = frechet_distance(np.zeros(2), s1, np.zeros(2), s2)
    for imaginary, raises in ((1e-2, True), (1e-4, False)):
        monkeypatch.setattr(linalg, "sqrtm", lambda m, *a, **k: real(m, *a, **k) + imaginary * 1j * np.eye(2))
        if raises:
            with pytest.raises(ValueError, match="has an imaginary part of 0.01 on its diagonal"):
                frechet_distance(np.zeros(2), s1, np.zeros(2), s2)
        else:
            assert frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(want, rel=1e-12)


def test_sqrtm_falls_back_to_eps_on_both_diagonals(monkeypatch):
    """Where scipy's sqrtm of the product is not finite, both covariances get eps."""
    from scipy import linalg

    real, seen = linalg.sqrtm, []

    def flaky(m, *args, **kwargs):
        seen.append(m)
        return np.full_like(m, np.nan) if len(seen) == 1 else real(m, *args, **kwargs)

    monkeypatch.setattr(linalg, "sqrtm", flaky)
    s1, s2 = np.diag([1.0, 0.0]), np.diag([0.0, 4.0])
    with pytest.warns(UserWarning, match="singular"):
        value = frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps=0.01)
    offset = 0.01 * np.eye(2)
    np.testing.assert_allclose(seen[1], (s1 + offset) @ (s2 + offset))
    assert value == pytest.approx(5 - 2 * (np.sqrt(1.01 * 0.01) + np.sqrt(0.01 * 4.01)), rel=1e-9)
