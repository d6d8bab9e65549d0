"""The Trainer: the loss falls, the log, checkpoints, grids and samples it
writes, channels_last and torch.compile, one device read and copy a step,
its losses and precisions, a run's folder (resuming: test_train_resume.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ddpm_fast.train
import ddpm_fast.train_step
from ddpm_fast.checkpoint import checkpoints, latest_checkpoint
from ddpm_fast.train import NonFiniteLossError, TrainConfig
from conftest import host_to_device_copies
from train_helpers import final_weights, logged_losses, make_trainer


def test_one_step_lowers_the_loss_on_a_fixed_batch(tmp_path):
    trainer = make_trainer(tmp_path, lr=3e-3, warmup=0)
    with torch.no_grad():
        before = trainer._loss(0).item()
    trainer.train_step()  # step 0: the same batch, timesteps and noise as _loss(0)
    with torch.no_grad():
        after = trainer._loss(0).item()
    assert after < before


def test_loss_falls_over_a_short_run(tmp_path):
    """Over 150 steps the last 25-step window's mean loss is 0.43-0.48 of the
    first's for training seeds 0-7 (60 steps gave 0.56-0.64: too close to the bar)."""
    trainer = make_trainer(tmp_path, steps=150, log_every=25, checkpoint_every=150)
    trainer.train(final_samples=False)
    losses = logged_losses(tmp_path)
    assert len(losses) == 6 and losses[-1] < 0.6 * losses[0]


def test_the_log_records_images_per_second(tmp_path, monkeypatch):
    """images_per_s is the window's images (steps x global batch) over the seconds
    its steps took: on a clock where a step takes 0.5 s, 3 steps of 8 images are
    16/s, however long the sample grids and checkpoints between them take (they
    counted: a window after a grid logged 125 images/s for 4,712)."""
    import types

    import ddpm_fast.train as train_module

    clock = [0.0]
    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    trainer = make_trainer(tmp_path, steps=6, log_every=3, checkpoint_every=2, sample_every=1)
    real_step, real_save = trainer.train_step, trainer.save_checkpoint

    def step():
        clock[0] += 0.5
        return real_step()

    def save():
        clock[0] += 7.0
        return real_save()

    def grid(path):
        clock[0] += 10.0
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"png")

    monkeypatch.setattr(trainer, "train_step", step)
    monkeypatch.setattr(trainer, "save_checkpoint", save)
    monkeypatch.setattr(trainer, "sample_grid", grid)
    trainer.train(final_samples=False)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["images_per_s"]) for r in records] == [(3, 16.0), (6, 16.0)]


def test_run_writes_log_checkpoints_plot_and_samples(tmp_path):
    trainer = make_trainer(tmp_path, steps=4, checkpoint_every=2, keep_checkpoints=1, sample_count=4, sample_every=2)
    trainer.train()
    assert [json.loads(l)["step"] for l in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-00000004"]
    config = json.loads((tmp_path / "checkpoint-00000004" / "config.json").read_text())
    assert config["train"]["steps"] == 4 and config["schedule"]["name"] == "linear"
    for name in ("loss.png", "samples.png", "samples/step-00000002.png"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.parametrize("steps, grids", [(7, [3, 6, 7]), (6, [3, 6])])
def test_grids_every_n_steps_and_at_the_last_one_drawn_once(tmp_path, monkeypatch, steps, grids):
    """sample_every=3 writes grids at 3, 6, ... and at the last step (7 had none),
    and samples.png is that last grid, not drawn again (steps=6 sampled it twice)."""
    trainer = make_trainer(tmp_path, steps=steps, checkpoint_every=10, sample_count=4, sample_every=3)
    drawn = []
    real = trainer.sample_grid
    monkeypatch.setattr(trainer, "sample_grid", lambda path: drawn.append(Path(path).name) or real(path))
    trainer.train()
    assert drawn == [f"step-{g:08d}.png" for g in grids]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == drawn
    assert (tmp_path / "samples.png").read_bytes() == (tmp_path / "samples" / drawn[-1]).read_bytes()


def test_a_model_that_does_not_tell_its_image_shape_trains_and_samples(tmp_path):
    """Any nn.Module model(x_t, t) -> eps trains; its grids take the data's shape.
    One without in_channels/image_size trained every step, then failed at the grid."""

    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x, t):
            return self.conv(x)

    from ddpm_fast.schedules import NoiseSchedule
    from train_helpers import toy_dataset

    trainer = ddpm_fast.train.Trainer(Plain(), toy_dataset(), NoiseSchedule("linear", timesteps=20),
                                      TrainConfig(steps=3, batch_size=8, sample_every=2, sample_count=4),
                                      tmp_path, device="cpu", progress=False)
    assert trainer.train()["steps"] == 3
    assert (tmp_path / "samples.png").stat().st_size > 0 and (tmp_path / "samples" / "step-00000002.png").exists()


def _formats_seen(trainer, monkeypatch) -> dict[str, list[bool]]:
    """Whether the model's hidden activations, and the Samplers of sample_grid, were channels_last."""
    seen: dict[str, list[bool]] = {"hidden": [], "sampler": []}
    trainer.model.mid.register_forward_pre_hook(
        lambda _, args: seen["hidden"].append(args[0].is_contiguous(memory_format=torch.channels_last)))
    real = ddpm_fast.train.Sampler

    def sampler(*args, **kwargs):
        made = real(*args, **kwargs)
        seen["sampler"].append(made.channels_last)
        return made

    monkeypatch.setattr(ddpm_fast.train, "Sampler", sampler)
    return seen


def test_channels_last_is_the_default_and_nchw_trains_the_same_steps(tmp_path, monkeypatch):
    runs = {}
    for channels_last in (None, False):
        overrides = {} if channels_last is None else {"channels_last": channels_last}
        trainer = make_trainer(tmp_path / str(channels_last), sample_count=2, **overrides)
        seen = _formats_seen(trainer, monkeypatch)
        losses = [trainer.train_step() for _ in range(4)]
        trainer.sample_grid(tmp_path / f"{channels_last}.png")
        # (16 channels of 8x8: channels_last and contiguous strides differ.)
        expected = channels_last is None
        assert trainer.config.channels_last is expected
        assert trainer.model.mid.weight.is_contiguous(memory_format=torch.channels_last) is expected
        assert set(seen["hidden"]) == {expected} and seen["sampler"] == [expected]
        runs[channels_last] = losses
    # The same batches, timesteps and noise either way: only the convolutions' rounding differs.
    assert runs[None] == pytest.approx(runs[False], rel=1e-4)


def test_compiled_model_trains_the_same_steps(tmp_path):
    runs = {}
    for compiled in (False, True):
        trainer = make_trainer(tmp_path / str(compiled), steps=4, checkpoint_every=4, compile=compiled)
        trainer.train(final_samples=False)
        assert hasattr(trainer.net, "_orig_mod") is compiled  # torch.compile's wrapper
        runs[compiled] = (logged_losses(tmp_path / str(compiled)), final_weights(tmp_path / str(compiled)))
    # The same batches, timesteps and noise; inductor's fused arithmetic rounds differently.
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-4)
    for name, weight in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], weight, rtol=1e-4, atol=1e-5)


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path):
    trainer = make_trainer(tmp_path, steps=20, checkpoint_every=2, max_nonfinite=3)
    trainer.train(final_samples=False)  # a good run to step 20 with its checkpoint
    good = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.config.steps = 40
    with torch.no_grad():
        trainer.model.out.bias.fill_(float("nan"))
    with pytest.warns(UserWarning, match="non-finite"), pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        trainer.train(resume=False)
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000020"
    restored = make_trainer(tmp_path, steps=20)
    restored.load_checkpoint(latest_checkpoint(tmp_path))
    assert all(torch.equal(restored.model.state_dict()[k], v) for k, v in good.items())


def _host_reads(monkeypatch) -> list[str]:
    """Records each read of a tensor's value on the host (what synchronizes
    with a GPU) that the Trainer itself makes (ddpm_fast/train.py, train_step.py)."""
    reads: list[str] = []
    sources = {ddpm_fast.train.__file__, ddpm_fast.train_step.__file__}
    for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            if sys._getframe(1).f_code.co_filename in sources:
                reads.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


def test_a_step_reads_the_device_once(tmp_path, monkeypatch):
    """The loss and the finite check come back in one read per step (there
    were two, plus three synchronizing copies of the batch), skipped or not.
    On the CPU, where a read costs no sync, the gradient clip reads the norm
    too (to skip multiplying by 1.0): _clip_reads_norm is False on a GPU."""
    trainer = make_trainer(tmp_path, steps=20)
    assert trainer._clip_reads_norm
    trainer.train_step()
    reads = _host_reads(monkeypatch)
    assert isinstance(trainer.train_step(), float) and reads == ["__bool__", "tolist"]
    trainer._clip_reads_norm = False
    reads.clear()
    assert isinstance(trainer.train_step(), float) and reads == ["tolist"]
    with torch.no_grad():
        trainer.model.out.bias.fill_(float("nan"))
    with pytest.warns(UserWarning, match=r"step 4: non-finite loss or gradient \(nan\); update skipped") as seen:
        assert trainer.train_step() is None
    assert {w.filename for w in seen} == {__file__}  # the caller's line, not the library's
    assert reads == ["tolist", "tolist"]


def test_the_batch_goes_to_the_device_in_one_copy(tmp_path):
    """Indices, timesteps and flips of a step travel together (pinned and
    non-blocking on CUDA); meta tensors stand in for the device here. The next
    step's batch is staged during a step, as drawn on the host."""
    trainer = make_trainer(tmp_path)
    on_host = trainer._stage(3)
    trainer.train_step()
    assert trainer._staged[0] == 1 and all(torch.equal(a, b) for a, b in zip(trainer._stage(1), make_trainer(tmp_path)._stage(1)))

    trainer.device = torch.device("meta")
    staged, copies = host_to_device_copies(lambda: trainer._stage(3))
    assert copies == 1
    assert [(a.shape, a.dtype, a.device.type) for a in staged] == [(a.shape, a.dtype, "meta") for a in on_host]


@pytest.mark.gpu
def test_gpu_train_step_synchronizes_once(tmp_path):
    trainer = make_trainer(tmp_path, steps=20, device="cuda")
    for _ in range(2):  # first use: allocations, kernel loading
        trainer.train_step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(3):
                trainer.train_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchronizing" in str(w.message)]
    assert len(syncs) == 3, [str(w.message) for w in caught]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"steps": 0}, "steps must be a positive int"),
        # beyond an int64 they failed later: an OverflowError traceback from the progress
        # bar (steps), or from the grid's shares after all the training (sample_count)
        ({"steps": 10**400}, r"TrainConfig.steps must be below 2\^63, got 1000"),
        ({"sample_count": 2**63}, r"TrainConfig.sample_count must be below 2\^63"),
        ({"warmup": 2**64}, r"TrainConfig.warmup must be below 2\^63"),
        ({"sample_steps": 2**63}, r"TrainConfig.sample_steps must be below 2\^63"),
        ({"lr": -1.0}, "lr must be a finite number > 0"),
        ({"lr": float("inf")}, "lr must be a finite number > 0, got inf"),  # said "a positive number"
        ({"precision": "fp8"}, "precision must be one of"),
        ({"loss": "l1"}, "loss must be one of"),
        ({"ema_decay": 1.0}, r"ema_decay must lie in \[0, 1\)"),
        ({"batch_size": 1000}, "fewer than batch_size"),
    ],
)
def test_bad_config_is_rejected(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, **overrides)


def test_unknown_config_field_is_rejected():
    with pytest.raises(ValueError, match="unknown TrainConfig fields: lr_max"):
        TrainConfig.from_dict({"lr_max": 1.0})


def test_from_dict_rebuilds_a_config_from_its_json_record():
    """What a checkpoint's config.json records ("train") gives the config back."""
    from dataclasses import asdict

    config = TrainConfig(steps=7, batch_size=16, lr=3e-4, precision="bf16", loss="hybrid", flip=False, seed=11)
    assert TrainConfig.from_dict(json.loads(json.dumps(asdict(config)))) == config


@pytest.mark.parametrize("loss", ["vlb", "hybrid"])
def test_vlb_and_hybrid_losses_train(tmp_path, loss):
    trainer = make_trainer(tmp_path, steps=3, loss=loss)
    trainer.train(final_samples=False)
    assert all(torch.isfinite(torch.tensor(logged_losses(tmp_path))))


def test_hybrid_loss_weighs_the_sampled_bound_term_by_lambda_times_t(tmp_path):
    """L_hybrid = L_simple + 0.001 L_vlb, and one sampled term L_t estimates
    L_vlb / T: the term was weighted 0.001 alone, T times too little (at
    T = 1000 'hybrid' trained as 'simple')."""
    from ddpm_fast.train_step import HYBRID_VLB_WEIGHT

    losses = {name: make_trainer(tmp_path / name, loss=name)._loss(5).item() for name in ("simple", "vlb", "hybrid")}
    timesteps = 100  # make_trainer's schedule
    want = losses["simple"] + HYBRID_VLB_WEIGHT * timesteps * losses["vlb"]
    assert losses["vlb"] > 0 and losses["hybrid"] == pytest.approx(want, rel=1e-5)


def test_bf16_autocast_trains_with_fp32_master_weights(tmp_path):
    trainer = make_trainer(tmp_path, steps=3, precision="bf16")
    trainer.train(final_samples=False)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert all(torch.isfinite(torch.tensor(logged_losses(tmp_path))))


def test_a_fresh_run_replaces_a_longer_one_in_its_folder(tmp_path):
    """resume=False in a folder of a longer run: the earlier run's later
    checkpoints once outranked the new ones, which were pruned as the oldest
    the moment they were written, and resuming or sampling took the old run."""
    make_trainer(tmp_path, steps=6, sample_every=3, sample_count=2).train()  # checkpoints 4 and 6
    earlier = ["loss.png", "samples.png", "samples/step-00000003.png", "samples/step-00000006.png"]
    assert all((tmp_path / name).is_file() for name in earlier)  # (step 6, the last, has its grid too)
    fresh = make_trainer(tmp_path, steps=2, lr=2e-3)
    with pytest.warns(UserWarning, match="removing the earlier run's checkpoint-00000004, checkpoint-00000006"), \
            pytest.warns(UserWarning, match="removing the earlier run's pictures"):
        fresh.train(resume=False, final_samples=False)
    # Its pictures passed for the new run's (grids of steps it never took; the
    # loss curve until this run's first checkpoint redraws it).
    assert not any((tmp_path / name).exists() for name in earlier[1:])
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-00000002"]
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000002"
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2]
    saved = load_file(str(tmp_path / "checkpoint-00000002" / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in fresh.model.state_dict().items())


def test_a_run_already_beyond_steps_warns_that_it_trains_nothing(tmp_path):
    make_trainer(tmp_path, steps=4).train(final_samples=False)
    with pytest.warns(UserWarning, match="already at step 4, beyond steps=2: nothing to train") as seen:
        assert make_trainer(tmp_path, steps=2).train(final_samples=False)["steps"] == 4
    assert {w.filename for w in seen} == {__file__}  # the caller's line (train, one call deeper than train_step)


def test_a_second_run_in_a_folder_in_use_is_refused(tmp_path):
    """Two runs started in one folder wrote their checkpoints and log between each
    other's. The folder is held while one trains (a lock the system drops when its
    process dies, SIGKILL too); the second raises, naming the first's pid."""
    from ddpm_fast.checkpoint import RunInUseError

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from ddpm_fast.checkpoint import lock_run_folder; "
         f"release = lock_run_folder({str(tmp_path)!r}); print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunInUseError, match=rf"another process \(pid {holder.pid}\) is training in"):
            make_trainer(tmp_path, steps=2).train(final_samples=False)
        assert not list(tmp_path.glob("checkpoint-*")) and not (tmp_path / "log.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    assert make_trainer(tmp_path, steps=2).train(final_samples=False)["steps"] == 2  # released by the kill
    trainer = make_trainer(tmp_path, steps=3)
    trainer.train(final_samples=False)  # released when train returns: the same folder trains again
    assert trainer.train(final_samples=False)["steps"] == 3


def test_the_log_records_the_mean_loss_of_each_window(tmp_path, monkeypatch):
    """Each log line's loss is the mean of the losses of the steps since the
    line before (log_every=3: steps 1-3, then 4-6), not the last step's alone
    nor a running mean since the start."""
    trainer = make_trainer(tmp_path, steps=6, log_every=3, checkpoint_every=6)
    losses = []
    real = trainer.train_step

    def step():
        losses.append(real())
        return losses[-1]

    monkeypatch.setattr(trainer, "train_step", step)
    trainer.train(final_samples=False)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6]
    assert [r["loss"] for r in records] == pytest.approx([sum(losses[:3]) / 3, sum(losses[3:]) / 3], rel=1e-12)


def test_keep_checkpoints_0_keeps_them_all(tmp_path):
    make_trainer(tmp_path, steps=6, keep_checkpoints=0).train(final_samples=False)
    assert [step for step, _ in checkpoints(tmp_path)] == [2, 4, 6]
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000006"


def test_sample_steps_may_be_every_timestep_but_no_more(tmp_path):
    make_trainer(tmp_path, sample_steps=100)  # make_trainer's schedule: T = 100
    with pytest.raises(ValueError, match="sample_steps .* is 101, more than the schedule's 100 timesteps"):
        make_trainer(tmp_path, sample_steps=101)


def test_each_epoch_is_a_new_permutation_of_the_data(tmp_path):
    trainer = make_trainer(tmp_path, images=24)  # 3 steps of 8 an epoch
    epochs = [torch.cat([trainer._global_batch(3 * epoch + i) for i in range(3)]) for epoch in range(3)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(24))
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
