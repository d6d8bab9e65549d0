"""Pixel values the loaders promise, each derived by hand from the documented
formula: grey conversion, the digits' 0..16 scale and bilinear upscaling,
float16 arrays, and labels carried through load_dataset."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast.data import load_array, load_cifar10, load_dataset, load_digits, load_image_folder


def test_grey_conversion_uses_rounded_itu601_luma(tmp_path):
    """channels=1 on RGB arrays is Pillow's "L": 0.299 R + 0.587 G + 0.114 B, rounded."""
    rgb = np.zeros((1, 2, 2, 3), np.uint8)
    rgb[0, 0, 0] = (255, 0, 0)  # 76.245 -> 76
    rgb[0, 0, 1] = (0, 255, 0)  # 149.685 -> 150 (truncation would give 149)
    rgb[0, 1, 0] = (0, 0, 255)  # 29.07 -> 29 (R/B swapped would give 76)
    rgb[0, 1, 1] = (255, 255, 255)  # 255
    np.save(tmp_path / "rgb.npy", rgb)
    grey = load_array(tmp_path / "rgb.npy", channels=1).images
    assert grey.shape == (1, 1, 2, 2) and grey.dtype == torch.uint8
    assert grey[0, 0].tolist() == [[76, 150], [29, 255]]


def test_grey_conversion_of_arrays_is_pillows_to_the_level(tmp_path):
    """channels=1 gives arrays what it gives image folders (Pillow's convert("L")),
    ties included: a float32 luma rounded half to even put [221, 127, 148]
    (157.5, which Pillow's fixed-point weights give as 157) at 158, and 33 of
    65,536 random pixels a level off."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
    rgb[0, 0, 0] = (221, 127, 148)
    np.save(tmp_path / "rgb.npy", rgb)
    want = np.asarray(Image.fromarray(rgb[0], "RGB").convert("L"))
    assert want[0, 0] == 157
    assert np.array_equal(load_array(tmp_path / "rgb.npy", channels=1).images[0, 0].numpy(), want)


def test_digits_grey_levels_are_rounded_to_255():
    """Level v of 0..16 becomes round(v * 255 / 16): level 1 is 16, not a truncated 15."""
    from sklearn.datasets import load_digits as sklearn_digits

    raw = sklearn_digits().images
    data = load_digits()
    assert np.array_equal(data.images[:, 0].numpy(), np.round(raw * 255 / 16).astype(np.uint8))
    levels = {round(v * 255 / 16) for v in range(17)}
    assert set(data.images.unique().tolist()) <= levels


def test_digits_upscale_is_bilinear():
    """8 -> 16 (align_corners=False): output k samples input (k - 0.5) / 2, so odd
    outputs are 3/4 x[i] + 1/4 x[i+1], even ones 1/4 x[i-1] + 3/4 x[i], edges clamped
    (bicubic would weigh four neighbours and overshoot)."""
    small = load_digits().images[:50, 0].double()
    big = load_digits(image_size=16).images[:50, 0].double()
    w = torch.zeros(16, 8, dtype=torch.float64)
    for k in range(16):
        src = min(max((k + 0.5) / 2 - 0.5, 0.0), 7.0)
        i = int(src)
        frac = src - i
        w[k, i] += 1 - frac
        w[k, min(i + 1, 7)] += frac
    want = (w @ small @ w.T).round()  # every weight a multiple of 1/16: exact in float
    assert torch.equal(big, want)


def test_float16_arrays_are_scaled_in_float32(tmp_path):
    """float16 arithmetic rounds x * 255 to the wrong level near a half: the float16
    0.0176544189453125 is 4.5019 levels (-> 5), 0.00588226318359375 is 1.49998 (-> 1)."""
    values = np.array([0.0, 0.0176544189453125, 0.00588226318359375, 1.0], np.float16)
    assert values.astype(np.float64).tolist() == [0.0, 0.0176544189453125, 0.00588226318359375, 1.0]  # exact in float16
    np.save(tmp_path / "half.npy", values.reshape(1, 2, 2))
    assert load_array(tmp_path / "half.npy").images[0, 0].tolist() == [[0, 5], [1, 255]]


def test_a_float_minimum_of_exactly_minus_half_reads_as_minus_one_to_one(tmp_path):
    """Only a minimum in the open interval (-0.5, 0) is ambiguous; -0.5 is [-1, 1] data:
    -0.5 -> 0.25 * 255 = 63.75 -> 64, 1 -> 255."""
    np.save(tmp_path / "x.npy", np.array([[[-0.5, 1.0], [0.0, 1.0]]], np.float32))
    assert load_array(tmp_path / "x.npy").images[0, 0].tolist() == [[64, 255], [128, 255]]


def test_load_dataset_keeps_the_labels_of_digits_and_cifar(tmp_path):
    """load_dataset (the command line's entry) must not drop the labels the loaders read."""
    digits = load_dataset("digits", channels=3)
    assert digits.labels is not None and torch.equal(digits.labels, load_digits().labels)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)]):
        batch = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [i, 9 - i]}
        (folder / name).write_bytes(pickle.dumps(batch))
    want = [0, 9, 1, 8, 2, 7, 3, 6, 4, 5]
    assert load_cifar10(folder).labels.tolist() == want
    assert load_dataset(folder, image_size=16, channels=1).labels.tolist() == want


@pytest.mark.parametrize("dtype", [np.int16, np.int64])
def test_negative_integer_arrays_are_refused_not_wrapped(tmp_path, dtype):
    """-1 cast to uint8 would load as a white 255 pixel."""
    array = np.zeros((2, 4, 4), dtype)
    array[0, 0, 0] = -1
    np.save(tmp_path / "neg.npy", array)
    with pytest.raises(ValueError, match=r"integer images must lie in 0..255, got values in -1..0"):
        load_array(tmp_path / "neg.npy")


def test_image_folder_resizes_bicubic(tmp_path):
    """Image folders resize with (antialiased) bicubic, as documented: a 0 | 200 step
    upscaled 4 -> 8 rings past 200 beside the edge (the cubic kernel's negative lobe);
    bilinear would stay within [0, 200]."""
    step = np.zeros((4, 4, 3), np.uint8)
    step[:, 2:] = 200
    Image.fromarray(step).save(tmp_path / "step.png")
    row = load_image_folder(tmp_path, image_size=8).images[0, 0, 0].tolist()
    assert row[:3] == [0, 0, 0] and row[-1] == 200 and max(row) > 200


def test_downscaling_is_antialiased(tmp_path):
    """One white column in four, 32 -> 8 px: an antialiased filter (4 px per output
    pixel, weights summing to 1 over each residue class: the cubic kernel's partition
    of unity) gives every interior pixel exactly 255 / 4 = 63.75 -> 64; point sampling
    between two black columns would give ~0."""
    lines = np.zeros((32, 32, 3), np.uint8)
    lines[:, ::4] = 255
    Image.fromarray(lines).save(tmp_path / "lines.png")
    out = load_image_folder(tmp_path, image_size=8).images[0]
    assert out.shape == (3, 8, 8)
    assert (out[:, :, 2:6] == 64).all()  # columns whose filter support lies inside the image
