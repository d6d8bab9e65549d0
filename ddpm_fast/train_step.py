"""The Trainer's step (the Trainer mixes it in, with TrainerCheckpoints): the
batch, timesteps and flips of step s from (seed, s); the loss (Ho et al. 2020,
eq. 14, or the bound); one update, with clipping, the GradScaler, the learning
rate's warm-up and the EMA; and what an interruption inside it leaves (nothing
half done: see _interrupts)."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from . import diffusion, ops
from ._interrupts import sigint_deferred
from ._warn import warn
from .checkpoint import CheckpointError
from .train_config import PRECISIONS, check_live_changes

# Nichol & Dhariwal (2021), eq. 16: L_simple + lambda * L_vlb. One sampled term L_t
# per sample estimates L_vlb / T, so it is weighted lambda * T (improved-diffusion's
# rescaling, T / 1000).
HYBRID_VLB_WEIGHT = 1e-3

_SEED_RANGE = 1 << 63  # host generators' seeds, derived from the run's seed, wrap into int64


class NonFiniteLossError(RuntimeError):
    """Training stopped after too many non-finite losses in a row."""


class TrainerSteps:
    """The step of Trainer (train.py), whose __init__ makes the state used here."""

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
            order = torch.randperm(n, device="cpu", generator=torch.Generator().manual_seed((self.config.seed * 7919 + epoch) % _SEED_RANGE))
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
        # dtype and device fixed: a float64 draw (under torch.set_default_dtype)
        # takes other bits from the generator, and so other flips.
        t = torch.randint(0, self.schedule.num_timesteps, (b,), generator=gen, device="cpu")[lo : lo + local]
        flip = torch.rand(b, generator=gen, dtype=torch.float32, device="cpu")[lo : lo + local] < 0.5
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
        vlb = self.config.loss in ("vlb", "hybrid")
        with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            # The bound reads x_t after the call: a copy, for a model that writes into its input
            pred = self.net(x_t.clone() if vlb else x_t, t)
        if not isinstance(pred, torch.Tensor):  # a tuple, say: loss_simple checks the shape
            raise TypeError(f"the model returned a {type(pred).__name__}; expected eps as a torch.Tensor")
        pred = pred.float()
        terms = []
        if self.config.loss in ("simple", "hybrid"):
            terms.append(diffusion.loss_simple(eps, pred))
        if vlb:
            # L_t in bits/dim: the KL to the posterior (the decoder's NLL at t = 0). With the
            # fixed variances it trains the mean (there is no learned variance, which
            # Nichol & Dhariwal's hybrid loss trains alone, the mean's gradient stopped).
            vb, _ = diffusion.vb_terms_bpd(self.schedule, pred, x0, x_t, t, clip_denoised=False)
            hybrid = self.config.loss == "hybrid"
            terms.append(vb * (HYBRID_VLB_WEIGHT * self.schedule.num_timesteps if hybrid else 1.0))
        # Mean over the local batch; DDP averages over ranks = the global-batch mean.
        return sum(terms).mean()

    @torch.no_grad()
    def _ema_update(self) -> None:
        decay = self.config.ema_decay
        if self.config.ema_warmup:
            decay = min(decay, (1 + self.step) / (10 + self.step))
        torch._foreach_lerp_(*self._ema_averaged, 1.0 - decay)
        for e, p in self._ema_copied:
            e.copy_(p)
        for eb, mb in zip(self.ema.buffers(), self.model.buffers()):
            eb.copy_(mb)

    def _clip_gradients(self) -> torch.Tensor:
        """clip_grad_norm_ at grad_clip; returns the gradients' total norm. Where
        reading the norm costs no device sync (the CPU) a norm within grad_clip
        leaves the gradients as they are rather than multiplying them by 1.0, as
        torch does to spare a GPU the sync: the same gradients, 0.4 ms a step
        sooner for the demo's model."""
        grads = [p.grad for p in self._params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if not self._clip_reads_norm or not bool(self.config.grad_clip / (norm + 1e-6) >= 1.0):  # (NaN: clipped)
            torch.nn.utils.clip_grads_with_norm_(self._params, self.config.grad_clip, norm)
        return norm

    def _advance_lr(self) -> None:
        """The learning rate follows the step count, skipped updates included.
        torch warns when the schedule steps before the optimizer ever has (a
        first update skipped): that order is meant here, so the warning, which
        would tell users to reorder calls they never made, is not shown."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.lr_schedule.step()

    def train_step(self) -> float | None:
        """One optimisation step; returns the loss, or None if it was not finite
        (the update is skipped, with a warning).

        The step reads the device once, for the loss and whether it and the
        gradient are finite together: the skip, its warning and the stop after
        ``max_nonfinite`` in a row are decided on the step itself. The next
        step's batch is drawn and sent to the device before that read, while
        the device still computes this one.
        """
        self._check_can_train()
        try:
            return self._step()
        except BaseException:
            # A Ctrl-C (the host waits in the step's one device read) or an error
            # between the scaler's unscale_ and update leaves it mid-step, and every
            # later step (a resumed train() too) raised: a fresh one, same state.
            if self.scaler.is_enabled():
                state, self.scaler = self.scaler.state_dict(), torch.amp.GradScaler(self.device.type)
                self.scaler.load_state_dict(state)
            raise

    def _step(self) -> float | None:
        if not all(m.training for m in self._model_modules):  # (train() sets each of them: 0.3 ms a step)
            self.net.train()
        # The forward pass updates buffers (BatchNorm's running statistics) before the
        # step is known to be finite: kept, to undo a skipped step's (NaN) update,
        # which the next EMA update would copy into the EMA model. They and the
        # generators (dropout's) are put back too when the step stops before its
        # update (a Ctrl-C, an error): taken again, it is the step it would have been.
        kept = [b.clone() for b in self.model.buffers()]
        rng = self._own_rng_state()  # (TrainerCheckpoints)
        try:
            finite, loss_value = self._forward_backward()
        except BaseException:
            self.optimizer.zero_grad(set_to_none=True)
            self._restore_forward(kept, rng)
            raise
        with sigint_deferred():  # the update and its bookkeeping: all of it or none (_interrupts)
            if not finite:
                self.optimizer.zero_grad(set_to_none=True)
                self._restore_forward(kept, None)  # the forward's buffers, where it replaced one
                if self.scaler.is_enabled():
                    self.scaler.update()  # ends the step unscale_ began (and lowers the scale)
                self._nonfinite_in_row += 1
                # Steps are counted from 1 in the log and checkpoints: this is step self.step + 1.
                if self.rank == 0:  # the ranks share the decision (and the loss): one warning
                    warn(f"step {self.step + 1}: non-finite loss or gradient ({loss_value}); update skipped")
                if self._nonfinite_in_row >= self.config.max_nonfinite:
                    raise NonFiniteLossError(
                        f"{self._nonfinite_in_row} non-finite losses in a row at step {self.step + 1}; stopping. "
                        f"{self._last_good_checkpoint()}: lower the learning rate or check the data"
                    )
                self.step += 1
                self._advance_lr()
                loss_value = None
            else:
                self._applying = self.step + 1  # until the EMA's update: an error between leaves them apart
                self.scaler.step(self.optimizer)  # fp16: the scaler skips overflowed steps itself
                self.scaler.update()
                self._advance_lr()
                self._nonfinite_in_row = 0
                self.step += 1
                self._ema_update()
            if self._running:  # (train()'s: its log's losses, and what is due after the step)
                if loss_value is not None:
                    self._loss_window.append(loss_value)
                self._after_step = (self.step, set())
            self._applying = None
        return loss_value

    def _forward_backward(self) -> tuple[bool, float]:
        """The step's loss and gradients, and whether they are finite (read once)."""
        loss = self._loss(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip_gradients()
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
        self._last_lr = self.optimizer.param_groups[0]["lr"]  # what this step uses (the log's lr)
        return finite_flag == 1.0, loss_value

    def _restore_forward(self, kept: list[torch.Tensor], rng: dict[str, torch.Tensor | None] | None) -> None:
        for buffer, value in zip(self.model.buffers(), kept):
            buffer.copy_(value)
        if rng is not None:
            self._set_own_rng_state(rng)  # (TrainerCheckpoints)

    def _check_can_train(self) -> None:
        """What every step and every ``train()`` checks first: the config's changes,
        the images, and a state that is whole."""
        check_live_changes(self.config, self._made_with)
        self._check_same_images()
        self._check_whole()

    def _check_same_images(self) -> None:
        """Refuse images set on the dataset, or another dataset, since the Trainer was
        made: it took the images, and their fingerprint for its checkpoints, then
        (batches were drawn from the old images by the new count, silently)."""
        dataset, version = self._images_from
        if self.dataset is not dataset or getattr(dataset, "_images_version", 0) != version:
            raise ValueError("dataset.images (or trainer.dataset) was replaced after the Trainer was made, which took "
                             "the images (and their fingerprint for its checkpoints) then: make a new Trainer")

    def _check_whole(self) -> None:
        """Refuse to go on from a step whose update was cut short (not by a Ctrl-C:
        that waits for the update's end), or from a partly loaded checkpoint."""
        if self._applying is not None:
            raise RuntimeError(f"step {self._applying} stopped while its update was applied, so this Trainer's "
                               "model, optimizer and EMA no longer agree; make a new Trainer (it resumes from "
                               "the newest checkpoint)")
        if self._failed_resume is not None:  # its model, EMA, optimizer: part one checkpoint's, part another's or fresh
            raise CheckpointError(f"this Trainer's state was partly overwritten by a checkpoint load that failed "
                                  f"({self._failed_resume}); make a new Trainer, or load a checkpoint whole (load_checkpoint)")
