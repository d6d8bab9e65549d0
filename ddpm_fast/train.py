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
import math
import os
import shutil
import time
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import diffusion, ops
from .checkpoint import LATEST, CheckpointError, atomic_write, checkpoints, latest_checkpoint, write_checkpoint
from .data import ImageDataset
from .distributed import rank_and_world
from .images import plot_curve, save_grid, to_uint8
from .models.serialization import load_safetensors, load_state_dict_checked
from .sampler import Sampler
from .schedules import NoiseSchedule
from .train_config import PRECISIONS, RESUMABLE_CHANGES, TrainConfig

__all__ = ["TrainConfig", "Trainer", "NonFiniteLossError", "ConfigMismatchError"]

HYBRID_VLB_WEIGHT = 1e-3  # Nichol & Dhariwal (2021), eq. 16


class ConfigMismatchError(CheckpointError):
    """A run resumed with another configuration than its checkpoint's:
    ``differences`` lists each setting as "name: old there, new now"."""

    def __init__(self, path: Path, differences: list[str]) -> None:
        self.path, self.differences = path, differences
        super().__init__(
            f"cannot resume {path} with another configuration ({'; '.join(differences)}): pass the run's own "
            "settings, or start afresh in another folder (or here with resume=False, --no-resume, which replaces "
            "this run)"
        )


class NonFiniteLossError(RuntimeError):
    """Training stopped after too many non-finite losses in a row."""


_SEED_RANGE = 1 << 63  # host generators' seeds, derived from the run's seed, wrap into int64


def _check_samplable(schedule: NoiseSchedule, sample_steps: int | None) -> None:
    """Refuse, before any training, what the run's sample grids (and later
    sampling and bits/dim) could not do with this schedule."""
    if not torch.equal(schedule.timestep_map, torch.arange(schedule.num_timesteps)):
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


class Trainer:
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
        if not isinstance(dataset, ImageDataset):
            raise TypeError(f"dataset must be a ddpm_fast.data.ImageDataset, got {type(dataset).__name__}")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        self.config = config if config is not None else TrainConfig()
        self.rank, self.world = rank_and_world()
        if self.config.batch_size % self.world:
            raise ValueError(f"batch_size {self.config.batch_size} must be divisible by the {self.world} ranks")
        if len(dataset) < self.config.batch_size:
            raise ValueError(f"the dataset has {len(dataset)} images, fewer than batch_size {self.config.batch_size}")
        dataset.check_model(model)
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        )
        self.out_dir = Path(out_dir)
        self.progress = progress
        self.dataset = dataset
        self.images = dataset.images.to(self.device)  # uint8: small enough to live on the device
        _check_samplable(schedule, self.config.sample_steps)
        self.schedule = schedule
        self.extra_config = extra_config or {}
        self.model = model.to(self.device)
        if self.config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.net: nn.Module = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if self.config.compile:  # the DDP wrapper too, as torch advises: its gradient hooks stay in place
            self.net = torch.compile(self.net)
        params = [p for p in self.model.parameters() if p.requires_grad]
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
        self._last_lr = self.optimizer.param_groups[0]["lr"]  # the lr of the last step taken (logged)
        self._epoch_order: tuple[int, torch.Tensor] | None = None  # (epoch, its permutation)
        self._staged: tuple[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None  # (step, batch)

    # ------------------------------------------------------------ the step

    def _generator(self, step: int, stream: int) -> torch.Generator:
        # Below 2^63 (manual_seed takes an int64); unchanged for seeds below about 2.3e12.
        return torch.Generator().manual_seed(((self.config.seed * 1_000_003 + step) * 4 + stream) % _SEED_RANGE)

    def _global_batch(self, step: int) -> torch.Tensor:
        """Indices of step ``step``'s global batch: epochs are fixed permutations
        (the current one kept: a permutation of CIFAR-10 costs milliseconds)."""
        n, b = len(self.dataset), self.config.batch_size
        per_epoch = n // b
        epoch, i = divmod(step, per_epoch)
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = torch.randperm(n, generator=torch.Generator().manual_seed((self.config.seed * 7919 + epoch) % _SEED_RANGE))
            self._epoch_order = (epoch, order)
        return self._epoch_order[1][i * b : (i + 1) * b]

    def _stage(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's image indices, timesteps and flip flags of step ``step``,
        on the device: drawn on the host (from the seed and the step), then sent
        in one copy, from pinned memory on CUDA so that it does not wait for the
        device (a copy from pageable memory synchronizes with it)."""
        if self._staged is not None and self._staged[0] == step:
            return self._staged[1]
        b = self.config.batch_size
        local = b // self.world
        lo = self.rank * local
        index = self._global_batch(step)[lo : lo + local]
        gen = self._generator(step, 0)
        t = torch.randint(0, self.schedule.num_timesteps, (b,), generator=gen)[lo : lo + local]
        flip = torch.rand(b, generator=gen)[lo : lo + local] < 0.5
        if self.device.type != "cpu":
            packed = torch.stack([index, t, flip.to(torch.int64)])
            if self.device.type == "cuda":
                packed = packed.pin_memory()
            packed = packed.to(self.device, non_blocking=self.device.type == "cuda")
            index, t, flip = packed[0], packed[1], packed[2].bool()
        self._staged = (step, (index, t, flip))
        return index, t, flip

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """This rank's (x_0, t, noise offset) for step ``step``."""
        b = self.config.batch_size
        lo = self.rank * (b // self.world)
        index, t, flip = self._stage(step)
        x0 = self.images[index].float() / 127.5 - 1
        if self.config.flip:
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        if self.config.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        per_sample = x0[0].numel()
        offset = (step * b + lo) * per_sample  # counters of the global batch: rank-independent
        return x0, t, offset

    def _loss(self, step: int) -> torch.Tensor:
        x0, t, offset = self._batch(step)
        x_t, eps = ops.q_sample(x0, t, self.schedule, seed=self.config.seed, offset=offset)
        amp = PRECISIONS[self.config.precision]
        with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            pred = self.net(x_t, t)
        pred = pred.float()
        terms = []
        if self.config.loss in ("simple", "hybrid"):
            terms.append(diffusion.loss_simple(eps, pred))
        if self.config.loss in ("vlb", "hybrid"):
            vb, _ = diffusion.vb_terms_bpd(self.schedule, pred, x0, x_t, t, clip_denoised=False)
            terms.append(vb * (HYBRID_VLB_WEIGHT if self.config.loss == "hybrid" else 1.0))
        # Mean over the local batch; DDP averages over ranks = the global-batch mean.
        return sum(terms).mean()

    def _ema_update(self) -> None:
        decay = self.config.ema_decay
        if self.config.ema_warmup:
            decay = min(decay, (1 + self.step) / (10 + self.step))
        ema = [p for p in self.ema.parameters()]
        live = [p.detach() for p in self.model.parameters()]
        torch._foreach_lerp_(ema, live, 1.0 - decay)
        for eb, mb in zip(self.ema.buffers(), self.model.buffers()):
            eb.copy_(mb)

    def train_step(self) -> float | None:
        """One optimisation step; returns the loss, or None if it was not finite
        (the update is skipped, with a warning).

        The step reads the device once, for the loss and whether it and the
        gradient are finite together: the skip, its warning and the stop after
        ``max_nonfinite`` in a row are decided on the step itself. The next
        step's batch is drawn and sent to the device before that read, while
        the device still computes this one.
        """
        self.net.train()
        loss = self._loss(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        # Under fp16 the GradScaler skips steps whose scaled gradients overflowed
        # (and lowers the scale): routine, not counted. A non-finite loss is no
        # overflow of the scaling, and is counted in every precision.
        finite = torch.isfinite(loss)
        if not self.scaler.is_enabled():
            finite = finite & torch.isfinite(grad_norm)
        summary = torch.stack([finite.to(torch.float64), loss.detach().to(torch.float64)])
        if self.world > 1:
            # One all-reduce: every rank takes the same decision (or DDP deadlocks),
            # and logs the global batch's loss, the mean of the ranks' local means.
            dist.all_reduce(summary)
            summary = torch.stack([(summary[0] == self.world).to(torch.float64), summary[1] / self.world])
        self._stage(self.step + 1)
        # The step's one device-to-host read (float64 holds the float32 loss exactly).
        finite_flag, loss_value = summary.tolist()
        finite = finite_flag == 1.0
        self._last_lr = self.optimizer.param_groups[0]["lr"]  # what this step uses (the log's lr)
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler.is_enabled():
                self.scaler.update()  # ends the step unscale_ began (and lowers the scale)
            self._nonfinite_in_row += 1
            # Steps are counted from 1 in the log and checkpoints: this is step self.step + 1.
            warnings.warn(f"step {self.step + 1}: non-finite loss or gradient ({loss_value}); update skipped")
            if self._nonfinite_in_row >= self.config.max_nonfinite:
                raise NonFiniteLossError(
                    f"{self._nonfinite_in_row} non-finite losses in a row at step {self.step + 1}; stopping. "
                    f"{self._last_good_checkpoint()}: lower the learning rate or check the data"
                )
            self.step += 1
            self.lr_schedule.step()
            return None
        self.scaler.step(self.optimizer)  # fp16: the scaler skips overflowed steps itself
        self.scaler.update()
        self.lr_schedule.step()
        self._nonfinite_in_row = 0
        self.step += 1
        self._ema_update()
        return loss_value

    # ------------------------------------------------------------- the run

    def train(self, *, resume: bool = True, final_samples: bool = True) -> dict[str, Any]:
        """Train until ``config.steps``, resuming from the newest checkpoint in
        ``out_dir`` when there is one and ``resume`` is set; then, with
        ``final_samples``, write ``samples.png`` of the EMA model. Returns a summary:
        ``steps`` (the run's step now), ``trained`` (steps this call took), ``out_dir``.

        With ``resume=False`` no checkpoint is loaded: a Trainer that has not
        trained starts the run afresh (the folder's log and any later checkpoints
        of an earlier run go), one that has continues from where it is."""
        if resume and (newest := latest_checkpoint(self.out_dir)) is not None:
            self._resume(newest)
        elif self.step > 0:
            self._nonfinite_in_row = 0  # a new call: a stop for non-finite losses starts counting again
        elif self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "log.jsonl").unlink(missing_ok=True)
            self._remove_later_checkpoints()
        cfg = self.config
        if self.step > cfg.steps and self.rank == 0:
            warnings.warn(f"the run in {self.out_dir} is already at step {self.step}, beyond steps={cfg.steps}: "
                          "nothing to train")
        first_step = self.step
        bar = _progress(cfg.steps, self.step, self.progress and self.rank == 0)
        window: list[float] = []
        tick, tick_step = time.perf_counter(), self.step
        try:  # closed on Ctrl-C and errors too: a bar left open redraws itself after the message
            while self.step < cfg.steps:
                loss = self.train_step()
                if loss is not None:
                    window.append(loss)
                last = self.step == cfg.steps
                # Never checkpoint inside a run of skipped non-finite steps.
                checkpoint = (self.step % cfg.checkpoint_every == 0 or last) and not self._nonfinite_in_row
                if self.step % cfg.log_every == 0 or checkpoint:  # a resumed run logs what this one would
                    elapsed = time.perf_counter() - tick
                    rate = (self.step - tick_step) * cfg.batch_size / max(elapsed, 1e-9)
                    record = {
                        "step": self.step,
                        "loss": sum(window) / len(window) if window else float("nan"),
                        "lr": self._last_lr,
                        "images_per_s": rate,
                    }
                    self._log(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{rate:.0f}")
                    window, tick, tick_step = [], time.perf_counter(), self.step
                bar.update(1)
                if cfg.sample_every and self.step % cfg.sample_every == 0 and not last and self.rank == 0:
                    self.sample_grid(self.out_dir / "samples" / f"step-{self.step:08d}.png")
                if checkpoint:
                    self.save_checkpoint()
        finally:
            bar.close()
        if self._nonfinite_in_row:  # its last steps were skipped: no final checkpoint, no model to show
            raise NonFiniteLossError(
                f"the run ended on {self._nonfinite_in_row} non-finite losses in a row (the last at step {self.step}), "
                f"so its final checkpoint was not written. {self._last_good_checkpoint()}: "
                "lower the learning rate or check the data"
            )
        if final_samples and self.rank == 0:
            self.sample_grid(self.out_dir / "samples.png")
        return {"steps": self.step, "trained": self.step - first_step, "out_dir": str(self.out_dir)}

    def _last_good_checkpoint(self) -> str:
        """Where a run stopped by non-finite losses can resume from, in words."""
        newest = latest_checkpoint(self.out_dir)
        if newest is None:
            return f"No checkpoint was written to {self.out_dir}"
        return f"The last good checkpoint, {newest}, is intact"

    def _resume(self, newest: Path) -> None:
        """Load ``newest``, the newest checkpoint of ``out_dir``; if it cannot be
        read (a damaged disk, a hand-edited file: writes themselves are atomic),
        warn and take the next older one, so the run loses the steps since that
        one rather than stopping. A configuration mismatch with the newest is
        raised, not skipped: the older ones of the same run have its configuration."""
        older = [path for _, path in reversed(checkpoints(self.out_dir)) if path != newest]
        failure = None
        damaged = []
        for path in [newest, *older]:
            try:
                self.check_resumable(path)
                self.load_checkpoint(path)
            except ConfigMismatchError:
                if path == newest:
                    raise
                continue  # another run's
            except CheckpointError as error:  # damaged
                failure = failure or error
                damaged.append(path)
                continue
            if damaged:
                self._set_aside(damaged)
                if self.rank == 0:
                    warnings.warn(f"{failure}; resumed from the older {path.name} instead (step {self.step}); "
                                  f"the damaged {', '.join(p.name for p in damaged)} renamed damaged-*")
            return
        raise failure

    def _set_aside(self, damaged: list[Path]) -> None:
        """Rename damaged checkpoints newer than the one resumed (rank 0, once
        every rank has passed them): else they would outrank the run's new
        checkpoints, which pruning would then delete first, and be resumed again."""
        if self.world > 1:
            dist.barrier()
        if self.rank == 0:
            for path in damaged:
                target = path.with_name(f"damaged-{path.name}")
                suffix = 1
                while target.exists():
                    target, suffix = path.with_name(f"damaged-{path.name}-{suffix}"), suffix + 1
                path.rename(target)

    def _remove_later_checkpoints(self) -> None:
        """A run started afresh (``resume=False``) in a folder that holds a
        longer run: that run's checkpoints beyond this trainer's step are
        removed (its log is replaced too), else they would outrank this run's
        — pruned first as the oldest-numbered, resumed and sampled instead of it."""
        later = [path for step, path in checkpoints(self.out_dir) if step > self.step]
        if not later:
            return
        warnings.warn(f"starting afresh in {self.out_dir}: removing the earlier run's "
                      f"{', '.join(p.name for p in later)}")
        (self.out_dir / LATEST).unlink(missing_ok=True)
        for path in later:
            shutil.rmtree(path)

    def check_resumable(self, path: str | os.PathLike) -> None:
        """Refuse to resume checkpoint ``path`` with another model, schedule or
        training recipe than the one it was trained with (see
        ``RESUMABLE_CHANGES`` for what may change): raise ``ConfigMismatchError``
        (a ``CheckpointError``) naming each setting that differs. A checkpoint without ``config.json``
        is not checked."""
        path = Path(path)
        try:
            saved = json.loads((path / "config.json").read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as error:
            raise CheckpointError(f"cannot read {path / 'config.json'}: {error}") from error
        if not isinstance(saved, dict):
            raise CheckpointError(f"cannot read {path / 'config.json'}: not a JSON object")
        now = json.loads(json.dumps(self.run_config()))  # tuples as lists, as the file has them
        differ = []
        for section in ("model", "schedule", "train"):
            old, new = saved.get(section), now.get(section)
            if not (isinstance(old, dict) and isinstance(new, dict)):
                if section in saved and old != new:
                    differ.append(f"{section}: {old!r} there, {new!r} now")
                continue
            for key in sorted(set(old) | set(new)):
                if section == "train" and key in RESUMABLE_CHANGES:
                    continue
                if key in old and old.get(key) != new.get(key):
                    differ.append(f"{section}.{key}: {old.get(key)!r} there, {new.get(key)!r} now")
        if differ:
            raise ConfigMismatchError(path, differ)
        # What the caller recorded besides (the command line's --data): a change may
        # be deliberate (the data moved), so it is said, not refused.
        changed = [f"{key}: {saved[key]!r} there, {value!r} now" for key, value in self.extra_config.items()
                   if key in saved and saved[key] != value]
        if changed and self.rank == 0:
            warnings.warn(f"resuming {path} with other settings than it was trained with ({'; '.join(changed)})")

    def _log(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        with open(self.out_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_log(self) -> list[dict[str, Any]]:
        """The log's records. Appends are not atomic, so a process killed in one
        leaves half a line: such a line is skipped (and dropped from the file when
        the run resumes, which rewrites the log up to its checkpoint)."""
        path = self.out_dir / "log.jsonl"
        records = []
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "step" in record:
                records.append(record)
        return records

    @torch.no_grad()
    def sample_grid(self, path: str | os.PathLike) -> torch.Tensor:
        """A grid of ``sample_count`` EMA samples (fixed seed, so grids compare over time)."""
        sampler = Sampler(self.ema, self.schedule, device=self.device, cuda_graph=False,
                          channels_last=self.config.channels_last)
        x = sampler.sample(self.config.sample_count, seed=self.config.seed, steps=self.config.sample_steps, progress=False)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_grid(to_uint8(x), path)
        return x

    # -------------------------------------------------------- checkpoints

    def run_config(self) -> dict[str, Any]:
        return {
            "model": getattr(self.model, "config", None),
            "schedule": self.schedule.config,
            "train": asdict(self.config),
            **self.extra_config,
        }

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0), then a fresh loss plot."""
        path = None
        rank_rng = self._gather_rank_rng() if self.world > 1 else None
        if self.rank == 0:
            from safetensors.torch import save_file

            def weights(module: nn.Module):
                state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
                return lambda p: save_file(state, str(p))

            state = {
                "step": self.step,
                "optimizer": self.optimizer.state_dict(),
                "lr_schedule": self.lr_schedule.state_dict(),
                "scaler": self.scaler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "rank_rng": rank_rng,
            }
            config = json.dumps(self.run_config(), indent=2)
            path = write_checkpoint(
                self.out_dir,
                self.step,
                {
                    "model.safetensors": weights(self.model),
                    "ema.safetensors": weights(self.ema),
                    "trainer.pt": lambda p: torch.save(state, p),
                    "config.json": lambda p: p.write_text(config),
                },
                keep=self.config.keep_checkpoints,
            )
            log = self.read_log()
            losses, steps = [r["loss"] for r in log], [r["step"] for r in log]
            if sum(map(math.isfinite, losses)) > 1:
                atomic_write(self.out_dir / "loss.png", lambda p: plot_curve(losses, p, steps=steps, title="training loss (by step)"))
        if self.world > 1:
            dist.barrier()
        return path

    def _gather_rank_rng(self) -> list[dict[str, torch.Tensor | None]]:
        """Each rank's own generator states (the CPU's, its GPU's), in rank order.
        Under DDP each rank draws its dropout from its own process's generators,
        which rank 0 cannot read: its state of another rank's GPU is one it never
        drew from, and ranks seeded apart differ on the CPU too."""
        mine = {
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, mine)
        return gathered

    def _restore_fused(self) -> None:
        """A loaded optimizer state brings its own ``fused`` flag: checkpoints
        written before the trainer used the fused kernel say False, and the
        per-parameter loop then fails under the fp16 GradScaler, which drives
        the optimizer as a fused one. Keep this trainer's choice (the fused
        kernel keeps its step counts on the parameters' device)."""
        for group in self.optimizer.param_groups:
            group["fused"] = self._fused
        if self._fused:
            for param, param_state in self.optimizer.state.items():
                if "step" in param_state:
                    param_state["step"] = param_state["step"].to(device=param.device, dtype=torch.float32)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore model, EMA, optimizer, schedules, step and RNG state from a
        checkpoint folder, and cut the log back to that step."""
        path = Path(path)
        needed = ("model.safetensors", "ema.safetensors", "trainer.pt")
        missing = [name for name in needed if not (path / name).is_file()]
        if missing:
            raise CheckpointError(f"checkpoint {path} is missing {', '.join(missing)}")
        name = "trainer.pt"
        try:
            state = torch.load(path / name, map_location="cpu", weights_only=True)
            for module, name in ((self.model, "model.safetensors"), (self.ema, "ema.safetensors")):
                load_state_dict_checked(module, load_safetensors(path / name, self.device), str(path / name))
        except Exception as error:  # damaged file, another architecture, ...
            if name == "trainer.pt" and not zipfile.is_zipfile(path / name):
                reason = "not a torch.save archive (damaged?)"  # torch.load would talk of weights_only
            else:
                reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise CheckpointError(f"cannot load checkpoint {path}: {name}: {reason}") from error
        try:  # a trainer.pt that loads but holds the wrong things (edited, another version): damaged too
            self._restore_state(state)
        except Exception as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise CheckpointError(f"cannot load checkpoint {path}: trainer.pt: {type(error).__name__}: {reason}") from error
        self._nonfinite_in_row = 0
        if self.rank == 0:
            kept = [r for r in self.read_log() if r["step"] <= self.step]
            atomic_write(self.out_dir / "log.jsonl", lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in kept)))

    def _restore_state(self, state: dict[str, Any]) -> None:
        """Optimizer, schedules, step and RNG state from a checkpoint's trainer.pt."""
        self.optimizer.load_state_dict(state["optimizer"])
        self._restore_fused()
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            # One state per GPU of the machine that wrote it, which may have had more
            # (set_rng_state_all raised IndexError there): restore the GPUs this one has.
            for index, rng in enumerate(state["cuda_rng"][: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(rng, index)
        rank_rng = state.get("rank_rng")
        if rank_rng is not None and len(rank_rng) == self.world:  # under DDP, by the same number of ranks
            own = rank_rng[self.rank]
            torch.set_rng_state(own["torch_rng"])
            if own["cuda_rng"] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(own["cuda_rng"], self.device)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="step", disable=not enabled, dynamic_ncols=True)
