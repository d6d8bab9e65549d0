"""``ddpm-fast`` behaviour that mutants of cli.py / cli_options.py changed
without any other test failing: option bounds, presets, wiring of options to
the work, what is printed and the exit status. Fast: the expensive parts
(training, sampling, Inception) are replaced where the wiring is what is tested."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from ddpm_fast.checkpoint import CheckpointError
from ddpm_fast.cli import RunFailed, build_parser, main
from ddpm_fast.cli_options import UsageError
from ddpm_fast.images import save_grid, save_npz

TRAIN = ["--model", "tiny", "--batch-size", "8", "--timesteps", "20", "--warmup", "1", "--no-flip", "--device", "cpu"]


@pytest.fixture
def built(monkeypatch):
    """The Trainer that `train` builds, not a run: [(model, resume)] per command."""
    import ddpm_fast.train

    seen = []

    def train(self, **kwargs):
        seen.append((self.model, kwargs.get("resume")))
        return {"steps": 0, "out_dir": str(self.out_dir)}

    monkeypatch.setattr(ddpm_fast.train.Trainer, "train", train)
    return seen


# ------------------------------------------------------------------ train


def test_dropout_zero_is_accepted_and_a_negative_one_refused(toy_npz, tmp_path, built, capsys):
    """[0, 1): 0 (no dropout) is a value, -0.1 is the option's own error, not the preset's."""
    assert main(["train", "--data", str(toy_npz), "--out", str(tmp_path / "a"), *TRAIN, "--dropout", "0"]) == 0
    assert len(built) == 1
    capsys.readouterr()
    assert main(["train", "--data", str(toy_npz), "--out", str(tmp_path / "b"), *TRAIN, "--dropout", "-0.1"]) == 2
    assert capsys.readouterr().err.strip() == "ddpm-fast train: error: --dropout must lie in [0, 1), got -0.1"
    assert len(built) == 1


def test_cifar10_preset_refuses_three_channel_images_of_another_size(toy_npz, tmp_path, built, capsys):
    assert main(["train", "--data", str(toy_npz), "--out", str(tmp_path / "r"), *TRAIN, "--model", "cifar10",
                 "--channels", "3", "--image-size", "16"]) == 2
    assert "--model cifar10 takes 3x32x32 images; the data has 3x16x16" in capsys.readouterr().err
    assert built == []


def test_model_tiny_builds_the_tiny_preset(toy_npz, tmp_path, built):
    from ddpm_fast.models import UNet

    assert main(["train", "--data", str(toy_npz), "--out", str(tmp_path / "r"), *TRAIN]) == 0
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(built[0][0]) == count(UNet.tiny(image_size=8, in_channels=1))
    assert count(built[0][0]) != count(UNet.small(image_size=8, in_channels=1))


def test_no_resume_reaches_the_trainer(toy_npz, tmp_path, built):
    for flags in ([], ["--no-resume"]):
        assert main(["train", "--data", str(toy_npz), "--out", str(tmp_path / "r"), *TRAIN, *flags]) == 0
    assert [resume for _, resume in built] == [True, False]


def test_ctrl_c_before_the_first_checkpoint_says_there_is_nothing_to_resume(toy_npz, tmp_path, monkeypatch, capsys):
    import ddpm_fast.train

    def train(self, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ddpm_fast.train.Trainer, "train", train)
    out = tmp_path / "run"
    assert main(["train", "--data", str(toy_npz), "--out", str(out), *TRAIN]) == 130
    assert capsys.readouterr().err.strip() == (
        f"ddpm-fast train: interrupted at step 0, before the first checkpoint: nothing to resume in {out}")


def test_ddpm_fast_debug_raises_a_failed_run_and_reads_the_value_as_setup_py(toy_npz, tmp_path, monkeypatch):
    """RunFailed (non-finite losses) is a traceback under DDPM_FAST_DEBUG too; "1 " is on, as setup.py strips it."""
    import ddpm_fast.train

    def train(self, **kwargs):
        raise ddpm_fast.train.NonFiniteLossError("10 non-finite losses in a row")

    monkeypatch.setattr(ddpm_fast.train.Trainer, "train", train)
    monkeypatch.setenv("DDPM_FAST_DEBUG", "1")
    with pytest.raises(RunFailed, match="non-finite"):
        main(["train", "--data", str(toy_npz), "--out", str(tmp_path / "r"), *TRAIN])
    monkeypatch.setenv("DDPM_FAST_DEBUG", " 1 ")
    with pytest.raises(CheckpointError, match="does not exist"):
        main(["sample", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "s")])


def test_channels_and_seed_bounds_parse():
    parser = build_parser()
    for command in (["train", "--data", "d", "--out", "o"], ["bpd", "--checkpoint", "c", "--data", "d"]):
        assert parser.parse_args([*command, "--channels", "3"]).channels == 3
    # sample's noise streams are uint64: its seeds go to 2^64 - 1 (train's and demo's to 2^63 - 1)
    assert parser.parse_args(["sample", "--checkpoint", "c", "--out", "o", "--seed", str(2**64 - 1)]).seed == 2**64 - 1
    assert parser.parse_args(["demo", "--out", "o", "--seed", str(2**63 - 1)]).seed == 2**63 - 1


# ------------------------------------------------------------------ sample


def test_sample_dtype_reaches_the_model_and_the_sampler(tiny_run, tmp_path, monkeypatch):
    from ddpm_fast import distributed

    seen = []
    monkeypatch.setattr(distributed, "sample_sharded", lambda sampler, *a, **k: seen.append(
        ({p.dtype for p in sampler.model.parameters()}, sampler.dtype)))
    for dtype in ("bf16", "fp32"):
        assert main(["sample", "--checkpoint", str(tiny_run), "--out", str(tmp_path / "s"), "-n", "2",
                     "--dtype", dtype, "--device", "cpu"]) == 0
    assert seen == [({torch.bfloat16}, torch.bfloat16), ({torch.float32}, torch.float32)]


def test_a_pipeline_folder_with_eta_or_no_clip(tmp_path, monkeypatch, capsys):
    """--no-clip wins over the pipeline's clip_sample (on by default); with --eta
    the variance is eta's, so only the clip is said to follow the pipeline."""
    pytest.importorskip("diffusers")
    from conftest import save_tiny_diffusers_pipeline
    from ddpm_fast import distributed

    save_tiny_diffusers_pipeline(tmp_path / "pipe", timesteps=20)
    seen = []
    monkeypatch.setattr(distributed, "sample_sharded", lambda sampler, *a, **k: seen.append(sampler.clip_denoised))
    base = ["sample", "--checkpoint", str(tmp_path / "pipe"), "--out", str(tmp_path / "s"), "-n", "2", "--device", "cpu"]
    config = tmp_path / "pipe" / "scheduler" / "scheduler_config.json"
    assert main([*base, "--no-clip"]) == 0
    assert seen == [False]
    assert f"following {config}: variance fixed_small (--variance/--clip override)" in capsys.readouterr().err
    assert main([*base, "--eta", "0"]) == 0
    assert f"following {config}: clip on (--variance/--clip override)" in capsys.readouterr().err


def test_out_of_memory_message_is_cut_to_200_characters(tiny_run, tmp_path, monkeypatch, capsys):
    from ddpm_fast import distributed

    def sample_sharded(*args, **kwargs):
        raise torch.OutOfMemoryError("x" * 5000)

    monkeypatch.setattr(distributed, "sample_sharded", sample_sharded)
    assert main(["sample", "--checkpoint", str(tiny_run), "--out", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err.strip() == f"ddpm-fast sample: error: out of memory ({'x' * 200}): lower --batch-size"


# ------------------------------------------------------------------ bpd


@pytest.fixture
def evaluated(monkeypatch):
    """What `bpd` hands evaluate_bpd: the model's conv weight format and its keyword arguments."""
    from ddpm_fast import evaluate

    seen = []

    def evaluate_bpd(model, dataset, schedule, **kwargs):
        weights = [p for p in model.parameters() if p.dim() == 4]
        nhwc = all(p.is_contiguous(memory_format=torch.channels_last) for p in weights) and any(
            not p.is_contiguous() for p in weights)
        seen.append(dict(nhwc=nhwc, channels=dataset.channels, **kwargs))
        return {"summary": "bits/dim 1.2345", "total": 1.2345}

    monkeypatch.setattr(evaluate, "evaluate_bpd", evaluate_bpd)
    return seen


def test_bpd_options_reach_the_evaluation_and_its_summary_is_printed(tiny_run, toy_npz, evaluated, capsys):
    base = ["bpd", "--checkpoint", str(tiny_run), "--data", str(toy_npz), "--device", "cpu"]
    assert main(base) == 0
    assert capsys.readouterr().out == "bits/dim 1.2345\n"
    assert main([*base, "--no-channels-last", "--json"]) == 0
    assert capsys.readouterr().out == json.dumps({"summary": "bits/dim 1.2345", "total": 1.2345}, indent=2) + "\n"
    assert [(s["nhwc"], s["sharded"]) for s in evaluated] == [(True, True), (False, True)]


@pytest.fixture
def dataset_options(monkeypatch):
    """The keyword arguments a command hands load_dataset, which then stops it (exit 2)."""
    import ddpm_fast.data

    seen = {}

    def load_dataset(spec, **kwargs):
        seen.update(kwargs)
        raise UsageError("recorded")

    monkeypatch.setattr(ddpm_fast.data, "load_dataset", load_dataset)
    return seen


def test_bpd_channels_reach_the_dataset(tiny_run, toy_npz, dataset_options):
    assert main(["bpd", "--checkpoint", str(tiny_run), "--data", str(toy_npz), "--channels", "3",
                 "--image-size", "16", "--device", "cpu"]) == 2
    assert dataset_options["channels"] == 3 and dataset_options["image_size"] == 16


# ------------------------------------------------------------------ fid


@pytest.fixture
def fake_inception(monkeypatch):
    """fid's work replaced: [device of load_inception, number of images of each activation_statistics]."""
    import ddpm_fast.fid

    seen = []

    def activation_statistics(x, model, **kwargs):
        seen.append(len(x))
        return np.zeros(4), np.eye(4)

    monkeypatch.setattr(ddpm_fast.fid, "load_inception", lambda path, device: seen.append(device))
    monkeypatch.setattr(ddpm_fast.fid, "activation_statistics", activation_statistics)
    return seen


def test_fid_n_may_equal_the_smaller_set(tmp_path, fake_inception, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "s.npz", images=rng.integers(0, 256, (5, 8, 8, 1), dtype=np.uint8))
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8))
    assert main(["fid", "--samples", str(tmp_path / "s.npz"), "--data", str(tmp_path / "d.npz"), "-n", "5",
                 "--device", "cpu"]) == 0, capsys.readouterr().err
    assert fake_inception == [torch.device("cpu"), 5, 5]
    assert capsys.readouterr().out.startswith("FID 0.0000 (5 samples of ")


def test_fid_reads_samples_saved_unnamed(tmp_path, fake_inception, capsys):
    """np.savez(file, images), as guided-diffusion saves samples: the command
    asked for the key 'images' itself, past load_array's arr_0."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "s.npz", rng.integers(0, 256, (5, 8, 8, 1), dtype=np.uint8), np.arange(5))
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8))
    assert main(["fid", "--samples", str(tmp_path / "s.npz"), "--data", str(tmp_path / "d.npz"),
                 "--device", "cpu"]) == 0, capsys.readouterr().err
    assert fake_inception == [torch.device("cpu"), 5, 6]


def test_fid_reads_samples_from_a_folder_of_images(tmp_path, fake_inception, capsys):
    """Samples other tools wrote as image files (clean-fid and torch-fidelity
    read such folders): was "cannot read ... as a .npy/.npz array file"."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "samples").mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "samples" / f"{i}.png")
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    assert main(["fid", "--samples", str(tmp_path / "samples"), "--data", str(tmp_path / "d.npz"),
                 "--device", "cpu"]) == 0, capsys.readouterr().err
    assert fake_inception == [torch.device("cpu"), 5, 6]


def test_fid_refuses_a_sample_output_folder_as_samples(tmp_path, fake_inception, capsys):
    """`sample --out S` then `fid --samples S`: read as a folder of images, S
    held one image, the grid samples.png, refused as not square with advice
    (--image-size) that resizes --data only."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    (tmp_path / "s").mkdir()
    save_npz(rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8), tmp_path / "s" / "samples.npz")
    save_grid(rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8), tmp_path / "s" / "samples.png")
    assert main(["fid", "--samples", str(tmp_path / "s"), "--data", str(tmp_path / "d.npz"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"ddpm-fast fid: error: --samples {tmp_path / 's'} is a `ddpm-fast sample` output folder, whose "
                   f"samples.png is a grid of the samples: pass --samples {tmp_path / 's' / 'samples.npz'}"), err
    assert main(["fid", "--samples", str(tmp_path / "s" / "samples.npz"), "--data", str(tmp_path / "d.npz"),
                 "--device", "cpu"]) == 0


@pytest.mark.parametrize("sizes", [[(8, 8), (6, 6)], [(8, 6)]], ids=["two sizes", "not square"])
def test_fid_samples_of_unusable_sizes_get_advice_that_applies_to_them(tmp_path, fake_inception, capsys, sizes):
    """Was "...: pass image_size (--image-size) to resize and center-crop them",
    which resizes --data only: following it gave the same error."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "samples").mkdir()
    for i, (h, w) in enumerate(sizes * 2):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "samples" / f"{i}.png")
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    for samples in (tmp_path / "samples", tmp_path / "s.npz"):
        if samples.suffix == ".npz":  # the same in an array file (non-square only: an array has one size)
            np.savez(samples, images=rng.integers(0, 256, (5, 8, 6, 3), dtype=np.uint8))
        assert main(["fid", "--samples", str(samples), "--data", str(tmp_path / "d.npz"), "--image-size", "8",
                     "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"ddpm-fast fid: error: --samples {samples}: ") and "image_size" not in err, err
        assert err.endswith("FID takes the samples as they are, of one square size (--image-size resizes --data only)")


def test_fid_device_and_image_size_are_used(tmp_path, monkeypatch, fake_inception, dataset_options):
    import ddpm_fast.data

    monkeypatch.setattr(ddpm_fast.data, "load_array", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # --device cpu must win over the default cuda
    assert main(["fid", "--samples", str(tmp_path / "s.npz"), "--data", str(tmp_path), "--image-size", "16",
                 "--device", "cpu"]) == 2
    assert fake_inception == [torch.device("cpu")] and dataset_options["image_size"] == 16


def test_a_failing_command_exits_with_its_status_from_the_console_entry_point(tmp_path):
    """fid imports no ddpm_fast.distributed: entry_point's own sys.exit gives the status."""
    done = subprocess.run([sys.executable, "-m", "ddpm_fast", "fid", "--samples", str(tmp_path / "s.npz"), "--data",
                           "digits", "--inception-weights", str(tmp_path / "none.pth"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "ddpm-fast fid: error: Inception weights file" in done.stderr


# ------------------------------------------------------------------ demo


def test_demo_refuses_a_loss_png_folder_before_training(tmp_path, monkeypatch, capsys):
    import ddpm_fast.demo

    monkeypatch.setattr(ddpm_fast.demo, "run_demo", lambda *a, **k: pytest.fail("trained"))
    (tmp_path / "loss.png").mkdir()
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "loss.png is a folder" in capsys.readouterr().err
