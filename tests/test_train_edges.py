"""Trainer edges the other training tests do not reach (found by mutation
testing of train.py, train_config.py and train_checkpoints.py): a dataset of
exactly one batch, the vlb loss on the unclipped x0, an EMA out of autograd,
grids of one noise, a model handed over in eval mode, resuming at steps=,
rank states of another world size, config sections and a schedule
that cannot be sampled."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from ddpm_fast import NoiseSchedule, diffusion, ops
from ddpm_fast.checkpoint import latest_checkpoint
from ddpm_fast.data import ImageDataset
from ddpm_fast.train import ConfigMismatchError, TrainConfig, Trainer
from train_helpers import TinyEps, make_trainer, toy_dataset


def test_a_dataset_of_exactly_one_batch_trains(tmp_path):
    """len(dataset) == batch_size is enough (one batch per epoch): only fewer is refused."""
    trainer = make_trainer(tmp_path, steps=2, images=8)
    assert trainer.train(final_samples=False)["steps"] == 2


def test_the_vlb_loss_trains_on_the_unclipped_x0_prediction(tmp_path):
    """L_t of the 'vlb' loss is the KL with the model's x_0 prediction unclipped:
    clipping (as sampling may) zeroes the gradient wherever the prediction
    leaves [-1, 1], i.e. at most large t."""
    trainer = make_trainer(tmp_path, loss="vlb")
    step = 5
    x0, t, offset = trainer._batch(step)
    x_t, _ = ops.q_sample(x0, t, trainer.schedule, seed=trainer.config.seed, offset=offset)
    with torch.no_grad():
        pred = trainer.net(x_t, t).float()
        want = diffusion.vb_terms_bpd(trainer.schedule, pred, x0, x_t, t, clip_denoised=False)[0].mean()
        clipped = diffusion.vb_terms_bpd(trainer.schedule, pred, x0, x_t, t, clip_denoised=True)[0].mean()
        got = trainer._loss(step)
    assert not torch.allclose(want, clipped)  # the case tells them apart
    torch.testing.assert_close(got, want)


def test_the_ema_stays_out_of_autograd(tmp_path):
    """The EMA update reads the weights detached: else every EMA tensor
    requires grad and chains a graph through all the steps (memory that grows
    with the run, and an EMA that is no leaf)."""
    trainer = make_trainer(tmp_path, steps=3)
    for _ in range(3):
        trainer.train_step()
    assert all(not p.requires_grad and p.grad_fn is None for p in trainer.ema.parameters())


def test_sample_grids_use_the_same_noise_at_every_step(tmp_path):
    """Grids are drawn from the run's seed, not the step: the same weights give
    the same grid, so grids of a run compare over time."""
    trainer = make_trainer(tmp_path, steps=1, sample_count=2, sample_steps=5)
    first = trainer.sample_grid(tmp_path / "a.png")
    trainer.step = 7
    second = trainer.sample_grid(tmp_path / "b.png")
    assert first.dtype == np.uint8 and first.shape == (2, 8, 8, 1) and np.array_equal(second, first)


def test_sample_grids_are_drawn_in_batches_of_the_training_batch(tmp_path, monkeypatch):
    """A sample_count in one batch asked for far more memory than training did,
    at the first grid; sample i is the same whatever the batch."""
    from ddpm_fast.sampler import Sampler

    def grid(folder, batch_size: int) -> np.ndarray:
        trainer = make_trainer(tmp_path / folder, steps=1, sample_count=10, sample_steps=3, batch_size=batch_size)
        return trainer.sample_grid(tmp_path / f"{folder}.png")

    whole = grid("a", 16)
    counts, sample = [], Sampler.sample
    monkeypatch.setattr(Sampler, "sample", lambda self, n, **kw: counts.append(n) or sample(self, n, **kw))
    batched = grid("b", 4)
    assert counts == [4, 4, 2] and np.array_equal(batched, whole)


def test_a_step_trains_a_model_handed_over_in_eval_mode(tmp_path):
    """A model passed in eval mode (say, loaded for fine-tuning) still trains
    with its dropout on."""
    trainer = make_trainer(tmp_path, steps=3, dropout=0.5)
    trainer.model.eval()
    trainer.train_step()
    assert trainer.model.training
    trainer.model.drop.eval()  # one module alone, between steps
    trainer.train_step()
    assert all(m.training for m in trainer.model.modules())


def test_a_finished_run_resumed_with_its_own_steps_does_not_warn(tmp_path):
    """Only a run beyond steps= is told it has nothing to train; one exactly
    at it (a finished run started again) just returns."""
    make_trainer(tmp_path, steps=2).train(final_samples=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*nothing to train")
        assert make_trainer(tmp_path, steps=2).train(final_samples=False)["trained"] == 0


def test_a_single_process_resume_ignores_the_rank_states_of_another_world_size(tmp_path):
    """trainer.pt of a 2-rank run holds each rank's generator states; one
    process resuming it takes the checkpoint's own torch_rng, not rank 0's."""
    make_trainer(tmp_path, steps=2).train(final_samples=False)
    saved = latest_checkpoint(tmp_path) / "trainer.pt"
    state = torch.load(saved, weights_only=True)
    other = torch.Generator().manual_seed(123).get_state()
    state["rank_rng"] = [{"torch_rng": other, "cuda_rng": None}, {"torch_rng": other, "cuda_rng": None}]
    torch.save(state, saved)
    make_trainer(tmp_path, steps=2).load_checkpoint(saved.parent)
    assert torch.equal(torch.get_rng_state(), state["torch_rng"])


def test_resuming_a_model_with_a_config_by_one_without_is_refused(tmp_path):
    """A section that is no dict on one side (a model without .config) is
    compared whole: a checkpoint of a configured model is not resumed into another."""
    make_trainer(tmp_path, steps=2).train(final_samples=False)
    other = make_trainer(tmp_path, steps=4)
    del other.model.config
    with pytest.raises(ConfigMismatchError, match="model: "):
        other.check_resumable(latest_checkpoint(tmp_path))


def test_a_schedule_whose_reverse_step_is_undefined_is_refused_before_training(tmp_path):
    """jsd's last beta is 1: a model trained on it could never be sampled, so
    the Trainer refuses it when made, not at the first sample grid."""
    with pytest.raises(ValueError, match="reverse step is undefined at timestep 9"):
        Trainer(TinyEps(), toy_dataset(n=16), NoiseSchedule("jsd", timesteps=10), TrainConfig(batch_size=8),
                tmp_path, device="cpu", progress=False)
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_config_a_model_without_parameters_or_a_file_as_out_dir_is_refused_when_made(tmp_path):
    """Each was a deep error: the dict's missing attribute, torch's empty
    parameter list, or mkdir's FileExistsError at the first write, after training."""
    schedule = NoiseSchedule("linear", timesteps=100)
    config = TrainConfig(batch_size=8)
    with pytest.raises(TypeError, match=r"config must be a TrainConfig \(from a dict: TrainConfig.from_dict\(d\)\), got dict"):
        Trainer(TinyEps(), toy_dataset(), schedule, {"batch_size": 8}, tmp_path / "a", device="cpu")
    frozen = TinyEps().requires_grad_(False)
    with pytest.raises(ValueError, match="the model has no trainable parameters"):
        Trainer(frozen, toy_dataset(), schedule, config, tmp_path / "b", device="cpu")
    (tmp_path / "c").write_text("a file")
    with pytest.raises(NotADirectoryError, match="out_dir '.*/c' is a file, not a folder"):
        Trainer(TinyEps(), toy_dataset(), schedule, config, tmp_path / "c", device="cpu")
    Trainer(TinyEps(), toy_dataset(), schedule, config, tmp_path / "d", device="cpu")  # a new folder is fine


def test_a_file_named_samples_is_refused_when_made_if_grids_are_drawn(tmp_path):
    """The grids go into out_dir/samples/: a file there was found at the first
    grid, after sample_every steps of training, whose checkpoint was then lost."""
    schedule = NoiseSchedule("linear", timesteps=100)
    (tmp_path / "samples").write_text("a file")
    with pytest.raises(NotADirectoryError, match="samples' is a file, but the sample grids go into a folder"):
        Trainer(TinyEps(), toy_dataset(), schedule, TrainConfig(batch_size=8, sample_every=2), tmp_path, device="cpu")
    Trainer(TinyEps(), toy_dataset(), schedule, TrainConfig(batch_size=8, sample_every=0), tmp_path, device="cpu")
    # A broken link of that name as well (exists() is False for it): found at the first grid, steps lost
    (tmp_path / "samples").unlink()
    (tmp_path / "samples").symlink_to(tmp_path / "nowhere" / "grids")
    with pytest.raises(NotADirectoryError, match="samples' is a broken symbolic link, but the sample grids go into a"):
        Trainer(TinyEps(), toy_dataset(), schedule, TrainConfig(batch_size=8, sample_every=2), tmp_path, device="cpu")



@pytest.mark.parametrize("name", ["latest", "log.jsonl", "loss.png"])
def test_a_folder_named_as_a_file_the_run_writes_is_refused_at_once(tmp_path, name):
    """A folder named latest (or log.jsonl, loss.png) in the run folder failed
    only when the first checkpoint was written: checkpoint_every steps lost."""
    (tmp_path / name).mkdir()
    with pytest.raises(IsADirectoryError, match=f"{name}' is a folder, but the run writes a file of that name"):
        make_trainer(tmp_path, steps=2)

def test_images_set_on_the_dataset_after_the_trainer_was_made_are_refused(tmp_path):
    """The Trainer took the images (and their fingerprint) when made, but read the
    dataset's length live: after dataset.images = 64 new images, every batch was
    drawn from the first 64 old ones, silently."""
    trainer = make_trainer(tmp_path, steps=4, images=80)
    trainer.dataset.images = trainer.dataset.images  # the same tensor again: nothing changes
    trainer.train_step()
    trainer.dataset.images = toy_dataset(n=64, seed=1).images
    with pytest.raises(ValueError, match=r"dataset.images \(or trainer.dataset\) was replaced after the Trainer was made"):
        trainer.train_step()
    with pytest.raises(ValueError, match="make a new Trainer"):
        trainer.train(final_samples=False)
    trainer = make_trainer(tmp_path / "swapped", steps=4, images=80)
    trainer.dataset = toy_dataset(n=64, seed=1)  # another dataset: its images were set but once, too
    with pytest.raises(ValueError, match=r"\(or trainer.dataset\) was replaced"):
        trainer.train_step()


class _ImagesMadeOnRead(ImageDataset):
    """A subclass whose images are a fresh tensor at every read, and whose length
    is its own: neither is a replacement, and the length is honoured."""

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__(images)
        self._arr = images.numpy()

    @property
    def images(self) -> torch.Tensor:
        return torch.from_numpy(self._arr)

    @images.setter
    def images(self, images: torch.Tensor) -> None:
        ImageDataset.images.fset(self, images)

    def __len__(self) -> int:
        return 16


def test_a_dataset_whose_images_are_made_on_read_trains_on_its_own_length(tmp_path):
    trainer = make_trainer(tmp_path, steps=4)
    trainer = Trainer(trainer.model, _ImagesMadeOnRead(toy_dataset(n=64).images), trainer.schedule, trainer.config,
                      tmp_path / "own", device="cpu", progress=False)
    drawn = torch.cat([trainer._global_batch(step) for step in range(4)])
    assert trainer.train(final_samples=False)["trained"] == 4 and int(drawn.max()) < 16


def test_load_checkpoint_refuses_another_recipe(tmp_path):
    """Called directly, load_checkpoint skipped the config check: the other
    run's optimizer state brought its learning rate along (training at 5e-2
    while every config.json written said 1e-3)."""
    make_trainer(tmp_path / "other", steps=2, lr=5e-2).train(final_samples=False)
    mine = make_trainer(tmp_path / "mine", steps=4)
    with pytest.raises(ConfigMismatchError, match="train.lr: 0.05 there, 0.001 now"):
        mine.load_checkpoint(latest_checkpoint(tmp_path / "other"))
    assert mine.step == 0 and mine.optimizer.param_groups[0]["lr"] != 5e-2


def test_load_checkpoint_into_a_trainer_whose_out_dir_does_not_exist_yet(tmp_path):
    """Cutting the log back wrote log.jsonl into a folder that did not exist:
    a FileNotFoundError after the state had been overwritten."""
    make_trainer(tmp_path / "run", steps=2).train(final_samples=False)
    fresh = make_trainer(tmp_path / "new", steps=4)
    fresh.load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert fresh.step == 2 and not (tmp_path / "new").exists()


def test_the_ema_samples_in_eval_mode(tmp_path):
    """The EMA copy is made in eval mode: in training mode its sample grids ran
    with dropout on (and the Sampler warned)."""
    trainer = make_trainer(tmp_path, dropout=0.5, sample_count=2, sample_steps=2)
    trainer.train_step()
    assert not trainer.ema.training
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.sample_grid(tmp_path / "grid.png")


def test_sample_grids_take_sample_steps(tmp_path):
    trainer = make_trainer(tmp_path, steps=1, sample_count=2, sample_steps=3)
    calls = []
    trainer.ema.register_forward_hook(lambda *args: calls.append(1))
    trainer.sample_grid(tmp_path / "grid.png")
    assert len(calls) == 3  # not all 100 of the schedule's


def test_read_log_skips_lines_that_are_no_step_records(tmp_path):
    """A log line that is JSON but no record of a step (a list, a string, a
    record without "step") is skipped: the resume's log cut failed on it."""
    trainer = make_trainer(tmp_path, steps=2)
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n[2]\n"x"\n{"loss": 3.0}\n{"step": 2, "loss": 2.0}\n')
    assert [r["step"] for r in trainer.read_log()] == [1, 2]


def test_a_short_run_draws_its_loss_curve(tmp_path):
    make_trainer(tmp_path, steps=2, checkpoint_every=2, log_every=1).train(final_samples=False)
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_the_last_step_is_checkpointed_off_the_checkpoint_every_grid(tmp_path):
    make_trainer(tmp_path, steps=3, checkpoint_every=2, keep_checkpoints=0).train(final_samples=False)
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000003"




def test_an_ema_decay_of_zero_is_allowed():
    """[0, 1), as documented: 0 makes the EMA the weights themselves."""
    assert TrainConfig(ema_decay=0).ema_decay == 0.0


def test_a_config_mismatch_survives_pickling():
    """pickle rebuilt ConfigMismatchError(path, differences) as a call with the
    message alone, which raised in the receiving process: a multiprocessing
    Pool's result thread died there, and the caller waited for ever."""
    import pickle
    from pathlib import Path

    error = ConfigMismatchError(Path("runs/x/checkpoint-1"), ["train.lr: 0.001 there, 0.002 now"])
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is ConfigMismatchError and str(back) == str(error)
    assert (back.path, back.differences) == (error.path, error.differences)


def _disk_with(monkeypatch, free: int) -> None:
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - free, free))


def test_a_disk_without_room_for_one_checkpoint_is_refused_before_training(tmp_path, monkeypatch):
    """Found only when the first checkpoint was written: checkpoint_every steps of training lost."""
    import errno

    trainer = make_trainer(tmp_path, steps=4)
    monkeypatch.setattr(trainer, "train_step", lambda: pytest.fail("training began"))
    _disk_with(monkeypatch, 1000)
    with pytest.raises(OSError, match=r"a checkpoint of this run takes about \d+\.\d KiB and the disk of .* has 1000 "
                                      r"bytes free: free some space or train elsewhere") as raised:
        trainer.train(final_samples=False)
    assert raised.value.errno == errno.ENOSPC


def test_a_disk_without_room_for_the_checkpoints_kept_at_once_is_warned_of(tmp_path, monkeypatch):
    """Sized from the newest checkpoint: resumed to step 8 with keep_checkpoints=2,
    the run holds checkpoint 2 and two more at once (the third before it deletes one)."""
    make_trainer(tmp_path, steps=2).train(final_samples=False)
    size = sum(f.stat().st_size for f in latest_checkpoint(tmp_path).iterdir())
    _disk_with(monkeypatch, size + size // 2)
    with pytest.warns(UserWarning, match=r"this run writes 2 more checkpoints before it deletes old ones "
                                         r"\(keep_checkpoints=2\), about \d+\.\d KiB, and the disk of .* has \d+\.\d KiB "
                                         r"free: it will fill before the run ends"):
        assert make_trainer(tmp_path, steps=8).train(final_samples=False)["trained"] == 6
    _disk_with(monkeypatch, 3 * size)  # room enough: no word
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_trainer(tmp_path, steps=12).train(final_samples=False)
    _disk_with(monkeypatch, size // 2)
    with pytest.raises(OSError, match="a checkpoint of this run takes about"):
        make_trainer(tmp_path, steps=14).train(final_samples=False)


def test_a_disk_whose_free_space_cannot_be_read_trains(tmp_path, monkeypatch):
    import shutil

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shutil, "disk_usage", unreadable)
    assert make_trainer(tmp_path, steps=2).train(final_samples=False)["trained"] == 2
