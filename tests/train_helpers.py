"""Small models, data and a runnable training script shared by the Trainer tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from ddpm_fast.checkpoint import latest_checkpoint
from ddpm_fast.data import ImageDataset
from ddpm_fast.schedules import NoiseSchedule
from ddpm_fast.train import TrainConfig, Trainer


class TinyEps(nn.Module):
    """A cheap eps-model with the U-Net's interface (conv net + a timestep embedding)."""

    def __init__(self, channels: int = 1, image_size: int = 8, width: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_channels, self.image_size = channels, image_size
        self.config = {"channels": channels, "image_size": image_size, "width": width}
        self.embed = nn.Embedding(1000, width)
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.inp(x) + self.embed(t)[:, :, None, None])
        return self.out(self.drop(torch.nn.functional.silu(self.mid(h))))


def toy_dataset(n: int = 64, channels: int = 1, size: int = 8, seed: int = 0) -> ImageDataset:
    """Blobs of random brightness: structured enough that the loss falls quickly."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centres = torch.randint(2, size - 2, (n, 2), generator=g)
    d2 = (yy[None] - centres[:, :1, None]) ** 2 + (xx[None] - centres[:, 1:, None]) ** 2
    img = (255 * torch.exp(-d2.float() / 4)).round().to(torch.uint8)
    return ImageDataset(img[:, None].expand(n, channels, size, size).contiguous(), name="toy")


def save_toy_npz(path) -> None:
    """toy_dataset(n=32) as a data file the CLI reads: key ``images``, uint8 N x H x W x C."""
    np.savez(path, images=toy_dataset(n=32).images.permute(0, 2, 3, 1).numpy())


def make_trainer(out_dir, steps: int = 6, device: str = "cpu", dropout: float = 0.0, images: int = 64,
                 extra_config: dict | None = None, model: nn.Module | None = None, **overrides) -> Trainer:
    """A Trainer of ``model`` (default: a TinyEps with ``dropout``) on toy data."""
    torch.manual_seed(0)
    values = dict(steps=steps, batch_size=8, lr=1e-3, warmup=2, log_every=1, checkpoint_every=2, seed=3, flip=True,
                  ema_decay=0.9)
    values.update(overrides)
    return Trainer(model if model is not None else TinyEps(dropout=dropout), toy_dataset(n=images), NoiseSchedule("linear", timesteps=100),
                   TrainConfig(**values), out_dir, device=device, progress=False, extra_config=extra_config)


# The fault tests' run: every part of the state a resume must restore matters
# in it. Dropout draws from torch's generator; the learning rate is still
# warming up when it is killed; 24 images of batch 8 make epochs of 3 steps, so
# a resume lands in a later epoch than the first, with its own permutation.
RESUMABLE = dict(dropout=0.3, warmup=6, images=24)


KILL_POINTS = ("mid-files", "publish", "pointer", "prune")


def _kill_inside_checkpoint_write(step: int, point: str) -> None:
    """SIGKILL this process inside the write of checkpoint ``step``, at
    ``point``: ``mid-files`` once its first file is written and synced, before
    the others are written; ``publish`` with every file written, before the
    rename that publishes the folder; ``pointer`` after that rename, before
    ``latest`` names it; ``prune`` while the oldest checkpoint is being deleted.
    (A kill leaves written data in the page cache: what a missing fsync would
    lose only a power cut shows.)"""
    import os
    import shutil
    import signal

    from ddpm_fast import checkpoint, train_checkpoints

    armed, fsyncs = [False], [0]
    real_write, real_fsync, real_replace, real_rmtree = (
        train_checkpoints.write_checkpoint, os.fsync, os.replace, shutil.rmtree)

    def kill_if(reached: bool) -> None:
        if armed[0] and reached:
            os.kill(os.getpid(), signal.SIGKILL)

    def write_checkpoint(run_dir, at_step, *args, **kwargs):
        armed[0] = at_step == step
        try:
            return real_write(run_dir, at_step, *args, **kwargs)
        finally:
            armed[0] = False

    def fsync(fd):
        real_fsync(fd)
        fsyncs[0] += armed[0]
        kill_if(point == "mid-files" and fsyncs[0] == 1)

    def replace(src, dst):
        kill_if(point == "publish" and f"checkpoint-{step:08d}" in str(dst))
        kill_if(point == "pointer" and str(dst).endswith(checkpoint.LATEST))
        return real_replace(src, dst)

    def rmtree(path, *args, **kwargs):
        if armed[0] and point == "prune" and checkpoint._NAME.match(os.path.basename(path)):
            children = sorted(os.listdir(path))
            os.remove(os.path.join(path, children[0]))  # part of it gone, as a kill mid-rmtree leaves it
            kill_if(True)
        return real_rmtree(path, *args, **kwargs)

    # Process-wide: this process exists to be killed.
    train_checkpoints.write_checkpoint, os.fsync, os.replace, shutil.rmtree = write_checkpoint, fsync, replace, rmtree


def run_training(out_dir: str, steps: int, kill_in_write: int | None = None, kill_point: str = "publish") -> None:
    """A run that checkpoints every step, for the fault tests to kill (one thread,
    so that every process computes bitwise alike)."""
    torch.set_num_threads(1)
    if kill_in_write is not None:
        _kill_inside_checkpoint_write(kill_in_write, kill_point)
    make_trainer(out_dir, steps=steps, checkpoint_every=1, **RESUMABLE).train(final_samples=False)


def logged_losses(run: Path) -> list[float]:
    """The loss of each line of a run's log.jsonl."""
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    """The model's and the EMA's weights ('ema.' names) in a run's latest checkpoint."""
    ckpt = latest_checkpoint(run)
    return {**load_file(str(ckpt / "model.safetensors")), **{f"ema.{k}": v for k, v in load_file(str(ckpt / "ema.safetensors")).items()}}
