"""ddpm_fast/checkpoint.py's crash safety at the file level: data synced to
disk before a rename publishes it, the ``latest`` pointer never trusted past
what exists, the ``--out`` writability probe leaves nothing behind."""

from __future__ import annotations

import os

import pytest

from ddpm_fast import checkpoint
from ddpm_fast.checkpoint import atomic_write, latest_checkpoint, write_checkpoint
from ddpm_fast.cli_options import check_output_folder


@pytest.fixture
def events(monkeypatch):
    """("fsync", inode) and ("replace", inode of the source) in the order they happen."""
    seen = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        seen.append(("fsync", os.fstat(fd).st_ino))
        return real_fsync(fd)

    def replace(src, dst):
        seen.append(("replace", os.stat(src).st_ino))
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    return seen


def test_atomic_write_syncs_the_file_before_renaming_it(tmp_path, events):
    # Without the fsync a power cut after the rename can leave `latest` (or the loss plot) empty.
    target = tmp_path / "latest"
    atomic_write(target, lambda p: p.write_text("checkpoint-00000001\n"))
    inode = target.stat().st_ino
    assert ("fsync", inode) in events and events.index(("fsync", inode)) < events.index(("replace", inode))
    assert events[-1] == ("fsync", tmp_path.stat().st_ino)  # then the folder, which holds the new name


# Why: the temporary name (".{name}.tmp-{pid}") is 11+ bytes longer than the
# target's: a name that fits the 255-byte limit failed with "File name too
# long", naming the hidden temporary file, not the path asked for.
@pytest.mark.parametrize("name", ["g" * 250 + ".png", "ü" * 125 + ".png"])
def test_atomic_write_takes_any_name_the_file_system_takes(tmp_path, name):
    atomic_write(tmp_path / name, lambda tmp: tmp.write_bytes(b"picture"))
    assert [p.name for p in tmp_path.iterdir()] == [name] and (tmp_path / name).read_bytes() == b"picture"


def test_write_checkpoint_syncs_every_file_and_the_folder_before_publishing(tmp_path, events):
    # A checkpoint renamed into place before its files reach the disk could be published half-written.
    final = write_checkpoint(tmp_path, 1, {"a.bin": lambda p: p.write_bytes(b"a"), "b.bin": lambda p: p.write_bytes(b"b")})
    publish = events.index(("replace", final.stat().st_ino))
    synced = {inode for kind, inode in events[:publish] if kind == "fsync"}
    assert {(final / name).stat().st_ino for name in ("a.bin", "b.bin")} | {final.stat().st_ino} <= synced


def test_a_latest_pointer_to_a_missing_checkpoint_falls_back_to_the_newest_there(tmp_path):
    # `latest` may name a folder since set aside (damaged-*) or deleted: only an existing checkpoint counts.
    for step in (1, 2):
        write_checkpoint(tmp_path, step, {"a.bin": lambda p: p.write_bytes(b"x")})
    (tmp_path / "latest").write_text("checkpoint-00000003\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-00000002"


@pytest.mark.parametrize("out", ["run", "new/deeper/run"])
def test_the_writability_probe_leaves_nothing_behind(tmp_path, out):
    # The probe file is removed again: a run folder (or its parent) keeps no stray .ddpm-fast-probe-* file.
    (tmp_path / "run").mkdir()
    (tmp_path / "new").mkdir()
    check_output_folder(tmp_path / out)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["new", "run"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoint_files_follow_the_umask(tmp_path, umask):
    """safetensors' save_file created the weights readable by their owner
    alone, whatever the umask, while config.json and trainer.pt followed it:
    on a shared machine others could read a run's config but not sample it."""
    import torch

    from ddpm_fast import NoiseSchedule
    from ddpm_fast.data import ImageDataset
    from ddpm_fast.models import UNet
    from ddpm_fast.train import TrainConfig, Trainer

    data = ImageDataset(torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8))
    config = TrainConfig(steps=1, batch_size=4, warmup=0, checkpoint_every=1)
    old = os.umask(umask)
    try:
        Trainer(UNet.tiny(), data, NoiseSchedule("linear", timesteps=20), config, tmp_path / "run", device="cpu",
                progress=False).train(final_samples=False)
    finally:
        os.umask(old)
    folder = latest_checkpoint(tmp_path / "run")
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert set(modes) >= {"model.safetensors", "ema.safetensors", "config.json", "trainer.pt"}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask), modes
