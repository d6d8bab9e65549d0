"""The Trainer's recipe, piece by piece (Ho et al. 2020, appendix B; issue 6):
its defaults, the EMA and its decay warm-up, gradient clipping at 1, the
optimizer, the timesteps drawn, random horizontal flips, and q-sampling with
noise drawn in-kernel."""

from __future__ import annotations

import pytest
import torch

import ddpm_fast.train_step
from ddpm_fast.cli import build_parser
from ddpm_fast.train import TrainConfig
from train_helpers import make_trainer


@pytest.mark.parametrize("ema_decay", [0.5, 0.2])
def test_ema_follows_its_warmed_up_decay(tmp_path, ema_decay):
    """After step s (counted from 1) the EMA moves by (1 - d) towards the
    weights, d = min(ema_decay, (1 + s) / (10 + s)): 0.5 is above the warm-up
    over these 5 steps (6/15 at most), 0.2 caps it from step 2 (3/12) on."""
    trainer = make_trainer(tmp_path, steps=5, ema_decay=ema_decay)
    for s in range(1, 6):
        before = [p.clone() for p in trainer.ema.parameters()]
        trainer.train_step()
        d = min(ema_decay, (1 + s) / (10 + s))
        for old, ema, live in zip(before, trainer.ema.parameters(), trainer.model.parameters()):
            torch.testing.assert_close(ema, old + (1 - d) * (live.detach() - old), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("clip_reads_norm", [True, False], ids=["cpu", "as-on-a-gpu"])
def test_gradients_are_clipped_to_the_configured_norm(tmp_path, monkeypatch, clip_reads_norm):
    """The update sees gradients of total norm at most grad_clip (the loss of
    a fresh model gives a larger one, so the clip acts); gradients within it,
    exactly as backward left them (on the CPU the multiply by 1.0 is skipped,
    which gives the same values)."""
    norms = []
    real_norm = torch.nn.utils.get_total_norm

    def recorded_norm(*args, **kwargs):
        norms.append(float(real_norm(*args, **kwargs)))
        return torch.tensor(norms[-1])

    monkeypatch.setattr(torch.nn.utils, "get_total_norm", recorded_norm)
    for clip in (0.05, 1e6):
        trainer = make_trainer(tmp_path / str(clip), steps=1, grad_clip=clip)
        trainer._clip_reads_norm = clip_reads_norm
        updated = []

        def seen(optimizer, args, kwargs):  # the gradients the update reads
            updated.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.model.parameters()]))))

        trainer.optimizer.register_step_pre_hook(seen)
        trainer.train_step()
        (before,), (after,) = norms, updated
        norms.clear()
        if clip == 0.05:
            assert before > clip and after <= clip * (1 + 1e-5)
        else:  # within the clip: the gradients backward left
            assert after == pytest.approx(before, rel=1e-6, abs=0)


def test_flips_mirror_the_images_they_pick(tmp_path):
    """x_0 of a step: image index[i] scaled to [-1, 1], mirrored left-right
    exactly where the step's flip flag is set (and never with flip=False)."""
    for flip in (True, False):
        trainer = make_trainer(tmp_path / str(flip), steps=1, flip=flip)
        index, _, flags = trainer._stage(3)
        x0, _, _ = trainer._batch(3)
        want = trainer.images[index].float() / 127.5 - 1
        if flip:
            assert 0 < int(flags.sum()) < len(flags)
            want = torch.where(flags[:, None, None, None], want.flip(-1), want)
        torch.testing.assert_close(x0, want, rtol=0, atol=0)


def test_noise_is_drawn_in_kernel(tmp_path, monkeypatch):
    """Each step q-samples through ops.q_sample with no noise tensor: the op
    draws it from the run's seed at the step's counters."""
    calls = []
    real = ddpm_fast.train_step.ops.q_sample

    def spy(x0, t, schedule, **kwargs):
        calls.append(kwargs)
        return real(x0, t, schedule, **kwargs)

    monkeypatch.setattr(ddpm_fast.train_step.ops, "q_sample", spy)
    trainer = make_trainer(tmp_path, steps=2, seed=11)
    trainer.train_step()
    trainer.train_step()
    assert [c.get("noise") for c in calls] == [None, None]
    assert [c["seed"] for c in calls] == [11, 11] and calls[0]["offset"] != calls[1]["offset"]


def test_fp16_clips_the_unscaled_gradients(tmp_path):
    """Under fp16 the GradScaler's gradients are unscaled before the clip:
    clipped while still scaled (by 65536), the update would see gradients of
    norm grad_clip / 65536. The update sees norm grad_clip exactly."""
    trainer = make_trainer(tmp_path, steps=1, grad_clip=0.05, precision="fp16")
    seen = []

    def record(optimizer, args, kwargs):
        grads = [p.grad.float().norm() for p in trainer.model.parameters() if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack(grads))))

    trainer.optimizer.register_step_pre_hook(record)
    assert trainer.train_step() is not None
    assert seen == [pytest.approx(0.05, rel=1e-3)]


def test_ema_without_warmup_takes_its_decay_from_the_first_step(tmp_path):
    """ema_warmup=False: the EMA moves by 1 - ema_decay from step 1 on (with
    the warm-up it would move by 1 - 2/11 at step 1)."""
    trainer = make_trainer(tmp_path, steps=2, ema_decay=0.5, ema_warmup=False)
    for _ in range(2):
        before = [p.clone() for p in trainer.ema.parameters()]
        trainer.train_step()
        for old, ema, live in zip(before, trainer.ema.parameters(), trainer.model.parameters()):
            torch.testing.assert_close(ema, old + 0.5 * (live.detach() - old), rtol=1e-6, atol=1e-7)


def test_weight_decay_switches_to_decoupled_adamw(tmp_path):
    """weight_decay > 0 is AdamW's decoupled decay (Adam's weight_decay would add
    it to the gradient, where Adam's scaling undoes most of it); 0 is plain Adam."""
    assert type(make_trainer(tmp_path / "a", weight_decay=0.1).optimizer) is torch.optim.AdamW
    assert type(make_trainer(tmp_path / "b").optimizer) is torch.optim.Adam


def test_timesteps_are_drawn_from_all_of_0_to_t_minus_1(tmp_path):
    """t ~ U{0, ..., T-1}: over 200 steps of 8 (T = 100) every timestep is drawn,
    the first and the last included."""
    trainer = make_trainer(tmp_path)
    drawn = torch.cat([trainer._stage(step)[1] for step in range(200)])
    assert sorted(set(drawn.tolist())) == list(range(100))


def test_each_sample_of_each_step_gets_its_own_noise(tmp_path, monkeypatch):
    """The noise counters of a step follow on from the step before's: no sample
    of step 1 reuses the noise of a sample of step 0 (offsets one sample apart
    would shift step 0's noise into step 1's)."""
    noises = []
    real = ddpm_fast.train_step.ops.q_sample

    def spy(*args, **kwargs):
        x_t, eps = real(*args, **kwargs)
        noises.append(eps.detach().flatten(1).clone())
        return x_t, eps

    monkeypatch.setattr(ddpm_fast.train_step.ops, "q_sample", spy)
    trainer = make_trainer(tmp_path, steps=2)
    trainer.train_step()
    trainer.train_step()
    assert float(torch.cdist(noises[0], noises[1]).min()) > 1.0


def test_the_config_defaults_are_the_papers_cifar10_recipe():
    """Ho et al. (2020), appendix B: Adam at 2e-4, 5000 warm-up steps, batch 128,
    gradients clipped at norm 1, EMA decay 0.9999, random flips, L_simple, 800k steps."""
    config = TrainConfig()
    assert (config.lr, config.warmup, config.batch_size, config.grad_clip, config.ema_decay, config.flip, config.loss,
            config.steps, config.weight_decay) == (2e-4, 5000, 128, 1.0, 0.9999, True, "simple", 800_000, 0.0)


def test_the_other_config_defaults():
    """fp32 unless autocast is asked for, in TrainConfig and in `ddpm-fast train`
    alike, and the run's bookkeeping as the README gives it."""
    config = TrainConfig()
    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    assert config.precision == "fp32" and train_parser.get_default("precision") == "fp32"
    assert (config.ema_warmup, config.seed, config.log_every, config.sample_every, config.sample_count,
            config.sample_steps, config.checkpoint_every, config.keep_checkpoints, config.max_nonfinite,
            config.channels_last, config.compile) == (True, 0, 100, 0, 64, None, 5000, 2, 10, True, False)
