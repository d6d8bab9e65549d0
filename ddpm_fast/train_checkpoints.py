"""The Trainer's checkpoints: writing them, loading them, and resuming a run
from the newest one that loads (falling back past damaged ones), refusing
another configuration than the run's. ``Trainer`` (ddpm_fast/train.py) takes
these methods from ``TrainerCheckpoints``; they use its model, EMA, optimizer,
schedules, step and run folder."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ._memory import check_unpacked_fits, format_size
from ._warn import warn
from .checkpoint import (LATEST, CheckpointError, atomic_write, checkpoints, latest_checkpoint, resume_order,
                         write_checkpoint)
from .distributed import check_ranks_agree, rank_seed
from .images import plot_curve
from .models.serialization import load_safetensors, load_state_dict_checked
from .train_config import RECIPE_VERSION, RESUMABLE_CHANGES

__all__ = ["ConfigMismatchError", "TrainerCheckpoints"]


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

    def __reduce__(self) -> tuple:
        # Rebuilt from its own arguments: pickle would call ConfigMismatchError(message),
        # which fails, in the process that receives it (a Pool's result thread: a hang).
        return type(self), (self.path, self.differences)


class TrainerCheckpoints:
    """Checkpoint methods of ``Trainer`` (a mixin: the state is the Trainer's)."""

    def _check_disk_space(self) -> None:
        """Before training: refuse a run whose next checkpoint the disk under
        its folder has no room for (found only when it was written, after
        ``checkpoint_every`` steps of training lost), and warn where the
        checkpoints it writes before it deletes old ones (``keep_checkpoints``
        and the one being written) will not fit. Sized from the newest
        checkpoint, else from the model: two copies of its state (the model,
        the EMA) and Adam's two moments."""
        cfg = self.config
        every = cfg.checkpoint_every
        writes = cfg.steps // every - self.step // every + (1 if cfg.steps % every and self.step < cfg.steps else 0)
        if writes <= 0:
            return
        held = checkpoints(self.out_dir)
        if held:
            size = sum(f.stat().st_size for f in held[-1][1].iterdir() if f.is_file())
        else:
            state = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
            moments = sum(2 * p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
            size = 2 * state + moments + (1 << 18)  # and the generator states, the config, the archives' own bytes
        keep = cfg.keep_checkpoints
        at_once = writes if keep <= 0 else min(writes, max(keep + 1 - len(held), 1))
        try:
            free = shutil.disk_usage(self.out_dir).free
        except OSError:  # not known here: the writes will tell
            return
        if size > free:
            raise OSError(errno.ENOSPC, f"a checkpoint of this run takes about {format_size(size)} and the disk of "
                          f"{self.out_dir} has {format_size(free)} free: free some space or train elsewhere")
        if at_once * size > free:
            warn(f"this run writes {at_once} more checkpoints before it deletes old ones (keep_checkpoints={keep}), "
                 f"about {format_size(at_once * size)}, and the disk of {self.out_dir} has {format_size(free)} free: "
                 "it will fill before the run ends")

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
        failure = None
        self._loaded_part = False  # set by _load_checkpoint once it begins to overwrite the state
        damaged: list[Path] = []
        resumed = None
        for path in resume_order(self.out_dir, newest):
            try:
                self._load_checkpoint(path)  # refuses another run's (ConfigMismatchError) first
            except ConfigMismatchError:
                if path == newest:
                    raise
                continue  # another run's
            except CheckpointError as error:  # damaged
                failure = failure or error
                damaged.append(path)
                continue
            except BaseException as error:  # a Ctrl-C mid-load, say: the state is now part this checkpoint's
                if self._loaded_part:
                    self._failed_resume = f"{path.name} was not fully loaded ({type(error).__name__})"
                raise
            resumed = path
            break
        # Every rank, before any acts on it: a rank that could not read a checkpoint the
        # others read resumed an older one (or none), and waited for them in a
        # collective that they never reached: a hang, without a word.
        check_ranks_agree("the checkpoint each resumed", {
            "checkpoint": resumed.name if resumed is not None else None,
            "unreadable": str(failure) if failure is not None else None,
        }, "a rank could not read a checkpoint that another could: every rank must see the same run folder; "
           "resume again once it does")
        if resumed is not None:
            if damaged:
                self._set_aside(damaged)
                if self.rank == 0:
                    warn(f"{failure}; resumed from the older {resumed.name} instead (step {self.step}); "
                         f"the damaged {', '.join(p.name for p in damaged)} renamed damaged-*")
            return
        if self._loaded_part:  # the model, say, and not the EMA: no longer fresh, nor any checkpoint's
            self._failed_resume = str(failure)
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
        warn(f"starting afresh in {self.out_dir}: removing the earlier run's "
             f"{', '.join(p.name for p in later)}")
        (self.out_dir / LATEST).unlink(missing_ok=True)
        for path in later:
            shutil.rmtree(path)

    def _remove_earlier_pictures(self) -> None:
        """A run started afresh: the earlier run's sample grids and loss curve
        would pass for this one's until overwritten (some never are)."""
        found = [self.out_dir / name for name in ("samples.png", "loss.png") if (self.out_dir / name).is_file()]
        found += sorted((self.out_dir / "samples").glob("step-*.png"))
        if not found:
            return
        warn(f"starting afresh in {self.out_dir}: removing the earlier run's pictures "
             f"({', '.join(str(p.relative_to(self.out_dir)) for p in found[:4])}{' ...' if len(found) > 4 else ''})")
        for path in found:
            path.unlink(missing_ok=True)

    def check_resumable(self, path: str | os.PathLike) -> None:
        """Refuse to resume checkpoint ``path`` with another model, schedule or
        training recipe than the one it was trained with (see
        ``RESUMABLE_CHANGES`` for what may change): raise ``ConfigMismatchError``
        (a ``CheckpointError``) naming each setting that differs. A checkpoint
        without ``config.json`` (every one written has it) is damaged: a
        ``CheckpointError``, as a resume falls back past."""
        path = Path(path)
        try:
            saved = json.loads((path / "config.json").read_text())
        except FileNotFoundError:  # was "not checked": any recipe resumed, and its config.json recorded
            raise CheckpointError(f"checkpoint {path} is missing config.json") from None
        except (OSError, ValueError, RecursionError) as error:  # RecursionError: nested too deeply
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
        # The images, and what the caller recorded besides (the command line's --data):
        # a change may be deliberate (the data moved, or grew), so it is said, not refused.
        changed = [f"{key}: {saved[key]!r} there, {value!r} now" for key, value in self.extra_config.items()
                   if key in saved and not _same_setting(saved[key], value)]
        old_data = saved.get("data_fingerprint")  # (absent from checkpoints of older versions)
        if old_data is not None and old_data != self.data_fingerprint:
            changed.insert(0, f"other images: {_described(old_data)} there, {_described(self.data_fingerprint)} now")
        if changed and self.rank == 0:
            warn(f"resuming {path} with other settings than it was trained with ({'; '.join(changed)})")
        # What an older version's checkpoint cannot tell (those of 2026-12-05 on record
        # their images; "recipe" marks later changes of what a setting means).
        older = []
        if old_data is None:
            older.append("it records no fingerprint of its images, so they are not compared with these")
            if self.config.loss == "hybrid" and "recipe" not in saved:
                older.append("its 'hybrid' loss may have weighed L_t by 0.001 (versions before 2026-12-04 did), "
                             "this one weighs it by 0.001 * T")
        if older and self.rank == 0:
            warn(f"resuming {path}, written by an older version: {'; '.join(older)}")

    def run_config(self) -> dict[str, Any]:
        return {
            "recipe": RECIPE_VERSION,
            "model": getattr(self.model, "config", None),
            "schedule": self.schedule.config,
            "train": asdict(self.config),
            "data_fingerprint": self.data_fingerprint,
            **self.extra_config,
        }

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0), then a fresh loss plot."""
        self._check_whole()  # not the state of a step cut short, nor of a part-loaded checkpoint
        path = None
        rank_rng = self._gather_rank_rng() if self.world > 1 else None
        if self.rank == 0:
            from safetensors.torch import save

            def weights(module: nn.Module):
                # Copies: tied weights (two names, one tensor) share memory, which
                # safetensors refuses (at the first checkpoint, after hours of training).
                state = {k: v.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
                         for k, v in module.state_dict().items()}
                # Written by Python, whose files follow the umask (safetensors'
                # save_file made them readable by their owner alone).
                return lambda p: Path(p).write_bytes(save(state))

            state = {
                "step": self.step,
                "optimizer": self.optimizer.state_dict(),
                "lr_schedule": self.lr_schedule.state_dict(),
                "scaler": self.scaler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "rank_rng": rank_rng,
                "loss_window": list(self._loss_window),
                "early_record": self._early_record,
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
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, self._own_rng_state())
        return gathered

    def _own_rng_state(self) -> dict[str, torch.Tensor | None]:
        """This process's generator states that dropout draws from: the CPU's, its GPU's."""
        return {
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }

    def _set_own_rng_state(self, own: dict[str, torch.Tensor | None]) -> None:
        """Put back states that _own_rng_state gave."""
        torch.set_rng_state(own["torch_rng"])
        if own["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(own["cuda_rng"], self.device)

    def _restore_fused(self) -> None:
        """A loaded optimizer state brings its own ``fused`` flag: checkpoints
        written before the trainer used the fused kernel say False, and the
        per-parameter loop then fails under the fp16 GradScaler, which drives
        the optimizer as a fused one. Keep this trainer's choice (the fused
        kernel keeps its step counts on the parameters' device), and give the
        state tensors their parameters' memory layout."""
        for group in self.optimizer.param_groups:
            group["fused"] = self._fused
        for param, param_state in self.optimizer.state.items():
            if self._fused and "step" in param_state:
                param_state["step"] = param_state["step"].to(device=param.device, dtype=torch.float32)
            for key, value in param_state.items():
                # Moments (exp_avg, ...) keep the strides they were saved with: after
                # a channels_last switch on resume (a resumable change) they no longer
                # match the parameters', and the fused kernel pairs elements by
                # memory position, so it would update each weight with another's moments.
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    param_state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore model, EMA, optimizer, schedules, step and RNG state from a
        checkpoint folder, and cut the log back to that step. A checkpoint of
        another model or recipe is refused first (``check_resumable``): its
        optimizer state would bring its own learning rate and betas along. One
        that fails once it has begun to overwrite the state (a damaged
        ema.safetensors after the model's) leaves a Trainer that refuses to
        train or save (its model would be that checkpoint's, its EMA and step not)
        until a checkpoint loads whole."""
        self._loaded_part = False
        try:
            self._load_checkpoint(path)
        except BaseException as error:
            if self._loaded_part:
                self._failed_resume = f"{Path(path).name} was not fully loaded ({type(error).__name__})"
            raise
        self._failed_resume = None  # all of the state is now this checkpoint's

    def _load_checkpoint(self, path: str | os.PathLike) -> None:
        """``load_checkpoint``, which a resume calls on older checkpoints where one fails."""
        path = Path(path)
        needed = ("model.safetensors", "ema.safetensors", "trainer.pt", "config.json")
        missing = [name for name in needed if not (path / name).is_file()]
        if missing:
            raise CheckpointError(f"checkpoint {path} is missing {', '.join(missing)}")
        self.check_resumable(path)
        name = "trainer.pt"
        check_unpacked_fits(path / name, f"loading {path / name}")  # not a damaged file: older ones are no smaller
        try:
            state = torch.load(path / name, map_location="cpu", weights_only=True)
            for module, name in ((self.model, "model.safetensors"), (self.ema, "ema.safetensors")):
                tensors = load_safetensors(path / name, self.device)
                self._loaded_part = True  # from here on, the state is no longer all the Trainer's own
                load_state_dict_checked(module, tensors, str(path / name))
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
        if self.rank == 0 and (self.out_dir / "log.jsonl").is_file():  # no run folder yet: no log to cut
            self._rewrite_log(lambda r: r["step"] <= self.step)

    def _restore_state(self, state: dict[str, Any]) -> None:
        """Optimizer, schedules, step and RNG state from a checkpoint's trainer.pt."""
        self.optimizer.load_state_dict(state["optimizer"])
        self._restore_fused()
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        # (absent from checkpoints of older versions, which logged at every checkpoint)
        self._loss_window = [float(loss) for loss in state.get("loss_window", [])]
        self._early_record = state.get("early_record")
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            # One state per GPU of the machine that wrote it, which may have had more
            # (set_rng_state_all raised IndexError there): restore the GPUs this one has.
            for index, rng in enumerate(state["cuda_rng"][: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(rng, index)
        rank_rng = state.get("rank_rng")
        if rank_rng is not None and len(rank_rng) == self.world:  # under DDP, by the same number of ranks
            self._set_own_rng_state(rank_rng[self.rank])
        elif self.world > 1:
            # Written by another number of ranks (one process, say): every rank
            # would go on from the same state and draw the same dropout masks.
            # Each seeds its own from that state and its rank, reproducibly.
            base = int(torch.randint(2**62, (1,)).item())
            torch.manual_seed(rank_seed(base, self.rank))


def _same_setting(old: object, new: object) -> bool:
    """Whether a recorded extra setting is the one given now: equal, or a path an
    older version recorded as typed (relative) that is the absolute one now
    (the command line's --data: a resume with the same command warned)."""
    if old == new:
        return True
    return (isinstance(old, str) and isinstance(new, str) and not os.path.isabs(old) and os.path.isabs(new)
            and os.path.abspath(old) == new)


def _described(fingerprint: Any) -> str:
    """A recorded ``ImageDataset.fingerprint()`` in a few words: its shape and
    the start of its hash."""
    if not isinstance(fingerprint, dict):
        return repr(fingerprint)
    shape = fingerprint.get("shape")
    shown = " x ".join(map(str, shape)) if isinstance(shape, list) else repr(shape)
    return f"{shown} images, SHA-256 {str(fingerprint.get('sha256'))[:12]}"
