"""The ``ddpm-fast`` command line: ``train``, ``sample``, ``bpd``, ``fid``, ``demo`` and ``info``.

Every command prints a clear one-line error and exits with status 2 on bad
arguments or unusable inputs (missing data, corrupt checkpoints, ...).
Run ``ddpm-fast COMMAND --help`` for each command's options.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path
from typing import NoReturn, Sequence

import torch

from . import __version__
from ._checks import is_out_of_memory
from .checkpoint import CheckpointError
from . import cli_options as options
from .cli_options import UsageError
from .cli_fid import fid_command as _fid
from .cli_sample import DTYPES, VARIANCE_DEFAULT, bpd_command as _bpd, sample_command as _sample
from .cli_signals import catch_sigterm, restore_sigterm, stopped
from .cli_warnings import format_warnings, restore_warnings
from .images import GRID_SAMPLES
from .ops import BackendUnavailableError

MODELS = ("tiny", "small", "cifar10")


class RunFailed(Exception):
    """A run that stopped on its own, for a reason it states (non-finite losses):
    reported in one line, exit status 1."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during a run: reported in one line, exit status 130 or 143."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------- commands


def _info(args: argparse.Namespace) -> int:
    from .selfcheck import report

    return report()


def _build_model(args: argparse.Namespace, channels: int, image_size: int):
    from .models import UNet

    overrides = {"dropout": args.dropout} if args.dropout is not None else {}
    if args.dropout is not None and not 0 <= args.dropout < 1:  # NaN fails too
        raise UsageError(f"--dropout must lie in [0, 1), got {args.dropout}")
    if args.model == "cifar10":
        if (channels, image_size) != (3, 32):
            raise UsageError(f"--model cifar10 takes 3x32x32 images; the data has {channels}x{image_size}x{image_size}")
        return UNet.ddpm_cifar10(**overrides)
    preset = UNet.tiny if args.model == "tiny" else UNet.small
    try:
        return preset(image_size=image_size, in_channels=channels, **overrides)
    except ValueError as error:
        raise UsageError(f"--model {args.model} cannot take {channels}x{image_size}x{image_size} images ({error}); "
                         "resize them with --image-size") from None


def _train(args: argparse.Namespace) -> int:
    from . import distributed
    from .data import load_dataset
    from .schedules import NoiseSchedule
    from .train import NonFiniteLossError, TrainConfig, Trainer

    device = distributed.setup(args.device)
    trainer = None
    try:
        rank, world = distributed.rank_and_world()
        distributed.run_on_rank0(lambda: options.check_output_folder(args.out, files=("samples.png", "loss.png", "log.jsonl", "latest")))
        data = Path(args.data).resolve()
        if args.data != "digits" and data.is_dir() and Path(args.out).resolve().is_relative_to(data):  # (the bundled set)
            raise UsageError(f"--out {args.out} lies inside --data {args.data}: the run's own images (sample "
                             "grids, the loss curve) would become training data; put the run elsewhere")
        dataset = load_dataset(args.data, image_size=args.image_size, channels=args.channels, progress=rank == 0)
        config = options.option_errors(TrainConfig)(
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
            weight_decay=args.weight_decay, grad_clip=args.grad_clip, ema_decay=args.ema_decay,
            flip=args.flip if args.flip is not None else _default_flip(args),
            precision=args.precision, loss=args.loss, seed=args.seed,
            log_every=args.log_every, sample_every=args.sample_every, sample_steps=args.sample_steps,
            checkpoint_every=args.checkpoint_every, channels_last=args.channels_last, compile=args.compile,
        )
        schedule = NoiseSchedule(args.schedule, timesteps=args.timesteps)
        torch.manual_seed(args.seed)  # the model's initial weights (and the dropout after them), as the demo
        model = _build_model(args, dataset.channels, dataset.image_size)
        if world > 1:  # each rank its own dropout masks (with one seed, every rank drew the same ones)
            torch.manual_seed(distributed.rank_seed(args.seed, rank))
        trainer = Trainer(model, dataset, schedule, config, args.out, device=device,
                          extra_config={"data": _data_record(args.data)})
        summary = trainer.train(resume=args.resume)
    except KeyboardInterrupt as stop:
        distributed.teardown(failed=True)
        raise _interrupted_run(args.out, trainer, args.resume, stop) from None
    except NonFiniteLossError as error:
        distributed.teardown(failed=True)
        raise RunFailed(str(error)) from None
    except BaseException:
        distributed.teardown(failed=True)
        raise
    distributed.teardown()
    if trainer.rank == 0:
        print(f"trained to step {summary['steps']}; run folder {summary['out_dir']}")
    return 0


def _default_flip(args: argparse.Namespace) -> bool:
    """--flip unset: a run being resumed keeps its own setting (runs of --data
    digits made before flips defaulted off there had them on); a new run flips,
    except the bundled digits (by name, not a dataset that happens to be called
    so), whose mirror images are no digits."""
    from .checkpoint import resume_order

    # In the order the resume tries them, past damaged ones (read from the newest
    # alone, a damaged one gave the digits' off, and the older one the resume
    # fell back to was refused as a run of other settings).
    for checkpoint in resume_order(args.out) if args.resume and Path(args.out).is_dir() else []:
        try:
            saved = json.loads((checkpoint / "config.json").read_text())["train"]["flip"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError):  # (JSON nested too deeply)
            continue  # resuming says what is wrong with the checkpoint
        if isinstance(saved, bool):
            return saved
    return args.data != "digits"


def _interrupted_run(out: str, trainer, resume: bool, stop: KeyboardInterrupt) -> Interrupted:
    """What a Ctrl-C (or SIGTERM) during training leaves: checkpoints are written
    whole or not at all, so the newest one is intact and the same command resumes it."""
    from .checkpoint import latest_checkpoint

    what, code = stopped(stop)
    at = f" at step {trainer.step}" if trainer is not None else ""
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        return Interrupted(f"{what}{at}, before the first checkpoint: nothing to resume in {out}", code)
    again = "the same command" if resume else "the same command with --resume"
    return Interrupted(f"{what}{at}; the newest checkpoint, {ckpt}, is intact: run {again} to continue from it", code)


def _data_record(spec: str) -> str:
    """--data as a run records it: a path made absolute, so that resuming from
    another folder, or with the path written as ./x, is not taken for a resume
    on other data; "digits" as it is."""
    return spec if spec == "digits" else os.path.abspath(spec)


def _demo(args: argparse.Namespace) -> int:
    from . import distributed
    from .demo import run_demo

    if distributed.launched_world_size() > 1:  # its ranks would each take the run folder's lock: one fails
        raise UsageError("demo runs in one process: start it without torchrun (train, sample and bpd run distributed)")
    options.check_output_folder(args.out, files=("samples.png", "samples.npz", "loss.png"))
    try:
        summary = options.option_errors(run_demo)(args.out, steps=args.steps, samples=args.samples, sample_steps=args.sample_steps,
                           seed=args.seed, progress=True)
    except KeyboardInterrupt as stop:
        raise _interrupted_run(str(Path(args.out) / "run"), None, True, stop) from None
    print(summary)
    return 0


# ------------------------------------------------------------------ parser


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=options.device, default=None, help="cpu, cuda or cuda:K (default: cuda if available, else cpu)")


class _Parser(argparse.ArgumentParser):
    """Argument errors in one line, as every other error (argparse prints the
    whole usage first); its subcommands' parsers are of this class too."""

    # A subcommand's parser names its own unknown arguments: argparse hands them
    # up to the top level, whose error pointed at `ddpm-fast --help`, which
    # does not list the subcommand's options.
    rejects_unknown = False

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None,
                         ) -> tuple[argparse.Namespace, list[str]]:
        parsed, unknown = super().parse_known_args(args, namespace)
        if unknown and self.rejects_unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return parsed, unknown


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ddpm-fast", description="DDPM training, sampling and evaluation on fused kernels.")
    parser.add_argument("--version", action="version", version=f"ddpm_fast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="environment, backends, and a self-check of each backend")
    info.set_defaults(run=_info)

    train = commands.add_parser("train", help="train a U-Net on a dataset (resumes the run in --out)")
    train.add_argument("--data", required=True, type=options.path, help="'digits' (bundled), a folder of images, a CIFAR-10 python folder/archive, or a .npy/.npz file")
    train.add_argument("--out", required=True, type=options.path, help="run folder: checkpoints, log.jsonl, loss.png, samples")
    train.add_argument("--model", choices=MODELS, default="small", help="U-Net preset (default: small)")
    train.add_argument("--image-size", type=options.positive, default=None, help="resize/crop the data to this size")
    train.add_argument("--channels", type=int, choices=(1, 3), default=None, help="convert the data to 1 or 3 channels")
    train.add_argument("--dropout", type=float, default=None, help="dropout of the U-Net (default: the preset's)")
    train.add_argument("--schedule", default="linear", help="beta schedule: linear, cosine, quad, ... (default: linear)")
    train.add_argument("--timesteps", type=options.positive, default=1000, help="diffusion steps T (default: 1000)")
    train.add_argument("--steps", type=options.positive, default=100_000, help="training steps (default: 100000)")
    train.add_argument("--batch-size", type=options.positive, default=128, help="global batch size (default: 128)")
    train.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default: 2e-4)")
    train.add_argument("--warmup", type=options.non_negative, default=5000, help="learning-rate warm-up steps (default: 5000)")
    train.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0, plain Adam)")
    train.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip (default: 1.0)")
    train.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay (default: 0.9999, warmed up)")
    train.add_argument("--flip", action=options.OnOff, default=None, help="random horizontal flips (default: a resumed run's own setting; else on, but off for --data digits, whose mirror images are no digits)")
    train.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast precision (default: fp32)")
    train.add_argument("--loss", choices=("simple", "vlb", "hybrid"), default="simple", help="training loss: simple (MSE on eps), vlb (one sampled bound term per image), hybrid (simple + 0.001 x T x that term; see the README) (default: simple)")
    train.add_argument("--seed", type=options.seed_below(63), default=0, help="run seed, below 2^63 (default: 0)")
    train.add_argument("--log-every", type=options.positive, default=100, help="log every N steps (default: 100)")
    train.add_argument("--sample-every", type=options.non_negative, default=0, help="EMA sample grid every N steps (default: 0, only at the end)")
    train.add_argument("--sample-steps", type=options.positive, default=None, help="respaced steps for sample grids (default: all T)")
    train.add_argument("--checkpoint-every", type=options.positive, default=5000, help="checkpoint every N steps (default: 5000)")
    train.add_argument("--channels-last", action=options.OnOff, default=True,
                       help="train in channels_last memory format: faster convolutions (default: on)")
    train.add_argument("--compile", action=options.OnOff, default=False,
                       help="torch.compile the model: the first step compiles, later ones run faster on a GPU (default: off)")
    train.add_argument("--resume", action=options.OnOff, default=True, help="continue the run in --out if it has a checkpoint (default: on)")
    _add_device(train)
    train.set_defaults(run=_train)

    sample = commands.add_parser("sample", help="draw samples from a checkpoint into samples.png and samples.npz")
    sample.add_argument("--checkpoint", required=True, type=options.path, help="a run folder, checkpoint-* folder, UNet.save_pretrained folder or diffusers UNet2DModel/pipeline folder")
    sample.add_argument("--out", required=True, type=options.path, help="output folder for samples.png and samples.npz (key 'images', uint8 NxHxWxC); files of those names there are replaced")
    sample.add_argument("-n", type=options.positive, default=64, help="number of samples (default: 64)")
    sample.add_argument("--batch-size", type=options.positive, default=256, help="samples per batch (default: 256)")
    sample.add_argument("--grid", type=options.positive, default=GRID_SAMPLES,
                        help=f"samples.png shows the first N samples (default: {GRID_SAMPLES}); samples.npz holds all")
    sample.add_argument("--steps", type=options.positive, default=None, help="respace the chain to this many steps (default: all T)")
    sample.add_argument("--eta", type=float, default=None, help="DDIM with this eta (0: deterministic; default: ancestral DDPM)")
    sample.add_argument("--variance", choices=("fixed_large", "fixed_small"), default=VARIANCE_DEFAULT,
                        help="the DDPM chain's variance (default: a diffusers pipeline's variance_type, else fixed_large; "
                             "not with --eta, whose DDIM chain eta sets)")
    sample.add_argument("--clip", action=options.OnOff, default=None,
                        help="clip predicted x0 to [-1, 1] (default: a diffusers pipeline's clip_sample, else on)")
    sample.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights of our checkpoints (default: ema)")
    sample.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                        help="model precision (default: auto, bf16 on a CUDA GPU of compute capability 8.0 or newer, else fp32)")
    sample.add_argument("--channels-last", action=options.OnOff, default=True,
                        help="run the model channels_last: faster convolutions (default: on)")
    sample.add_argument("--seed", type=options.seed_below(64), default=0, help="seed, below 2^64 (default: 0); sample i is the same for any batch size")
    _add_device(sample)
    sample.set_defaults(run=_sample)

    bpd = commands.add_parser("bpd", help="negative log-likelihood bound (bits/dim) of a dataset under a checkpoint")
    bpd.add_argument("--checkpoint", required=True, type=options.path, help="a run folder, checkpoint-* folder or model folder")
    bpd.add_argument("--data", required=True, type=options.path, help="dataset, as for train")
    bpd.add_argument("--image-size", type=options.positive, default=None, help="resize/crop the data to this size")
    bpd.add_argument("--channels", type=int, choices=(1, 3), default=None, help="convert the data to 1 or 3 channels")
    bpd.add_argument("-n", type=options.positive, default=None, help="evaluate the first N images (default: all)")
    bpd.add_argument("--batch-size", type=options.positive, default=256, help="images per batch (default: 256)")
    bpd.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights of our checkpoints (default: ema)")
    bpd.add_argument("--seed", type=options.seed_below(64), default=0, help="seed of the evaluation noise, below 2^64 (default: 0)")
    bpd.add_argument("--json", action="store_true", help="print the full result (total and every term) as JSON")
    bpd.add_argument("--channels-last", action=options.OnOff, default=True,
                     help="run the model channels_last: faster convolutions (default: on)")
    _add_device(bpd)
    bpd.set_defaults(run=_bpd)

    fid = commands.add_parser("fid", help="Frechet Inception Distance between samples and a dataset (Inception weights supplied by you)")
    fid.add_argument("--samples", required=True, type=options.path, help="samples: .npz with key 'images' (uint8 NxHxWxC, as written by sample) or 'arr_0' (as np.savez(file, images) writes it), .npy, or a folder of image files of one size")
    fid.add_argument("--data", required=True, type=options.path, help="dataset, as for train, or an .npz of its Inception statistics mu and sigma (from --save-stats, or pytorch-fid's)")
    fid.add_argument("--save-stats", type=options.path, default=None, help="also write --data's Inception statistics (mu, sigma) to this .npz, to pass as --data next time (default: none)")
    fid.add_argument("--image-size", type=options.positive, default=None, help="resize/crop the data to this size (for images of several sizes)")
    fid.add_argument("--inception-weights", type=options.path, default=None, help="path of pt_inception-2015-12-05-6726825d.pth (pytorch-fid's release; never downloaded) (default: $DDPM_FAST_INCEPTION_WEIGHTS)")
    fid.add_argument("-n", type=options.positive, default=None, help="use the first N images of each set (default: all of each)")
    fid.add_argument("--batch-size", type=options.positive, default=50, help="images per Inception batch (default: 50)")
    fid.add_argument("--method", choices=("sqrtm", "eigh"), default="sqrtm", help="matrix square root: scipy sqrtm as the reference FID code, or the same trace by symmetric eigensolvers, faster (default: sqrtm)")
    _add_device(fid)
    fid.set_defaults(run=_fid)

    demo = commands.add_parser("demo", help="train a small model on the bundled 8x8 digits and sample from it (minutes on a CPU)")
    demo.add_argument("--out", required=True, type=options.path, help="output folder: samples.png, samples.npz, loss.png and the run")
    demo.add_argument("--steps", type=options.positive, default=None, help="training steps (default: the demo recipe's)")
    demo.add_argument("--samples", type=options.positive, default=100,
                      help="number of samples, drawn in one batch: at most 10000 (default: 100)")
    demo.add_argument("--sample-steps", type=options.positive, default=None, help="respaced sampling steps (default: 250 of the 1000)")
    demo.add_argument("--seed", type=options.seed_below(63), default=0, help="seed, below 2^63 (default: 0)")
    demo.set_defaults(run=_demo)
    for command in commands.choices.values():
        command.rejects_unknown = True
    return parser


def _lost_a_peer(error: RuntimeError) -> bool:
    """Whether a collective failed because another rank went away (stopped on
    its own error, or killed): gloo says so in a plain RuntimeError, NCCL and
    the store raise torch.distributed's DistError."""
    import torch.distributed as dist

    text = str(error)
    return (isinstance(error, getattr(dist, "DistError", ())) or "Connection closed by peer" in text
            or "Connection reset by peer" in text)


def _one_line(error: BaseException) -> str:
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text or type(error).__name__


# What sets a command's memory: a huge --image-size or --timesteps runs out as
# surely as a large batch.
_MEMORY_OPTIONS = {
    "demo": "--samples",  # its training recipe is fixed; it samples all at once
    "train": "--batch-size, --image-size, --timesteps or --model",
    "bpd": "--batch-size or --image-size",
    "fid": "--batch-size or --image-size",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prefix = f"ddpm-fast {args.command}"
    # Its on values as setup.py reads them (where a misspelling is an error; here, off)
    debug = os.environ.get("DDPM_FAST_DEBUG", "").strip().lower() in ("1", "true", "yes", "y", "on")
    # One line per warning, as errors are, not Python's file:line and source line
    previous_prefix = None if debug else format_warnings(prefix)
    sigterm = catch_sigterm()
    try:
        return args.run(args)
    except Interrupted as error:
        if debug:
            raise
        message, code = f"{prefix}: {_one_line(error)}", error.code
    except KeyboardInterrupt as error:
        if debug:
            raise
        what, code = stopped(error)
        message = f"{prefix}: {what}"
    except RunFailed as error:
        if debug:
            raise
        message, code = f"{prefix}: error: {_one_line(error)}", 1
    except BrokenPipeError:  # stdout's reader went away (ddpm-fast info | head -1): as other tools, quietly
        if debug:
            raise
        return 1
    except (UsageError, CheckpointError, OSError, ValueError, TypeError, ImportError, BackendUnavailableError,
            RecursionError) as error:
        # OSError: a --out that is not writable, a full disk, ... (FileNotFoundError included);
        # BackendUnavailableError (a RuntimeError): a setting (DDPM_FAST_BACKEND), not a failure;
        # RecursionError (a RuntimeError): a file's config nested too deeply (a schedule's respace_of)
        if debug:
            raise
        message, code = f"{prefix}: error: {_one_line(error)}", 2
    except RuntimeError as error:
        lost_a_peer = _lost_a_peer(error)
        if debug or not (lost_a_peer or is_out_of_memory(error)):
            raise
        if lost_a_peer:  # that rank printed why, in one line; this one's traceback said nothing more
            message = (f"{prefix}: error: another rank stopped, so this one cannot go on (that rank's message says "
                       f"why): {_one_line(error)[:200]}")
            code = 1
        else:
            advice = _MEMORY_OPTIONS.get(args.command, "--batch-size")
            message, code = f"{prefix}: error: out of memory ({_one_line(error)[:200]}): lower {advice}", 2
    finally:
        if not debug:
            restore_warnings(previous_prefix)
        restore_sigterm(sigterm)
    # Printed once the error and its frames are gone: a progress bar still open
    # in them (bits/dim, inception) closes then, on its own line, not after the message.
    sys.stderr.flush()
    print(message, file=sys.stderr)
    return code


def _replace_closed_std_streams() -> None:
    """stdout or stderr closed by the caller (``ddpm-fast info >&-``): Python
    makes it None, and the command's first print, progress bar or flush raised
    (an AttributeError's traceback and status 1 in place of the command's own).
    /dev/null takes its place, on its descriptor while that is still free, so
    that no file the command opens gets descriptor 1 or 2 (where C++ code
    writing to stdout or stderr would write into it)."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        if getattr(sys, name) is not None:
            continue
        try:
            os.fstat(fd)
            free = False  # taken since the start (a file an import keeps open): left to it
        except OSError:
            free = True
        null = os.open(os.devnull, os.O_WRONLY)
        if free and null != fd:
            os.dup2(null, fd)
            os.close(null)
            null = fd
        setattr(sys, name, open(null, "w", errors="backslashreplace"))


def entry_point() -> NoReturn:
    """The ``ddpm-fast`` command (and ``python -m ddpm_fast``)."""
    _replace_closed_std_streams()
    # A path that stdout's encoding cannot show (an ASCII or Latin-1 terminal) is
    # escaped, as on stderr: printing where the samples went raised after writing them.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")
    code = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # else Python's own flush at exit says "Exception ignored ... BrokenPipeError"
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = code or 1
    distributed = sys.modules.get(f"{__package__}.distributed")  # imported by every command that can join a group
    if distributed is None:
        sys.exit(code)
    distributed.exit_process(code)


if __name__ == "__main__":
    entry_point()
