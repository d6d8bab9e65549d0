"""Training: the recipe of Ho et al. (2020), sec. 4 and appendix B.

Each step draws a batch x_0, a timestep t ~ U{0..T-1} per sample and noise ε
in-kernel (fused q-sampling, ``ops.q_sample``), and descends L_simple =
‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t)‖² (eq. 14) — or the variational bound
(``loss="vlb"``) or their sum (``"hybrid"``). Adam at 2e-4 with linear warm-up,
gradient norm clipped at 1, an EMA of the weights for sampling, optional
random horizontal flips, bf16/fp16 autocast over fp32 master weights.

Everything random in step s is a function of (seed, s) and of each sample's
position in the *global* batch, never of the rank: a run resumed from a
checkpoint continues exactly, and N ranks under DDP take the same steps as one
process with the same global batch. (Dropout draws from torch's generator,
whose state the checkpoint saves.)
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn.parameter import is_lazy

from ._checks import as_device, check_bool
from ._progress import progress_bar
from ._warn import warn
from .checkpoint import LATEST, RunInUseError, atomic_write, latest_checkpoint, lock_run_folder
from .data import ImageDataset
from .distributed import check_ranks_agree, rank_and_world, release_ddp_at_exit, run_on_rank0, sample_sharded
from .images import save_grid
from .sampler import Sampler
from .schedules import NoiseSchedule
from .train_checkpoints import ConfigMismatchError, TrainerCheckpoints
from .train_config import PRECISIONS, TrainConfig
from .train_step import NonFiniteLossError, TrainerSteps

__all__ = ["TrainConfig", "Trainer", "NonFiniteLossError", "ConfigMismatchError", "RunInUseError"]

# What ranks that found different checkpoints (or steps) to resume need.
_SHARED_FOLDER = ("every rank must see the same run folder: for a run over several machines, put it (--out, "
                  "out_dir) on a filesystem they share")


def _check_samplable(schedule: NoiseSchedule, sample_steps: int | None) -> None:
    """Refuse, before any training, what the run's sample grids (and later
    sampling and bits/dim) could not do with this schedule."""
    if not torch.equal(schedule.timestep_map, torch.arange(schedule.num_timesteps, device="cpu")):
        # Training would show the model the sub-chain's indices, and sampling
        # (through timestep_map) the original timesteps it never saw.
        raise ValueError(f"the Trainer takes a full schedule, not a respaced one ({schedule.name}); "
                         "respace for sampling only (Sampler.sample(steps=...))")
    if sample_steps is not None and sample_steps > schedule.num_timesteps:
        raise ValueError(
            f"TrainConfig.sample_steps (--sample-steps) is {sample_steps}, more than the schedule's "
            f"{schedule.num_timesteps} timesteps"
        )
    undefined = schedule.undefined_steps("fixed_large", clip_denoised=True)
    if undefined:
        raise ValueError(
            f"the reverse step is undefined at timestep {undefined[0]} of this schedule (beta_t = 1 there, as at the "
            "last step of jsd), so a noise-predicting model trained on it could never be sampled or evaluated; "
            "use a schedule whose betas stay below 1"
        )


class Trainer(TrainerSteps, TrainerCheckpoints):
    """Trains ``model(x_t, t) -> ε`` on ``dataset`` and writes the run into ``out_dir``:
    ``log.jsonl`` (step, loss, lr, images/s), ``loss.png``, ``samples/``
    grids of the EMA model, and ``checkpoint-<step>/`` folders
    (``model.safetensors``, ``ema.safetensors``, ``trainer.pt``, ``config.json``).

    Under ``torchrun`` (``torch.distributed`` initialised before construction) the
    model is wrapped in DistributedDataParallel, each rank takes its slice of
    every global batch, and rank 0 alone writes.
    """

    def __init__(
        self,
        model: nn.Module,
        dataset: ImageDataset,
        schedule: NoiseSchedule,
        config: TrainConfig | None = None,
        out_dir: str | os.PathLike = "runs/ddpm",
        *,
        device: torch.device | str | None = None,
        extra_config: dict[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(model, torch.jit.ScriptModule):  # (failed in torch's words: requires_grad_ is not supported)
            raise TypeError("the Trainer trains an eager nn.Module, not a TorchScript one (torch.jit.script/trace): "
                            "pass the module before scripting it")
        if any(is_lazy(p) for p in model.parameters()):  # (torch's "uninitialized parameter", from the EMA copy)
            raise ValueError("the model has uninitialized lazy parameters (LazyConv2d, LazyLinear, ...): run it once "
                             "on a batch, model(x, t), before training it")
        if not isinstance(dataset, ImageDataset):
            raise TypeError(f"dataset must be a ddpm_fast.data.ImageDataset, got {type(dataset).__name__}")
        overrides = [m for m in ("__getitem__", "batch") if getattr(type(dataset), m) is not getattr(ImageDataset, m)]
        if overrides:  # (a subclass's augmentation, say, was dropped without a word)
            raise TypeError(f"{type(dataset).__name__} overrides ImageDataset.{overrides[0]}, which the Trainer does "
                            "not call: it reads the uint8 dataset.images itself (kept on the device), flipping them "
                            "with TrainConfig.flip. Train on ImageDataset(images) of the images you want")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        if config is not None and not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig (from a dict: TrainConfig.from_dict(d)), "
                            f"got {type(config).__name__}")
        # Copies, kept: the checks below, the optimizer's settings and every
        # checkpoint's record hold for them, whatever the caller edits later
        # (one config reused for an lr sweep made each checkpoint record the last lr).
        self.config = copy.deepcopy(config) if config is not None else TrainConfig()
        self._made_with = asdict(self.config)  # what trainer.config may not change later (_check_can_train)
        self.rank, self.world = rank_and_world()
        if self.config.batch_size % self.world:
            raise ValueError(f"batch_size {self.config.batch_size} must be divisible by the {self.world} ranks")
        if len(dataset) < self.config.batch_size:
            raise ValueError(f"the dataset has {len(dataset)} images, fewer than batch_size {self.config.batch_size}")
        dataset.check_model(model)
        self.device = as_device(device, "device") if device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        )
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():  # now, not at the first checkpoint
            raise NotADirectoryError(f"the Trainer's out_dir {str(self.out_dir)!r} is a file, not a folder")
        grids = self.out_dir / "samples"
        if self.config.sample_every and grids.is_symlink() and not grids.exists():  # exists() is False for it: else found late too
            raise NotADirectoryError(f"{str(grids)!r} is a broken symbolic link, but the sample grids go into a folder of "
                                     "that name (sample_every > 0): remove it or mend it")
        if self.config.sample_every and grids.exists() and not grids.is_dir():  # else found at the first grid, its steps lost
            raise NotADirectoryError(f"{str(grids)!r} is a file, but the sample grids go into a folder of that name "
                                     "(sample_every > 0): move it away")
        for name in (LATEST, "log.jsonl", "loss.png"):  # else found at the first checkpoint, its steps lost
            if (self.out_dir / name).is_dir():
                raise IsADirectoryError(f"{str(self.out_dir / name)!r} is a folder, but the run writes a file of "
                                        "that name: move it away")
        self.progress = progress
        self.dataset = dataset
        self._images_from = (dataset, getattr(dataset, "_images_version", 0))  # others later are refused (_check_same_images)
        self.images = dataset.images.to(self.device)  # uint8: small enough to live on the device
        _check_samplable(schedule, self.config.sample_steps)
        self.schedule = schedule
        self.extra_config = extra_config or {}
        self.data_fingerprint = dataset.fingerprint()  # in every checkpoint: a resume on other images is noticed
        floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
        if floats - {torch.float32}:  # the recipe's master weights are float32 (precision= sets autocast)
            raise TypeError(f"the Trainer trains float32 parameters (precision= chooses the autocast dtype), "
                            f"got {sorted(map(str, floats))}: call model.float() first")
        if not any(p.requires_grad for p in model.parameters()):  # (torch's errors: DDP's, the optimizer's empty list)
            raise ValueError("the model has no trainable parameters (none, or all requires_grad=False)")
        self.model = model
        try:  # written into every checkpoint: refused now, not at the first one after hours of training
            json.dumps(self.run_config())
        except (TypeError, ValueError) as error:
            raise TypeError(f"the model's config and extra_config must be JSON-serializable (checkpoints record "
                            f"them): {error}") from None
        self.extra_config = copy.deepcopy(self.extra_config)  # checked: a later edit by the caller cannot undo it
        # Copied, then moved: what can refuse the model (these checks, a model deepcopy
        # cannot copy) does so before the caller's model is moved or converted.
        ema = copy.deepcopy(model)
        self.model, ema = model.to(self.device), ema.to(self.device)
        if self.config.channels_last:
            self.model, ema = (m.to(memory_format=torch.channels_last) for m in (self.model, ema))
        self.ema = ema.eval().requires_grad_(False)
        # Parameters listed once: a walk over the demo model's modules takes 60-400 us,
        # at every step. (Buffers are walked each step: a module may replace one,
        # `self.running_mean = ...`, which files the new tensor under its name.)
        self._params = list(self.model.parameters())
        averaged: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._ema_copied: list[tuple[torch.Tensor, torch.Tensor]] = []
        for e, p in zip(self.ema.parameters(), self._params):
            # An integer parameter (frozen: no gradient for it) is copied, as buffers are: lerp has no integer kernel.
            (averaged if e.is_floating_point() or e.is_complex() else self._ema_copied).append((e, p))
        self._ema_averaged = ([e for e, _ in averaged], [p for _, p in averaged])
        self.net: nn.Module = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
            release_ddp_at_exit(self)
        if self.config.compile:  # the DDP wrapper too, as torch advises: its gradient hooks stay in place
            self.net = torch.compile(self.net)
        # The model's, not the wrappers': a DDP wrapper must go at exit (release_ddp_at_exit).
        self._model_modules = list(self.model.modules())
        self._clip_reads_norm = self.device.type == "cpu"  # (where reading a value costs no sync: _clip_gradients)
        params = [p for p in self._params if p.requires_grad]
        optim = torch.optim.AdamW if self.config.weight_decay > 0 else torch.optim.Adam
        # The fused kernel: one call per step instead of a dozen small ops per
        # parameter (the demo's 144 tensors: 7.9 -> 1.8 ms a step on the CPU).
        self._fused = self.device.type in ("cpu", "cuda")
        self.optimizer = optim(params, lr=self.config.lr, weight_decay=self.config.weight_decay, fused=self._fused)
        warmup = self.config.warmup
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )
        amp = PRECISIONS[self.config.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp is torch.float16)
        self.step = 0
        self._nonfinite_in_row = 0
        self._failed_resume: str | None = None  # why a resume that loaded part of a checkpoint failed
        self._applying: int | None = None  # the step whose update is being applied (_step)
        self._running = False  # in train()'s loop
        # (step, the work due after it that is done): a step whose log record, grid or
        # checkpoint an interruption cut short; train() called again does the rest first.
        self._after_step: tuple[int, set[str]] | None = None
        self._last_lr = self.optimizer.param_groups[0]["lr"]  # the lr of the last step taken (logged)
        self._epoch_order: tuple[int, torch.Tensor] | None = None  # (epoch, its permutation)
        self._staged: tuple[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None  # (step, batch)
        # The losses since the last log record at a multiple of log_every, and the
        # step of a record written early (a run's last step between two multiples),
        # which the next record replaces: both in checkpoints, so that a run
        # continued past its last step logs what an uninterrupted one does.
        self._loss_window: list[float] = []
        self._early_record: int | None = None

    # ------------------------------------------------------------- the run

    def train(self, *, resume: bool = True, final_samples: bool = True) -> dict[str, Any]:
        """Train until ``config.steps``, resuming from the newest checkpoint in
        ``out_dir`` when there is one and ``resume`` is set; then, with
        ``final_samples``, write ``samples.png`` of the EMA model. Returns a summary:
        ``steps`` (the run's step now), ``trained`` (steps this call took), ``out_dir``.

        With ``resume=False`` no checkpoint is loaded: a Trainer that has not
        trained starts the run afresh (the folder's log and any later checkpoints
        of an earlier run go), one that has continues from where it is.

        The folder is held while it trains: a second run started in it raises
        ``RunInUseError`` (on every rank)."""
        check_bool(resume, "resume")  # None is no "no": it would start the run afresh
        check_bool(final_samples, "final_samples")
        releases = []

        def hold() -> None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            releases.append(lock_run_folder(self.out_dir))

        run_on_rank0(hold)
        try:
            return self._train(resume, final_samples)
        finally:
            for release in releases:
                release()

    def _train(self, resume: bool, final_samples: bool) -> dict[str, Any]:
        self._check_can_train()
        newest = latest_checkpoint(self.out_dir) if resume else None
        if self.world > 1:  # ranks that differ here would train on a mix of states, then deadlock
            self._check_ranks_agree(newest)
        if newest is not None:
            self._after_step = None  # the checkpoint's state, whose step was finished before it was written
            self._resume(newest)
            check_ranks_agree("the step resumed", self.step, _SHARED_FOLDER)
        elif self.step > 0:
            self._nonfinite_in_row = 0  # a new call: a stop for non-finite losses starts counting again
        elif self.rank == 0:  # (train() made the folder, to hold it)
            (self.out_dir / "log.jsonl").unlink(missing_ok=True)
            self._remove_later_checkpoints()
            self._remove_earlier_pictures()
        run_on_rank0(self._check_disk_space)  # which writes the checkpoints; raised on every rank
        cfg = self.config
        if self.step > cfg.steps and self.rank == 0:
            warn(f"the run in {self.out_dir} is already at step {self.step}, beyond steps={cfg.steps}: "
                 "nothing to train")
        first_step = self.step
        bar = _progress(cfg.steps, self.step, self.progress and self.rank == 0)
        window = self._loss_window
        # images/s counts training steps only: the time of grids and checkpoints is left out.
        tick, tick_step, aside = time.perf_counter(), self.step, 0.0
        grid_of_last_step = None

        def after_step() -> None:
            """The step's log record, grid and checkpoint, those that are due and
            not yet done (done: kept in _after_step, for a call cut short here)."""
            nonlocal tick, tick_step, aside, grid_of_last_step
            step, done = self._after_step
            last = step == cfg.steps
            # Never checkpoint inside a run of skipped non-finite steps.
            checkpoint = (step % cfg.checkpoint_every == 0 or last) and not self._nonfinite_in_row
            # A record every log_every steps, and one at the run's last step
            # (early, unless a multiple), which a longer run replaces.
            early = step % cfg.log_every != 0
            if (not early or (last and checkpoint)) and "log" not in done:
                elapsed = time.perf_counter() - tick - aside
                rate = (step - tick_step) * cfg.batch_size / max(elapsed, 1e-9)
                record = {
                    "step": step,
                    "loss": sum(window) / len(window) if window else float("nan"),
                    "lr": self._last_lr,
                    "images_per_s": rate,
                }
                self._log(record, early)
                done.add("log")
                # (drawn at the next redraw: refresh=True would redraw at every record, also in a log)
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{rate:.0f}", refresh=False)
                if not early:
                    window.clear()
                tick, tick_step, aside = time.perf_counter(), step, 0.0
            started = time.perf_counter()
            # Every sample_every steps and at the last step (a run resumed to more steps
            # then still has every multiple's grid).
            if cfg.sample_every and (step % cfg.sample_every == 0 or last) and "grid" not in done:
                grid_of_last_step = self.out_dir / "samples" / f"step-{step:08d}.png"
                self.sample_grid(grid_of_last_step)  # every rank: a share each
                done.add("grid")
            if checkpoint:
                self.save_checkpoint()
            aside += time.perf_counter() - started
            self._after_step = None

        try:  # closed on Ctrl-C and errors too: a bar left open redraws itself after the message
            self._running = True
            if self._after_step is not None and self._after_step[0] == self.step:
                after_step()  # the rest of a step that a call cut short
            while self.step < cfg.steps:
                self.train_step()
                bar.update(1)
                after_step()
        finally:
            self._running = False
            bar.close()
        if self._nonfinite_in_row:  # its last steps were skipped: no final checkpoint, no model to show
            raise NonFiniteLossError(
                f"the run ended on {self._nonfinite_in_row} non-finite losses in a row (the last at step {self.step}), "
                f"so its final checkpoint was not written. {self._last_good_checkpoint()}: "
                "lower the learning rate or check the data"
            )
        if final_samples:
            if grid_of_last_step is None or self.step != cfg.steps:
                self.sample_grid(self.out_dir / "samples.png")
            elif self.rank == 0:  # the same samples: not drawn twice
                atomic_write(self.out_dir / "samples.png", lambda tmp: shutil.copyfile(grid_of_last_step, tmp))
        return {"steps": self.step, "trained": self.step - first_step, "out_dir": str(self.out_dir)}

    def _check_ranks_agree(self, newest: Path | None) -> None:
        """Every rank holds the same settings and finds the same checkpoint to resume."""
        settings = {f"{section}.{key}": value for section in ("model", "schedule", "train")
                    for key, value in (self.run_config()[section] or {}).items()}
        check_ranks_agree("their settings", settings, "launch every rank with the same settings")
        check_ranks_agree("their images", self.data_fingerprint, "give every rank the same data")
        check_ranks_agree("the checkpoint to resume", newest.name if newest is not None else None, _SHARED_FOLDER)

    def _log(self, record: dict[str, Any], early: bool) -> None:
        """Append a record to log.jsonl (rank 0). A record written ``early`` (at
        a run's last step, no multiple of log_every) makes way for the next one,
        which a longer run (resumed, or train() called again) writes over the
        same losses and those after them, as an uninterrupted run does."""
        if self.rank == 0:
            if self._early_record is not None:
                replaced = self._early_record
                self._rewrite_log(lambda r: r["step"] != replaced)
            with open(self.out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        self._early_record = record["step"] if early else None

    def read_log(self) -> list[dict[str, Any]]:
        """The log's records. Appends are not atomic, so a process killed in one
        leaves half a line: such a line is skipped (and dropped from the file when
        the run resumes, which rewrites the log up to its checkpoint)."""
        path = self.out_dir / "log.jsonl"
        records = []
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                continue
            if isinstance(record, dict) and "step" in record:
                records.append(record)
        return records

    def _rewrite_log(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Rewrite log.jsonl, atomically, with the records ``keep`` accepts (and
        without half-written lines, which read_log skips)."""
        kept = [r for r in self.read_log() if keep(r)]
        atomic_write(self.out_dir / "log.jsonl", lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in kept)))

    @torch.no_grad()
    def sample_grid(self, path: str | os.PathLike) -> np.ndarray | None:
        """A grid of ``sample_count`` EMA samples (fixed seed, so grids compare
        over time), written to ``path``; returns them, uint8 N x H x W x C.
        Under DDP every rank calls it and draws a share: rank 0 alone drawing
        them all kept the others waiting at the next collective, past its
        timeout for a long chain on CPUs. Rank 0 writes the grid and returns
        the samples, the others None."""
        images = self.images  # the data's shape: the model need not tell it (in_channels, image_size)
        sampler = Sampler(self.ema, self.schedule, device=self.device, cuda_graph=False,
                          channels_last=self.config.channels_last, sample_shape=tuple(images.shape[1:]))
        count = self.config.sample_count
        # In batches of the training batch, which fits (sample i is the same for any batch size):
        # a large sample_count in one batch asked for far more memory than training, at the first grid.
        # A bar of its own (rank 0's, below the training bar): a grid is a whole chain, minutes of silence else.
        drawn = sample_sharded(sampler, count, seed=self.config.seed, batch_size=min(count, self.config.batch_size),
                               steps=self.config.sample_steps, progress=self.progress)
        if drawn is not None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_grid(drawn, path)
        return drawn


def _progress(total: int, initial: int, enabled: bool):
    return progress_bar(total=total, initial=initial, desc="training", unit="step", disable=not enabled,
                        dynamic_ncols=True)
