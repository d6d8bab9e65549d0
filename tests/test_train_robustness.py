"""The Trainer where runs go wrong: non-finite losses under fp16, damaged
checkpoints, schedules and settings it cannot use, and what its log says
(its main behaviour: test_train.py; the command line: test_cli_train.py)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ddpm_fast.checkpoint import CheckpointError, checkpoints, latest_checkpoint, write_checkpoint
from ddpm_fast.schedules import NoiseSchedule
from ddpm_fast.train import NonFiniteLossError, TrainConfig, Trainer
from train_helpers import TinyEps, make_trainer, toy_dataset


class NaNEps(TinyEps):
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return super().forward(x, t) * float("nan")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_non_finite_losses_stop_the_run_in_every_precision(tmp_path, precision):
    """Under fp16 the check was left to the GradScaler, which only skips steps:
    a NaN loss trained on to the end, logging NaN and writing checkpoints."""
    config = TrainConfig(steps=8, batch_size=8, warmup=0, log_every=1, checkpoint_every=1, max_nonfinite=3,
                         precision=precision)
    trainer = Trainer(NaNEps(), toy_dataset(), NoiseSchedule("linear", timesteps=20), config, tmp_path, device="cpu",
                      progress=False)
    with pytest.warns(UserWarning, match="step 1: non-finite loss") as seen, pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row at step 3"):
        trainer.train(final_samples=False)
    assert latest_checkpoint(tmp_path) is None
    # Not torch's advice to reorder the optimizer and schedule steps (the
    # schedule follows skipped steps on purpose).
    assert [str(w.message) for w in seen if "lr_scheduler" in str(w.message)] == []


class FlakyEps(TinyEps):
    """Non-finite at chosen calls (one call a training step): a NaN output, or a
    finite output whose gradient is NaN (0 * d sqrt(p)/dp at p = 0)."""

    def __init__(self, nan_output: set[int], nan_gradient: set[int]) -> None:
        super().__init__()
        self.nan_output, self.nan_gradient, self.calls = nan_output, nan_gradient, 0
        self.probe = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = super().forward(x, t)
        if self.calls in self.nan_output:
            return out * float("nan")
        if self.calls in self.nan_gradient:
            return out + 0 * torch.sqrt(self.probe)
        return out + 0 * self.probe


def _state(trainer: Trainer) -> list[torch.Tensor]:
    optimizer = [v for state in trainer.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return [t.detach().clone() for t in (*trainer.model.parameters(), *trainer.ema.parameters(), *optimizer)]


def test_a_skipped_step_changes_nothing_and_a_good_one_resets_the_count(tmp_path):
    """Steps 3 (NaN loss), 5 (NaN gradient of a finite loss) and 6 (NaN loss):
    each leaves the weights, the EMA and Adam's state as they were, and with
    max_nonfinite=3 the run goes on (step 4 reset the count: 3, 5, 6 are not
    3 in a row). The tests before poisoned every step, so neither an update
    taken anyway nor a count never reset could be seen."""
    config = TrainConfig(steps=8, batch_size=8, warmup=0, log_every=1, checkpoint_every=100, max_nonfinite=3, ema_decay=0.9)
    trainer = Trainer(FlakyEps(nan_output={3, 6}, nan_gradient={5}), toy_dataset(), NoiseSchedule("linear", timesteps=20),
                      config, tmp_path, device="cpu", progress=False)
    losses = []
    with pytest.warns(UserWarning, match="non-finite"):
        for step in range(1, 9):
            before = _state(trainer)
            losses.append(trainer.train_step())
            after = _state(trainer)
            unchanged = all(torch.equal(a, b) for a, b in zip(before, after))
            assert unchanged == (step in (3, 5, 6)), step
    assert [loss is None for loss in losses] == [step in (3, 5, 6) for step in range(1, 9)]
    assert trainer.step == 8


def test_a_load_checkpoint_that_loaded_part_and_failed_spoils_the_trainer(tmp_path):
    """Called directly (not through a resume), a checkpoint whose EMA file is
    damaged left the model at its step and the EMA, optimizer and step count at
    the Trainer's own: train() and save_checkpoint() went on with the mix. One
    refused before anything loaded leaves the Trainer usable."""
    out = tmp_path / "run"
    make_trainer(out, steps=4, keep_checkpoints=0).train(final_samples=False)
    ema = out / "checkpoint-00000004" / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:100])
    trainer = make_trainer(tmp_path / "other", steps=6)
    trainer.train_step()
    with pytest.raises(CheckpointError, match="ema.safetensors"):
        trainer.load_checkpoint(out / "checkpoint-00000004")
    for go_on in (trainer.train_step, lambda: trainer.train(final_samples=False), trainer.save_checkpoint):
        with pytest.raises(CheckpointError, match="checkpoint-00000004 was not fully loaded.*make a new Trainer"):
            go_on()
    trainer.load_checkpoint(out / "checkpoint-00000002")  # whole: the state is all that checkpoint's
    assert trainer.step == 2 and trainer.train_step() is not None
    ema.unlink()  # now refused before anything loads
    trainer = make_trainer(tmp_path / "third", steps=6)
    with pytest.raises(CheckpointError, match="missing ema.safetensors"):
        trainer.load_checkpoint(out / "checkpoint-00000004")
    assert trainer.train_step() is not None
    model = out / "checkpoint-00000002" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])  # unreadable, so nothing of it was loaded
    with pytest.raises(CheckpointError, match="model.safetensors"):
        trainer.load_checkpoint(out / "checkpoint-00000002")
    assert trainer.step == 1 and trainer.train_step() is not None  # its own step 1, untouched


def test_loading_a_checkpoint_restarts_the_non_finite_count(tmp_path):
    # The count of skipped steps in a row belongs to the steps a checkpoint rewinds: one more after it is no stop.
    config = TrainConfig(steps=2, batch_size=8, warmup=0, log_every=1, checkpoint_every=2, max_nonfinite=2)
    trainer = Trainer(FlakyEps(nan_output={3, 4}, nan_gradient=set()), toy_dataset(), NoiseSchedule("linear", timesteps=20),
                      config, tmp_path, device="cpu", progress=False)
    trainer.train(final_samples=False)
    with pytest.warns(UserWarning, match="non-finite"):
        assert trainer.train_step() is None  # call 3: skipped, one in a row
        trainer.load_checkpoint(tmp_path / "checkpoint-00000002")
        assert trainer.train_step() is None  # call 4: skipped again, the first in a row since the checkpoint
    assert trainer.step == 3  # 2 again, then the skipped step 3


def test_a_respaced_schedule_is_refused(tmp_path):
    """Training would show the model the sub-chain's indices, and sampling
    (through timestep_map) the original timesteps it never saw."""
    schedule = NoiseSchedule("linear", timesteps=100).respace(range(0, 100, 10))
    with pytest.raises(ValueError, match=r"full schedule, not a respaced one \(linear\[10 of 100\]\)"):
        Trainer(TinyEps(), toy_dataset(), schedule, TrainConfig(batch_size=8), tmp_path, device="cpu")


@pytest.mark.parametrize("damage", ["no optimizer", "bad rng", "config a list", "config missing"])
def test_a_checkpoint_that_loads_but_is_wrong_falls_back(tmp_path, damage):
    """trainer.pt that unpickles but lacks or garbles a part, or a config.json
    that is not an object: a KeyError, RuntimeError or AttributeError escaped
    instead of the documented fallback to the older checkpoint."""
    out = tmp_path / "run"
    make_trainer(out, steps=4).train(final_samples=False)  # checkpoints 2 and 4
    newest = out / "checkpoint-00000004"
    if damage == "config a list":
        (newest / "config.json").write_text("[1, 2]")
    elif damage == "config missing":  # was "not checked": any recipe resumed, and recorded in the next config.json
        (newest / "config.json").unlink()
    else:
        state = torch.load(newest / "trainer.pt", weights_only=True)
        if damage == "no optimizer":
            del state["optimizer"]
        else:
            state["torch_rng"] = torch.zeros(3, dtype=torch.uint8)
        torch.save(state, newest / "trainer.pt")
    trainer = make_trainer(out, steps=4)
    with pytest.warns(UserWarning, match="resumed from the older checkpoint-00000002"):
        trainer.train(final_samples=False)
    assert trainer.step == 4 and (out / "damaged-checkpoint-00000004").is_dir()


def test_the_damaged_newer_checkpoint_does_not_outrank_the_run(tmp_path):
    """With keep_checkpoints=1, pruning by step number deleted the checkpoint the
    resumed run had just written and kept the damaged newer one, which `latest`
    then outlived: the run could not be resumed at all."""
    out = tmp_path / "run"
    make_trainer(out, steps=4).train(final_samples=False)
    (out / "checkpoint-00000004" / "model.safetensors").write_bytes(b"junk")
    with pytest.warns(UserWarning, match="renamed damaged-"):
        make_trainer(out, steps=3, checkpoint_every=1, keep_checkpoints=1).train(final_samples=False)
    assert [step for step, _ in checkpoints(out)] == [3] and latest_checkpoint(out).name == "checkpoint-00000003"
    resumed = make_trainer(out, steps=5, checkpoint_every=1, keep_checkpoints=1)
    resumed.train(final_samples=False)
    assert resumed.step == 5


@pytest.mark.parametrize("earlier", [1, 2])
def test_a_checkpoint_damaged_again_is_set_aside_beside_the_others(tmp_path, earlier):
    """A second damaged checkpoint of the same step (damaged-* taken) was renamed
    onto it: OSError, no resume. A third goes beside both (-2), not onto -1."""
    trainer = make_trainer(tmp_path, steps=1)
    taken = ["damaged-checkpoint-00000004"] + [f"damaged-checkpoint-00000004-{k}" for k in range(1, earlier)]
    for name in taken + ["checkpoint-00000004"]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer.pt").write_text(name)
    trainer._set_aside([tmp_path / "checkpoint-00000004"])
    for name in taken:
        assert (tmp_path / name / "trainer.pt").read_text() == name
    assert (tmp_path / f"damaged-checkpoint-00000004-{earlier}" / "trainer.pt").read_text() == "checkpoint-00000004"


@pytest.mark.parametrize("pointer", [b"", b"\n", b"..", b"samples", b"checkpoint-00000002/..", b"\xff\xfe"])
def test_a_damaged_latest_pointer_names_no_other_folder(tmp_path, pointer):
    """`latest` was trusted whatever it held: empty, it named the run folder
    itself, and a resume that failed to load that renamed the whole run
    damaged-*. Now only a checkpoint-<step> folder counts; else the newest one."""
    out = tmp_path / "run"
    make_trainer(out, steps=4).train(final_samples=False)
    (out / "samples").mkdir(exist_ok=True)
    (out / "latest").write_bytes(pointer)
    assert latest_checkpoint(out) == out / "checkpoint-00000004"
    resumed = make_trainer(out, steps=6)
    resumed.train(final_samples=False)
    assert resumed.step == 6 and out.is_dir() and (out / "samples").is_dir()


@pytest.mark.parametrize("field, value, error", [
    ("sample_steps", 0, ValueError), ("sample_steps", 2.5, ValueError), ("sample_steps", True, ValueError),
    ("flip", "no", TypeError), ("channels_last", 1, TypeError), ("ema_warmup", None, TypeError),
    ("lr", True, TypeError), ("lr", "1e-3", TypeError), ("ema_decay", "0.9", TypeError), ("seed", 2**63, ValueError),
    ("precision", ["fp32"], TypeError), ("loss", {"simple"}, TypeError),  # were "unhashable type"
    ("weight_decay", 10**400, ValueError),  # not an OverflowError from float()
    # at the edge of each range: a clip at 0 zeroes every update, an infinite decay or lr wrecks the weights
    ("grad_clip", 0.0, ValueError), ("weight_decay", float("inf"), ValueError), ("lr", float("inf"), ValueError),
    ("seed", -1, ValueError), ("warmup", -1, ValueError),
    ("max_nonfinite", 0, ValueError), ("sample_every", -1, ValueError), ("compile", 1, TypeError),
    ("lr", 0.0, ValueError),
    # bookkeeping that would fail (or misbehave) only at the first checkpoint, log line or grid
    ("keep_checkpoints", -1, ValueError), ("sample_count", 0, ValueError), ("log_every", 0, ValueError),
    ("checkpoint_every", 0, ValueError),
])
def test_config_fields_are_checked_when_made(field, value, error):
    """Each was accepted (then failed at the end of a run, or was read as True)."""
    with pytest.raises(error, match=f"TrainConfig.{field} must be"):
        TrainConfig(**{field: value})


def test_config_takes_numpy_integers_as_ints():
    """They were refused; kept as numpy's, the config could not be written as JSON."""
    import dataclasses

    import numpy as np

    config = TrainConfig(steps=np.int64(5), seed=np.uint8(3), sample_steps=np.int16(4), warmup=np.int32(0))
    assert {type(getattr(config, f)) for f in ("steps", "seed", "sample_steps", "warmup")} == {int}
    json.dumps(dataclasses.asdict(config))


def test_config_takes_numpy_and_fraction_numbers_as_floats():
    """They passed the check as they were, and the Trainer then refused the
    config as not JSON-serializable, blaming the model's config."""
    import dataclasses
    from fractions import Fraction

    import numpy as np

    config = TrainConfig(lr=np.float32(1e-3), ema_decay=np.float64(0.9), grad_clip=Fraction(1, 2), weight_decay=np.int8(0))
    assert {type(getattr(config, f)) for f in ("lr", "ema_decay", "grad_clip", "weight_decay")} == {float}
    assert config.grad_clip == 0.5
    json.dumps(dataclasses.asdict(config))


def test_a_large_seed_trains(tmp_path):
    """Seeds up to 2^63 - 1 (the host generators' seeds derived from it
    overflowed int64 from about 2.3e12 on)."""
    trainer = make_trainer(tmp_path, steps=2, seed=2**63 - 1)
    trainer.train(final_samples=False)
    assert trainer.step == 2


def test_the_log_records_the_learning_rate_each_step_used(tmp_path):
    """It recorded the next step's (read after the schedule had stepped)."""
    trainer = make_trainer(tmp_path, steps=5, warmup=4, lr=1e-3)
    used = []
    trainer.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: used.append(optimizer.param_groups[0]["lr"]))
    trainer.train(final_samples=False)
    logged = [json.loads(line)["lr"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert used == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert logged == pytest.approx(used)


def test_train_after_manual_train_steps_creates_the_folder(tmp_path):
    """train_step() alone makes no folder; train() then took the resumed-run
    branch and failed writing log.jsonl into a folder that did not exist."""
    out = tmp_path / "new" / "run"
    trainer = make_trainer(out, steps=4)
    trainer.train_step()
    trainer.train(final_samples=False)
    assert trainer.step == 4 and (out / "log.jsonl").is_file() and latest_checkpoint(out).name == "checkpoint-00000004"


@pytest.mark.parametrize("first", [True, False], ids=["cl-then-nchw", "nchw-then-cl"])
def test_switching_channels_last_on_resume_keeps_the_optimizer_state_right(tmp_path, first):
    """channels_last is a resumable change (rounding only), but Adam's moments
    came back with their saved strides, which the fused kernel pairs with the
    parameters' by memory position: each weight got another's moments (weights
    0.005 apart after 4 steps, against 1e-6 between the two formats)."""
    straight = make_trainer(tmp_path / "straight", steps=8, channels_last=not first)
    straight.train(final_samples=False)
    make_trainer(tmp_path / "switched", steps=4, channels_last=first).train(final_samples=False)
    switched = make_trainer(tmp_path / "switched", steps=8, channels_last=not first)
    switched.train(final_samples=False)
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(switched.model.state_dict()[name], value, rtol=0, atol=1e-5, msg=name)


def test_models_the_trainer_cannot_checkpoint_or_train_are_refused_when_made(tmp_path):
    """A config JSON cannot encode failed at the first checkpoint, after
    training (a raw TypeError); a float64 or half model at the first step, and
    a bfloat16 one trained with bfloat16 master weights, against the recipe."""
    unencodable = TinyEps()
    unencodable.config = {"width": object()}
    with pytest.raises(TypeError, match="must be JSON-serializable"):
        Trainer(unencodable, toy_dataset(), NoiseSchedule("linear", timesteps=20), TrainConfig(batch_size=8), tmp_path)
    mine = TinyEps()
    weights = {name: p.clone() for name, p in mine.state_dict().items()}
    with pytest.raises(TypeError, match="must be JSON-serializable"):  # "meta" stands in for a GPU
        Trainer(mine, toy_dataset(), NoiseSchedule("linear", timesteps=20), TrainConfig(batch_size=8), tmp_path,
                device="meta", extra_config={"when": object()})
    for name, p in mine.state_dict().items():  # the refused call had moved the caller's model first
        assert p.device.type == "cpu" and torch.equal(p, weights[name]), name
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        with pytest.raises(TypeError, match="trains float32 parameters"):
            Trainer(TinyEps().to(dtype), toy_dataset(), NoiseSchedule("linear", timesteps=20),
                    TrainConfig(batch_size=8), tmp_path)


# Why: the Trainer kept the caller's TrainConfig and extra_config objects. One
# config reused for an lr sweep made trainer A's checkpoints record B's lr (its
# optimizer had A's); a batch_size edited afterwards skipped the constructor's
# checks (a ZeroDivisionError mid-run); a value JSON cannot encode, added to
# extra_config afterwards, failed at the first checkpoint, after the training.
def test_the_trainer_keeps_its_own_copies_of_config_and_extra_config(tmp_path):
    config, extra = TrainConfig(steps=2, batch_size=8, lr=1e-4, checkpoint_every=2), {"sweep": {"run": 1}}
    trainer = Trainer(TinyEps(), toy_dataset(n=16), NoiseSchedule("linear", timesteps=20), config, tmp_path,
                      extra_config=extra, progress=False)
    config.lr, config.batch_size = 5e-4, 32
    extra["sweep"]["run"] = 2
    extra["started"] = object()
    trainer.train(final_samples=False)
    saved = json.loads((latest_checkpoint(tmp_path) / "config.json").read_text())
    assert saved["train"]["lr"] == 1e-4 and saved["train"]["batch_size"] == 8
    assert saved["sweep"] == {"run": 1} and "started" not in saved
    assert trainer.config.lr == 1e-4 and trainer.config is not config
    # Its own config: what it reads as it runs may change (steps), the rest took
    # effect when it was made (the optimizer's lr): an edit is refused, not recorded.
    trainer.config.steps = 4
    assert trainer.train(final_samples=False)["steps"] == 4
    trainer.config.lr = 5e-4
    with pytest.raises(ValueError, match=r"trainer.config.lr was changed from 0.0001 to 0.0005 after the Trainer was "
                                         r"made, which took it then: make a new Trainer"):
        trainer.train(final_samples=False)
    with pytest.raises(ValueError, match="trainer.config.lr was changed"):
        trainer.train_step()
    trainer.config.lr, trainer.config.steps = 1e-4, 0  # checked as a new config would be (was a ZeroDivisionError)
    with pytest.raises(ValueError, match="TrainConfig.steps must be a positive int, got 0"):
        trainer.train_step()


class BatchNormEps(TinyEps):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.bn(self.inp(x)) + self.embed(t)[:, :, None, None])
        return self.out(torch.nn.functional.silu(self.mid(h)))


def test_a_model_with_integer_buffers_resumes(tmp_path):
    """BatchNorm's int64 num_batches_tracked made every checkpoint 'damaged'
    (its tensors were refused as not floating point), so no run resumed."""
    config = dict(batch_size=8, warmup=0, log_every=1, checkpoint_every=2, seed=3)
    trainer = Trainer(BatchNormEps(), toy_dataset(), NoiseSchedule("linear", timesteps=20), TrainConfig(steps=2, **config),
                      tmp_path, device="cpu", progress=False)
    trainer.train(final_samples=False)
    resumed = Trainer(BatchNormEps(), toy_dataset(), NoiseSchedule("linear", timesteps=20),
                      TrainConfig(steps=4, **config), tmp_path, device="cpu", progress=False)
    resumed.train(final_samples=False)
    assert resumed.step == 4 and int(resumed.model.bn.num_batches_tracked) == 4
    from ddpm_fast.models.serialization import load_state_dict_checked

    state = dict(resumed.model.state_dict(), **{"inp.weight": torch.zeros(16, 1, 3, 3, dtype=torch.int64)})
    with pytest.raises(ValueError, match=r"\['inp.weight'\] are not floating point where the model's are"):
        load_state_dict_checked(resumed.model, state, "edited")  # would be cast silently


def test_train_again_without_resuming_continues_from_memory(tmp_path):
    """resume=False on a Trainer that has trained: no checkpoint is loaded and
    the folder's log stays (it was deleted, as for a fresh run), and a stop for
    non-finite losses counts afresh on the next call."""
    trainer = make_trainer(tmp_path, steps=3, max_nonfinite=2)
    trainer.train(final_samples=False)
    trainer.config.steps = 5
    trainer.train(resume=False, final_samples=False)
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    trainer.config.steps = 20
    with torch.no_grad():
        trainer.model.out.bias.fill_(float("nan"))
    for _ in range(2):  # each call: two non-finite steps, then the stop
        with pytest.warns(UserWarning), pytest.raises(NonFiniteLossError, match="^2 non-finite losses in a row"):
            trainer.train(resume=False, final_samples=False)


def test_sample_grid_takes_a_string_path(tmp_path):
    trainer = make_trainer(tmp_path, steps=1, sample_count=2, sample_steps=2)
    trainer.sample_grid(str(tmp_path / "grid.png"))
    assert (tmp_path / "grid.png").is_file()


def test_a_failed_checkpoint_write_is_a_checkpoint_error_and_leaves_no_partial_folder(tmp_path):
    """A full disk reached the user as safetensors' SafetensorError or torch.save's
    "unexpected pos 186688 vs 186580" (neither an OSError, so the command line
    printed a traceback), and the partial folder kept its space until the next write."""
    write_checkpoint(tmp_path, 1, {"a.bin": lambda p: p.write_bytes(b"1")})

    def full_disk(path):
        path.write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 186688 vs 186580")

    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*checkpoint-00000002 \(b.bin\): \[enforce fail"
                                              r".*unexpected pos 186688 vs 186580 \[[0-9.]+ MiB free on its disk\]"):
        write_checkpoint(tmp_path, 2, {"a.bin": lambda p: p.write_bytes(b"2"), "b.bin": full_disk})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000001", "latest"]
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000001"


class TiedEps(TinyEps):
    """A model with one weight under two names (as tied embeddings are)."""

    def __init__(self) -> None:
        super().__init__()
        self.out_again = self.out


def test_a_model_with_tied_weights_writes_checkpoints_and_resumes(tmp_path):
    """safetensors refuses tensors that share memory: the run trained to its
    first checkpoint, then stopped ("Some tensors share memory")."""
    def trainer(steps):
        torch.manual_seed(0)
        return Trainer(TiedEps(), toy_dataset(), NoiseSchedule("linear", timesteps=100),
                       TrainConfig(steps=steps, batch_size=8, warmup=0, checkpoint_every=2), tmp_path, device="cpu",
                       progress=False)

    trainer(2).train(final_samples=False)
    resumed = trainer(4)
    resumed.train(final_samples=False)
    assert resumed.step == 4 and resumed.model.out_again is resumed.model.out


def test_a_resume_that_loaded_part_of_a_checkpoint_and_failed_spoils_the_trainer(tmp_path):
    """The model loaded, then the EMA failed and no older checkpoint was left:
    train(resume=False) on the same Trainer then trained a "fresh" run from the
    loaded weights. A failure before anything loaded leaves the Trainer usable."""
    out = tmp_path / "run"
    make_trainer(out, steps=2, keep_checkpoints=1).train(final_samples=False)
    ema = out / "checkpoint-00000002" / "ema.safetensors"
    good = ema.read_bytes()
    ema.write_bytes(good[: len(good) // 2])
    trainer = make_trainer(out, steps=4)
    with pytest.raises(CheckpointError, match="ema.safetensors"):
        trainer.train(final_samples=False)
    with pytest.raises(CheckpointError, match="partly overwritten by a checkpoint load that failed .*make a new Trainer"):
        trainer.train(resume=False, final_samples=False)
    ema.unlink()  # now found missing before anything loads
    trainer = make_trainer(out, steps=4)
    with pytest.raises(CheckpointError, match="missing ema.safetensors"):
        trainer.train(final_samples=False)
    with pytest.warns(UserWarning, match="starting afresh") as seen:
        trainer.train(resume=False, final_samples=False)
    assert trainer.step == 4
    assert {w.filename for w in seen} == {__file__}  # the caller's line, not the library's


def test_the_ema_takes_the_models_buffers_each_step(tmp_path):
    """Buffers (BatchNorm's running statistics) are not averaged but copied
    into the EMA after each step: left at their initial values, the EMA model
    would sample with statistics of mean 0 and variance 1."""
    trainer = Trainer(BatchNormEps(), toy_dataset(), NoiseSchedule("linear", timesteps=20),
                      TrainConfig(steps=2, batch_size=8, warmup=0), tmp_path, device="cpu", progress=False)
    for step in (1, 2):
        trainer.train_step()
        for (name, live), ema in zip(trainer.model.named_buffers(), trainer.ema.buffers()):
            assert torch.equal(ema, live), name
        assert int(trainer.ema.bn.num_batches_tracked) == step


def test_the_learning_rate_follows_the_step_count_through_skipped_steps(tmp_path):
    """A skipped (non-finite) step still advances the warm-up: step 3 uses
    step 3's learning rate, not step 2's."""
    config = TrainConfig(steps=4, batch_size=8, lr=1e-3, warmup=4, checkpoint_every=100)
    trainer = Trainer(FlakyEps(nan_output={2}, nan_gradient=set()), toy_dataset(), NoiseSchedule("linear", timesteps=20),
                      config, tmp_path, device="cpu", progress=False)
    used = []
    trainer.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: used.append(optimizer.param_groups[0]["lr"]))
    with pytest.warns(UserWarning, match="step 2: non-finite"):
        for _ in range(4):
            trainer.train_step()
    assert used == pytest.approx([2.5e-4, 7.5e-4, 1e-3])
    assert trainer.lr_schedule.last_epoch == trainer.step == 4


def test_an_fp16_overflow_is_skipped_by_the_scaler_not_counted(tmp_path):
    """A finite loss whose scaled gradients overflow (a scale far too high) is
    the GradScaler's routine: it skips the update and halves the scale. It is
    no non-finite step: no warning, not counted towards max_nonfinite."""
    import warnings

    trainer = make_trainer(tmp_path, steps=2, precision="fp16", max_nonfinite=1)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = trainer.train_step()
    assert loss is not None and trainer._nonfinite_in_row == 0
    assert trainer.scaler.get_scale() == 2.0**99
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))  # the scaler skipped it


def test_an_interrupt_after_the_fp16_unscale_does_not_break_later_steps(tmp_path, monkeypatch):
    """A Ctrl-C between the GradScaler's unscale_ and update (where the host
    waits on a GPU) left the scaler mid-step: every later step, and a train()
    that resumed the newest checkpoint, raised 'unscale_() has already been
    called'. The scale it had carries over."""
    trainer = make_trainer(tmp_path, steps=4, precision="fp16", checkpoint_every=1)
    real_norm, calls = torch.nn.utils.get_total_norm, []

    def norm(*args, **kwargs):  # the gradient clip's first call, after unscale_
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_norm(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "get_total_norm", norm)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(final_samples=False)
    assert trainer.step == 2
    scale = trainer.scaler.get_scale()
    assert trainer.train_step() is not None and trainer.step == 3 and trainer.scaler.get_scale() == scale
    assert trainer.train(final_samples=False)["steps"] == 4  # resumes checkpoint 2 (or 3) and finishes


def test_bf16_has_no_loss_scaling_and_counts_a_nan_gradient(tmp_path):
    """The GradScaler is on for fp16 alone: under bf16 it would skip a step of
    NaN gradients silently, neither counted nor warned."""
    config = TrainConfig(steps=2, batch_size=8, warmup=0, checkpoint_every=100, precision="bf16")
    trainer = Trainer(FlakyEps(nan_output=set(), nan_gradient={1}), toy_dataset(), NoiseSchedule("linear", timesteps=20),
                      config, tmp_path, device="cpu", progress=False)
    with pytest.warns(UserWarning, match="step 1: non-finite"):
        assert trainer.train_step() is None
    assert trainer._nonfinite_in_row == 1
