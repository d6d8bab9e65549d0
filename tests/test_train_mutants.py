"""Trainer behaviours a second mutation round of train.py, train_checkpoints.py
and train_config.py found unpinned: epochs of a dataset that is no multiple of
the batch, a trainer rewound to an earlier epoch, the flip rate, each rank's
slice of a global batch, and the log record of a window of skipped steps."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ddpm_fast import NoiseSchedule, ops
from ddpm_fast.checkpoint import CheckpointError
from ddpm_fast.train import TrainConfig, Trainer
from test_train_robustness import FlakyEps
from train_helpers import make_trainer, toy_dataset


def test_a_dataset_that_is_no_multiple_of_the_batch_drops_each_epochs_remainder(tmp_path):
    """12 images in batches of 8: an epoch is one whole batch (the 4 left over
    are dropped, as every step takes batch_size images), and the run trains."""
    trainer = make_trainer(tmp_path, steps=3, images=12)
    batches = [trainer._global_batch(step) for step in range(3)]
    assert [len(b) for b in batches] == [8, 8, 8]
    assert all(len(set(b.tolist())) == 8 for b in batches)
    assert trainer.train(final_samples=False)["steps"] == 3


def test_a_trainer_rewound_to_an_earlier_epoch_takes_that_epochs_batches(tmp_path):
    """load_checkpoint into a trainer that has gone on to a later epoch (as
    train() does after a stop on non-finite losses): the steps after the
    checkpoint take their own epoch's permutation, not the later one's it held,
    so they repeat the losses the run logged for them."""
    trainer = make_trainer(tmp_path, steps=8, images=24, keep_checkpoints=0)  # 3 steps an epoch
    trainer.train(final_samples=False)
    logged = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    trainer.load_checkpoint(tmp_path / "checkpoint-00000002")  # epoch 0; the trainer held epoch 2's order
    again = [trainer.train_step() for _ in range(2)]  # steps 3 (epoch 0) and 4 (epoch 1)
    assert again == pytest.approx(logged[2:4], rel=1e-6)


def test_about_half_of_the_images_are_flipped(tmp_path):
    """Random horizontal flips take each image with probability 1/2: over
    200 steps of 8 images the share flipped is within 4 standard deviations of it."""
    trainer = make_trainer(tmp_path, flip=True)
    flags = torch.cat([trainer._stage(step)[2] for step in range(200)])
    assert abs(float(flags.float().mean()) - 0.5) < 4 * math.sqrt(0.25 / len(flags))


def test_each_ranks_slice_of_a_step_is_its_part_of_the_one_process_batch(tmp_path):
    """Under DDP rank r of N takes samples r*B/N ... of the global batch: the
    same images, timesteps, flips and noise as one process has there (the
    noise counters run over the global batch). Ranks are set by hand here:
    the slicing reads only rank and world."""
    whole = make_trainer(tmp_path / "whole")
    x0, t, offset = whole._batch(5)
    x_t, eps = ops.q_sample(x0, t, whole.schedule, seed=whole.config.seed, offset=offset)
    for rank in (0, 1):
        part = make_trainer(tmp_path / str(rank))
        part.rank, part.world = rank, 2
        px0, pt, poffset = part._batch(5)
        px_t, peps = ops.q_sample(px0, pt, part.schedule, seed=part.config.seed, offset=poffset)
        half = slice(4 * rank, 4 * rank + 4)
        assert torch.equal(px0, x0[half]) and torch.equal(pt, t[half])
        torch.testing.assert_close(peps, eps[half], rtol=0, atol=0)
        torch.testing.assert_close(px_t, x_t[half], rtol=0, atol=0)


def test_a_log_record_of_skipped_steps_alone_logs_a_nan_loss(tmp_path):
    """A record whose steps were all skipped (non-finite) has no loss to
    average: it logs NaN (a 0.0 would pass for a perfect loss on the curve),
    and the records around it the mean of their own finite steps."""
    config = TrainConfig(steps=3, batch_size=8, warmup=0, log_every=1, checkpoint_every=100, max_nonfinite=3)
    trainer = Trainer(FlakyEps(nan_output={2}, nan_gradient=set()), toy_dataset(), NoiseSchedule("linear", timesteps=20),
                      config, tmp_path, device="cpu", progress=False)
    with pytest.warns(UserWarning, match="step 2: non-finite"):
        trainer.train(final_samples=False)
    losses = [record["loss"] for record in trainer.read_log()]
    assert [record["step"] for record in trainer.read_log()] == [1, 2, 3]
    assert math.isfinite(losses[0]) and math.isnan(losses[1]) and math.isfinite(losses[2])


def test_a_trainer_whose_only_checkpoint_fails_to_load_before_any_state_is_still_usable(tmp_path):
    """An unreadable trainer.pt fails before the model, the EMA or the optimizer
    is touched: the resume raises, but the Trainer is not spoiled, and
    train(resume=False) starts afresh."""
    make_trainer(tmp_path, steps=2, keep_checkpoints=1).train(final_samples=False)
    (tmp_path / "checkpoint-00000002" / "trainer.pt").write_bytes(b"damaged")
    trainer = make_trainer(tmp_path, steps=2)
    with pytest.raises(CheckpointError, match="trainer.pt: not a torch.save archive"):
        trainer.train(final_samples=False)
    with pytest.warns(UserWarning, match="starting afresh"):
        assert trainer.train(resume=False, final_samples=False)["steps"] == 2
