"""``ddpm-fast sample`` and ``ddpm-fast bpd``: a checkpoint loaded on every
rank (a run folder's newest resolved on rank 0), then a chain of samples or
the bits/dim of a dataset, shared among the ranks."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import cli_options as options
from .cli_options import UsageError

if TYPE_CHECKING:
    from .schedules import NoiseSchedule

__all__ = ["DTYPES", "VARIANCE_DEFAULT", "bpd_command", "sample_command", "sample_dtype"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sample_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The model's dtype for ``sample --dtype``. ``auto``: bfloat16 on a CUDA
    device with native bfloat16 (compute capability 8.0 or newer), where a U-Net
    step runs faster than in float32 (diffusers' CIFAR-10 U-Net on an H100:
    14.0 ms against 23.7) and the samples keep their quality (x_t stays
    float32; the README's Sampler section, "Precision");
    float32 elsewhere: without AMX a CPU's bfloat16 convolutions are slower than
    its float32 ones (the demo's model sampled 7x slower in bfloat16 on a 2-core
    AVX2 VM)."""
    if choice != "auto":
        return DTYPES[choice]
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16
    return torch.float32


class _Default(str):
    """An option's default as argparse gives it where the option is absent: an
    object of its own, told apart (``is``) from the same value given."""


VARIANCE_DEFAULT = _Default("fixed_large")


def sample_command(args: argparse.Namespace) -> int:
    from . import distributed
    from .images import save_grid, save_npz
    from .sampler import Sampler

    if args.eta is not None and args.variance is not VARIANCE_DEFAULT:  # DDIM's variance is eta's: it would do nothing
        raise UsageError("--variance sets the DDPM chain's variance; with --eta (DDIM) eta sets it: pass one of the two")
    device = distributed.setup(args.device)
    try:
        # before sampling: not after a whole run
        distributed.run_on_rank0(lambda: options.check_output_folder(args.out, files=("samples.png", "samples.npz")))
        model, schedule, checkpoint = _load_on_every_rank(args, device)
        variance, clip = _chain_settings(args, checkpoint, rank0=distributed.rank_and_world()[0] == 0)
        dtype = sample_dtype(args.dtype, device)
        model = model.to(dtype)
        if args.channels_last:  # the weights too: else cuDNN converts every conv weight at every step
            model = model.to(memory_format=torch.channels_last)
        sampler = Sampler(model, schedule, variance=variance, clip_denoised=clip, dtype=dtype,
                          channels_last=args.channels_last, device=device)
        if sampler.sample_shape is not None:  # samples.npz: uint8, one byte a value
            need = args.n * math.prod(sampler.sample_shape)
            what = f"samples.npz of {args.n} samples"
            distributed.run_on_rank0(lambda: options.check_free_space(args.out, need, what))
        images = distributed.sample_sharded(sampler, args.n, seed=args.seed, batch_size=args.batch_size,
                                            steps=args.steps, eta=args.eta, progress=True)
    except BaseException:
        distributed.teardown(failed=True)
        raise
    distributed.teardown()
    if images is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        # Each written whole or not at all; the data first: a failure leaves no new grid beside old data.
        save_npz(images, out / "samples.npz")
        save_grid(images[: args.grid], out / "samples.png")
        shown = "" if args.grid >= len(images) else f" (the first {args.grid} of them)"
        print(f"wrote {len(images)} samples to {out / 'samples.npz'} and {out / 'samples.png'}{shown}")
    return 0


def _load_on_every_rank(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, NoiseSchedule, Path]:
    """--checkpoint's model and schedule, and the folder they came from. A run
    folder's newest checkpoint is resolved on rank 0: each rank reading it for
    itself loaded different models when training wrote one meanwhile."""
    from . import distributed
    from .pretrained import load_model, resolve_run_folder

    checkpoint = distributed.run_on_rank0(lambda: resolve_run_folder(args.checkpoint))
    return (*load_model(checkpoint, weights=args.weights, device=device), checkpoint)


def _chain_settings(args: argparse.Namespace, checkpoint: Path, rank0: bool) -> tuple[str, bool]:
    """--variance and --clip, where not given: a diffusers pipeline's own (so
    that its chain is the one DDPMPipeline draws), else fixed_large and clip on."""
    from .pretrained import diffusers_sampling

    pipeline = diffusers_sampling(checkpoint)
    variance = str(args.variance) if args.variance is not VARIANCE_DEFAULT else pipeline.get("variance", str(args.variance))
    clip = args.clip if args.clip is not None else pipeline.get("clip_denoised", True)
    taken = []  # what the pipeline decided (DDIM's variance is eta's: none taken then)
    if pipeline and args.variance is VARIANCE_DEFAULT and args.eta is None:
        taken.append(f"variance {variance}")
    if pipeline and args.clip is None:
        taken.append(f"clip {'on' if clip else 'off'}")
    if taken and rank0:
        print(f"following {pipeline['source']}: {', '.join(taken)} (--variance/--clip override)", file=sys.stderr)
    return variance, clip


def bpd_command(args: argparse.Namespace) -> int:
    from . import distributed
    from .data import load_dataset
    from .evaluate import evaluate_bpd

    device = distributed.setup(args.device)
    try:
        rank = distributed.rank_and_world()[0]  # before teardown, which leaves every rank rank 0 of 1
        model, schedule, _ = _load_on_every_rank(args, device)
        if args.channels_last:  # evaluate_bpd then feeds it channels_last batches
            model = model.to(memory_format=torch.channels_last)
        dataset = load_dataset(args.data, image_size=args.image_size, channels=args.channels, progress=rank == 0)
        result = evaluate_bpd(model, dataset, schedule, n=args.n, batch_size=args.batch_size, seed=args.seed,
                              device=device, progress=True, sharded=True)
    except BaseException:
        distributed.teardown(failed=True)
        raise
    distributed.teardown()
    if rank == 0:
        print(json.dumps(result, indent=2) if args.json else result["summary"])
    return 0
