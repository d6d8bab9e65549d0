"""Gaps a mutation round over data.py, images.py and checkpoint.py found: each
test here fails on one small change to the code that the other tests let pass."""

from __future__ import annotations

import os
import tarfile
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ddpm_fast import data as data_module
from ddpm_fast.data import ImageDataset, load_array, load_cifar10, load_image_folder


def test_image_dataset_refuses_4_channels_and_tall_images():
    """Only 1 or 3 channels, and square images: a 4-channel (RGBA) tensor or
    one taller than wide is refused, as one wider than tall is."""
    with pytest.raises(ValueError, match="1 or 3 channels, got 4"):
        ImageDataset(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="must be square, got 8x6"):
        ImageDataset(torch.zeros(2, 3, 8, 6, dtype=torch.uint8))
    with pytest.raises(ValueError, match="must be square, got 6x8"):
        ImageDataset(torch.zeros(2, 3, 6, 8, dtype=torch.uint8))


def test_resize_rounds_the_long_side_and_crops_its_centre(tmp_path):
    """A 12 x 19 picture to 8: the long side becomes round(19 * 8 / 12) = 13
    (not 12), and the crop starts (13 - 8) // 2 = 2 px in."""
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (12, 19, 3), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "p.png")
    got = load_image_folder(tmp_path, image_size=8).images[0]
    x = torch.from_numpy(picture).permute(2, 0, 1)[None].float()
    big = F.interpolate(x, size=(8, 13), mode="bicubic", antialias=True, align_corners=False)
    expected = big[0, :, :, 2:10].round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(got, expected)


def test_a_link_loop_is_not_walked_into(tmp_path, monkeypatch):
    """A folder linked back up is entered once and left at once: not walked
    ever deeper (with two such links, exponentially) until the OS says ELOOP."""
    folder = tmp_path / "data"
    folder.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(folder / "a.png")
    (folder / "up").symlink_to(folder, target_is_directory=True)
    walked, walk = [], os.walk

    def recording_walk(*args, **kwargs):
        for root, dirs, names in walk(*args, **kwargs):
            walked.append(root)
            yield root, dirs, names

    monkeypatch.setattr(data_module.os, "walk", recording_walk)
    assert len(load_image_folder(folder)) == 1
    assert len(walked) == 2  # data, data/up (the same folder: not entered further)


def test_a_folder_named_like_an_image_is_skipped_and_a_dangling_link_refused(tmp_path):
    """(A dangling link was skipped too, an image short without a word: now an error.)"""
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "album.png").mkdir()
    assert len(load_image_folder(tmp_path)) == 1
    (tmp_path / "gone.png").symlink_to(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match="gone.png is a broken symbolic link$"):
        load_image_folder(tmp_path)


def test_a_folder_entry_named_like_a_batch_in_an_archive_is_not_a_batch(tmp_path):
    """A tar member that is no file (a folder ``test_batch/``) is passed over: the
    batch is said to be missing, not an AttributeError from extractfile's None."""
    path = tmp_path / "cifar.tar"
    with tarfile.open(path, "w") as archive:
        member = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        member.type = tarfile.DIRTYPE
        archive.addfile(member)
    with pytest.raises(FileNotFoundError, match="test_batch not found in archive"):
        load_cifar10(path, train=False)


@pytest.mark.parametrize("low", [-0.45, -0.3])
def test_float_minimum_just_above_minus_half_is_ambiguous(tmp_path, low):
    """The ambiguous window is (-0.5, 0) all through, not only near 0."""
    array = np.random.default_rng(0).random((2, 4, 4, 3)).astype(np.float32)
    array[0, 0, 0, 0] = low
    np.save(tmp_path / "x.npy", array)
    with pytest.raises(ValueError, match="ambiguous"):
        load_array(tmp_path / "x.npy")


# ---------------------------------------------------------------- images.py


def test_to_uint8_refuses_4_channels_and_grids_refuse_no_images(tmp_path):
    from ddpm_fast.images import make_grid, save_npz, to_uint8

    with pytest.raises(ValueError, match="C 1 or 3"):
        to_uint8(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="non-empty"):
        make_grid(np.zeros((0, 4, 4, 1), np.uint8))
    with pytest.raises(ValueError, match="non-empty"):
        save_npz(np.zeros((0, 4, 4, 1), np.uint8), tmp_path / "s.npz")
    assert not (tmp_path / "s.npz").exists()


def _png(path):
    with Image.open(path) as image:
        return np.asarray(image)


def test_plot_curve_leaves_out_non_finite_values_with_their_steps(tmp_path):
    """Plotting [nan, 1, inf, 2, 3] at steps 0..4 draws what [1, 2, 3] at steps 1, 3, 4 draws."""
    from ddpm_fast.images import plot_curve

    plot_curve([float("nan"), 1.0, float("inf"), 2.0, 3.0], tmp_path / "a.png", steps=[0, 1, 2, 3, 4], smooth=1)
    plot_curve([1.0, 2.0, 3.0], tmp_path / "b.png", steps=[1, 3, 4], smooth=1)
    assert np.array_equal(_png(tmp_path / "a.png"), _png(tmp_path / "b.png"))


def test_plot_curve_of_a_zero_value_falls_back_to_a_linear_axis(tmp_path):
    from ddpm_fast.images import plot_curve

    with np.errstate(all="raise"):  # no log10(0) = -inf, no NaN coordinates
        plot_curve([0.0, 1.0, 2.0], tmp_path / "a.png", smooth=1)
    plot_curve([0.0, 1.0, 2.0], tmp_path / "b.png", smooth=1, log_y=False)
    assert np.array_equal(_png(tmp_path / "a.png"), _png(tmp_path / "b.png"))


# ---------------------------------------------------------------- checkpoint.py


def _write(run, step, keep=2):
    from ddpm_fast.checkpoint import write_checkpoint

    return write_checkpoint(run, step, {"a.bin": lambda p: p.write_bytes(str(step).encode())}, keep=keep)


def test_write_checkpoint_keeps_the_newest_keep_and_points_latest_at_the_last(tmp_path):
    from ddpm_fast.checkpoint import checkpoints, latest_checkpoint

    for step in (1, 2, 3, 4):
        _write(tmp_path, step)
    assert [step for step, _ in checkpoints(tmp_path)] == [3, 4]
    assert (tmp_path / "latest").read_text() == "checkpoint-00000004\n"
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000004"


def test_writing_a_step_again_replaces_it(tmp_path):
    _write(tmp_path, 1)
    _write(tmp_path, 2)
    path = tmp_path / "checkpoint-00000002"
    _write(tmp_path, 2)  # a resumed run writing the same step: no OSError (folder not empty)
    assert (path / "a.bin").read_bytes() == b"2" and not list(tmp_path.glob(".tmp-*"))


def test_checkpoints_are_ordered_by_step_and_only_folders_count(tmp_path):
    from ddpm_fast.checkpoint import checkpoints, latest_checkpoint

    assert checkpoints(tmp_path / "missing") == [] and latest_checkpoint(tmp_path / "missing") is None
    for step in (99_999_999, 100_000_000):  # 9 digits sorts before 8 by name
        (tmp_path / f"checkpoint-{step:08d}").mkdir()
    (tmp_path / "checkpoint-100000001").write_text("a file, not a checkpoint")
    assert [step for step, _ in checkpoints(tmp_path)] == [99_999_999, 100_000_000]
    assert latest_checkpoint(tmp_path).name == "checkpoint-100000000"


@pytest.mark.parametrize("pointer", ["samples", "..", b"\xff\xfe"])
def test_a_latest_pointer_to_no_checkpoint_is_passed_over(tmp_path, pointer):
    from ddpm_fast.checkpoint import latest_checkpoint

    (tmp_path / "samples").mkdir()
    (tmp_path / "checkpoint-00000003").mkdir()
    (tmp_path / "checkpoint-00000001").mkdir()
    latest = tmp_path / "latest"
    latest.write_bytes(pointer) if isinstance(pointer, bytes) else latest.write_text(pointer + "\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-00000003"


def test_leftovers_of_killed_writers_are_cleaned_and_a_failed_write_leaves_none(tmp_path):
    from ddpm_fast.checkpoint import CheckpointError, atomic_write, write_checkpoint

    (tmp_path / ".tmp-checkpoint-5-123").mkdir()
    (tmp_path / ".latest.tmp-123").write_text("half")
    _write(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000001", "latest"]

    def broken(path):
        path.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(CheckpointError, match="disk full"):
        write_checkpoint(tmp_path, 2, {"a.bin": broken})
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(tmp_path / "plot.png", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000001", "latest"]


def test_the_lock_refuses_a_second_holder_and_names_the_current_pid(tmp_path):
    from ddpm_fast.checkpoint import RunInUseError, lock_run_folder

    (tmp_path / ".lock").write_text("999999\n")  # a dead run's pid
    release = lock_run_folder(tmp_path)
    outcome = {}

    def second_holder():  # flock: another open file, refused at once, not waited for
        try:
            outcome["release"] = lock_run_folder(tmp_path)
        except RunInUseError as error:
            outcome["error"] = str(error)

    try:
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
        thread = threading.Thread(target=second_holder, daemon=True)
        thread.start()
        thread.join(10)
    finally:
        release()
    thread.join(10)
    assert f"(pid {os.getpid()})" in outcome.get("error", "")
    lock_run_folder(tmp_path)()


# Why: the lock was opened through a link: a run folder (downloaded, or copied
# from elsewhere) whose .lock linked out had the file it named cut to the pid.
def test_the_lock_is_never_taken_through_a_link_or_in_anything_but_a_file(tmp_path):
    from ddpm_fast.checkpoint import CheckpointError, lock_run_folder

    victim = tmp_path / "victim.txt"
    victim.write_text("a user's data\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(victim)
    with pytest.raises(CheckpointError, match=r"run/.lock is a symbolic link; the run's lock must be a plain file"):
        lock_run_folder(run)
    assert victim.read_text() == "a user's data\n"
    (run / ".lock").unlink()
    (run / ".lock").symlink_to(tmp_path / "created-by-the-lock")  # a dangling one made its target
    with pytest.raises(CheckpointError, match="is a symbolic link"):
        lock_run_folder(run)
    assert not (tmp_path / "created-by-the-lock").exists()
    (run / ".lock").unlink()
    os.mkfifo(run / ".lock")
    with pytest.raises(CheckpointError, match=r"run/.lock is not a plain file"):
        lock_run_folder(run)
