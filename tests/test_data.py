"""The digits, image-folder and array loaders and ImageDataset on small
synthetic files, and each of their errors (CIFAR-10: test_data_cifar10.py)."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast.data import (
    ImageDataset,
    load_array,
    load_dataset,
    load_digits,
    load_image_folder,
)
from ddpm_fast.images import to_uint8


def test_digits_are_bundled_and_scaled():
    data = load_digits()
    assert data.images.shape == (1797, 1, 8, 8) and data.images.dtype == torch.uint8
    assert data.images.max() == 255 and data.images.min() == 0
    assert data.labels.shape == (1797,) and set(data.labels.tolist()) == set(range(10))
    x = data.batch(torch.arange(5))
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(to_uint8(x), data.images[:5].permute(0, 2, 3, 1).numpy())  # exact round trip
    big = load_digits(image_size=16)
    assert big.images.shape == (1797, 1, 16, 16) and torch.equal(big.labels, data.labels)
    assert torch.equal(load_dataset("digits", image_size=16).images, big.images)  # the same (bilinear) upscaling
    up = big.images.float()
    assert (up[..., ::2, ::2] != up[..., 1::2, 1::2]).any()  # interpolated, not 2x2 blocks (nearest)
    assert abs(up.mean() - data.images.float().mean()) < 2


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
    # Red | green | blue thirds across the long side: the centre crop keeps the green
    # third (a corner crop would keep red, a squash all three).
    thirds = np.zeros((16, 48, 3), np.uint8)
    for k in range(3):
        thirds[:, 16 * k : 16 * (k + 1), k] = 255
    Image.fromarray(thirds).save(tmp_path / "wide.png")
    Image.fromarray(np.ascontiguousarray(thirds.transpose(1, 0, 2))).save(tmp_path / "tall.png")
    crops = load_image_folder(tmp_path, image_size=8).images[-2:]  # tall.png, wide.png (sorted)
    assert crops[:, :, 1:7, 1:7].float().mean((2, 3)).tolist() == [[0.0, 255.0, 0.0]] * 2


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
    with pytest.raises(ValueError, match=r"uint8 N x C x H x W tensor or numpy array, got torch.float32 \(2, 1, 4, 4\)"):
        ImageDataset(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"numpy array, got float64 \(2, 1, 4, 4\)"):
        ImageDataset(np.zeros((2, 1, 4, 4)))
    with pytest.raises(ValueError, match="numpy array, got a list"):
        ImageDataset([[[[0]]]])
    with pytest.raises(ValueError, match="holds no images"):
        ImageDataset(torch.zeros(0, 1, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        ImageDataset(torch.zeros(2, 2, 4, 4, dtype=torch.uint8))
    data = ImageDataset(torch.full((3, 1, 4, 4), 255, dtype=torch.uint8))
    assert len(data) == 3 and data[1].shape == (1, 4, 4) and data[1].max() == 1.0


def test_image_dataset_keeps_a_numpy_array_as_it_keeps_a_tensor():
    array = np.full((2, 1, 3, 3), 255, dtype=np.uint8)
    data = ImageDataset(array)
    assert data.images.dtype == torch.uint8 and data.images.shape == (2, 1, 3, 3) and data[0].min() == 1.0
    array[0] = 0
    assert data[0].max() == -1.0  # the same memory, as the README says
    array = np.full((2, 1, 3, 3), 255, dtype=np.uint8)
    array.flags.writeable = False  # as np.load(mmap_mode="r") gives: torch warns when it shares such memory
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ImageDataset(array)[1].min() == 1.0
    flipped = np.arange(2 * 3 * 2 * 2, dtype=np.uint8).reshape(2, 2, 2, 3)[..., ::-1].transpose(0, 3, 1, 2)  # BGR to RGB
    assert torch.equal(ImageDataset(flipped).images, torch.from_numpy(flipped.copy()))  # torch refuses to share it
    with pytest.raises(ValueError, match=r"got 8 \(shape \(4, 8, 8, 3\)\) \(channels last, N x H x W x C\? then permute"):
        ImageDataset(np.zeros((4, 8, 8, 3), np.uint8))


def test_images_set_later_are_checked_as_when_made():
    """Float images put into a dataset were read as 0..255 levels by the Trainer
    and evaluate_bpd: near-black data, silently. A subclass that sets its own
    images in __init__, and uint8 images of another size, still work."""
    data = ImageDataset(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), labels=[0, 1, 2])
    with pytest.raises(ValueError, match=r"uint8 N x C x H x W tensor or numpy array, got torch.float32"):
        data.images = torch.zeros(3, 1, 4, 4)
    with pytest.raises(ValueError, match="images must be 3, as the dataset's labels, got 2"):
        data.images = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    data.images = np.full((3, 3, 8, 8), 255, np.uint8)
    assert (data.channels, data.image_size) == (3, 8) and data[0].min() == 1.0

    class Inverted(ImageDataset):
        def __init__(self, images):
            super().__init__(images)
            self.images = 255 - images

    assert Inverted(torch.zeros(2, 1, 4, 4, dtype=torch.uint8))[0].min() == 1.0


def test_a_dataset_pickled_when_images_was_an_attribute_loads():
    data = ImageDataset(torch.arange(16, dtype=torch.uint8).reshape(1, 1, 4, 4), name="old")
    data.__dict__["images"] = data.__dict__.pop("_images")  # the state as it was pickled then
    restored = pickle.loads(pickle.dumps(data))
    assert torch.equal(restored.images, torch.arange(16, dtype=torch.uint8).reshape(1, 1, 4, 4))
    assert restored.name == "old" and len(restored) == 1


# ---------------------------------------------------------------- more image-folder cases


def test_image_folder_formats_gif_first_frame_and_hidden_files(tmp_path):
    red, blue = Image.new("RGB", (5, 5), (255, 0, 0)), Image.new("RGB", (5, 5), (0, 0, 255))
    red.save(tmp_path / "a.gif", save_all=True, append_images=[blue])
    Image.new("RGB", (5, 5), (0, 255, 0)).save(tmp_path / "b.BMP")
    Image.new("RGB", (5, 5), (10, 20, 30)).save(tmp_path / "c.webp", lossless=True)
    (tmp_path / "._d.png").write_bytes(b"macOS resource fork, not an image")
    (tmp_path / ".cache").mkdir()
    Image.new("RGB", (9, 9)).save(tmp_path / ".cache" / "e.png")
    data = load_image_folder(tmp_path)
    assert data.images.shape == (3, 3, 5, 5) and data.name == tmp_path.name
    assert data.images[:, :, 0, 0].tolist() == [[255, 0, 0], [0, 255, 0], [10, 20, 30]]


def test_image_folder_exif_orientation_and_16_bit_grey(tmp_path):
    image = Image.new("RGB", (4, 4))
    image.putpixel((3, 0), (255, 255, 255))  # top-right corner as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "a.png", exif=exif)
    data = load_image_folder(tmp_path)
    assert data.images[0, :, 3, 3].tolist() == [255, 255, 255] and data.images[0, :, 0, 3].sum() == 0  # bottom-right
    (tmp_path / "a.png").unlink()
    Image.fromarray(np.array([[0, 65535], [32768, 257]], dtype=np.uint16)).save(tmp_path / "wide.png")
    assert load_image_folder(tmp_path, channels=1).images[0, 0].tolist() == [[0, 255], [128, 1]]
    # every level rounds v * 255 / 65535 (levels 257 k alone cannot tell it from v // 256)
    levels = np.arange(0, 65536, 97).reshape(26, 26)
    Image.fromarray(levels.astype(np.uint16)).save(tmp_path / "wide.png")
    want = np.round(levels * 255 / 65535)
    assert np.array_equal(load_image_folder(tmp_path, channels=1).images[0, 0].numpy(), want)


def test_image_folder_more_errors(tmp_path):
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        load_image_folder(tmp_path / "file.png")
    with pytest.raises(ValueError, match="channels must be 1, 3 or None"):
        load_image_folder(tmp_path, channels=2)
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        load_image_folder(tmp_path, image_size=-3)
    folder = tmp_path / "photos"
    _write_images(folder, [(6, 6)], suffix=".jpg")
    good = (folder / "img0.jpg").read_bytes()
    (folder / "img1.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    with pytest.raises(ValueError, match="cannot read image .*img1.jpg"):
        load_image_folder(folder)
    (folder / "img1.jpg").unlink()
    _write_images(folder / "wide", [(4, 6)])
    with pytest.raises(ValueError, match="must be square.*image_size"):
        load_image_folder(folder / "wide")


# ---------------------------------------------------------------- more array cases


def test_array_integers_and_channel_axis_tie_break(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, (2, 3, 4, 4), dtype=np.uint8)  # N x 3 x 4 x 4
    np.save(tmp_path / "nchw.npy", images)  # channels last would read 3x4 images with 4 channels
    assert torch.equal(load_array(tmp_path / "nchw.npy").images, torch.from_numpy(images))
    np.save(tmp_path / "ints.npy", images.astype(np.int64))
    assert torch.equal(load_array(tmp_path / "ints.npy").images, torch.from_numpy(images))
    ambiguous = np.random.default_rng(3).integers(0, 256, (2, 3, 3, 3), dtype=np.uint8)
    np.save(tmp_path / "amb.npy", ambiguous)  # both readings square: channels last, as samples.npz
    assert torch.equal(load_array(tmp_path / "amb.npy").images, torch.from_numpy(ambiguous).permute(0, 3, 1, 2))
    np.save(tmp_path / "big.npy", np.full((2, 4, 4), 256, np.int32))
    with pytest.raises(ValueError, match=r"integer images must lie in 0..255, got values in 256..256"):
        load_array(tmp_path / "big.npy")
    np.save(tmp_path / "bool.npy", np.zeros((2, 4, 4), bool))
    with pytest.raises(ValueError, match="must be uint8, integers in 0..255 or floats, got bool"):
        load_array(tmp_path / "bool.npy")
    np.save(tmp_path / "neg.npy", np.full((2, 4, 4), -1.5, np.float32))
    with pytest.raises(ValueError, match=r"got values in \[-1.5, -1.5\]"):
        load_array(tmp_path / "neg.npy")


def test_array_key_and_file_errors(tmp_path):
    np.savez(tmp_path / "a.npz", images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"has no array 'pixels'; it holds arrays \['images'\]"):
        load_array(tmp_path / "a.npz", key="pixels")
    np.savez(tmp_path / "obj.npz", images=np.array([None, 1], dtype=object))
    with pytest.raises(ValueError, match="cannot read .*obj.npz"):
        load_array(tmp_path / "obj.npz")
    np.save(tmp_path / "flat.npy", np.zeros((2, 16), np.uint8))
    with pytest.raises(ValueError, match="expected N x H x W"):
        load_array(tmp_path / "flat.npy")
    np.savez(tmp_path / "digits.npz", images=np.zeros((2, 8, 8, 1), np.uint8))
    data = load_dataset(tmp_path / "digits.npz", image_size=16, channels=3)
    assert data.images.shape == (2, 3, 16, 16) and data.name == "digits"


def test_an_npz_of_unnamed_arrays_gives_its_first_as_the_images(tmp_path):
    """np.savez(file, images, labels), as guided-diffusion's sample and
    reference batches are written (arr_0 the images, arr_1 the labels): was
    "holds arrays ['arr_0', 'arr_1']: name the images 'images'", and the command
    line has no option to name them."""
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "batch.npz", images, np.array([1, 2, 3]))
    data = load_array(tmp_path / "batch.npz")
    assert torch.equal(data.images, torch.from_numpy(images).permute(0, 3, 1, 2))
    np.savez(tmp_path / "both.npz", np.zeros((3, 8, 8), np.uint8), images=images)  # 'images' still first
    assert torch.equal(load_array(tmp_path / "both.npz").images, data.images)
    np.savez(tmp_path / "named.npz", a=images, b=images)
    with pytest.raises(ValueError, match=r"holds arrays \['a', 'b'\]: name the images 'images'"):
        load_array(tmp_path / "named.npz")


def test_array_files_numpy_did_not_write_and_images_of_no_pixels(tmp_path):
    """Each was a raw error from deep inside (AttributeError: a zip member
    without the .npy header comes back as bytes; ZeroDivisionError resizing
    0-pixel images) or accepted (0 x 0 uint8 images), or a folder was called
    missing."""
    import zipfile

    with zipfile.ZipFile(tmp_path / "foreign.npz", "w") as archive:
        archive.writestr("images.npy", b"not an npy payload")
    with pytest.raises(ValueError, match="member 'images' is not a .npy array"):
        load_array(tmp_path / "foreign.npz")
    np.save(tmp_path / "zero_hw.npy", np.zeros((3, 0, 0, 3), np.uint8))
    np.save(tmp_path / "zero_w.npy", np.zeros((2, 4, 0, 3), np.uint8))
    for name, size in (("zero_hw", None), ("zero_w", 4)):
        with pytest.raises(ValueError, match="holds no images"):
            load_array(tmp_path / f"{name}.npy", image_size=size)
    with pytest.raises(ValueError, match="images of 0 pixels"):
        ImageDataset(torch.zeros(2, 1, 0, 0, dtype=torch.uint8))
    (tmp_path / "folder.npz").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder, not a .npy/.npz array file"):
        load_array(tmp_path / "folder.npz")


# ---------------------------------------------------------------- load_dataset, ImageDataset


def test_dataset_spec_rejects_what_it_cannot_read(tmp_path):
    (tmp_path / "one.png").write_bytes(b"")
    with pytest.raises(ValueError, match="is not a dataset .* expected 'digits', a .npy/.npz file, a CIFAR-10"):
        load_dataset(tmp_path / "one.png")
    with pytest.raises(TypeError, match="spec must be a str or path"):
        load_dataset(3)
    with pytest.raises(ValueError, match="channels must be 1, 3 or None"):
        load_dataset("digits", channels=4)
    _write_images(tmp_path / "folder", [(6, 6)] * 2)
    data = load_dataset(tmp_path / "folder", channels=1)
    assert data.images.shape == (2, 1, 6, 6) and data.labels is None


def test_image_dataset_labels():
    images = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    assert ImageDataset(images, labels=torch.tensor([1, 2, 3], dtype=torch.int32)).labels.dtype == torch.int64
    with pytest.raises(ValueError, match=r"labels must be 3 integers"):
        ImageDataset(images, labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"labels must be 3 integers"):
        ImageDataset(images, labels=torch.tensor([0.5, 1.0, 2.0]))
    with pytest.raises(ValueError, match="must be square"):
        ImageDataset(torch.zeros(3, 1, 4, 5, dtype=torch.uint8))


def test_an_empty_spec_is_not_the_current_folder(tmp_path, monkeypatch):
    """Path("") is "."; an empty --data once loaded whatever images the working folder held."""
    _write_images(tmp_path, [(6, 6)] * 2)
    monkeypatch.chdir(tmp_path)
    for spec in ("", "  "):
        with pytest.raises(ValueError, match="dataset spec is empty"):
            load_dataset(spec)


def test_a_file_that_is_no_array_file_says_so(tmp_path):
    """numpy reads any file without the .npy or zip header as a pickle, and then
    complains of "pickled (object) data" in a text file."""
    for name in ("junk.npz", "junk.npy", "empty.npy"):
        (tmp_path / name).write_bytes(b"" if name == "empty.npy" else b"some text\n")
        with pytest.raises(ValueError, match=rf"cannot read .*{name} as a .npy/.npz array file: it is neither") as info:
            load_array(tmp_path / name)
        assert "pickle" not in str(info.value)


def test_image_size_may_be_a_numpy_integer():
    """A size computed with numpy (np.int64) was refused as not an int."""
    assert tuple(load_dataset("digits", image_size=np.int64(4)).images.shape[2:]) == (4, 4)


# ---------------------------------------------------------------- damaged or unusual input (audit, 2026-12-04)


def test_image_folder_follows_symlinked_folders_once(tmp_path):
    """Path.rglob does not enter symlinked folders (Python < 3.13): a linked class
    folder was skipped without a word. A link back up must not loop or repeat."""
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    _write_images(data / "dogs", [(8, 8)] * 2)
    _write_images(elsewhere / "cats", [(8, 8)] * 3)
    (data / "cats").symlink_to(elsewhere / "cats", target_is_directory=True)
    (data / "dogs" / "up").symlink_to(data, target_is_directory=True)
    assert len(load_image_folder(data)) == 5


def test_32_bit_integer_pixels_beyond_16_bits_are_refused(tmp_path):
    """Pillow's mode I holds 32-bit integers (a TIFF's; older Pillows read 16-bit
    PNGs so too): read as 16-bit grey, values above 65535 were clipped to white
    without a word. Within 16 bits they are 16-bit grey, as I;16."""
    Image.fromarray(np.array([[0, 257 * 10], [65535, 1]], dtype=np.int32), "I").save(tmp_path / "a.tif")
    assert load_image_folder(tmp_path, channels=1).images[0, 0].tolist() == [[0, 10], [255, 0]]
    for value in (65536, 2**31 - 1, -1):
        Image.fromarray(np.array([[0, value], [7, 1]], dtype=np.int32), "I").save(tmp_path / "a.tif")
        with pytest.raises(ValueError, match=rf"a.tif: ValueError: its pixels are 32-bit integers \(Pillow mode I\) "
                                             rf"from {min(value, 0)} to {max(value, 7)}, beyond 16 bits"):
            load_image_folder(tmp_path, channels=1)


# Why: a broken link named like an image was skipped without a word (the dataset
# silently one image short), and TIFF images, which Pillow reads, were skipped too.
def test_image_folder_reads_tiff_and_refuses_a_broken_link(tmp_path):
    _write_images(tmp_path, [(8, 8)] * 2)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "z.tif")
    Image.new("RGB", (8, 8), (4, 5, 6)).save(tmp_path / "zz.TIFF")
    data = load_image_folder(tmp_path)
    assert len(data) == 4 and data.images[2:, :, 0, 0].tolist() == [[1, 2, 3], [4, 5, 6]]
    # float pixels (mode F, TIFF's): Pillow's convert clipped a [0, 1] ramp to 0 and 1, a black image
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8), "F").save(tmp_path / "zzz.tif")
    with pytest.raises(ValueError, match=r"zzz.tif: ValueError: its pixels are 32-bit floats \(Pillow mode F\)"):
        load_image_folder(tmp_path, channels=1)
    (tmp_path / "zzz.tif").unlink()
    (tmp_path / "gone.png").symlink_to(tmp_path / "moved" / "gone.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "lost.jpg").symlink_to(tmp_path / "moved" / "lost.jpg")
    with pytest.raises(FileNotFoundError, match=r"gone.png is a broken symbolic link \(and 1 more\)"):
        load_image_folder(tmp_path)
    (tmp_path / "notes.txt").symlink_to(tmp_path / "moved" / "notes.txt")  # not an image's name: no matter
    (tmp_path / "gone.png").unlink()
    (tmp_path / "sub" / "lost.jpg").unlink()
    assert len(load_image_folder(tmp_path)) == 4


# Why: "digits" loads the bundled set; with a folder ./digits of the user's there
# too, the user's images were passed over without a word.
def test_digits_says_it_is_not_a_folder_named_digits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_dataset("digits")) == 1797  # no such folder: nothing said
    _write_images(tmp_path / "digits", [(8, 8)] * 2)
    with pytest.warns(UserWarning, match=r"'digits' is the bundled scikit-learn set, not the ./digits found here"):
        assert len(load_dataset("digits")) == 1797
    assert len(load_dataset("./digits")) == 2
    assert len(load_dataset(Path("digits"))) == 2  # a Path names a folder (str(Path("./digits")) is "digits")
    # said by rank 0 alone (under torchrun every rank loads the data)
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_dataset("digits")) == 1797


def test_transparent_pixels_load_over_black(tmp_path):
    """Two pictures that look the same (a transparent background, whatever colour
    the saving tool left under it) load the same: composited over black."""
    folder = tmp_path / "alpha"
    folder.mkdir()
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[1:3, 1:3] = (200, 100, 50, 255)
    rgba[0, 0] = (255, 255, 255, 128)  # half transparent white
    hidden = rgba.copy()
    hidden[..., :3][rgba[..., 3] == 0] = (255, 0, 0)  # red under the transparent pixels
    Image.fromarray(rgba, "RGBA").save(folder / "a.png")
    Image.fromarray(hidden, "RGBA").save(folder / "b.png")
    palette = Image.fromarray(hidden, "RGBA").convert("P")
    palette.info["transparency"] = palette.getpixel((3, 3))  # the red of the background
    palette.save(folder / "c.png", transparency=palette.getpixel((3, 3)))
    images = load_image_folder(folder).images
    assert torch.equal(images[0], images[1])
    assert images[0, :, 3, 3].tolist() == [0, 0, 0] and images[0, :, 1, 1].tolist() == [200, 100, 50]
    assert images[0, :, 0, 0].tolist() == [128, 128, 128]
    assert images[2, :, 3, 3].tolist() == [0, 0, 0]  # a palette's transparent index too
    grey = load_image_folder(folder, channels=1).images
    assert grey[1, 0, 3, 3].item() == 0


def test_array_of_one_image_without_its_batch_axis(tmp_path):
    """An H x W x 3 array was read as H grey images H x 3 ('must be square: pass
    image_size', which then gave thin strips upscaled)."""
    path = tmp_path / "one.npy"
    np.save(path, np.zeros((32, 32, 3), np.uint8))
    for size in (None, 32):
        with pytest.raises(ValueError, match=r"one\.npy.*looks like one H x W x C image.*array\[None\]"):
            load_array(path, image_size=size)
    np.save(path, np.zeros((32, 32, 32), np.uint8))  # N x H x W grey: still read so
    assert load_array(path).images.shape == (32, 1, 32, 32)


def test_float_arrays_whose_range_is_ambiguous_are_refused(tmp_path):
    """Any negative value means [-1, 1]: a [0, 1] array that undershoots a little
    (a resize's ringing) was read as [-1, 1], black turning mid grey."""
    path = tmp_path / "x.npy"
    unit = np.random.default_rng(0).random((4, 8, 8, 3)).astype(np.float32)
    unit[0, 0, 0, 0] = -0.004
    np.save(path, unit)
    with pytest.raises(ValueError, match=r"ambiguous.*np\.clip"):
        load_array(path)
    np.save(path, np.clip(unit, 0, 1))
    assert load_array(path).images.float().mean().item() > 100  # read as [0, 1]
    np.save(path, unit * 0.8 - 0.6)  # [-1, 1] data in [-0.6, 0.2]: as before
    assert load_array(path).images.max().item() < 160


def _save_16_bit_grey_png(array: np.ndarray, path: Path, transparency: int) -> None:
    """Pillow 10 and later save a uint16 array's "I;16" image with a tRNS;
    older Pillow only through mode "I", which Pillow 13 no longer writes."""
    try:
        Image.fromarray(array).save(path, transparency=transparency)
    except OSError:
        Image.fromarray(array.astype(np.int32), "I").save(path, transparency=transparency)


def test_16_bit_grey_with_a_transparent_level_loads_over_black(tmp_path):
    """A 16-bit grey PNG's transparent level (tRNS) was lost with the 8-bit
    conversion, while 8-bit grey's was composited."""
    folder = tmp_path / "wide"
    folder.mkdir()
    wide = np.full((4, 4), 60000, np.uint16)
    wide[1:3, 1:3] = 30000
    _save_16_bit_grey_png(wide, folder / "a.png", transparency=60000)
    Image.fromarray(np.round(wide * (255 / 65535)).astype(np.uint8), "L").save(folder / "b.png", transparency=233)
    images = load_image_folder(folder, channels=1).images
    assert images[0, 0, 0, 0].item() == 0 and images[0, 0, 1, 1].item() == round(30000 * 255 / 65535)
    assert torch.equal(images[0], images[1])


def test_a_linked_folder_is_listed_under_the_first_name_in_order(tmp_path):
    """Which name a folder reached twice (itself and a link to it) lists its files
    under depended on the order the folders were created in."""
    import shutil

    orders = []
    for first in ("real", "link"):
        root = tmp_path / first / "data"
        root.mkdir(parents=True)
        if first == "link":
            (root / "a_link").symlink_to(root / "z_real", target_is_directory=True)
        _write_images(root / "z_real", [(8, 8)])
        if first == "real":
            (root / "a_link").symlink_to(root / "z_real", target_is_directory=True)
        from ddpm_fast.data import _image_files

        orders.append([p.relative_to(root).as_posix() for p in _image_files(root)])
        shutil.rmtree(tmp_path / first)
    assert orders[0] == orders[1] == ["a_link/img0.png"]


def test_a_large_image_folder_loads_under_a_progress_bar(tmp_path, monkeypatch):
    """Reading tens of thousands of images takes minutes, which passed with no
    word before the training bar; a bar from PROGRESS_MIN_FILES files on, where
    asked for (the command line asks on rank 0)."""
    import io

    import ddpm_fast.data

    _write_images(tmp_path, [(6, 6)] * 5)
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    load_dataset(tmp_path, progress=True)
    assert log.getvalue() == ""  # 5 files: below the bar's threshold
    monkeypatch.setattr(ddpm_fast.data, "PROGRESS_MIN_FILES", 5)
    load_dataset(tmp_path)
    assert log.getvalue() == ""  # not asked for
    data = load_dataset(tmp_path, progress=True)
    assert "loading images" in log.getvalue() and "5/5" in log.getvalue() and len(data) == 5
