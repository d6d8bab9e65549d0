"""The CIFAR-10 loader (python batches in a folder, its parent or a .tar.gz)
on small synthetic batches, and each of its errors."""

from __future__ import annotations

import pickle
import tarfile

import numpy as np
import pytest
import torch

from ddpm_fast.data import load_cifar10, load_dataset


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


def _write_batch(path, batch, protocol=2, numpy_module=None):
    blob = pickle.dumps(batch, protocol=protocol)
    if numpy_module:  # as written by older numpy (and by Python 2, as the real files are)
        blob = blob.replace(b"numpy._core.multiarray", numpy_module)
    path.write_bytes(blob)


@pytest.mark.parametrize("protocol, numpy_module", [(2, b"numpy.core.multiarray"), (4, None), (5, None)])
def test_cifar10_pickle_flavours(tmp_path, protocol, numpy_module):
    batch = _cifar_batch(2, 7)
    batch[b"batch_label"], batch[b"filenames"] = b"testing batch 1 of 1", [b"a.png", b"b.png"]
    _write_batch(tmp_path / "test_batch", batch, protocol, numpy_module)
    data = load_cifar10(tmp_path, train=False)
    assert data.name == "cifar10-test" and data.labels.tolist() == batch[b"labels"]
    assert np.array_equal(data.images.reshape(2, -1).numpy(), batch[b"data"])


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_cifar10_refuses_code_and_checks_shapes(tmp_path, capsys):
    _write_batch(tmp_path / "test_batch", {b"data": np.zeros((1, 3072), np.uint8), b"labels": [_Exploit()]})
    with pytest.raises(ValueError, match="test_batch .* is corrupt: UnpicklingError: refusing to load .*print"):
        load_cifar10(tmp_path, train=False)
    assert "never run" not in capsys.readouterr().out
    _write_batch(tmp_path / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]})
    with pytest.raises(ValueError, match="2 images but labels"):
        load_cifar10(tmp_path, train=False)
    _write_batch(tmp_path / "test_batch", {b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]})
    with pytest.raises(ValueError, match=r"expected uint8 N x 3072"):
        load_cifar10(tmp_path, train=False)
    _write_batch(tmp_path / "test_batch", {b"pixels": np.zeros((2, 3072), np.uint8)})
    with pytest.raises(ValueError, match="corrupt: KeyError"):
        load_cifar10(tmp_path, train=False)


# Why: a few-KB file could ask for gigabytes: a sparse archive member of any
# size was read whole (a MemoryError traceback), and a batch whose data was a
# list repeating one row 300,000 times (11 KB, memoized) took 4 GiB.
def test_cifar10_refuses_batches_larger_than_any_and_data_that_is_no_array(cifar_folder, tmp_path, monkeypatch):
    from ddpm_fast import cifar10

    monkeypatch.setattr(cifar10, "_MAX_BATCH_BYTES", 2000)  # a real batch's 31 MB scaled down: the folder's are ~9.5 KB
    with pytest.raises(ValueError, match=r"batch data_batch_1 in folder .* is [0-9,]+ bytes, more than any batch"):
        load_cifar10(cifar_folder)
    with tarfile.open(tmp_path / "c.tar.gz", "w:gz") as archive:
        archive.add(cifar_folder, arcname="cifar-10-batches-py")
    with pytest.raises(ValueError, match=r"batch data_batch_1 in archive .*c.tar.gz is [0-9,]+ bytes, more than any"):
        load_cifar10(tmp_path / "c.tar.gz")
    monkeypatch.undo()
    row = np.zeros(3072, np.uint8)
    (tmp_path / "listy").mkdir()
    _write_batch(tmp_path / "listy" / "test_batch", {b"data": [row] * 4, b"labels": [0] * 4})
    with pytest.raises(ValueError, match="test_batch .* is corrupt: TypeError: data is a list, not a numpy array"):
        load_cifar10(tmp_path / "listy", train=False)


def test_cifar10_archive_errors_and_any_archive_name(cifar_folder, tmp_path):
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ValueError, match="cannot read CIFAR-10 archive"):
        load_cifar10(bad)
    partial = tmp_path / "data.tgz"
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(cifar_folder / "test_batch", arcname="cifar-10-batches-py/test_batch")
    assert load_cifar10(partial, train=False).images.shape == (3, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match=r"data_batch_1, .*data_batch_5 not found in archive"):
        load_dataset(partial)  # any .tgz is taken for CIFAR-10; the training batches are missing
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="test_batch not found in folder"):
        load_cifar10(empty, train=False)


def test_a_file_that_is_no_archive_is_a_one_line_error(tmp_path):
    """tarfile's own message lists each compression it tried, one per line."""
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(b"not an archive at all")
    with pytest.raises(ValueError, match=r"cannot read CIFAR-10 archive .*: not a tar archive") as info:
        load_dataset(bad)
    assert "\n" not in str(info.value)


def test_a_damaged_cifar_archive_is_an_error_never_other_pixels(cifar_folder, tmp_path):
    """One flipped bit anywhere in a .tar.gz: the load either fails with a clear
    error or gives the intact archive's images. tarfile stops at the tar's end
    (or quietly at a damaged header) before gzip's checksum, so such flips gave
    other pixels without a word, a bare zlib.error, or 'batches not found'."""
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(cifar_folder, arcname="cifar-10-batches-py")
    intact, raw = load_cifar10(archive).images, archive.read_bytes()
    damaged, outcomes = tmp_path / "damaged.tar.gz", {"error": 0, "intact": 0}
    for position in range(10, len(raw), max(1, len(raw) // 150)):
        flipped = bytearray(raw)
        flipped[position] ^= 1 << (position % 8)
        damaged.write_bytes(bytes(flipped))
        try:
            images = load_cifar10(damaged).images
        except ValueError as error:
            assert "CIFAR-10" in str(error), error
            outcomes["error"] += 1
            continue
        assert torch.equal(images, intact), f"a flip at byte {position} loaded other pixels"
        outcomes["intact"] += 1
    assert outcomes["error"] > 100, outcomes
