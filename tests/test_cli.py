"""The ``ddpm-fast`` command line: every command end to end on tiny settings,
and bad arguments answered with a one-line error and exit status 2."""

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

from ddpm_fast.checkpoint import CheckpointError
from ddpm_fast.cli import _sample_dtype, build_parser, main
from train_helpers import save_toy_npz

COMMANDS = ("info", "train", "sample", "bpd", "fid", "demo")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "toy.npz"
    save_toy_npz(path)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_file):
    out = tmp_path_factory.mktemp("run")
    code = main([
        "train", "--data", str(data_file), "--out", str(out), "--model", "tiny", "--steps", "4",
        "--batch-size", "8", "--timesteps", "20", "--checkpoint-every", "2", "--log-every", "1",
        "--warmup", "2", "--no-flip", "--device", "cpu",
    ])
    assert code == 0
    return out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_documents_its_options(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps the help (at hyphens too): no whitespace
    for action in build_parser()._subparsers._group_actions[0].choices[command]._actions:
        if action.option_strings and action.dest != "help":
            # Every option has help of its own (the usage line names every flag anyway).
            assert action.help not in (None, "", argparse.SUPPRESS), action.option_strings
            assert "".join(action.help.split()).replace("%%", "%") in text, action.option_strings


@pytest.mark.parametrize("command", COMMANDS)
def test_every_default_the_help_states_is_the_default(command):
    """An option's "(default: X)" in --help, where X is a value (a number, a
    choice, on/off), is what the parser gives (a changed default with stale
    help passed before)."""
    checked = 0
    for action in build_parser()._subparsers._group_actions[0].choices[command]._actions:
        stated = re.search(r"\(default: ([^,;) ]+)[,;)]", action.help or "")
        if not stated or not action.option_strings:
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


def test_sample_and_bpd_options_reach_the_sampler_and_the_evaluation(run_dir, data_file, tmp_path, monkeypatch):
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
    assert main(["sample", "--checkpoint", str(run_dir), "--out", str(tmp_path / "s"), "-n", "3", "--batch-size", "2",
                 "--steps", "5", "--eta", "0.5", "--variance", "fixed_small", "--no-clip", "--seed", "7",
                 "--device", "cpu"]) == 0
    got = {k: seen["sample"][k] for k in ("n", "variance", "clip", "batch_size", "steps", "eta", "seed")}
    assert got == dict(n=3, variance="fixed_small", clip=False, batch_size=2, steps=5, eta=0.5, seed=7)
    assert main(["bpd", "--checkpoint", str(run_dir), "--data", str(data_file), "-n", "3", "--batch-size", "2",
                 "--seed", "5", "--device", "cpu"]) == 0
    assert {k: seen["bpd"][k] for k in ("n", "batch_size", "seed")} == dict(n=3, batch_size=2, seed=5)


def test_train_writes_a_run(run_dir):
    assert (run_dir / "checkpoint-00000004" / "ema.safetensors").is_file()
    assert (run_dir / "samples.png").is_file() and (run_dir / "loss.png").is_file()
    assert [json.loads(l)["step"] for l in (run_dir / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_train_passes_channels_last_and_compile_to_the_trainer(data_file, tmp_path, monkeypatch, capsys):
    import ddpm_fast.train

    seen = []

    def train(self, **kwargs):  # the Trainer as built, not a run (a compile takes seconds)
        seen.append((self.config.channels_last, self.config.compile))
        return {"steps": 0, "out_dir": str(self.out_dir)}

    monkeypatch.setattr(ddpm_fast.train.Trainer, "train", train)
    base = ["train", "--data", str(data_file), "--model", "tiny", "--steps", "2", "--batch-size", "8",
            "--timesteps", "20", "--device", "cpu"]
    for i, flags in enumerate(([], ["--no-channels-last", "--compile"])):
        assert main([*base, "--out", str(tmp_path / str(i)), *flags]) == 0
    assert seen == [(True, False), (False, True)]  # the defaults: channels_last, not compiled


def test_train_resumes_a_finished_run_without_retraining(run_dir, data_file, capsys):
    # The run's recipe again (--warmup, --no-flip); --checkpoint-every and --log-every may differ.
    code = main(["train", "--data", str(data_file), "--out", str(run_dir), "--model", "tiny", "--steps", "4",
                 "--batch-size", "8", "--timesteps", "20", "--warmup", "2", "--no-flip", "--device", "cpu"])
    assert code == 0 and "trained to step 4" in capsys.readouterr().out


def test_train_refuses_to_resume_with_another_recipe(run_dir, data_file, capsys):
    """A resume with other settings once trained on silently (another schedule
    under the old weights, the old learning rate kept under the new warm-up)."""
    code = main(["train", "--data", str(data_file), "--out", str(run_dir), "--model", "tiny", "--steps", "6",
                 "--batch-size", "8", "--timesteps", "30", "--lr", "1e-3", "--warmup", "2", "--no-flip",
                 "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "schedule.timesteps: 20 there, 30 now; train.lr: 0.0002 there, 0.001 now" in err
    assert sorted(p.name for p in run_dir.glob("checkpoint-*"))[-1] == "checkpoint-00000004"  # nothing trained


def test_sample_writes_png_and_npz(run_dir, tmp_path):
    out = tmp_path / "samples"
    assert main(["sample", "--checkpoint", str(run_dir), "--out", str(out), "-n", "5", "--batch-size", "2",
                 "--steps", "5", "--device", "cpu"]) == 0
    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (5, 8, 8, 1) and images.dtype == np.uint8
    assert (out / "samples.png").stat().st_size > 0
    # sample i does not depend on the batch size
    again = tmp_path / "again"
    main(["sample", "--checkpoint", str(run_dir), "--out", str(again), "-n", "5", "--batch-size", "5",
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
    assert _sample_dtype(choice, torch.device(device)) == want


def test_sample_precision_script_compares_dtypes(run_dir):
    """benchmarks/sample_precision.py (the evidence for --dtype auto) runs: float32
    against itself is exact, bf16 is close but not identical."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "sample_precision.py"
    result = subprocess.run([sys.executable, str(script), str(run_dir), "-n", "6", "--steps", "3", "--dtypes", "bf16"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["fp32", "bf16"]
    assert "mean 0.00000 max 0.0000" in lines[0] and "digits: confident" in lines[0]
    bf16_mean = float(lines[1].split("mean ")[1].split()[0])
    assert 0 < bf16_mean < 0.05


def test_sample_from_a_diffusers_pipeline_folder(tmp_path):
    """A saved diffusers pipeline (its UNet2DModel and scheduler config) samples
    as our Sampler does with the diffusers model itself as the noise predictor."""
    pytest.importorskip("diffusers")
    from conftest import save_tiny_diffusers_pipeline
    from ddpm_fast import NoiseSchedule, Sampler
    from ddpm_fast.images import to_uint8

    torch.manual_seed(0)
    unet = save_tiny_diffusers_pipeline(tmp_path / "pipe", timesteps=200)
    out = tmp_path / "samples"
    assert main(["sample", "--checkpoint", str(tmp_path / "pipe"), "--out", str(out), "-n", "3", "--steps", "6",
                 "--no-channels-last", "--device", "cpu"]) == 0
    images = np.load(out / "samples.npz")["images"]
    schedule = NoiseSchedule("linear", timesteps=200, beta_start=2e-4, beta_end=0.03)
    with torch.no_grad():
        want = Sampler(lambda x, t: unet(x, t).sample, schedule, sample_shape=(1, 8, 8)).sample(3, seed=0, steps=6, progress=False)
    assert images.shape == (3, 8, 8, 1)
    assert np.abs(images.astype(int) - to_uint8(want).astype(int)).max() <= 1  # float rounding at a level's edge


def test_sample_channels_last_by_default_converts_the_model_and_keeps_the_samples(run_dir, tmp_path, monkeypatch):
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
        assert main(["sample", "--checkpoint", str(run_dir), "--out", str(out), "-n", "3", "--steps", "5",
                     "--device", "cpu", *flags]) == 0
    assert seen == [(False, False), (True, True)]
    # The same noise either way; the model's float32 arithmetic may round differently in NHWC.
    a, b = (np.load(out / "samples.npz")["images"].astype(int) for out in outs)
    assert np.abs(a - b).max() <= 1


def test_bpd_reports_terms_that_add_up(run_dir, data_file, capsys):
    assert main(["bpd", "--checkpoint", str(run_dir), "--data", str(data_file), "-n", "6", "--batch-size", "4",
                 "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 6 and len(result["terms"]) == 20
    assert result["total"] == pytest.approx(result["prior"] + result["vb"] + result["decoder"], rel=1e-6)  # summed in float32


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "no/such/folder", "--out", "{tmp}/r"], "no/such/folder"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--model", "cifar10"], "cifar10 takes 3x32x32"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--batch-size", "64"], "fewer than batch_size"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--schedule", "zigzag"], "unknown beta schedule"),
        (["sample", "--checkpoint", "{tmp}/missing", "--out", "{tmp}/s"], "does not exist"),
        (["sample", "--checkpoint", "{tmp}", "--out", "{tmp}/s"], "holds no checkpoint"),
        (["bpd", "--checkpoint", "{tmp}/missing", "--data", "{data}"], "does not exist"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--image-size", "1"], "--model small cannot take 1x1x1"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--dropout", "1.5"], "--dropout must lie in [0, 1)"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--weight-decay", "inf"], "--weight-decay must be a finite number >= 0"),
        # TrainConfig's and run_demo's checks in the options' names (they named the Python fields)
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--lr", "-1"], "--lr must be a positive number"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--grad-clip", "-1"], "--grad-clip must be > 0, got -1.0"),
        (["sample", "--checkpoint", "{tmp}", "--out", "{tmp}/with-folders"], "samples.npz is a folder"),
        # refused before training, not after it (at the final sample grid)
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--batch-size", "8", "--timesteps", "20", "--sample-steps", "21"],
         "--sample-steps) is 21, more than the schedule's 20 timesteps"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--batch-size", "8", "--schedule", "jsd"], "could never be sampled"),
        (["train", "--data", "{data}", "--out", "{file}"], "is a file, not a folder"),
        (["train", "--data", "{data}", "--out", "{file}/run"], "is a file, not a folder"),
        (["sample", "--checkpoint", "{tmp}/missing", "--out", "{file}"], "is a file, not a folder"),
        (["demo", "--out", "{file}", "--steps", "1"], "is a file, not a folder"),
        # refused before sampling, not when the folder is made after it
        (["sample", "--checkpoint", "{tmp}", "--out", "{tmp}/broken-link"], "is a broken symbolic link"),
        (["train", "--data", "{data}", "--out", "{tmp}/broken-link/run"], "is a broken symbolic link"),
        (["demo", "--out", "{tmp}/d", "--steps", "1", "--sample-steps", "1001"], "--sample-steps must be an int in [1, 1000]"),
    ],
)
def test_bad_inputs_fail_with_one_clear_line(argv, message, tmp_path, data_file, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "broken-link").symlink_to(tmp_path / "nowhere" / "deeper")
    (tmp_path / "with-folders" / "samples.npz").mkdir(parents=True)  # found before sampling, not after it
    argv = [a.format(tmp=tmp_path, data=data_file, file=tmp_path / "a-file") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ddpm-fast {argv[0]}: error:") and message in err and "\n" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--out", "x"],  # --data missing
        ["train", "--data", "digits", "--out", "x", "--steps", "0"],
        ["train", "--data", "digits", "--out", "x", "--precision", "fp8"],
        ["sample", "--checkpoint", "x", "--out", "y", "-n", "-3"],
        ["bpd", "--checkpoint", "x"],
        ["train", "--data", "", "--out", "x"],  # an empty path would mean the current folder
        ["train", "--data", "digits", "--out", " "],
        ["sample", "--checkpoint", "", "--out", "y"],
        ["train", "--data", "digits", "--out", "x", "--image-size", "abc"],
        ["train", "--data", "digits", "--out", "x", "--device", "cpu:1"],
        ["demo"],
        ["fly"],
        ["train", "--data", "digits", "--out", "x", "--seed", str(2**63)],
        ["demo", "--out", "x", "--seed", "99999999999999999999"],
        ["sample", "--checkpoint", "x", "--out", "y", "--seed", str(2**64)],
        ["bpd", "--checkpoint", "x", "--data", "digits", "--seed", "-1"],
    ],
)
def test_bad_arguments_exit_2(argv, capsys, tmp_path, monkeypatch):
    """In one line, as every other error (argparse printed its usage first), and
    before anything is made (a too-large demo seed left an empty folder)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "error:" in err and "_positive" not in err and "_path" not in err and "_seed" not in err
    assert "\n" not in err and err.endswith("--help)"), err
    assert not list(tmp_path.iterdir())


def test_console_script_and_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "ddpm_fast", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("ddpm_fast ")


@pytest.mark.parametrize(
    "device, message",
    [("banana", "unknown device 'banana'"), ("mps", "unsupported device 'mps'"), ("cuda", "CUDA is not available")],
)
@pytest.mark.parametrize("command", ["train", "sample", "bpd", "fid"])
def test_device_is_checked_while_parsing(command, device, message, monkeypatch, capsys):
    """A mistyped or absent device was a traceback from inside torch."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    required = {"train": ["--data", "d", "--out", "o"], "sample": ["--checkpoint", "c", "--out", "o"],
                "bpd": ["--checkpoint", "c", "--data", "d"], "fid": ["--samples", "s", "--data", "d"]}[command]
    with pytest.raises(SystemExit) as exit_info:
        main([command, *required, "--device", device])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"ddpm-fast {command}: error: argument --device: " in err and message in err


def test_an_unwritable_out_fails_before_any_work(run_dir, tmp_path, monkeypatch, capsys):
    """Tried with a temporary file: os.access says yes to root, and on read-only
    or special file systems (/proc), which then failed after the whole run."""
    import tempfile

    from ddpm_fast import distributed

    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if str(dir) == str(locked):
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(distributed, "sample_sharded", lambda *a, **k: pytest.fail("sampled into an unwritable --out"))
    assert main(["sample", "--checkpoint", str(run_dir), "--out", str(locked / "samples"), "-n", "2"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"ddpm-fast sample: error: --out {locked / 'samples'}: {locked} is not writable (Permission denied)")
    assert list(locked.iterdir()) == []
    if Path("/proc/self").is_dir():  # a special file system: no file can be made in /proc
        assert main(["sample", "--checkpoint", str(run_dir), "--out", "/proc/ddpm-fast-out", "-n", "2"]) == 2
        assert "/proc is not writable" in capsys.readouterr().err
    assert not [p for p in tmp_path.rglob(".ddpm-fast-probe-*")]


def test_os_errors_are_one_line(run_dir, tmp_path, monkeypatch, capsys):
    """A PermissionError, a full disk, ...: OSErrors beyond FileNotFoundError were tracebacks."""
    from ddpm_fast import cli

    def save_npz(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("ddpm_fast.images.save_npz", save_npz)
    assert cli.main(["sample", "--checkpoint", str(run_dir), "--out", str(tmp_path / "s"), "-n", "2",
                     "--steps", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.replace("\r", "\n").strip()  # after the progress bar
    assert err.splitlines()[-1] == "ddpm-fast sample: error: [Errno 28] No space left on device"
    assert "Traceback" not in err
    assert not (tmp_path / "s" / "samples.png").exists()  # the data first: no new grid without it


def test_ctrl_c_in_sample_is_one_line_and_exit_130(run_dir, tmp_path, monkeypatch, capsys):
    from ddpm_fast import distributed

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(distributed, "sample_sharded", interrupted)
    assert main(["sample", "--checkpoint", str(run_dir), "--out", str(tmp_path / "s"), "-n", "2"]) == 130
    assert capsys.readouterr().err.strip() == "ddpm-fast sample: interrupted"
    assert not (tmp_path / "s" / "samples.npz").exists()


def test_ctrl_c_in_train_names_the_intact_checkpoint(tmp_path, data_file):
    """A real SIGINT mid-run: exit status 130, one line naming the newest
    checkpoint (it loads), and the same command resumes from it."""
    import os
    import signal
    import time

    from ddpm_fast.checkpoint import latest_checkpoint
    from ddpm_fast.pretrained import load_model

    out = tmp_path / "run"
    args = ["train", "--data", str(data_file), "--out", str(out), "--model", "tiny", "--steps", "100000", "--batch-size", "8",
            "--timesteps", "20", "--checkpoint-every", "1", "--log-every", "1", "--device", "cpu"]
    # Python leaves SIGINT ignored if it started ignored (as a background job's
    # is): the child installs the default handler itself, before the CLI runs.
    launcher = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                "runpy.run_module('ddpm_fast', run_name='__main__')")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DDPM_FAST_DEBUG", None)
    process = subprocess.Popen([sys.executable, "-c", launcher, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while latest_checkpoint(out) is None and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:  # never leave the run behind
            process.kill()
            process.wait()
    assert process.returncode == 130, err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    ckpt = latest_checkpoint(out)
    assert "Traceback" not in err
    assert last.startswith("ddpm-fast train: interrupted at step ")
    assert last.endswith(f"the newest checkpoint, {ckpt}, is intact: run the same command to continue from it")
    for weights in ("ema", "model"):
        load_model(ckpt, weights=weights)  # loads: whole files, the right shapes


def test_out_of_memory_says_to_lower_the_batch_size(run_dir, tmp_path, monkeypatch, capsys):
    from ddpm_fast import distributed

    def sample_sharded(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore details")

    monkeypatch.setattr(distributed, "sample_sharded", sample_sharded)
    assert main(["sample", "--checkpoint", str(run_dir), "--out", str(tmp_path / "s"), "--batch-size", "4096"]) == 2
    assert capsys.readouterr().err.strip() == (
        "ddpm-fast sample: error: out of memory (CUDA out of memory. Tried to allocate 20.00 GiB more details): "
        "lower --batch-size")


def test_demo_rerun_with_another_seed_says_to_use_another_out(tmp_path, capsys):
    """The demo resumes out/run; with another --seed that run was once continued
    silently (as the seed-0 run), and the Trainer's advice names --no-resume,
    which the demo does not have."""
    argv = ["demo", "--out", str(tmp_path), "--steps", "1", "--samples", "2", "--sample-steps", "1"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv, "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"ddpm-fast demo: error: {tmp_path / 'run'} holds a demo run with other settings "
                   "(train.seed: 0 there, 1 now): rerun with its settings, or pass another --out")


def test_warnings_are_one_line(run_dir, data_file):
    """Python's own format adds the file, line and source line of the warning."""
    argv = [sys.executable, "-m", "ddpm_fast", "train", "--data", str(data_file), "--out", str(run_dir), "--model",
            "tiny", "--steps", "2", "--batch-size", "8", "--timesteps", "20", "--warmup", "2", "--no-flip",
            "--device", "cpu"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [l for l in done.stderr.replace("\r", "\n").splitlines() if "warn" in l]
    assert lines == [f"ddpm-fast train: warning: the run in {run_dir} is already at step 4, beyond steps=2: "
                     "nothing to train"]


def test_a_checkpoint_without_its_schedule_is_one_line(run_dir, tmp_path, capsys):
    """A hand-edited config.json without "schedule": a KeyError traceback before."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(run_dir / "checkpoint-00000004", ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    del config["schedule"]
    (ckpt / "config.json").write_text(json.dumps(config))
    assert main(["sample", "--checkpoint", str(ckpt), "--out", str(tmp_path / "s"), "-n", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpm-fast sample: error:") and "has no usable noise schedule" in err and "\n" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where the cuda backend cannot run")
def test_a_backend_the_environment_forces_but_cannot_run_is_one_line(run_dir, tmp_path, monkeypatch, capsys):
    """DDPM_FAST_BACKEND=cuda on a CPU-only machine: `sample` gave a raw
    RuntimeError traceback, and `info` (which diagnoses the setup) crashed."""
    monkeypatch.setenv("DDPM_FAST_BACKEND", "cuda")
    assert main(["sample", "--checkpoint", str(run_dir), "--out", str(tmp_path / "s"), "-n", "2", "--steps", "2",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpm-fast sample: error:") and "\n" not in err
    assert "backend 'cuda' is unavailable for cpu tensors" in err and "chosen by DDPM_FAST_BACKEND" in err
    assert main(["info"]) == 1
    assert "auto backend on cpu: unavailable:" in capsys.readouterr().out


def test_out_of_memory_in_training_names_every_option_that_sets_memory(data_file, tmp_path, capsys):
    """A huge --image-size ran out of memory with the advice to lower
    --batch-size alone (the CPU allocator's error: 'can't allocate memory')."""
    assert main(["train", "--data", str(data_file), "--out", str(tmp_path / "r"), "--model", "tiny",
                 "--image-size", "1000000", "--steps", "1", "--batch-size", "8", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpm-fast train: error: out of memory (") and "\n" not in err
    assert err.endswith("lower --batch-size, --image-size, --timesteps or --model")


def test_ddpm_fast_debug_is_read_as_setup_py_reads_it(tmp_path, monkeypatch, capsys):
    """DDPM_FAST_DEBUG=0 turned tracebacks on (any non-empty value did); only
    1/true/yes do, as for the build."""
    argv = ["sample", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "s")]
    monkeypatch.setenv("DDPM_FAST_DEBUG", "0")
    assert main(argv) == 2 and "does not exist" in capsys.readouterr().err
    monkeypatch.setenv("DDPM_FAST_DEBUG", "1")
    with pytest.raises(CheckpointError, match="does not exist"):
        main(argv)
