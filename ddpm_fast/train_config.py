"""The training recipe as data: ``TrainConfig``, its checks, and which of its
fields a resumed run may change. ``ddpm_fast.train`` runs it."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from ._checks import is_int

__all__ = ["TrainConfig", "PRECISIONS", "LOSSES", "RECIPE_VERSION", "RESUMABLE_CHANGES", "LIVE_CHANGES", "check_live_changes"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LOSSES = ("simple", "vlb", "hybrid")
# Recorded in every checkpoint, and raised when a setting comes to mean another
# recipe, so that a resume of a checkpoint from before can tell. 2: the hybrid
# loss weighs L_t by 0.001 * T (1, unrecorded: by 0.001).
RECIPE_VERSION = 2
# TrainConfig fields a resumed run may change: how long it runs, what it
# writes, and how it computes (memory format, compilation: rounding only).
# Every other field changes the training itself (and the optimizer and
# learning-rate state restored from the checkpoint would silently keep the old
# learning rate), so a resume with another value is refused.
RESUMABLE_CHANGES = frozenset({
    "steps", "log_every", "sample_every", "sample_count", "sample_steps", "checkpoint_every",
    "keep_checkpoints", "max_nonfinite", "channels_last", "compile",
})
# The fields a Trainer reads as it runs, which trainer.config may change between
# calls. The rest took effect when it was made (the optimizer's settings, the
# data order, the model's memory format, the checks of the sampling steps):
# edited later, the checkpoints recorded values the training did not use.
LIVE_CHANGES = frozenset({
    "steps", "log_every", "sample_every", "sample_count", "checkpoint_every", "keep_checkpoints", "max_nonfinite",
})


@dataclass
class TrainConfig:
    """The training recipe; the defaults are the paper's CIFAR-10 settings."""

    steps: int = 800_000
    batch_size: int = 128  # global: split evenly across DDP ranks
    lr: float = 2e-4
    warmup: int = 5000  # steps of linear learning-rate warm-up
    weight_decay: float = 0.0  # > 0 switches Adam to AdamW
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay min(ema_decay, (1+s)/(10+s)): useful EMA in short runs
    flip: bool = True  # random horizontal flips (turn off for data where they do not fit, e.g. digits)
    precision: str = "fp32"  # fp32 | bf16 | fp16 autocast; master weights stay fp32
    loss: str = "simple"  # simple | vlb | hybrid
    seed: int = 0
    log_every: int = 100
    sample_every: int = 0  # write an EMA sample grid every N steps (0: only at the end)
    sample_count: int = 64
    sample_steps: int | None = None  # respaced sampling for the grids (None: all T)
    checkpoint_every: int = 5000
    keep_checkpoints: int = 2
    max_nonfinite: int = 10  # stop after this many non-finite losses in a row
    # The model and its batches channels_last: faster convolutions on the CPU (oneDNN)
    # and, in 16-bit, on the GPU (cuDNN's tensor-core kernels take NHWC).
    channels_last: bool = True
    # torch.compile the model, forward and backward (our ops trace through it):
    # inductor fuses what lies between our kernels and, on a GPU, cuts the
    # per-op launch cost. The first step compiles: some 20 s for the demo's
    # model on a 2-core CPU, where the steps then gain little (4%).
    compile: bool = False

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "log_every", "sample_count", "checkpoint_every", "max_nonfinite")
        for name in positive:
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}")
            setattr(self, name, int(value))  # (numpy's too: the config is written as JSON)
        for name in ("warmup", "sample_every", "keep_checkpoints", "seed"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be an int >= 0, got {value!r}")
            setattr(self, name, int(value))
        if self.sample_steps is not None:
            if not is_int(self.sample_steps) or self.sample_steps < 1:
                raise ValueError(f"TrainConfig.sample_steps must be a positive int or None, got {self.sample_steps!r}")
            self.sample_steps = int(self.sample_steps)
        # A seed is an int64; the counts, beyond it, failed later: an OverflowError
        # traceback from the progress bar (steps) or, after training, from the grid's shares.
        for name in (*positive, "warmup", "sample_every", "keep_checkpoints", "seed", "sample_steps"):
            if (getattr(self, name) or 0) >= 1 << 63:
                raise ValueError(f"TrainConfig.{name} must be below 2^63, got {getattr(self, name)}")
        for name in ("ema_warmup", "flip", "channels_last", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"TrainConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("lr", "weight_decay", "grad_clip", "ema_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"TrainConfig.{name} must be a number, got {value!r}")
            try:
                setattr(self, name, float(value))  # numpy's, a Fraction: the config is written as JSON
            except OverflowError:  # an int beyond float's range (10**400)
                raise ValueError(f"TrainConfig.{name} must be a finite number, got {value!r}") from None
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig.lr must be a finite number > 0, got {self.lr!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"TrainConfig.ema_decay must lie in [0, 1), got {self.ema_decay!r}")
        if not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be > 0, got {self.grad_clip!r}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"TrainConfig.weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        for name in ("precision", "loss"):
            if not isinstance(getattr(self, name), str):  # (a list is not even hashable)
                raise TypeError(f"TrainConfig.{name} must be a str, got {getattr(self, name)!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"TrainConfig.loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {', '.join(sorted(unknown))}")
        return cls(**values)


def check_live_changes(config: TrainConfig, made_with: dict[str, Any]) -> None:
    """Refuse a change of a Trainer's ``config`` since it was made (``made_with``:
    its ``asdict`` then, which this updates) outside LIVE_CHANGES, and check the
    live ones as a new TrainConfig would (steps = 0 raised a ZeroDivisionError
    mid-run). Called every step: without a change, a few microseconds."""
    changed = [name for name, value in made_with.items() if getattr(config, name) != value]
    if not changed:
        return
    for name in changed:
        if name not in LIVE_CHANGES:
            raise ValueError(f"trainer.config.{name} was changed from {made_with[name]!r} to {getattr(config, name)!r} "
                             f"after the Trainer was made, which took it then: make a new Trainer (only "
                             f"{', '.join(sorted(LIVE_CHANGES))} may change)")
    now = asdict(config)
    TrainConfig(**now)
    made_with.update(now)
