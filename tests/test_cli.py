"""The ``ddpm-fast`` command line: every command end to end on tiny settings,
its help and defaults. Its errors: test_cli_errors.py."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast.cli import build_parser, main
from ddpm_fast.cli_sample import sample_dtype
from ddpm_fast.images import make_grid

COMMANDS = ("info", "train", "sample", "bpd", "fid", "demo")


def _options(command: str) -> list[argparse.Action]:
    """The options (not positionals) of one command's parser."""
    return [a for a in build_parser()._subparsers._group_actions[0].choices[command]._actions if a.option_strings]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_documents_its_options(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps the help (at hyphens too): no whitespace
    for action in _options(command):
        if action.dest != "help":
            # Every option has help of its own (the usage line names every flag anyway).
            assert action.help not in (None, "", argparse.SUPPRESS), action.option_strings
            assert "".join(action.help.split()).replace("%%", "%") in text, action.option_strings


def test_on_off_flags_state_their_default_once_where_python_appends_one(monkeypatch):
    """Python 3.10's BooleanOptionalAction appends " (default: %(default)s)" to
    a flag's help, which then read "(default: on) (default: True)"; simulated
    here (later Pythons append nothing), every option still states one default."""
    plain_init = argparse.BooleanOptionalAction.__init__

    def init_as_on_python_310(self, option_strings, dest, default=None, help=None, **kwargs):
        if help is not None and default is not None:
            help += " (default: %(default)s)"
        plain_init(self, option_strings, dest, default=default, help=help, **kwargs)

    monkeypatch.setattr(argparse.BooleanOptionalAction, "__init__", init_as_on_python_310)
    options = [a for command in COMMANDS for a in _options(command)]
    assert sum(isinstance(a, argparse.BooleanOptionalAction) for a in options) == 7
    for action in options:
        assert (action.help or "").count("(default:") <= 1, action.option_strings


@pytest.mark.parametrize("command", COMMANDS)
def test_every_default_the_help_states_is_the_default(command):
    """An option's "(default: X)" in --help, where X is a value (a number, a
    choice, on/off), is what the parser gives (a changed default with stale
    help passed before)."""
    checked = 0
    for action in _options(command):
        stated = re.search(r"\(default: ([^,;) ]+)[,;)]", action.help or "")
        if not stated:
            continue
        text = stated.group(1)
        if text in ("on", "off"):
            assert action.default is (text == "on"), action.option_strings
        elif re.fullmatch(r"-?[0-9.e+-]+", text):
            assert action.default == float(text), action.option_strings
        elif action.choices is not None and text in action.choices:
            assert action.default == text, action.option_strings
        else:
            continue
        checked += 1
    assert checked or command == "info"


def test_sample_and_bpd_options_reach_the_sampler_and_the_evaluation(tiny_run, toy_npz, tmp_path, monkeypatch):
    from ddpm_fast import distributed, evaluate

    seen = {}

    def sample_sharded(sampler, n, **kwargs):
        seen["sample"] = dict(n=n, variance=sampler.variance, clip=sampler.clip_denoised, **kwargs)
        return real_sample(sampler, n, **kwargs)

    def evaluate_bpd(model, dataset, schedule, **kwargs):
        seen["bpd"] = kwargs
        return real_bpd(model, dataset, schedule, **kwargs)

    real_sample, real_bpd = distributed.sample_sharded, evaluate.evaluate_bpd
    monkeypatch.setattr(distributed, "sample_sharded", sample_sharded)
    monkeypatch.setattr(evaluate, "evaluate_bpd", evaluate_bpd)
    keys = ("n", "variance", "clip", "batch_size", "steps", "eta", "seed")
    assert main(["sample", "--checkpoint", str(tiny_run), "--out", str(tmp_path / "s"), "-n", "3", "--batch-size", "2",
                 "--steps", "5", "--variance", "fixed_small", "--no-clip", "--seed", "7", "--device", "cpu"]) == 0
    got = {k: seen["sample"][k] for k in keys}
    assert got == dict(n=3, variance="fixed_small", clip=False, batch_size=2, steps=5, eta=None, seed=7)
    assert main(["sample", "--checkpoint", str(tiny_run), "--out", str(tmp_path / "s"), "-n", "2", "--steps", "4",
                 "--eta", "0.5", "--seed", "8", "--device", "cpu"]) == 0
    got = {k: seen["sample"][k] for k in keys}
    assert got == dict(n=2, variance="fixed_large", clip=True, batch_size=256, steps=4, eta=0.5, seed=8)
    assert main(["bpd", "--checkpoint", str(tiny_run), "--data", str(toy_npz), "-n", "3", "--batch-size", "2",
                 "--seed", "5", "--device", "cpu"]) == 0
    assert {k: seen["bpd"][k] for k in ("n", "batch_size", "seed")} == dict(n=3, batch_size=2, seed=5)


# Why: the shell leaves the ~ of --out=~/run alone, and the run went into a
# folder literally named "~" under the current one (FID weights paths expanded it).
def test_paths_on_the_command_line_expand_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    args = build_parser().parse_args(["train", "--data=~/data.npz", "--out=~/run"])
    assert (args.data, args.out) == (str(tmp_path / "data.npz"), str(tmp_path / "run"))
    assert build_parser().parse_args(["train", "--data", "digits", "--out", "a~b"]).data == "digits"


# Why: --data digits is the bundled set, yet with a folder ./digits there an
# --out under it was refused as "inside --data digits".
def test_training_on_the_bundled_digits_may_write_under_a_folder_named_digits(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()
    assert main(["train", "--data", "digits", "--out", "digits/run", "--model", "tiny", "--steps", "1",
                 "--batch-size", "8", "--timesteps", "10", "--no-flip", "--device", "cpu"]) == 0
    assert (tmp_path / "digits" / "run" / "latest").is_file()
    err = capsys.readouterr().err
    assert "ddpm-fast train: warning: 'digits' is the bundled scikit-learn set, not the ./digits found here" in err


def test_train_writes_a_run(tiny_run):
    assert (tiny_run / "checkpoint-00000004" / "ema.safetensors").is_file()
    assert (tiny_run / "samples.png").is_file() and (tiny_run / "loss.png").is_file()
    assert [json.loads(l)["step"] for l in (tiny_run / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_train_passes_channels_last_and_compile_to_the_trainer(toy_npz, tmp_path, monkeypatch, capsys):
    import ddpm_fast.train

    seen = []

    def train(self, **kwargs):  # the Trainer as built, not a run (a compile takes seconds)
        seen.append((self.config.channels_last, self.config.compile))
        return {"steps": 0, "out_dir": str(self.out_dir)}

    monkeypatch.setattr(ddpm_fast.train.Trainer, "train", train)
    base = ["train", "--data", str(toy_npz), "--model", "tiny", "--steps", "2", "--batch-size", "8",
            "--timesteps", "20", "--device", "cpu"]
    for i, flags in enumerate(([], ["--no-channels-last", "--compile"])):
        assert main([*base, "--out", str(tmp_path / str(i)), *flags]) == 0
    assert seen == [(True, False), (False, True)]  # the defaults: channels_last, not compiled


def test_train_resumes_a_finished_run_without_retraining(tiny_run, toy_npz, capsys):
    # The run's recipe again (--warmup, --no-flip); --checkpoint-every and --log-every may differ.
    code = main(["train", "--data", str(toy_npz), "--out", str(tiny_run), "--model", "tiny", "--steps", "4",
                 "--batch-size", "8", "--timesteps", "20", "--warmup", "2", "--no-flip", "--device", "cpu"])
    assert code == 0 and "trained to step 4" in capsys.readouterr().out


def test_train_refuses_to_resume_with_another_recipe(tiny_run, toy_npz, capsys):
    """A resume with other settings once trained on silently (another schedule
    under the old weights, the old learning rate kept under the new warm-up)."""
    code = main(["train", "--data", str(toy_npz), "--out", str(tiny_run), "--model", "tiny", "--steps", "6",
                 "--batch-size", "8", "--timesteps", "30", "--lr", "1e-3", "--warmup", "2", "--no-flip",
                 "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "schedule.timesteps: 20 there, 30 now; train.lr: 0.0002 there, 0.001 now" in err
    assert sorted(p.name for p in tiny_run.glob("checkpoint-*"))[-1] == "checkpoint-00000004"  # nothing trained


def test_sample_writes_png_and_npz(tiny_run, tmp_path, capsys):
    out = tmp_path / "samples"
    assert main(["sample", "--checkpoint", str(tiny_run), "--out", str(out), "-n", "5", "--batch-size", "2",
                 "--steps", "5", "--device", "cpu"]) == 0
    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (5, 8, 8, 1) and images.dtype == np.uint8
    whole = np.asarray(Image.open(out / "samples.png"))
    assert whole.shape == make_grid(images, scale=4).shape[:2]  # 8 px tiles upscaled to 32 px
    # the grid shows the first --grid samples; the npz holds every one
    assert main(["sample", "--checkpoint", str(tiny_run), "--out", str(out), "-n", "5", "--batch-size", "5",
                 "--steps", "5", "--grid", "4", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("samples.png (the first 4 of them)")
    np.testing.assert_array_equal(np.asarray(Image.open(out / "samples.png")), make_grid(images[:4], scale=4)[..., 0])
    np.testing.assert_array_equal(np.load(out / "samples.npz")["images"], images)
    # sample i does not depend on the batch size
    again = tmp_path / "again"
    main(["sample", "--checkpoint", str(tiny_run), "--out", str(again), "-n", "5", "--batch-size", "5",
          "--steps", "5", "--device", "cpu"])
    np.testing.assert_array_equal(np.load(again / "samples.npz")["images"], images)


@pytest.mark.parametrize(
    "choice, device, capability, want",
    [
        ("auto", "cpu", None, torch.float32),  # without AMX a CPU's bf16 convolutions are the slow ones
        ("auto", "cuda", (9, 0), torch.bfloat16),
        ("auto", "cuda", (8, 0), torch.bfloat16),
        ("auto", "cuda", (7, 5), torch.float32),  # no native bf16 before sm_80
        ("fp16", "cuda", (9, 0), torch.float16),  # a choice is kept
        ("fp32", "cuda", (9, 0), torch.float32),
        ("bf16", "cpu", None, torch.bfloat16),
    ],
)
def test_sample_dtype_auto_is_bf16_on_ampere_and_newer(monkeypatch, choice, device, capability, want):
    def get_device_capability(dev):
        assert dev == torch.device(device)
        return capability

    monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)
    assert sample_dtype(choice, torch.device(device)) == want


def test_sample_precision_script_compares_dtypes(tiny_run):
    """benchmarks/sample_precision.py (the evidence for --dtype auto) runs: float32
    against itself is exact (listed once, though asked for too), bf16 is close but not identical."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "sample_precision.py"
    result = subprocess.run([sys.executable, str(script), str(tiny_run), "-n", "6", "--steps", "3", "--dtypes", "fp32,bf16"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["fp32", "bf16"]
    assert "mean 0.00000 max 0.0000" in lines[0] and "digits: confident" in lines[0]
    assert "uint8 pixels that differ 0.00%" in lines[0]  # counted where they differ
    bf16_mean = float(lines[1].split("mean ")[1].split()[0])
    assert 0 < bf16_mean < 0.05


@pytest.mark.parametrize("scheduler, flags, variance, clip, said", [
    # DDPMScheduler's defaults where the config is silent: fixed_small, clip on
    ({}, [], "fixed_small", True, "variance fixed_small, clip on"),
    ({"variance_type": "fixed_large_log", "clip_sample": False}, [], "fixed_large", False, "variance fixed_large, clip off"),
    ({"clip_sample": False}, ["--variance", "fixed_large", "--clip"], "fixed_large", True, None),  # the options win
], ids=["defaults", "from-config", "overridden"])
def test_sample_from_a_diffusers_pipeline_folder(tmp_path, capsys, scheduler, flags, variance, clip, said):
    """A saved diffusers pipeline (its UNet2DModel and scheduler config) samples
    as our Sampler does with the diffusers model itself as the noise predictor,
    with the variance and clipping its scheduler config gives DDPMPipeline
    (it took fixed_large and clip on whatever the config said)."""
    pytest.importorskip("diffusers")
    from conftest import save_tiny_diffusers_pipeline
    from ddpm_fast import NoiseSchedule, Sampler
    from ddpm_fast.images import to_uint8

    torch.manual_seed(0)
    unet = save_tiny_diffusers_pipeline(tmp_path / "pipe", timesteps=200)
    config = tmp_path / "pipe" / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **scheduler}))
    out = tmp_path / "samples"
    assert main(["sample", "--checkpoint", str(tmp_path / "pipe"), "--out", str(out), "-n", "3", "--steps", "6",
                 "--no-channels-last", "--device", "cpu", *flags]) == 0
    images = np.load(out / "samples.npz")["images"]
    schedule = NoiseSchedule("linear", timesteps=200, beta_start=2e-4, beta_end=0.03)
    with torch.no_grad():
        want = Sampler(lambda x, t: unet(x, t).sample, schedule, sample_shape=(1, 8, 8), variance=variance,
                       clip_denoised=clip).sample(3, seed=0, steps=6, progress=False)
    assert images.shape == (3, 8, 8, 1)
    assert np.abs(images.astype(int) - to_uint8(want).astype(int)).max() <= 1  # float rounding at a level's edge
    err = capsys.readouterr().err
    assert (f"following {config}: {said} (--variance/--clip override)" in err) if said else "following" not in err


def test_sample_channels_last_by_default_converts_the_model_and_keeps_the_samples(tiny_run, tmp_path, monkeypatch):
    from ddpm_fast import distributed

    seen = []

    def sample_sharded(sampler, *args, **kwargs):
        weights = [p for p in sampler.model.parameters() if p.dim() == 4]
        # (A 1x1 or one-input-channel weight is both contiguous and channels_last.)
        converted = all(p.is_contiguous(memory_format=torch.channels_last) for p in weights) and any(
            not p.is_contiguous() for p in weights
        )
        seen.append((sampler.channels_last, converted))
        return real(sampler, *args, **kwargs)

    real = distributed.sample_sharded
    monkeypatch.setattr(distributed, "sample_sharded", sample_sharded)
    outs = [tmp_path / "nchw", tmp_path / "nhwc"]
    for out, flags in zip(outs, (["--no-channels-last"], [])):  # channels_last is the default
        assert main(["sample", "--checkpoint", str(tiny_run), "--out", str(out), "-n", "3", "--steps", "5",
                     "--device", "cpu", *flags]) == 0
    assert seen == [(False, False), (True, True)]
    # The same noise either way; the model's float32 arithmetic may round differently in NHWC.
    a, b = (np.load(out / "samples.npz")["images"].astype(int) for out in outs)
    assert np.abs(a - b).max() <= 1


def test_bpd_reports_terms_that_add_up(tiny_run, toy_npz, capsys):
    assert main(["bpd", "--checkpoint", str(tiny_run), "--data", str(toy_npz), "-n", "6", "--batch-size", "4",
                 "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 6 and len(result["terms"]) == 20
    assert result["total"] == pytest.approx(result["prior"] + result["vb"] + result["decoder"], rel=1e-6)  # summed in float32


@pytest.mark.parametrize("command", ["train", "bpd", "fid"])
def test_commands_load_image_folders_with_a_progress_bar(command, tiny_run, tmp_path, monkeypatch):
    import ddpm_fast.data
    import ddpm_fast.fid
    from ddpm_fast.cli_options import UsageError

    seen = {}

    def load_dataset(spec, **kwargs):
        seen.update(kwargs)
        raise UsageError("recorded")  # no need to go further

    monkeypatch.setattr(ddpm_fast.data, "load_dataset", load_dataset)
    monkeypatch.setattr(ddpm_fast.fid, "load_inception", lambda *args, **kwargs: None)
    monkeypatch.setattr(ddpm_fast.data, "load_array", lambda *args, **kwargs: None)
    data = tmp_path / "images"
    data.mkdir()
    argv = {"train": ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--device", "cpu"],
            "bpd": ["bpd", "--checkpoint", str(tiny_run), "--data", str(data), "--device", "cpu"],
            "fid": ["fid", "--samples", str(tmp_path / "s.npz"), "--data", str(data), "--device", "cpu"]}[command]
    assert main(argv) == 2
    assert seen.get("progress") is True


def test_resuming_with_the_same_data_written_another_way_is_not_other_settings(toy_npz, tmp_path, monkeypatch,
                                                                                 capsys):
    """--data was compared as written: x.npz, ./x.npz and its absolute path
    (from another folder) each warned of a resume 'with other settings'."""
    monkeypatch.chdir(toy_npz.parent)
    out = tmp_path / "run"
    common = ["--out", str(out), "--model", "tiny", "--batch-size", "8", "--timesteps", "20", "--warmup", "1",
              "--no-flip", "--device", "cpu", "--checkpoint-every", "1"]
    for step, data in enumerate([toy_npz.name, f"./{toy_npz.name}", str(toy_npz)], start=1):
        if step == 3:
            monkeypatch.chdir(tmp_path)
        assert main(["train", "--data", data, "--steps", str(step), *common]) == 0
        assert "other settings" not in capsys.readouterr().err
    import shutil

    other = shutil.copy(toy_npz, tmp_path / "copy.npz")  # other data (the same images, but it cannot know)
    assert main(["train", "--data", str(other), "--steps", "4", *common]) == 0
    assert f"(data: {str(toy_npz)!r} there, {str(other)!r} now)" in capsys.readouterr().err
