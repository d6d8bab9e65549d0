"""Sample output: uint8 conversion, PNG grids, atomic .npz files, the loss plot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast.images import make_grid, plot_curve, save_grid, save_npz, to_uint8


def test_to_uint8_clamps_rounds_and_moves_channels_last():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5).expand(2, 3, 1, 5)
    out = to_uint8(x)
    assert out.shape == (2, 1, 5, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]
    with pytest.raises(ValueError, match="floating N x C x H x W"):
        to_uint8(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match=r"channels first\) with C 1 or 3, got .* \(2, 8, 8, 3\)"):
        to_uint8(torch.zeros(2, 8, 8, 3))  # channels last by mistake: it was permuted into (2, 8, 3, 8)


def test_grid_layout_and_png(tmp_path):
    images = np.arange(5 * 2 * 3, dtype=np.uint8).reshape(5, 2, 3, 1)
    grid = make_grid(images, nrow=3, padding=1)
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 1)
    assert np.array_equal(grid[1:3, 1:4], images[0]) and np.array_equal(grid[4:6, 5:8], images[4])
    save_grid(images, tmp_path / "g.png")  # 2x3 tiles are upscaled to be viewable
    with Image.open(tmp_path / "g.png") as png:
        assert png.size[0] >= 3 * 32 and png.mode == "L"
    save_grid(np.zeros((4, 8, 8, 3), np.uint8), tmp_path / "rgb.png", scale=1)
    with Image.open(tmp_path / "rgb.png") as png:
        assert png.size == (2 * 10 + 2, 2 * 10 + 2) and png.mode == "RGB"
    with pytest.raises(ValueError, match="uint8 N x H x W x C"):
        save_grid(np.zeros((4, 8, 8, 2), np.uint8), tmp_path / "x.png")


def test_save_npz_round_trip_leaves_no_temporary(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 1), dtype=np.uint8)
    save_npz(images, tmp_path / "s.npz", labels=np.arange(3))
    with np.load(tmp_path / "s.npz") as loaded:
        assert np.array_equal(loaded["images"], images) and loaded["labels"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]
    for name in ("allow_pickle", "file"):  # np.savez took these itself: the array was dropped or a TypeError raised
        with pytest.raises(ValueError, match=f"may not be named {name}"):
            save_npz(images, tmp_path / "t.npz", **{name: np.arange(3)})


def test_save_npz_keeps_colour_images_as_they_are(tmp_path):
    """Channel order and every value of RGB images (the round trip above is grey)."""
    images = np.random.default_rng(1).integers(0, 256, (2, 5, 3, 3), dtype=np.uint8)
    save_npz(images, tmp_path / "rgb.npz")
    with np.load(tmp_path / "rgb.npz") as loaded:
        assert np.array_equal(loaded["images"], images)


def test_plot_curve_draws_the_moving_average_only_where_asked(tmp_path):
    """The smoothed line (blue, 30 90 200) over the raw one (grey): there with
    the default smoothing of 200 values, absent with smooth=1."""
    loss = np.exp(-np.linspace(0, 3, 200)) + 0.05 * np.random.default_rng(0).random(200)
    blue = []
    for smooth in (None, 1):
        plot_curve(loss, tmp_path / "loss.png", **({} if smooth is None else {"smooth": smooth}))
        with Image.open(tmp_path / "loss.png") as png:
            blue.append(int((np.asarray(png.convert("RGB")) == (30, 90, 200)).all(axis=2).sum()))
    assert blue[0] > 100 and blue[1] == 0


def test_save_grid_replaces_a_picture_whole_or_not_at_all(tmp_path, monkeypatch):
    """A grid written in place was half a PNG when the process died mid-write."""
    from PIL import Image

    path = tmp_path / "g.png"
    save_grid(np.zeros((4, 8, 8, 1), np.uint8), path)
    before = path.read_bytes()
    real_save = Image.Image.save

    def dies_mid_write(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_grid(np.full((4, 8, 8, 1), 255, np.uint8), path)
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["g.png"]


def test_plot_curve_writes_a_png(tmp_path):
    plot_curve(np.exp(-np.linspace(0, 3, 200)) + 0.01, tmp_path / "loss.png")
    plot_curve([1.0, -1.0, 0.5], tmp_path / "linear.png", steps=[10, 20, 30])  # negative values: linear axis
    for name in ("loss.png", "linear.png"):
        with Image.open(tmp_path / name) as png:
            assert png.size == (640, 360)
    with pytest.raises(ValueError, match="at least 2 finite values"):
        plot_curve([1.0, float("nan")], tmp_path / "none.png")
    with pytest.raises(ValueError, match=r"steps has shape \(2,\) for values of shape \(3,\)"):
        plot_curve([1.0, 2.0, 3.0], tmp_path / "none.png", steps=[1, 2])
    with pytest.raises(ValueError, match=r"values must be 1-d, got shape \(2, 2\)"):  # said "4 entries for 4 values"
        plot_curve([[1.0, 2.0], [3.0, 4.0]], tmp_path / "none.png")
    with pytest.raises(ValueError, match=r"size must be a \(width, height\) of ints of at least \(100, 70\)"):
        plot_curve([1.0, 2.0, 3.0], tmp_path / "none.png", size=(50, 40))  # failed inside PIL
    plot_curve([1.0, 2.0, 3.0], tmp_path / "list.png", size=[200, 100])  # a list, as PIL takes it
    with Image.open(tmp_path / "list.png") as png:
        assert png.size == (200, 100)


def test_to_uint8_round_trips_every_level_and_maps_nan_to_black():
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert np.array_equal(to_uint8(levels.float() / 127.5 - 1)[0, :, :, 0], levels[0, 0].numpy())
    assert to_uint8(torch.full((1, 1, 1, 1), float("nan")))[0, 0, 0, 0] == 0


def test_make_grid_arguments():
    images = np.zeros((3, 2, 2, 3), np.uint8)
    assert make_grid(images, nrow=10, padding=0).shape == (2, 6, 3)  # no empty columns past the last image
    assert make_grid(images, padding=0, scale=3).shape == (12, 12, 3)  # 2 x 2 layout, 6 px tiles
    assert make_grid(images, nrow=np.int64(3), padding=np.int32(0)).shape == (2, 6, 3)  # counts read from arrays
    for bad in (dict(nrow=0), dict(padding=-1), dict(scale=0), dict(scale=1.5), dict(nrow=True)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be an int"):
            make_grid(images, **bad)


def test_plot_curve_of_a_constant_series(tmp_path):
    for log_y in (True, False):
        plot_curve([0.5] * 30, tmp_path / "flat.png", log_y=log_y, title="flat")
        with Image.open(tmp_path / "flat.png") as png:
            pixels = np.asarray(png.convert("RGB"))
        assert (pixels != 255).any(axis=2).sum() > 100  # axes, labels and a line were drawn


def test_to_uint8_of_half_precision_equals_float32():
    """Samples in float16/bfloat16 get the same pixels as in float32 (the arithmetic
    in 16 bits moved levels by one)."""
    x = torch.linspace(-1, 1, 256).view(1, 1, 16, 16)
    for dtype in (torch.float16, torch.bfloat16):
        low = x.to(dtype)
        assert np.array_equal(to_uint8(low), to_uint8(low.float())), dtype


def test_grid_padding_is_black_and_small_tiles_reach_32_px(tmp_path):
    grid = make_grid(np.full((2, 2, 2, 1), 200, np.uint8), nrow=2, padding=1)
    assert grid.shape == (4, 7, 1)
    assert grid[0].max() == grid[-1].max() == grid[:, 0].max() == grid[:, 3].max() == grid[:, 6].max() == 0
    save_grid(np.zeros((5, 2, 3, 1), np.uint8), tmp_path / "g.png")  # 2 x 3 px tiles, scale ceil(32 / 3) = 11
    with Image.open(tmp_path / "g.png") as png:
        assert png.size == (3 * (33 + 2) + 2, 2 * (22 + 2) + 2)
