"""``ddpm-fast train`` as a user meets it: repeatable from its seed, one-line
endings for runs that diverge, resuming past a half-written log line, and
data folders kept apart from the run (the rest of the CLI: test_cli.py, its errors: test_cli_errors.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast.cli import main
from train_helpers import toy_dataset

TINY = ["--model", "tiny", "--batch-size", "8", "--timesteps", "20", "--warmup", "2", "--no-flip",
        "--device", "cpu", "--sample-steps", "2"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "toy.npz"
    np.savez(path, images=toy_dataset(n=16).images.permute(0, 2, 3, 1).numpy())  # N x H x W x C uint8
    return path


def _train(data, out, *extra: str) -> int:
    return main(["train", "--data", str(data), "--out", str(out), *TINY, *extra])


def test_the_same_seed_gives_the_same_run(data_file, tmp_path):
    """The model's initial weights come from --seed too (they came from torch's
    unseeded generator), so two runs of one command write the same weights."""
    from safetensors.torch import load_file

    runs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for out, seed in zip(runs, ("0", "0", "1")):
        assert _train(data_file, out, "--steps", "2", "--seed", seed) == 0
    weights = [load_file(out / "checkpoint-00000002" / "model.safetensors") for out in runs]
    assert weights[0].keys() == weights[1].keys()
    assert all(np.array_equal(weights[0][k].numpy(), weights[1][k].numpy()) for k in weights[0])
    assert not all(np.array_equal(weights[0][k].numpy(), weights[2][k].numpy()) for k in weights[0])


def test_a_diverging_run_ends_in_one_line_naming_its_last_good_checkpoint(data_file, tmp_path, capsys):
    """lr 1e9: the first step is finite, every later one is not; after 10 in a
    row the run stops with exit status 1 (it was a traceback), and the message
    names the checkpoint of step 1, which exists."""
    out = tmp_path / "run"
    assert _train(data_file, out, "--steps", "30", "--lr", "1e9", "--warmup", "0", "--checkpoint-every", "1") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ddpm-fast train: error: 10 non-finite losses in a row at step 11; stopping.")
    assert f"The last good checkpoint, {out / 'checkpoint-00000001'}, is intact" in err
    assert (out / "checkpoint-00000001" / "model.safetensors").is_file()


def test_a_run_ending_on_non_finite_losses_is_not_reported_as_done(data_file, tmp_path, capsys):
    """Its last steps were skipped, so its final checkpoint was not written: it
    said "trained to step 4" with exit status 0, and left nothing to sample."""
    out = tmp_path / "run"
    assert _train(data_file, out, "--steps", "4", "--lr", "1e9", "--warmup", "0") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "ended on 3 non-finite losses in a row (the last at step 4)" in err
    assert f"No checkpoint was written to {out}" in err
    assert not (out / "samples.png").exists()


def test_a_half_written_log_line_does_not_block_resuming(data_file, tmp_path, recwarn):
    """A process killed while appending to log.jsonl leaves half a line; the
    resume dropped dead on it (a JSON error). It resumes, and the log is whole."""
    out = tmp_path / "run"
    assert _train(data_file, out, "--steps", "2", "--checkpoint-every", "2", "--log-every", "1") == 0
    with open(out / "log.jsonl", "a") as log:
        log.write('{"step": 3, "lo')
    assert _train(data_file, out, "--steps", "4", "--checkpoint-every", "2", "--log-every", "1") == 0
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_a_run_inside_its_image_folder_is_refused(tmp_path, capsys):
    """Its sample grids and loss curve would be read back as training images."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(8):
        Image.fromarray(np.full((8, 8), 30 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    for out in (folder, folder / "run", tmp_path / "other" / ".." / "images" / "run"):
        assert _train(folder, out, "--steps", "1") == 2
        assert "lies inside --data" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == [f"{i}.png" for i in range(8)]


def test_resuming_with_other_data_warns(data_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(data_file, out, "--steps", "1") == 0
    other = tmp_path / "other.npz"
    other.write_bytes(data_file.read_bytes())
    capsys.readouterr()
    assert _train(other, out, "--steps", "2") == 0
    err = capsys.readouterr().err
    assert "warning: resuming" in err and f"data: {str(data_file)!r} there, {str(other)!r} now" in err


def test_ranks_draw_their_own_dropout_masks(data_file, tmp_path, monkeypatch):
    """Under torchrun every rank ran torch.manual_seed(--seed): all drew the same
    dropout masks, so a global batch had only batch/ranks distinct ones. (The
    ranks are faked: the generator's state is read where the Trainer starts.)"""
    from ddpm_fast import distributed, train

    class Started(Exception):
        pass

    def trainer(*args, **kwargs):
        raise Started(torch.rand(4))

    monkeypatch.setattr(distributed, "setup", lambda device: torch.device("cpu"))
    monkeypatch.setattr(distributed, "run_on_rank0", lambda check: check())
    monkeypatch.setattr(train, "Trainer", trainer)
    draws = {}
    for rank, world in ((0, 1), (0, 2), (1, 2)):
        monkeypatch.setattr(distributed, "rank_and_world", lambda: (rank, world))
        with pytest.raises(Started) as started:
            _train(data_file, tmp_path / f"run{rank}{world}", "--steps", "2", "--seed", "5")
        draws[rank, world] = started.value.args[0]
    assert not torch.equal(draws[0, 2], draws[1, 2])
    assert not torch.equal(draws[0, 1], draws[0, 2]) and not torch.equal(draws[0, 1], draws[1, 2])


def test_a_resumed_command_ends_as_one_uninterrupted_run(data_file, tmp_path):
    """Through the command line and the real U-Net (fused GroupNorm+SiLU),
    with dropout and flips: the API's resume tests use a toy model."""
    from safetensors.torch import load_file

    common = ("--dropout", "0.2", "--flip", "--checkpoint-every", "2", "--log-every", "1")
    assert _train(data_file, tmp_path / "whole", "--steps", "4", *common) == 0
    assert _train(data_file, tmp_path / "split", "--steps", "2", *common) == 0
    first = (tmp_path / "split" / "checkpoint-00000002").stat().st_ino
    assert _train(data_file, tmp_path / "split", "--steps", "4", *common) == 0
    # Resumed, not restarted: a run from step 0 would have written checkpoint 2 anew.
    assert (tmp_path / "split" / "checkpoint-00000002").stat().st_ino == first
    logs = [[json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
            for run in ("whole", "split")]
    assert len(logs[0]) == 4 and logs[0] == logs[1]
    for name in ("model.safetensors", "ema.safetensors"):
        whole, split = (load_file(tmp_path / run / "checkpoint-00000004" / name) for run in ("whole", "split"))
        assert whole.keys() == split.keys() and all(torch.equal(whole[k], split[k]) for k in whole), name


@pytest.mark.parametrize("data, extra, flip", [("digits", (), False), ("digits", ("--flip",), True),
                                               ("file", (), True), ("file", ("--no-flip",), False),
                                               ("digits.npz", (), True)])
def test_flips_default_off_for_digits_only(data_file, tmp_path, data, extra, flip):
    """A mirrored digit is no digit (the demo trains without flips): --data digits
    trained with flips unless told; other data keeps them on by default, also a
    file that happens to be called digits."""
    common = [a for a in TINY if a != "--no-flip"]
    spec = {"digits": "digits", "file": str(data_file)}.get(data)
    if spec is None:
        spec = str(tmp_path / data)
        (tmp_path / data).write_bytes(data_file.read_bytes())
    assert main(["train", "--data", spec, "--out", str(tmp_path / "run"), *common, "--steps", "1",
                 "--image-size", "8", *extra]) == 0
    config = json.loads((tmp_path / "run" / "checkpoint-00000001" / "config.json").read_text())
    assert config["train"]["flip"] is flip


def test_a_digits_run_made_with_flips_resumes_without_the_option(tmp_path):
    """Runs of --data digits made when flips defaulted on there: the same command
    (no --flip) resumes them with their own setting, not a configuration error."""
    common = [a for a in TINY if a != "--no-flip"] + ["--data", "digits", "--out", str(tmp_path / "run")]
    assert main(["train", *common, "--steps", "1", "--flip"]) == 0
    assert main(["train", *common, "--steps", "2"]) == 0
    config = json.loads((tmp_path / "run" / "checkpoint-00000002" / "config.json").read_text())
    assert config["train"]["flip"] is True


def test_a_digits_run_with_flips_and_a_damaged_newest_checkpoint_resumes_from_the_older_one(tmp_path, capsys):
    """The flip default came from the newest checkpoint's config.json alone: a
    damaged one made it the digits' off, and the fallback to the older
    checkpoint (flips on) was then refused as a run of other settings."""
    common = [a for a in TINY if a != "--no-flip"] + ["--data", "digits", "--out", str(tmp_path / "run"),
                                                      "--checkpoint-every", "1"]
    assert main(["train", *common, "--steps", "2", "--flip"]) == 0
    (tmp_path / "run" / "checkpoint-00000002" / "config.json").write_text("{damaged")
    capsys.readouterr()
    assert main(["train", *common, "--steps", "3"]) == 0, capsys.readouterr().err
    assert "resumed from the older checkpoint-00000001 instead" in capsys.readouterr().err
    config = json.loads((tmp_path / "run" / "checkpoint-00000003" / "config.json").read_text())
    assert config["train"]["flip"] is True


@pytest.mark.parametrize("resume, flip", [(True, False), (False, True)])
def test_only_a_resumed_run_keeps_its_own_flip_setting(data_file, tmp_path, resume, flip):
    """--no-resume replaces the run in --out: its checkpoint's --no-flip no longer applies."""
    import argparse

    from ddpm_fast.checkpoint import write_checkpoint
    from ddpm_fast.cli import _default_flip

    config = json.dumps({"train": {"flip": False}})
    write_checkpoint(tmp_path, 1, {"config.json": lambda p: p.write_text(config)})
    args = argparse.Namespace(data=str(data_file), out=str(tmp_path), resume=resume)
    assert _default_flip(args) is flip


def test_train_in_a_folder_another_run_holds_is_one_line(data_file, tmp_path, capsys):
    from ddpm_fast.checkpoint import lock_run_folder

    (tmp_path / "run").mkdir()
    release = lock_run_folder(tmp_path / "run")  # as another process's run would
    try:
        assert _train(data_file, tmp_path / "run", "--steps", "1") == 2
    finally:
        release()
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpm-fast train: error: another process (pid ") and "\n" not in err


@pytest.mark.parametrize("where", ["write", "serialize"])
def test_a_full_disk_while_writing_a_checkpoint_is_one_line(data_file, tmp_path, capsys, monkeypatch, where):
    """The weights' file failing as it is written (a full disk: an OSError) or
    as safetensors serializes them (its SafetensorError is a plain Exception,
    no OSError; safetensors' save_file, used before, reported a full disk so):
    `ddpm-fast train` ended in its traceback."""
    import pathlib

    import safetensors.torch

    class SafetensorError(Exception):  # safetensors' own is made in Rust; its kind matters, not its module
        pass

    if where == "write":
        real = pathlib.Path.write_bytes

        def write_bytes(self, data):
            if self.name.endswith(".safetensors"):
                raise OSError(28, "No space left on device")
            return real(self, data)

        monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)
        reason = "[Errno 28] No space left on device"
    else:
        def save(*args, **kwargs):
            raise SafetensorError("Error while serializing: something went wrong")

        monkeypatch.setattr(safetensors.torch, "save", save)
        reason = "Error while serializing: something went wrong"
    assert _train(data_file, tmp_path / "run", "--steps", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert err.startswith("ddpm-fast train: error: cannot write checkpoint "), err
    assert f"(model.safetensors): {reason}" in err, err
