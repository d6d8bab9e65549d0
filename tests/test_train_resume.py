"""The Trainer's resume: in the same process, after SIGKILL at random moments
and inside each stage of a checkpoint write, in fresh interpreters, from a
damaged newest checkpoint, from older optimizer states and other machines'
generators; and resumes it must refuse (its main behaviour: test_train.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import ddpm_fast.train
from ddpm_fast.checkpoint import CheckpointError, checkpoints, latest_checkpoint
from ddpm_fast.train import ConfigMismatchError, TrainConfig
from ddpm_fast.train_config import RESUMABLE_CHANGES
from train_helpers import KILL_POINTS, RESUMABLE, final_weights, logged_losses, make_trainer, run_training, toy_dataset

STEPS = 8
# Killed runs start from a fork server that has imported torch and ddpm_fast
# once (torch._dynamo too, which the optimizer imports): each trial costs a
# fork, not a fresh interpreter.
_PROCESSES = mp.get_context("forkserver")
_PROCESSES.set_forkserver_preload(["torch", "torch._dynamo", "ddpm_fast.train", "train_helpers"])


def _start(out: Path, kill_in_write: int | None = None, kill_point: str = "publish"):
    process = _PROCESSES.Process(target=run_training, args=(str(out), STEPS, kill_in_write, kill_point))
    process.start()
    return process


def _run(out: Path, kill_in_write: int | None = None, kill_point: str = "publish") -> int:
    process = _start(out, kill_in_write, kill_point)
    process.join(120)
    return process.exitcode


def _assert_same_run(out: Path, baseline: Path) -> None:
    assert logged_losses(out) == logged_losses(baseline)
    want, got = final_weights(baseline), final_weights(out)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """An uninterrupted run, in a process like the interrupted ones."""
    out = tmp_path_factory.mktemp("baseline")
    assert _run(out) == 0
    return out


def test_resume_in_process_continues_exactly(tmp_path):
    # RESUMABLE: torch's generator, the learning-rate warm-up and the epoch's
    # permutation all matter after the resume; the EMA, the optimizer's and the
    # learning-rate schedule's state are compared too (the losses and the model
    # alone do not show an EMA that was not restored).
    full = make_trainer(tmp_path / "full", steps=STEPS, **RESUMABLE)
    full.train(final_samples=False)
    part = make_trainer(tmp_path / "part", steps=STEPS // 2, **RESUMABLE)
    part.train(final_samples=False)
    resumed = make_trainer(tmp_path / "part", steps=STEPS, **RESUMABLE)
    resumed.train(final_samples=False)
    assert logged_losses(tmp_path / "part") == logged_losses(tmp_path / "full")
    assert resumed.lr_schedule.state_dict() == full.lr_schedule.state_dict()
    for module in ("model", "ema"):
        want, got = getattr(full, module).state_dict(), getattr(resumed, module).state_dict()
        assert got.keys() == want.keys()
        for name, value in want.items():
            assert torch.equal(value, got[name]), f"{module}.{name}"
    want, got = full.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert got["param_groups"] == want["param_groups"] and got["state"].keys() == want["state"].keys()
    for i, state in want["state"].items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(got["state"][i][k])) for k, v in state.items()), i


def _log(run: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["lr"]) for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())]


@pytest.mark.parametrize("how", ["resumed", "continued", "resumed twice"])
def test_a_run_longer_than_one_that_ended_between_log_records_logs_as_an_uninterrupted_one(tmp_path, how):
    """A run's last step is logged; one that ends between two multiples of
    log_every (steps=6, log_every=4) logs it early, and a longer run from it
    (resumed, or train() called again) logs at the next multiple the steps since
    the previous one, as an uninterrupted run does: it kept the record of step 6
    and averaged steps 7-8 alone at step 8. Checkpoints are no log points."""
    settings = dict(log_every=4, checkpoint_every=3, **RESUMABLE)
    make_trainer(tmp_path / "full", steps=10, **settings).train(final_samples=False)
    want = _log(tmp_path / "full")
    assert [step for step, *_ in want] == [4, 8, 10]
    part = make_trainer(tmp_path / "part", steps=6, **settings)
    part.train(final_samples=False)
    assert [step for step, *_ in _log(tmp_path / "part")] == [4, 6]
    if how == "continued":
        part.config.steps = 10
        part.train(resume=False, final_samples=False)
    else:
        if how == "resumed twice":  # from step 6's checkpoint to 7, then from 7's: the early record of 7 replaced 6's
            make_trainer(tmp_path / "part", steps=7, **settings).train(final_samples=False)
            assert [step for step, *_ in _log(tmp_path / "part")] == [4, 7]
        make_trainer(tmp_path / "part", steps=10, **settings).train(final_samples=False)
    assert _log(tmp_path / "part") == want


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(20))
def test_sigkill_at_a_random_moment_then_resume(baseline, tmp_path, trial):
    """Kill the run at a random moment (often inside a checkpoint write, as it
    checkpoints every step); the resumed run ends as the uninterrupted one.
    The kill lands while the run is alive, after step k (1 to STEPS - 2, by
    trial) and a random part of the next step: a delay from the first log line
    alone let short runs end before it, leaving nothing to resume (which is
    retried, with shorter delays, should it still happen)."""
    rng = random.Random(trial)
    after_step = 1 + trial % (STEPS - 2)  # at least two steps left to kill in
    for attempt in range(5):  # a fast machine may finish the last steps within the delay: try again
        out = tmp_path / f"run{attempt}"
        process = _start(out)
        deadline = time.monotonic() + 60
        while process.is_alive() and time.monotonic() < deadline and _logged_steps(out) < after_step:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.01 / 2**attempt))
        process.kill()
        process.join()
        if process.exitcode == -signal.SIGKILL:
            break
        assert process.exitcode == 0, f"the run failed (exit {process.exitcode}) before the kill"
    else:
        pytest.fail("the run ended before the kill in 5 attempts")
    assert _run(out) == 0
    _assert_same_run(out, baseline)


@pytest.mark.slow
def test_training_is_bitwise_alike_in_fresh_interpreters(baseline, tmp_path):
    """Run after run: new processes with other hash seeds train the same losses
    and weights as the baseline (the kill tests' runs all fork from one server,
    which shares its hash seed and anything cached at import)."""
    tests = str(Path(__file__).parent)
    for hash_seed in ("1", "2"):
        out = tmp_path / f"run{hash_seed}"
        script = f"import sys; sys.path.insert(0, {tests!r}); import train_helpers; train_helpers.run_training({str(out)!r}, {STEPS})"
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONHASHSEED": hash_seed})
        assert run.returncode == 0, run.stderr[-2000:]
        _assert_same_run(out, baseline)


def _logged_steps(out: Path) -> int:
    try:
        return (out / "log.jsonl").read_text().count("\n")
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_inside_a_checkpoint_write(baseline, tmp_path, point):
    """Killed at each stage of writing checkpoint 3 (train_helpers' kill
    points): the newest complete checkpoint resumes, and the run ends as the
    uninterrupted one."""
    out = tmp_path / "run"
    assert _run(out, kill_in_write=3, kill_point=point) == -signal.SIGKILL
    published = point in ("pointer", "prune")  # the folder was renamed into place before the kill
    assert (out / "checkpoint-00000003").is_dir() == published
    unpublished = list(out.glob(".tmp-checkpoint-*"))
    assert bool(unpublished) == (not published), "an unpublished checkpoint was left"
    if not published:  # its first file alone, or all of them
        complete = {p.name for p in latest_checkpoint(baseline).iterdir()}
        held = {p.name for p in unpublished[0].iterdir()}
        assert held <= complete and len(held) == (1 if point == "mid-files" else len(complete)), held
    assert latest_checkpoint(out).name == ("checkpoint-00000003" if point == "prune" else "checkpoint-00000002")
    if point == "prune":
        assert (out / "checkpoint-00000001").is_dir()  # partly deleted when the process died
    assert _run(out) == 0
    assert not list(out.glob(".tmp-checkpoint-*")) and not list(out.glob(".*.tmp-*"))  # no temporary left
    _assert_same_run(out, baseline)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    make_trainer(tmp_path, steps=2).train(final_samples=False)
    ckpt = latest_checkpoint(tmp_path)
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        make_trainer(tmp_path, steps=4).train()
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        make_trainer(tmp_path, steps=4).train()


def test_damaged_newest_checkpoint_resumes_from_the_older_one(tmp_path):
    make_trainer(tmp_path / "whole", steps=4).train(final_samples=False)
    out = tmp_path / "run"
    make_trainer(out, steps=4).train(final_samples=False)  # checkpoints 2 and 4
    (latest_checkpoint(out) / "trainer.pt").write_bytes(b"damaged")
    with pytest.warns(UserWarning, match=r"cannot load checkpoint .*checkpoint-00000004: trainer.pt: not a torch.save archive \(damaged\?\); resumed from the older checkpoint-00000002 instead \(step 2\)"):
        make_trainer(out, steps=4).train(final_samples=False)
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    _assert_same_run(out, tmp_path / "whole")
    for _, path in checkpoints(out):  # every checkpoint damaged: the newest's error
        (path / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="cannot read .*checkpoint-00000004"):
        make_trainer(out, steps=6).train(final_samples=False)


def test_fp16_resumes_a_checkpoint_of_the_unfused_optimizer(tmp_path):
    """Checkpoints written before the trainer used fused Adam carry fused=False
    in their optimizer state; loaded as is, the per-parameter Adam then fails
    under the fp16 GradScaler. The trainer keeps its own fused choice."""
    make_trainer(tmp_path, steps=2, precision="fp16").train(final_samples=False)
    saved = latest_checkpoint(tmp_path) / "trainer.pt"
    state = torch.load(saved, weights_only=True)
    for group in state["optimizer"]["param_groups"]:  # as the unfused optimizer wrote it
        group["fused"] = False
    torch.save(state, saved)
    resumed = make_trainer(tmp_path, steps=4, precision="fp16")
    resumed.train(final_samples=False)
    assert resumed.optimizer.param_groups[0]["fused"] is True
    assert resumed.step == 4 and all(torch.isfinite(torch.tensor(logged_losses(tmp_path))))


def test_resume_restores_the_gpu_generators_this_machine_has(tmp_path, monkeypatch):
    """A checkpoint written on a machine with more GPUs (8 CUDA generator
    states) resumed on one with fewer: torch.cuda.set_rng_state_all raised
    IndexError for the GPUs missing here. (torch.cuda faked: no GPU needed.)"""
    make_trainer(tmp_path, steps=2).train(final_samples=False)
    saved = latest_checkpoint(tmp_path) / "trainer.pt"
    state = torch.load(saved, weights_only=True)
    state["cuda_rng"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    torch.save(state, saved)
    restored = {}

    def set_rng_state(rng, device):
        if device >= 2:
            raise IndexError("tuple index out of range")  # as torch.cuda.default_generators[device] does
        restored[device] = rng

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: [set_rng_state(r, i) for i, r in enumerate(states)])
    make_trainer(tmp_path, steps=4).load_checkpoint(saved.parent)
    assert sorted(restored) == [0, 1] and all(torch.equal(restored[i], state["cuda_rng"][i]) for i in restored)


def test_resume_with_another_recipe_is_refused(tmp_path):
    """Resuming with another schedule, model or learning rate once continued
    silently: the restored optimizer kept the old learning rate under the new
    warm-up, and config.json then recorded settings the run never had."""
    make_trainer(tmp_path, steps=2).train(final_samples=False)
    with pytest.raises(CheckpointError, match=r"another configuration \(train.lr: 0.001 there, 0.5 now; "
                                              r"train.warmup: 2 there, 7 now\)"):
        make_trainer(tmp_path, steps=4, lr=0.5, warmup=7).train(final_samples=False)
    other = make_trainer(tmp_path, steps=4)
    other.schedule = ddpm_fast.train.NoiseSchedule("linear", timesteps=50)
    with pytest.raises(CheckpointError, match="schedule.timesteps: 100 there, 50 now"):
        other.train(final_samples=False)
    other.model.config = {**other.model.config, "width": 32}
    with pytest.raises(CheckpointError, match="model.width: 16 there, 32 now"):
        other.train(final_samples=False)
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000002"
    # How long it runs and what it writes may change.
    resumed = make_trainer(tmp_path, steps=4, log_every=3, checkpoint_every=4, keep_checkpoints=3, sample_every=9)
    assert resumed.train(final_samples=False)["steps"] == 4


def test_a_damaged_newest_checkpoint_falls_back_to_the_next_older_one(tmp_path):
    """With three checkpoints kept (2, 4, 6) and 6 damaged, the resume takes 4,
    the newest that loads, not the oldest (which would lose two more steps)."""
    out = tmp_path / "run"
    make_trainer(out, steps=6, keep_checkpoints=3).train(final_samples=False)
    (out / "checkpoint-00000006" / "trainer.pt").write_bytes(b"damaged")
    with pytest.warns(UserWarning, match=r"resumed from the older checkpoint-00000004 instead \(step 4\)") as seen:
        summary = make_trainer(out, steps=6, keep_checkpoints=3).train(final_samples=False)
    assert {w.filename for w in seen} == {__file__}  # the caller's line, not the library's
    assert summary["trained"] == 2


def test_resume_restores_the_fp16_loss_scale(tmp_path):
    """The GradScaler's scale (lowered by overflows, raised every 2000 good
    steps) comes back with the checkpoint: a resume at the initial 65536 would
    overflow again the steps it had learned to avoid."""
    make_trainer(tmp_path, steps=2, precision="fp16").train(final_samples=False)
    saved = latest_checkpoint(tmp_path) / "trainer.pt"
    state = torch.load(saved, weights_only=True)
    state["scaler"]["scale"], state["scaler"]["_growth_tracker"] = 1024.0, 7
    torch.save(state, saved)
    resumed = make_trainer(tmp_path, steps=4, precision="fp16")
    resumed.load_checkpoint(saved.parent)
    assert resumed.scaler.get_scale() == 1024.0 and resumed.scaler.state_dict()["_growth_tracker"] == 7


def test_which_training_settings_a_resume_may_change(tmp_path):
    """Every setting of the training itself is refused on resume (the seed: other
    batches and noise; the EMA, clipping, loss, precision: another recipe than
    the checkpoint's); how long it runs, what it writes and how it computes may change."""
    make_trainer(tmp_path, steps=2).train(final_samples=False)
    ckpt = latest_checkpoint(tmp_path)
    refused = dict(seed=4, ema_decay=0.5, ema_warmup=False, grad_clip=0.5, batch_size=4, flip=False, loss="vlb",
                   precision="bf16", weight_decay=0.1, lr=0.5, warmup=7)
    for field, value in refused.items():
        with pytest.raises(ConfigMismatchError, match=rf"train\.{field}: "):
            make_trainer(tmp_path, steps=4, **{field: value}).check_resumable(ckpt)
    allowed = dict(steps=9, log_every=5, sample_every=3, sample_count=4, sample_steps=10, checkpoint_every=3,
                   keep_checkpoints=5, max_nonfinite=2, channels_last=False, compile=True)
    make_trainer(tmp_path, **allowed).check_resumable(ckpt)
    # A field added later must be placed on one side or the other.
    assert set(allowed) == RESUMABLE_CHANGES and not set(refused) & set(allowed)
    assert set(refused) | set(allowed) == {field.name for field in dataclasses.fields(TrainConfig)}


def test_a_model_config_with_tuples_resumes(tmp_path):
    """config.json holds a tuple of the model's config as a list: compared as
    they are, (1, 2) there and [1, 2] now differ, and every resume was refused."""
    def trainer(steps):
        made = make_trainer(tmp_path, steps=steps)
        made.model.config = {**made.model.config, "mult": (1, 2)}
        return made

    trainer(2).train(final_samples=False)
    assert trainer(4).train(final_samples=False)["steps"] == 4


def test_a_checkpoint_from_before_a_setting_existed_resumes(tmp_path):
    """A setting the checkpoint's config.json does not have (written by a
    version before it existed) is not a mismatch: the run resumes."""
    make_trainer(tmp_path, steps=2).train(final_samples=False)
    path = latest_checkpoint(tmp_path) / "config.json"
    saved = json.loads(path.read_text())
    del saved["train"]["ema_warmup"]
    path.write_text(json.dumps(saved))
    assert make_trainer(tmp_path, steps=4).train(final_samples=False)["steps"] == 4


def test_a_resume_on_other_images_is_said(tmp_path):
    """Other images of the same shape resumed without a word (the Python API
    records no --data path to compare): checkpoints now record the images'
    shape and SHA-256, and a resume on others warns (a deliberate change, new
    data, may go on), naming both."""
    make_trainer(tmp_path, steps=2).train(final_samples=False)
    ckpt = latest_checkpoint(tmp_path)
    recorded = json.loads((ckpt / "config.json").read_text())["data_fingerprint"]
    images = toy_dataset(n=64).images
    assert recorded == {"shape": [64, 1, 8, 8], "sha256": hashlib.sha256(images.numpy().tobytes()).hexdigest()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_trainer(tmp_path, steps=4).check_resumable(ckpt)  # the same images: nothing said
    other = make_trainer(tmp_path, steps=4)
    other.data_fingerprint = toy_dataset(n=64, seed=1).fingerprint()
    with pytest.warns(UserWarning, match=rf"with other settings than it was trained with \(other images: 64 x 1 x 8 x 8 "
                                         rf"images, SHA-256 {recorded['sha256'][:12]} there, 64 x 1 x 8 x 8 images, "
                                         rf"SHA-256 {other.data_fingerprint['sha256'][:12]} now\)") as seen:
        assert other.train(final_samples=False)["steps"] == 4
    assert {w.filename for w in seen} == {__file__}  # the caller's line, not the library's
    # A checkpoint written before images were recorded resumed without a word, on
    # any images: it says their check cannot be made.
    path = latest_checkpoint(tmp_path) / "config.json"
    assert json.loads(path.read_text())["recipe"] == 2
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items()
                                if k not in ("data_fingerprint", "recipe")}))
    with pytest.warns(UserWarning, match=r"written by an older version: it records no fingerprint of its images, so "
                                         r"they are not compared with these$"):
        make_trainer(tmp_path, steps=4).check_resumable(path.parent)


# Why: versions before 2026-12-04 weighed the hybrid loss's L_t by 0.001, later
# ones by 0.001 * T, under the same loss="hybrid": such a run resumed on the other
# loss without a word. Checkpoints of those versions record no images (nor a recipe).
def test_a_hybrid_checkpoint_of_an_older_version_says_its_weight_may_differ(tmp_path):
    make_trainer(tmp_path, steps=2, loss="hybrid").train(final_samples=False)
    path = latest_checkpoint(tmp_path) / "config.json"
    saved = json.loads(path.read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_trainer(tmp_path, steps=4, loss="hybrid").check_resumable(path.parent)  # this version's: nothing said
    path.write_text(json.dumps({k: v for k, v in saved.items() if k not in ("data_fingerprint", "recipe")}))
    with pytest.warns(UserWarning, match=r"its 'hybrid' loss may have weighed L_t by 0.001 \(versions before "
                                         r"2026-12-04 did\), this one weighs it by 0.001 \* T"):
        make_trainer(tmp_path, steps=4, loss="hybrid").check_resumable(path.parent)


# Why: older versions recorded the command line's --data as typed ("d.npy"), this
# one as an absolute path: resuming with the same command from the same folder
# warned of "other settings (data: 'd.npy' there, '/.../d.npy' now)".
def test_a_data_path_recorded_relative_by_an_older_version_is_the_same_setting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = str(tmp_path / "d.npy")
    make_trainer(tmp_path / "run", steps=2, extra_config={"data": data}).train(final_samples=False)
    path = latest_checkpoint(tmp_path / "run") / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "data": "d.npy"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_trainer(tmp_path / "run", steps=4, extra_config={"data": data}).check_resumable(path.parent)
    with pytest.warns(UserWarning, match=r"other settings than it was trained with \(data: 'd.npy' there, '/elsewhere"):
        make_trainer(tmp_path / "run", steps=4, extra_config={"data": "/elsewhere/d.npy"}).check_resumable(path.parent)


def test_an_older_checkpoint_of_another_recipe_is_passed_over(tmp_path):
    """Falling back past a damaged newest checkpoint, one of another recipe is
    skipped like a damaged one (only the newest's mismatch is an error)."""
    out = tmp_path / "run"
    make_trainer(out, steps=6, keep_checkpoints=3).train(final_samples=False)  # 2, 4, 6
    (out / "checkpoint-00000006" / "trainer.pt").write_bytes(b"damaged")
    config = out / "checkpoint-00000004" / "config.json"
    saved = json.loads(config.read_text())
    saved["train"]["lr"] = 0.5
    config.write_text(json.dumps(saved))
    resumed = make_trainer(out, steps=6, keep_checkpoints=3)
    with pytest.warns(UserWarning, match="resumed from the older checkpoint-00000002"):
        assert resumed.train(final_samples=False)["trained"] == 4


def test_a_checkpoint_config_without_a_section_resumes(tmp_path):
    """A config.json without a whole section (written before it was recorded) is no mismatch."""
    make_trainer(tmp_path, steps=2).train(final_samples=False)
    path = latest_checkpoint(tmp_path) / "config.json"
    saved = json.loads(path.read_text())
    del saved["model"]
    path.write_text(json.dumps(saved))
    assert make_trainer(tmp_path, steps=4).train(final_samples=False)["steps"] == 4
