"""A train() cut short inside one process (a notebook's Ctrl-C, an error),
then called again on the same Trainer: it ends where an uninterrupted run does,
or refuses, and never goes on from a half-done step."""

from __future__ import annotations

import signal

import pytest
import torch
from torch import nn

import ddpm_fast.checkpoint
from train_helpers import TinyEps, make_trainer

# Dropout draws from torch's generator; a checkpoint only at the end (8): the
# continued run has nothing on disk to resume from, only what is in memory.
RUN = dict(steps=8, dropout=0.3, log_every=3, checkpoint_every=1000)


def weights(trainer) -> dict[str, torch.Tensor]:
    return {**{f"model.{k}": v.clone() for k, v in trainer.model.state_dict().items()},
            **{f"ema.{k}": v.clone() for k, v in trainer.ema.state_dict().items()}}


def assert_same_run(trainer, want, want_log) -> None:
    got = weights(trainer)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    assert [(r["step"], r["loss"]) for r in trainer.read_log()] == want_log


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    trainer = make_trainer(tmp_path_factory.mktemp("whole"), **RUN)
    trainer.train(final_samples=False)
    return weights(trainer), [(r["step"], r["loss"]) for r in trainer.read_log()]


def test_a_ctrl_c_during_the_update_lands_after_it(tmp_path, uninterrupted):
    trainer = make_trainer(tmp_path, **RUN)
    calls = []

    def ctrl_c(optimizer, args, kwargs):  # a Ctrl-C that arrives while the update runs
        calls.append(1)
        if len(calls) == 4:
            signal.raise_signal(signal.SIGINT)

    handle = trainer.optimizer.register_step_post_hook(ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(final_samples=False)
    assert trainer.step == 4  # the step it arrived in, all of it: weights, count, EMA
    handle.remove()
    trainer.train(final_samples=False)
    assert_same_run(trainer, *uninterrupted)


def test_an_error_during_the_update_makes_the_trainer_refuse_to_go_on(tmp_path):
    trainer = make_trainer(tmp_path, **RUN)
    calls = []

    def fail(optimizer, args, kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("a hook failed")

    handle = trainer.optimizer.register_step_post_hook(fail)
    with pytest.raises(RuntimeError, match="a hook failed"):
        trainer.train(final_samples=False)
    handle.remove()
    for go_on in (lambda: trainer.train(final_samples=False), trainer.train_step, trainer.save_checkpoint):
        with pytest.raises(RuntimeError, match="step 4 stopped while its update was applied.*make a new Trainer"):
            go_on()
    assert not list(tmp_path.glob("checkpoint-*"))


class BatchNormed(TinyEps):
    """Dropout and BatchNorm: a forward changes torch's generator and buffers."""

    def __init__(self) -> None:
        super().__init__(dropout=0.3)
        self.norm = nn.BatchNorm2d(16)
        self.interrupt_at: int | None = None
        self.calls = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = self.norm(torch.nn.functional.silu(self.inp(x) + self.embed(t)[:, :, None, None]))
        h = self.drop(h)
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt  # after the forward's draws and buffer updates
        return self.out(torch.nn.functional.silu(self.mid(h)))


def test_a_step_stopped_before_its_update_is_taken_again_as_it_would_have_been(tmp_path):
    def run(folder, interrupt_at):
        torch.manual_seed(0)
        model = BatchNormed()
        trainer = make_trainer(folder, model=model, **RUN)
        model.interrupt_at = interrupt_at
        if interrupt_at is not None:
            with pytest.raises(KeyboardInterrupt):
                trainer.train(final_samples=False)
            assert trainer.step == interrupt_at - 1
        trainer.train(final_samples=False)
        return trainer

    whole, cut = run(tmp_path / "whole", None), run(tmp_path / "cut", 5)
    assert_same_run(cut, weights(whole), [(r["step"], r["loss"]) for r in whole.read_log()])
    assert int(cut.model.norm.num_batches_tracked) == 8


def test_the_work_after_a_step_cut_short_is_done_by_the_next_call(tmp_path, uninterrupted, monkeypatch):
    """A Ctrl-C in the record of step 6, then in the final checkpoint's write:
    each next call writes what is missing, and no partial checkpoint stays."""
    trainer = make_trainer(tmp_path, **RUN)
    log = type(trainer)._log

    def log_then_ctrl_c(self, record, early):
        if record["step"] == 6 and not getattr(self, "_cut", False):
            self._cut = True
            raise KeyboardInterrupt
        log(self, record, early)

    monkeypatch.setattr(type(trainer), "_log", log_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(final_samples=False)
    assert trainer.step == 6 and [r["step"] for r in trainer.read_log()] == [3]

    write, cut = ddpm_fast.checkpoint.write_checkpoint, []

    def ctrl_c_in_write(run_dir, step, writers, **kwargs):
        if not cut:  # the first file of the first checkpoint
            cut.append(step)
            first = next(iter(writers))
            writers = {**writers, first: lambda path: (_ for _ in ()).throw(KeyboardInterrupt)}
        return write(run_dir, step, writers, **kwargs)

    monkeypatch.setattr("ddpm_fast.train_checkpoints.write_checkpoint", ctrl_c_in_write)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(final_samples=False)
    assert trainer.step == 8 and not list(tmp_path.glob("checkpoint-*")) and not list(tmp_path.glob(".tmp*"))
    assert trainer.train(final_samples=False)["trained"] == 0
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-00000008"]
    assert_same_run(trainer, *uninterrupted)


def test_a_ctrl_c_while_a_checkpoint_loads_makes_the_trainer_refuse(tmp_path, monkeypatch):
    make_trainer(tmp_path, **RUN).train(final_samples=False)
    trainer = make_trainer(tmp_path, **{**RUN, "steps": 10})
    load = ddpm_fast.train_checkpoints.load_safetensors
    calls = []

    def ctrl_c_on_the_second_file(*args, **kwargs):  # the model loaded, the EMA not
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return load(*args, **kwargs)

    monkeypatch.setattr(ddpm_fast.train_checkpoints, "load_safetensors", ctrl_c_on_the_second_file)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(final_samples=False)
    monkeypatch.setattr(ddpm_fast.train_checkpoints, "load_safetensors", load)
    with pytest.raises(ddpm_fast.checkpoint.CheckpointError, match="not fully loaded.*make a new Trainer"):
        trainer.train(resume=False, final_samples=False)
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-00000008"]  # not started afresh


def test_a_ctrl_c_while_safetensors_builds_a_tensor_is_not_a_damaged_checkpoint(tmp_path, sigint_inside_safetensors_read):
    """A SIGINT that landed while safetensors built a tensor (torch.asarray, which
    indexes the storage from C++) came out of torch as a ValueError ("could not
    determine the shape of object type 'torch.storage.UntypedStorage'"): the
    resume called the intact checkpoint unreadable, set it aside as damaged-*
    and, had there been an older one, trained on from it, the Ctrl-C swallowed."""
    make_trainer(tmp_path, **RUN).train(final_samples=False)
    trainer = make_trainer(tmp_path, **{**RUN, "steps": 10})
    with pytest.raises(KeyboardInterrupt):
        trainer.train(final_samples=False)
    assert len(sigint_inside_safetensors_read) >= 3, "safetensors no longer builds tensors with torch.asarray here: move the SIGINT"
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint-" in p.name) == ["checkpoint-00000008"]
