"""Every data loader on small synthetic files, and each of its errors."""

from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast.data import ImageDataset, load_array, load_cifar10, load_dataset, load_digits, load_image_folder
from ddpm_fast.images import to_uint8


def test_digits_are_bundled_and_scaled():
    data = load_digits()
    assert data.images.shape == (1797, 1, 8, 8) and data.images.dtype == torch.uint8
    assert data.images.max() == 255 and data.images.min() == 0
    assert data.labels.shape == (1797,) and set(data.labels.tolist()) == set(range(10))
    x = data.batch(torch.arange(5))
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(to_uint8(x), data.images[:5].permute(0, 2, 3, 1).numpy())  # exact round trip
    assert load_digits(image_size=16).images.shape == (1797, 1, 16, 16)


def _write_images(folder, sizes, mode="RGB", suffix=".png"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        shape = (h, w, 3) if mode == "RGB" else (h, w)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"img{i}{suffix}")


def test_image_folder_recursive_sorted_and_grey(tmp_path):
    _write_images(tmp_path / "a", [(6, 6), (6, 6)])
    _write_images(tmp_path / "b", [(6, 6)], suffix=".jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    data = load_image_folder(tmp_path)
    assert data.images.shape == (3, 3, 6, 6)
    first = np.asarray(Image.open(tmp_path / "a" / "img0.png"))
    assert np.array_equal(data.images[0].permute(1, 2, 0).numpy(), first)
    assert load_image_folder(tmp_path, channels=1).images.shape == (3, 1, 6, 6)


def test_image_folder_resizes_and_center_crops(tmp_path):
    _write_images(tmp_path, [(10, 20), (16, 16), (30, 12)])
    data = load_image_folder(tmp_path, image_size=8)
    assert data.images.shape == (3, 3, 8, 8)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="holds no images"):
        load_image_folder(tmp_path)
    _write_images(tmp_path, [(6, 6), (8, 8)])
    with pytest.raises(ValueError, match="different sizes.*image_size"):
        load_image_folder(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        load_image_folder(tmp_path, image_size=6)


def _cifar_batch(n, seed):
    rng = np.random.default_rng(seed)
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}


@pytest.fixture
def cifar_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        (folder / name).write_bytes(pickle.dumps(_cifar_batch(3, i)))
    return folder


def test_cifar10_folder_parent_and_archive(cifar_folder, tmp_path):
    data = load_cifar10(cifar_folder)
    assert data.images.shape == (15, 3, 32, 32) and data.labels.shape == (15,)
    raw = _cifar_batch(3, 0)[b"data"][0]
    assert np.array_equal(data.images[0, 0].numpy().ravel(), raw[:1024])  # red plane first, row-major
    assert np.array_equal(data.images[0, 2].numpy().ravel(), raw[2048:])
    assert torch.equal(load_cifar10(tmp_path).images, data.images)
    assert load_cifar10(cifar_folder, train=False).images.shape == (3, 3, 32, 32)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(cifar_folder, arcname="cifar-10-batches-py")
    assert torch.equal(load_cifar10(archive).images, data.images)
    assert torch.equal(load_dataset(archive).images, data.images)
    assert load_dataset(cifar_folder, image_size=16).images.shape == (15, 3, 16, 16)


def test_cifar10_errors(cifar_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cifar10(tmp_path / "nothing")
    (cifar_folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3 not found"):
        load_cifar10(cifar_folder)
    (cifar_folder / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="data_batch_3 .* is corrupt"):
        load_cifar10(cifar_folder)


@pytest.mark.parametrize(
    "layout, make",
    [
        ("nhwc uint8", lambda x: x),
        ("nhw grey", lambda x: x[..., 0]),
        ("nchw uint8", lambda x: x.transpose(0, 3, 1, 2)),
        ("nhwc rgba", lambda x: np.concatenate([x, np.full(x.shape[:3] + (1,), 255, np.uint8)], -1)),
        ("float [0,1]", lambda x: x.astype(np.float32) / 255),
        ("float [-1,1]", lambda x: x.astype(np.float64) / 127.5 - 1),
    ],
)
def test_arrays_in_every_layout(tmp_path, layout, make):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 6, 6, 3), dtype=np.uint8)
    if layout == "nhw grey":
        images = images[..., :1]
    images[0, 0, 0] = 0  # both ends of the range present, so the float scale is unambiguous
    images[0, 0, 1] = 255
    array = make(images)
    np.save(tmp_path / "a.npy", array)
    np.savez(tmp_path / "a.npz", images=array, other=np.zeros(3))
    for path in (tmp_path / "a.npy", tmp_path / "a.npz"):
        data = load_dataset(path)
        assert np.array_equal(data.images.permute(0, 2, 3, 1).numpy(), images), (layout, path.name)


def test_array_errors(tmp_path):
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 4, 4), np.uint8), b=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"holds arrays \['a', 'b'\]"):
        load_array(tmp_path / "two.npz")
    assert load_array(tmp_path / "two.npz", key="b").images.shape == (2, 1, 4, 4)
    np.save(tmp_path / "hot.npy", np.full((2, 4, 4, 3), 3.0, np.float32))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\] or \[-1, 1\]"):
        load_array(tmp_path / "hot.npy")
    np.save(tmp_path / "nan.npy", np.full((2, 4, 4, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match="must lie in"):
        load_array(tmp_path / "nan.npy")
    np.save(tmp_path / "wide.npy", np.zeros((2, 5, 4, 7), np.uint8))
    with pytest.raises(ValueError, match="cannot tell the channel axis"):
        load_array(tmp_path / "wide.npy")
    np.save(tmp_path / "rect.npy", np.zeros((2, 4, 6, 1), np.uint8))
    with pytest.raises(ValueError, match="must be square.*image_size"):
        load_array(tmp_path / "rect.npy")
    assert load_array(tmp_path / "rect.npy", image_size=4).images.shape == (2, 1, 4, 4)
    (tmp_path / "bad.npy").write_bytes(b"nope")
    with pytest.raises(ValueError, match="cannot read"):
        load_array(tmp_path / "bad.npy")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_array(tmp_path / "missing.npz")


def test_dataset_spec_errors_and_conversions(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected 'digits', a .npy/.npz file"):
        load_dataset(tmp_path / "nothing-here")
    assert load_dataset("digits", channels=3).images.shape == (1797, 3, 8, 8)
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        load_dataset("digits", image_size=0)


def test_image_dataset_checks_its_tensor():
    with pytest.raises(ValueError, match="uint8 N x C x H x W"):
        ImageDataset(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="holds no images"):
        ImageDataset(torch.zeros(0, 1, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        ImageDataset(torch.zeros(2, 2, 4, 4, dtype=torch.uint8))
    data = ImageDataset(torch.full((3, 1, 4, 4), 255, dtype=torch.uint8))
    assert len(data) == 3 and data[1].shape == (1, 4, 4) and data[1].max() == 1.0
