"""The ``ddpm-fast`` command line's errors: bad arguments and unusable inputs
answered with one line and exit status 2, OS errors, out of memory, Ctrl-C
(130), warnings in one line, DDPM_FAST_DEBUG's tracebacks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddpm_fast.checkpoint import CheckpointError
from ddpm_fast.cli import main

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
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--dropout", "1"], "--dropout must lie in [0, 1), got 1.0"),  # drops everything
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--weight-decay", "inf"], "--weight-decay must be a finite number >= 0"),
        # TrainConfig's and run_demo's checks in the options' names (they named the Python fields)
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--lr", "-1"], "--lr must be a finite number > 0"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--grad-clip", "-1"], "--grad-clip must be > 0, got -1.0"),
        (["sample", "--checkpoint", "{tmp}", "--out", "{tmp}/with-folders"], "samples.npz is a folder"),
        (["train", "--data", "{data}", "--out", "{tmp}/with-folders"], "log.jsonl is a folder"),  # not after training
        (["train", "--data", "{data}", "--out", "{tmp}/with-latest"], "latest is a folder"),  # not at the first checkpoint
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
def test_bad_inputs_fail_with_one_clear_line(argv, message, tmp_path, toy_npz, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "broken-link").symlink_to(tmp_path / "nowhere" / "deeper")
    (tmp_path / "with-folders" / "samples.npz").mkdir(parents=True)  # found before sampling, not after it
    (tmp_path / "with-folders" / "log.jsonl").mkdir()
    (tmp_path / "with-latest" / "latest").mkdir(parents=True)
    argv = [a.format(tmp=tmp_path, data=toy_npz, file=tmp_path / "a-file") for a in argv]
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
        ["train", "--data", "digits", "--out", "x", "--steps", "1" + "0" * 400],  # an OverflowError traceback, from tqdm
        ["sample", "--checkpoint", "x", "--out", "y", "-n", str(2**63)],
    ],
)
def test_bad_arguments_exit_2(argv, capsys, tmp_path, monkeypatch):
    """In one line, as every other error (argparse printed its usage first), and
    before anything is made (a too-large demo seed left an empty folder)."""
    from ddpm_fast import cli

    def accepted(args):  # fail at once, rather than train for 100,000 steps on a broken check
        raise AssertionError(f"{argv} was accepted")

    for command in ("_info", "_train", "_sample", "_bpd", "_fid", "_demo"):
        monkeypatch.setattr(cli, command, accepted)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    # argparse names a type function in "invalid <name> value" when it raises a
    # plain ValueError: ours raise ArgumentTypeError, whose message it prints as it is
    assert "error:" in err and not re.search(r"invalid \w+ value", err), err
    assert "\n" not in err and err.endswith("--help)"), err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv", [["info"], ["train", "--data", "digits", "--out", "x"],
                                  ["sample", "--checkpoint", "x", "--out", "y"], ["bpd", "--checkpoint", "x", "--data", "d"],
                                  ["fid", "--samples", "s.npz", "--data", "d"], ["demo", "--out", "x"]],
                         ids=lambda argv: argv[0])
def test_an_unknown_option_of_a_command_points_at_the_commands_help(argv, capsys, monkeypatch):
    """argparse hands a subcommand's unknown arguments to the top level, whose
    error said `ddpm-fast: error: ... (see ddpm-fast --help)`: a help that does
    not list the command's options. One before the command stays the top level's."""
    from ddpm_fast import cli

    for command in ("_info", "_train", "_sample", "_bpd", "_fid", "_demo"):
        monkeypatch.setattr(cli, command, lambda args: pytest.fail(f"{argv} was accepted"))
    for where, args, prog in [("after", [*argv, "--no-such", "1"], f"ddpm-fast {argv[0]}"),
                              ("before", ["--no-such", *argv], "ddpm-fast")]:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2
        assert err.startswith(f"{prog}: error: unrecognized arguments: --no-such") and err.endswith(f"(see {prog} --help)"), \
            (where, err)


def test_console_script_and_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "ddpm_fast", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("ddpm_fast ")


@pytest.mark.parametrize(
    "device, message",
    [("banana", "unknown device 'banana'"), ("mps", "unsupported device 'mps'"), ("meta", "unsupported device 'meta'"),
     ("cuda", "CUDA is not available")],
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


def test_a_device_index_is_checked_against_the_devices_there_are(monkeypatch):
    """cuda:K exists for K below the device count (cuda:2 on two GPUs failed deep in torch); cpu:0 is the CPU."""
    from argparse import ArgumentTypeError

    from ddpm_fast import cli_options

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [cli_options.device(d) for d in ("cuda", "cuda:1", "cpu", "cpu:0")] == ["cuda", "cuda:1", "cpu", "cpu:0"]
    with pytest.raises(ArgumentTypeError, match=r"cuda:2: this machine has 2 CUDA device\(s\)"):
        cli_options.device("cuda:2")


def test_an_unwritable_out_fails_before_any_work(tiny_run, tmp_path, monkeypatch, capsys):
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
    assert main(["sample", "--checkpoint", str(tiny_run), "--out", str(locked / "samples"), "-n", "2"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"ddpm-fast sample: error: --out {locked / 'samples'}: no file can be created in {locked} (Permission denied)")
    assert list(locked.iterdir()) == []
    if Path("/proc/self").is_dir():  # a special file system: no file can be made in /proc
        assert main(["sample", "--checkpoint", str(tiny_run), "--out", "/proc/ddpm-fast-out", "-n", "2"]) == 2
        assert "no file can be created in /proc (" in capsys.readouterr().err  # was: "/proc is not writable (No such file or directory)"
    assert not [p for p in tmp_path.rglob(".ddpm-fast-probe-*")]


def test_os_errors_are_one_line(tiny_run, tmp_path, monkeypatch, capsys):
    """A PermissionError, a full disk, ...: OSErrors beyond FileNotFoundError were tracebacks."""
    from ddpm_fast import cli

    def save_npz(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("ddpm_fast.images.save_npz", save_npz)
    assert cli.main(["sample", "--checkpoint", str(tiny_run), "--out", str(tmp_path / "s"), "-n", "2",
                     "--steps", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.replace("\r", "\n").strip()  # after the progress bar
    assert err.splitlines()[-1] == "ddpm-fast sample: error: [Errno 28] No space left on device"
    assert "Traceback" not in err
    assert not (tmp_path / "s" / "samples.png").exists()  # the data first: no new grid without it


def test_ctrl_c_in_sample_is_one_line_and_exit_130(tiny_run, tmp_path, monkeypatch, capsys):
    from ddpm_fast import distributed

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(distributed, "sample_sharded", interrupted)
    assert main(["sample", "--checkpoint", str(tiny_run), "--out", str(tmp_path / "s"), "-n", "2"]) == 130
    assert capsys.readouterr().err.strip() == "ddpm-fast sample: interrupted"
    assert not (tmp_path / "s" / "samples.npz").exists()


def test_sigterm_is_handled_as_ctrl_c_is_and_only_while_a_command_runs(tiny_run, tmp_path, monkeypatch, capsys):
    """SIGTERM (timeout, docker stop, a batch system) ended the process at once,
    without a word; now one line and exit status 143. The handler is put back after."""
    import os
    import signal

    from ddpm_fast import distributed

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("SIGTERM did not stop the command")

    def not_caught(signum, frame):  # else SIGTERM's default action would end the test run itself
        pytest.fail("SIGTERM reached the handler from before the command: the command did not catch it")

    monkeypatch.setattr(distributed, "sample_sharded", terminated)
    before = signal.signal(signal.SIGTERM, not_caught)
    try:
        assert main(["sample", "--checkpoint", str(tiny_run), "--out", str(tmp_path / "s"), "-n", "2"]) == 143
        assert signal.getsignal(signal.SIGTERM) is not_caught
    finally:
        signal.signal(signal.SIGTERM, before)
    assert capsys.readouterr().err.strip() == "ddpm-fast sample: terminated (SIGTERM)"


def test_a_second_sigterm_ends_the_process_at_once():
    """The handler runs only between bytecodes: a rank stuck in a collective
    would ignore every further SIGTERM if the first left it installed."""
    import signal

    from ddpm_fast.cli_signals import Terminated, catch_sigterm, restore_sigterm

    previous = catch_sigterm()  # under pytest SIGTERM's handler is SIG_DFL already: install ours first
    try:
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        with pytest.raises(Terminated):
            signal.raise_signal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        restore_sigterm(previous)


@pytest.mark.parametrize("sent, code, what", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated (SIGTERM)")])
def test_ctrl_c_in_train_names_the_intact_checkpoint(tmp_path, toy_npz, sent, code, what):
    """A real SIGINT (or SIGTERM, which ended the process without a word)
    mid-run: exit status 130 (143), one line naming the newest checkpoint (it
    loads), and the same command resumes from it."""
    import os
    import signal
    import time

    from ddpm_fast.checkpoint import latest_checkpoint
    from ddpm_fast.pretrained import load_model

    out = tmp_path / "run"
    args = ["train", "--data", str(toy_npz), "--out", str(out), "--model", "tiny", "--steps", "100000", "--batch-size", "8",
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
        process.send_signal(getattr(signal, sent))
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:  # never leave the run behind
            process.kill()
            process.wait()
    assert process.returncode == code, err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    ckpt = latest_checkpoint(out)
    assert "Traceback" not in err
    assert last.startswith(f"ddpm-fast train: {what} at step ")
    assert last.endswith(f"the newest checkpoint, {ckpt}, is intact: run the same command to continue from it")
    for weights in ("ema", "model"):
        load_model(ckpt, weights=weights)  # loads: whole files, the right shapes


def test_ctrl_c_in_a_run_started_with_no_resume_says_to_add_resume(toy_npz, tmp_path, monkeypatch, capsys):
    """The same --no-resume command would start afresh and replace the checkpoint it names."""
    import ddpm_fast.train
    from ddpm_fast.checkpoint import write_checkpoint

    def train(self, **kwargs):  # a checkpoint, then Ctrl-C
        self.step = 3
        write_checkpoint(self.out_dir, 3, {"config.json": lambda p: p.write_text("{}")})
        raise KeyboardInterrupt

    monkeypatch.setattr(ddpm_fast.train.Trainer, "train", train)
    out = tmp_path / "run"
    assert main(["train", "--data", str(toy_npz), "--out", str(out), "--model", "tiny", "--batch-size", "8",
                 "--timesteps", "20", "--no-resume", "--device", "cpu"]) == 130
    assert capsys.readouterr().err.strip() == (
        f"ddpm-fast train: interrupted at step 3; the newest checkpoint, {out / 'checkpoint-00000003'}, is intact: "
        "run the same command with --resume to continue from it")


def test_ctrl_c_in_the_demo_names_the_checkpoint_of_its_run(tmp_path, monkeypatch, capsys):
    """The demo trains in OUT/run: its checkpoint is there, not in OUT itself."""
    import ddpm_fast.demo
    from ddpm_fast.checkpoint import write_checkpoint

    def run_demo(out, **kwargs):
        write_checkpoint(Path(out) / "run", 5, {"config.json": lambda p: p.write_text("{}")})
        raise KeyboardInterrupt

    monkeypatch.setattr(ddpm_fast.demo, "run_demo", run_demo)
    assert main(["demo", "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == (
        f"ddpm-fast demo: interrupted; the newest checkpoint, {tmp_path / 'run' / 'checkpoint-00000005'}, is intact: "
        "run the same command to continue from it")


@pytest.mark.parametrize("raised", [
    RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                 "[127.0.0.1]:61652. This is typically caused by a remote worker crashing. Check the logs of the "
                 "remote worker before reporting an error. GLHF!"),
    getattr(torch.distributed, "DistError", RuntimeError)("NCCL communicator was aborted on rank 1"),
], ids=["gloo", "DistError"])
def test_a_rank_whose_peer_stopped_says_so_in_one_line(tmp_path, monkeypatch, capsys, raised):
    """When one rank stopped on its own error (printed in one line), its peers
    printed 25 lines of traceback ending in gloo's "Connection closed by peer"."""
    from ddpm_fast import cli_sample

    def load(args, device):  # the sample command's first collective, say
        raise raised

    monkeypatch.setattr(cli_sample, "_load_on_every_rank", load)
    assert main(["sample", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "s"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpm-fast sample: error: another rank stopped, so this one cannot go on (that rank's "
                          "message says why): ") and "\n" not in err, err
    raised = RuntimeError("a bug")
    with pytest.raises(RuntimeError, match="a bug"):  # any other RuntimeError stays a traceback
        main(["sample", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "s"), "--device", "cpu"])


def test_a_missing_optional_package_is_one_line(tmp_path, monkeypatch, capsys):
    """An ImportError (a diffusers folder without diffusers installed, say) is a setup problem, not a traceback."""
    import ddpm_fast.pretrained

    def load_model(*args, **kwargs):
        raise ImportError("loading a diffusers folder needs diffusers: pip install diffusers")

    monkeypatch.setattr(ddpm_fast.pretrained, "load_model", load_model)
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")  # a diffusers pipeline folder, as far as the CLI looks
    assert main(["sample", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "s"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == (
        "ddpm-fast sample: error: loading a diffusers folder needs diffusers: pip install diffusers")


def test_out_of_memory_says_to_lower_the_batch_size(tiny_run, tmp_path, monkeypatch, capsys):
    from ddpm_fast import distributed

    def sample_sharded(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore details")

    monkeypatch.setattr(distributed, "sample_sharded", sample_sharded)
    assert main(["sample", "--checkpoint", str(tiny_run), "--out", str(tmp_path / "s"), "--batch-size", "4096"]) == 2
    assert capsys.readouterr().err.strip() == (
        "ddpm-fast sample: error: out of memory (CUDA out of memory. Tried to allocate 20.00 GiB more details): "
        "lower --batch-size")


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])  # the default's value, given, too
def test_variance_with_eta_is_refused_before_anything_runs(tmp_path, capsys, variance):
    """With --eta the chain is DDIM's, whose variance eta sets: --variance did
    nothing (the samples were byte-identical either way), silently."""
    argv = ["sample", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "s"), "--eta", "0",
            "--variance", variance]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "ddpm-fast sample: error: --variance sets the DDPM chain's variance; with --eta (DDIM) eta sets it: "
        "pass one of the two")
    assert not (tmp_path / "s").exists()


def test_out_of_memory_in_the_demo_names_its_own_option(tmp_path, monkeypatch, capsys):
    """The demo has no --batch-size, which the advice named."""
    import ddpm_fast.demo

    def run_demo(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 24.00 GiB")

    monkeypatch.setattr(ddpm_fast.demo, "run_demo", run_demo)
    assert main(["demo", "--out", str(tmp_path), "--samples", "100000000"]) == 2
    assert capsys.readouterr().err.strip().endswith("): lower --samples")


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


def test_the_demo_under_torchrun_says_it_runs_in_one_process(tmp_path, monkeypatch, capsys):
    """Its ranks each took the run folder's lock: rank 1 reported another
    process training there (its sibling), and torchrun then killed rank 0."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["demo", "--out", str(tmp_path / "d"), "--steps", "1", "--samples", "2", "--sample-steps", "1"]) == 2
    assert capsys.readouterr().err.strip() == ("ddpm-fast demo: error: demo runs in one process: start it without "
                                               "torchrun (train, sample and bpd run distributed)")
    assert not (tmp_path / "d").exists()


def test_warnings_are_one_line(tiny_run, toy_npz):
    """Python's own format adds the file, line and source line of the warning."""
    argv = [sys.executable, "-m", "ddpm_fast", "train", "--data", str(toy_npz), "--out", str(tiny_run), "--model",
            "tiny", "--steps", "2", "--batch-size", "8", "--timesteps", "20", "--warmup", "2", "--no-flip",
            "--device", "cpu"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [l for l in done.stderr.replace("\r", "\n").splitlines() if "warn" in l]
    assert lines == [f"ddpm-fast train: warning: the run in {tiny_run} is already at step 4, beyond steps=2: "
                     "nothing to train"]


def test_a_checkpoint_without_its_schedule_is_one_line(tiny_run, tmp_path, capsys):
    """A hand-edited config.json without "schedule": a KeyError traceback before."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_run / "checkpoint-00000004", ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    del config["schedule"]
    (ckpt / "config.json").write_text(json.dumps(config))
    assert main(["sample", "--checkpoint", str(ckpt), "--out", str(tmp_path / "s"), "-n", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpm-fast sample: error:") and "has no usable noise schedule" in err and "\n" not in err


# Why: JSON nested too deeply (a hostile or broken file of a few KB) raised a
# RecursionError, in the decoder or in from_config's respace_of: a traceback.
@pytest.mark.parametrize("nesting", ["json", "respace_of"])
def test_a_config_nested_too_deeply_is_one_line(tiny_run, tmp_path, capsys, nesting):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_run / "checkpoint-00000004", ckpt)
    if nesting == "json":
        (ckpt / "config.json").write_text("[" * 100_000 + "]" * 100_000)
        said = "cannot read"
    else:
        config = json.loads((ckpt / "config.json").read_text())
        for _ in range(900):  # (json.dumps itself recurses: not much deeper)
            config["schedule"] = {"respace_of": config["schedule"], "timesteps": [0]}
        (ckpt / "config.json").write_text(json.dumps(config))
        said = "recursion"
    # Python's default limit, as in a fresh `ddpm-fast` process: inductor raises it
    # to 2000 for good, so after a test that compiled in this worker the 900
    # levels fitted, the samples were made, and this test failed.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    try:
        code = main(["sample", "--checkpoint", str(ckpt), "--out", str(tmp_path / "s"), "-n", "2"])
    finally:
        sys.setrecursionlimit(limit)
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpm-fast sample: error:") and said in err and "\n" not in err, err[-500:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where the cuda backend cannot run")
def test_a_backend_the_environment_forces_but_cannot_run_is_one_line(tiny_run, tmp_path, monkeypatch, capsys):
    """DDPM_FAST_BACKEND=cuda on a CPU-only machine: `sample` gave a raw
    RuntimeError traceback, and `info` (which diagnoses the setup) crashed."""
    monkeypatch.setenv("DDPM_FAST_BACKEND", "cuda")
    assert main(["sample", "--checkpoint", str(tiny_run), "--out", str(tmp_path / "s"), "-n", "2", "--steps", "2",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpm-fast sample: error:") and "\n" not in err
    assert "backend 'cuda' is unavailable for cpu tensors" in err and "chosen by DDPM_FAST_BACKEND" in err
    assert main(["info"]) == 1
    assert "auto backend on cpu: unavailable:" in capsys.readouterr().out


def test_out_of_memory_in_training_names_every_option_that_sets_memory(toy_npz, tmp_path, capsys, monkeypatch):
    """A huge --image-size ran out of memory with the advice to lower
    --batch-size alone (the CPU allocator's error: 'can't allocate memory').
    (Where the memory left is known the data loader refuses it first, with the
    sizes: tests/test_memory.py. Here it is not, as on a platform without /proc.)"""
    from ddpm_fast import _memory

    monkeypatch.setattr(_memory, "available_memory", lambda: None)
    assert main(["train", "--data", str(toy_npz), "--out", str(tmp_path / "r"), "--model", "tiny",
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


def test_a_path_the_terminal_cannot_encode_is_escaped_not_an_error(tiny_run, tmp_path):
    """An ASCII (or Latin-1, ...) stdout and a path outside it: the samples were
    written, then printing their path raised UnicodeEncodeError, reported as
    "error: 'ascii' codec can't encode ..." with exit status 2."""
    out = tmp_path / "échantillons"
    done = subprocess.run([sys.executable, "-m", "ddpm_fast", "sample", "--checkpoint", str(tiny_run), "--out",
                           str(out), "-n", "2"], capture_output=True, timeout=300,
                          env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert (out / "samples.npz").is_file()
    assert done.stdout.decode("ascii").strip() == (f"wrote 2 samples to {tmp_path}/\\xe9chantillons/samples.npz and "
                                                   f"{tmp_path}/\\xe9chantillons/samples.png")


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    """``ddpm-fast info | head -1``: "ddpm-fast info: error: [Errno 32] Broken
    pipe" (and Python's "Exception ignored ... BrokenPipeError" at exit) on the
    terminal. Now, as for other tools, nothing; the status is 1."""
    err = tmp_path / "err"
    done = subprocess.run(["bash", "-c", f"'{sys.executable}' -m ddpm_fast info 2>'{err}' | true; "
                           "echo ${PIPESTATUS[0]}"], capture_output=True, text=True, timeout=300)
    assert (done.stdout.strip(), err.read_text()) == ("1", "")


@pytest.mark.parametrize("closed,command,status", [
    (">&-", ["info"], 0),  # its first print raised: status 1
    ("2>&-", ["sample", "--checkpoint", "missing", "--out", "out"], 2),  # its error message raised: status 1
])
def test_a_closed_stdout_or_stderr_leaves_the_command_its_status(tmp_path, closed, command, status):
    line = " ".join([f"'{sys.executable}'", "-m", "ddpm_fast", *command, closed])
    done = subprocess.run(["bash", "-c", f"{line}; echo $?"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.stdout.splitlines()[-1:] == [str(status)], done


def test_closed_std_streams_become_dev_null_on_their_own_descriptors(tmp_path):
    """So that no file the command opens takes descriptor 1 or 2, where C++
    code writing to stdout or stderr would write into it."""
    found = tmp_path / "found.json"
    script = ("import json, os, sys; from ddpm_fast import cli; cli._replace_closed_std_streams(); "
              "print('dropped'); sys.stderr.write('dropped'); fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT); "
              "os.write(fd, json.dumps([os.readlink(f'/proc/self/fd/{i}') for i in (1, 2)] + [fd]).encode())")
    done = subprocess.run(["bash", "-c", f"'{sys.executable}' -c \"{script}\" '{found}' >&- 2>&-"], timeout=300)
    assert done.returncode == 0
    one, two, fd = json.loads(found.read_text())
    assert (one, two) == (os.devnull, os.devnull) and fd > 2


def test_sample_refuses_a_disk_too_full_for_its_samples_before_sampling(tiny_run, tmp_path, monkeypatch, capsys):
    """A full disk was found only when samples.npz was written, after the whole run."""
    import shutil

    from ddpm_fast.sampler import Sampler

    seen = []

    def usage(path):
        seen.append(Path(path))
        return shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    monkeypatch.setattr(Sampler, "sample", lambda *a, **k: pytest.fail("sampling began"))
    assert main(["sample", "--checkpoint", str(tiny_run), "--out", str(tmp_path / "new" / "out"), "-n", "20",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"--out {tmp_path / 'new' / 'out'}: samples.npz of 20 samples needs 1.2 KiB of disk, and "
                        f"{tmp_path} has 1000 bytes free"), err
    assert seen == [tmp_path]  # the nearest folder that exists


def test_sample_goes_on_where_the_free_space_cannot_be_read(tiny_run, tmp_path, monkeypatch):
    import shutil

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shutil, "disk_usage", unreadable)
    assert main(["sample", "--checkpoint", str(tiny_run), "--out", str(tmp_path), "-n", "2", "--steps", "2",
                 "--device", "cpu"]) == 0
