"""Inputs the loaders must refuse (or accept) that test_data.py and
test_data_cifar10.py do not reach: bools for sizes and labels, float CIFAR
labels, same-height images of other widths, and upper-case file suffixes."""

from __future__ import annotations

import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast.data import ImageDataset, load_array, load_cifar10, load_dataset, load_digits, load_image_folder


@pytest.mark.parametrize("kwargs, message", [
    (dict(image_size=True), "image_size must be a positive int"),  # True == 1: one-pixel images
    (dict(channels=True), "channels must be 1, 3 or None"),  # True == 1: grey
])
def test_bools_are_not_sizes_or_channel_counts(kwargs, message):
    """A stray flag passed as image_size/channels must not pass as the int 1."""
    with pytest.raises(ValueError, match=message):
        load_dataset("digits", **kwargs)


@pytest.mark.parametrize("labels", [
    torch.tensor([True, False, True]),
    torch.tensor([1 + 0j, 2 + 0j, 3 + 0j]),
])
def test_bool_and_complex_labels_are_refused(labels):
    """Class labels are integers; bool or complex would be cast to int64 silently."""
    with pytest.raises(ValueError, match="labels must be 3 integers"):
        ImageDataset(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), labels=labels)


@pytest.mark.parametrize("batch, message", [
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": np.array([1.5, 2.0])}, "2 images but labels float64"),
    ({b"data": np.zeros((2, 3072), np.int64), b"labels": [1, 2]}, r"data is int64 \(2, 3072\), expected uint8"),
])
def test_cifar_batch_of_other_dtypes_is_corrupt(tmp_path, batch, message):
    """Float labels were truncated to int64 without a word; non-uint8 data must name the batch."""
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch))
    with pytest.raises(ValueError, match=r"test_batch .* is corrupt: " + message):
        load_cifar10(tmp_path, train=False)


def _cifar_folder(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        batch = {b"data": np.full((1, 3072), k, np.uint8), b"labels": [k]}
        (folder / name).write_bytes(pickle.dumps(batch))


def test_load_dataset_reads_cifar_from_the_parent_folder(tmp_path):
    """The documented spec "a CIFAR-10 python folder (or its parent)": e.g. --data ~/datasets."""
    _cifar_folder(tmp_path / "cifar-10-batches-py", [f"data_batch_{k}" for k in range(1, 6)])
    data = load_dataset(tmp_path, channels=1)
    assert data.name == "cifar10" and data.labels.tolist() == [0, 1, 2, 3, 4]


def test_a_cifar_folder_with_only_the_test_batch_names_the_missing_batches(tmp_path):
    """Not "holds no images": load_dataset reads the training batches, and says which are missing."""
    _cifar_folder(tmp_path, ["test_batch"])
    with pytest.raises(FileNotFoundError, match=r"data_batch_1, .*data_batch_5 not found in folder"):
        load_dataset(tmp_path)


def test_image_folder_sizes_differing_only_in_width_are_a_clear_error(tmp_path):
    """6x6 then 8-wide, 6-high: the same height must not hide the other width."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match=r"different sizes \(a.png is 6x6, b.png is 8x6\)"):
        load_image_folder(tmp_path)


def test_upper_case_array_and_archive_names_load(tmp_path):
    """IMAGES.NPY and CIFAR-10-PYTHON.TAR.GZ (e.g. from a case-insensitive file system)."""
    images = np.random.default_rng(1).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    with open(tmp_path / "IMAGES.NPY", "wb") as f:  # np.save(path) would append .npy
        np.save(f, images)
    assert np.array_equal(load_dataset(tmp_path / "IMAGES.NPY").images.permute(0, 2, 3, 1).numpy(), images)
    folder = tmp_path / "src"
    _cifar_folder(folder, [f"data_batch_{k}" for k in range(1, 6)])
    archive = tmp_path / "CIFAR-10-PYTHON.TAR.GZ"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    data = load_dataset(archive)
    assert data.name == "cifar10" and data.labels.tolist() == [0, 1, 2, 3, 4]


def test_image_folder_named_dot_is_named_after_the_folder(tmp_path, monkeypatch):
    """load_image_folder(".") names the dataset after the real folder, not ''."""
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    monkeypatch.chdir(tmp_path)
    assert load_image_folder(".").name == tmp_path.name


def test_a_folder_named_like_an_image_is_searched_not_read(tmp_path):
    """A folder called album.png is a folder: its images load, it is no unreadable image."""
    Image.new("RGB", (4, 4), (9, 8, 7)).save(tmp_path / "a.png")
    (tmp_path / "album.png").mkdir()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "album.png" / "b.png")
    data = load_image_folder(tmp_path)
    assert data.images[:, :, 0, 0].tolist() == [[9, 8, 7], [1, 2, 3]]


@pytest.mark.parametrize("size", [0, True])
def test_load_digits_checks_image_size_itself(size):
    """load_digits is public: 0 failed deep in interpolate, True gave 1x1 digits."""
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        load_digits(image_size=size)


def test_check_model_accepts_a_square_height_width_image_size():
    """A model's image_size may be (H, W), as the Sampler reads it: (8, 8) matches 8px
    data (was refused: "takes 1-channel (8, 8)px images"); (8, 6) and 3 channels do not."""
    data = ImageDataset(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    model = torch.nn.Identity()
    model.in_channels, model.image_size = 1, (8, 8)
    data.check_model(model)
    model.image_size = [8, 6]
    with pytest.raises(ValueError, match="the model takes 1-channel 8x6px images, the dataset has 1-channel 8px"):
        data.check_model(model)
    model.in_channels, model.image_size = 3, (8, 8)
    with pytest.raises(ValueError, match="the model takes 3-channel 8px images, the dataset has 1-channel 8px"):
        data.check_model(model)


def test_one_grey_image_without_its_batch_axis_is_refused(tmp_path):
    """32 x 32 x 1 is one grey image: it read as 32 grey images 1 pixel wide,
    which image_size then stretched into 32 images of garbage."""
    np.save(tmp_path / "one.npy", np.zeros((32, 32, 1), np.uint8))
    for size in (None, 32):
        with pytest.raises(ValueError, match=r"looks like one H x W x C image.*add the batch axis"):
            load_array(tmp_path / "one.npy", image_size=size)


def test_a_shape_square_in_neither_channel_layout_is_refused(tmp_path):
    """2 x 3 x 8 x 4 is 8x4 RGB (channels first) or 3x8 RGBA (channels last):
    it read as the latter, and image_size turned red images into grey stripes."""
    np.save(tmp_path / "odd.npy", np.zeros((2, 3, 8, 4), np.uint8))
    with pytest.raises(ValueError, match=r"reads 3x8 images, N x C x H x W reads 8x4 images, and neither is square"):
        load_array(tmp_path / "odd.npy", image_size=4)
    np.save(tmp_path / "square.npy", np.zeros((2, 3, 4, 4), np.uint8))  # only channels first is square: as before
    assert load_array(tmp_path / "square.npy").images.shape == (2, 3, 4, 4)


def test_a_float_just_past_one_is_shown_exactly(tmp_path):
    """With .4g the message said 'got values in [0, 1]', which looks allowed."""
    array = np.full((1, 4, 4), 0.5, np.float32)
    array[0, 0, 0] = np.nextafter(np.float32(1), np.float32(2))
    np.save(tmp_path / "over.npy", array)
    with pytest.raises(ValueError, match=r"got values in \[0.5, 1.00000011920928\d*\]"):
        load_array(tmp_path / "over.npy")


def test_arrays_are_resized_a_chunk_at_a_time(tmp_path, monkeypatch):
    """All N images went through interpolate at once in float32 (~8x the file
    in memory); chunks give the same values."""
    from ddpm_fast import data

    images = np.random.default_rng(0).integers(0, 256, (7, 12, 12, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", images)
    whole = load_array(tmp_path / "a.npy", image_size=8).images
    seen = []
    interpolate = data.F.interpolate
    monkeypatch.setattr(data.F, "interpolate", lambda x, **kw: seen.append(x.shape[0]) or interpolate(x, **kw))
    monkeypatch.setattr(data, "RESIZE_CHUNK", 3)
    chunked = load_array(tmp_path / "a.npy", image_size=8).images
    assert seen == [3, 3, 1]
    assert torch.equal(chunked, whole) and chunked.dtype == torch.uint8 and chunked.is_contiguous()
