"""Two gloo ranks on the CPU train to the same weights as one process with the
same global batch, and sharded sampling equals unsharded sampling."""

from __future__ import annotations

import atexit
import functools
import json
import os
import re
import socket
import subprocess
import sys
import time
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ddpm_fast import Sampler, distributed
from ddpm_fast.schedules import NoiseSchedule
from train_helpers import TinyEps, make_trainer, save_toy_npz, toy_dataset

STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_two_ranks(worker, *args) -> None:
    """Run worker(rank, 2, port, *args) in two processes. The port was free a
    moment before rank 0 binds it; should another process take it meanwhile,
    the ranks are started again on another port."""
    for attempt in range(3):
        try:
            context = mp.start_processes(worker, args=(2, _free_port(), *args), nprocs=2, join=False, start_method="spawn")
            deadline = time.monotonic() + 300
            while not context.join(timeout=2):
                if time.monotonic() > deadline:  # ranks whose collectives parted wait forever
                    for process in context.processes:
                        process.kill()
                    pytest.fail("the ranks did not finish within 300 s: deadlocked?")
            return
        except mp.ProcessRaisedException as error:
            if attempt == 2 or not re.search("EADDRINUSE|address already in use", str(error), re.IGNORECASE):
                raise


def _join(rank: int, world: int, port: int) -> None:
    """Join the gloo group as torchrun's rank ``rank`` would, on one thread."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.setup("cpu")


def _leave(failed: bool) -> None:
    """Leave the group; after a successful run, end the worker process as the
    ddpm-fast command does (distributed.exit_process): gloo now and then
    aborts a rank while the interpreter finalizes. These tests check what the
    workers wrote."""
    distributed.teardown(failed=failed)
    if not failed:
        distributed.exit_process(0)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    _join(rank, world, port)
    failed = True
    try:
        trainer = make_trainer(Path(out) / "run", steps=STEPS)
        trainer.train(final_samples=False)
        grads = _next_step_gradients(trainer)
        if rank == 0:
            torch.save(trainer.model.state_dict(), Path(out) / "weights.pt")
            torch.save(grads, Path(out) / "grads.pt")
        torch.manual_seed(0)
        sampler = Sampler(TinyEps(), NoiseSchedule("linear", timesteps=10), device="cpu", cuda_graph=False)
        images = distributed.sample_sharded(sampler, 5, seed=9, batch_size=2, progress=False)
        torch.manual_seed(100 + rank)  # seed=None: rank 0's draw, shared (each rank drew its own)
        drawn = distributed.sample_sharded(sampler, 5, seed=None, batch_size=2, progress=False)
        if rank != 0:  # rank 0 alone holds the samples (the sample command writes what it is given)
            assert images is None and drawn is None, f"sample_sharded returned images on rank {rank}"
        if rank == 0:
            np.save(Path(out) / "samples.npy", images)
            np.save(Path(out) / "drawn.npy", drawn)
        failed = False
    finally:
        _leave(failed)


def _next_step_gradients(trainer) -> list[torch.Tensor]:
    """The gradients of the next step's loss (through DDP where the trainer
    wraps the model): Adam barely notices a gradient scaled by a constant, so
    the weights alone would not show ranks summing where they should average."""
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer._loss(trainer.step).backward()
    return [p.grad.clone() for p in trainer.model.parameters()]


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path):
    _spawn_two_ranks(_worker, str(tmp_path))
    single = make_trainer(tmp_path / "single", steps=STEPS)
    single.train(final_samples=False)
    ddp = torch.load(tmp_path / "weights.pt")
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-5, atol=1e-6, msg=name)
    for k, (ddp_grad, grad) in enumerate(zip(torch.load(tmp_path / "grads.pt"), _next_step_gradients(single))):
        torch.testing.assert_close(ddp_grad, grad, rtol=1e-5, atol=1e-7, msg=f"gradient {k}")
    torch.manual_seed(0)
    sampler = Sampler(TinyEps(), NoiseSchedule("linear", timesteps=10), device="cpu", cuda_graph=False)
    alone = distributed.sample_sharded(sampler, 5, seed=9, batch_size=5, progress=False)
    _assert_same_images(np.load(tmp_path / "samples.npy"), alone)
    torch.manual_seed(100)
    _assert_same_images(np.load(tmp_path / "drawn.npy"), distributed.sample_sharded(sampler, 5, seed=None, batch_size=5, progress=False))
    # The log holds the global batch's loss (it held rank 0's half of it).
    ddp_log, single_log = (_log_losses(run) for run in (tmp_path / "run", tmp_path / "single"))
    np.testing.assert_allclose(ddp_log, single_log, rtol=1e-5)


def _assert_same_images(got: np.ndarray, want: np.ndarray) -> None:
    """The same noise gives the same uint8 images; the model's float results
    may differ in the last bit with the batch's size (2 per rank, 5 alone),
    which can move a value at a rounding level's edge by one, never more."""
    assert got.shape == want.shape and got.dtype == want.dtype == np.uint8
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.01, (diff.max(), (diff > 0).sum())


def _log_losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def _resume_worker(rank: int, world: int, port: int, out: str, interrupted: bool) -> None:
    """Train STEPS with dropout, each rank's generator seeded apart (as a user's
    script may), straight through or as two runs (the second one in a fresh
    generator state, as a new process has); rank 0 saves the weights."""
    _join(rank, world, port)
    failed = True
    try:
        for steps, seed in ((STEPS // 2, 100), (STEPS, 555)) if interrupted else ((STEPS, 100),):
            trainer = make_trainer(Path(out) / "run", steps=steps, dropout=0.3)
            torch.manual_seed(seed + rank)
            trainer.train(final_samples=False)
        if rank == 0:
            torch.save(trainer.model.state_dict(), Path(out) / "weights.pt")
        failed = False
    finally:
        _leave(failed)


@pytest.mark.slow
def test_two_gloo_ranks_resume_exactly_with_dropout(tmp_path):
    """Each rank's own generator state is checkpointed and restored: rank 1
    resumed with rank 0's (as before) draws other dropout masks."""
    for name, interrupted in (("full", False), ("resumed", True)):
        (tmp_path / name).mkdir()
        _spawn_two_ranks(_resume_worker, str(tmp_path / name), interrupted)
    full, resumed = (torch.load(tmp_path / name / "weights.pt") for name in ("full", "resumed"))
    for name, value in full.items():
        assert torch.equal(resumed[name], value), name


def _exit_worker(rank: int, world: int, port: int, out: str) -> None:
    """Train one step and leave the trainer in a reference cycle (as a stored
    exception traceback may): a handler registered before the trainer, so run
    after the library's, records whether the DDP wrapper was gone by then."""
    _join(rank, world, port)
    wrapper: list[weakref.ref] = []
    atexit.register(lambda: (Path(out) / f"released{rank}").write_text(str(wrapper[0]() is None)))
    trainer = make_trainer(Path(out) / "run", steps=1)
    trainer.cycle = trainer
    wrapper.append(weakref.ref(trainer.net))
    trainer.train(final_samples=False)
    _leave(failed=False)  # the atexit handlers run (the library's, then this test's)


@pytest.mark.slow
def test_ddp_wrappers_go_before_the_interpreter_finalizes(tmp_path):
    """A DDP wrapper destroyed during interpreter finalization makes gloo abort
    the process (SIGABRT) now and then, after a successful run."""
    _spawn_two_ranks(_exit_worker, str(tmp_path))
    assert [(tmp_path / f"released{rank}").read_text() for rank in (0, 1)] == ["True", "True"]


def test_batch_size_must_split_over_ranks(tmp_path, monkeypatch):
    monkeypatch.setattr("ddpm_fast.train.rank_and_world", lambda: (0, 3))
    with pytest.raises(ValueError, match="divisible by the 3 ranks"):
        make_trainer(tmp_path, batch_size=8)


def test_single_process_setup_is_a_no_op():
    assert not dist.is_initialized()
    assert distributed.setup("cpu") == torch.device("cpu")
    assert not dist.is_initialized()


def test_single_process_setup_keeps_the_gpu_it_is_given(monkeypatch):
    # `--device cuda:1` without torchrun used to give cuda:<current> (cuda:0):
    # the run went to another GPU than asked. (torch.cuda faked: no GPU needed.)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.setup("cuda:1") == torch.device("cuda", 1)
    assert distributed.setup("cuda") == torch.device("cuda", 0)
    assert distributed.setup() == torch.device("cuda", 0)
    assert not dist.is_initialized()


def test_more_local_ranks_than_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: pytest.fail("set a GPU that is not there"))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match=r"local rank 2, but 2 GPU\(s\) are visible: start at most 2 processes"):
        distributed.setup("cuda")
    assert not dist.is_initialized()


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_torchrun_on_gpus_binds_the_nccl_group_to_the_ranks_gpu(monkeypatch, device):
    """The group is bound to the rank's GPU (device_id): NCCL's barriers know
    their device, where torch warned at the first one that it guessed it. Rank
    3 computes there whatever CUDA index it was given (--device cuda:0 must not
    put every rank on cuda:0). (torch.cuda and the group's set-up faked: no GPU needed.)"""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    monkeypatch.setattr(distributed, "_joined", False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.setup(device) == torch.device("cuda", 3)
    assert calls == [("set_device", 3), ("nccl", {"device_id": torch.device("cuda", 3)})]


def test_torchrun_on_cpus_joins_a_gloo_group(monkeypatch):
    """Two ranks: the group is joined (exit_process then skips finalization)."""
    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    monkeypatch.setattr(distributed, "_joined", False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.setup("cpu") == torch.device("cpu")
    assert calls == [("gloo", {})] and distributed._joined


@pytest.mark.parametrize("joined", [False, True])
def test_exit_process_skips_finalization_only_after_joining_a_group(joined):
    """After a group was joined the process ends with the code, the atexit
    handlers run and the output flushed, but the interpreter not finalized
    (where gloo can abort a rank)."""
    script = ("import atexit, sys\n"
              "from ddpm_fast import distributed\n"
              f"distributed._joined = {joined}\n"
              "atexit.register(print, 'atexit handlers ran')\n"
              "class Finalized:\n"
              "    def __del__(self):\n"
              "        print('finalized', flush=True)\n"
              "kept = Finalized()\n"
              "print('unflushed', end='')\n"
              "distributed.exit_process(3)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 3, run.stderr
    lines = run.stdout.replace("unflushed", "unflushed\n").split()
    assert lines[:3] == ["unflushed", "atexit", "handlers"] and ("finalized" in lines) != joined, run.stdout


@pytest.mark.slow
def test_train_command_under_torchrun(tmp_path):
    """`ddpm-fast train` as two gloo ranks under torchrun: exit status 0 on
    every rank, rank 0's one summary line, a checkpoint that loads; then
    `ddpm-fast bpd` over the two ranks (each evaluated every image before)."""
    from ddpm_fast.checkpoint import latest_checkpoint
    from ddpm_fast.pretrained import load_model

    data = tmp_path / "digits.npz"
    save_toy_npz(data)
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ddpm_fast",
            "train", "--data", str(data), "--out", str(out), "--model", "tiny", "--steps", "4", "--batch-size", "8",
            "--timesteps", "20", "--checkpoint-every", "2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("trained to step 4;") == 1, run.stdout
    load_model(latest_checkpoint(out), weights="ema")
    # bits/dim sharded over the two ranks: rank 0's one line, the bound of one process
    bpd = ["bpd", "--checkpoint", str(out), "--data", str(data), "-n", "5", "--batch-size", "2", "--device", "cpu"]
    run = subprocess.run([*argv[:argv.index("train")], *bpd], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    alone = subprocess.run([sys.executable, "-m", "ddpm_fast", *bpd], capture_output=True, text=True, env=env, timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    # re.search, not match: torch 2.8's gloo prints "[Gloo] Rank 0 is connected to 1 peer ranks" lines to stdout first.
    got, want = (float(re.search(r"^5 images: (\S+) bits/dim", r.stdout, re.MULTILINE).group(1)) for r in (run, alone))
    assert run.stdout.count("bits/dim") == 1 and got == pytest.approx(want, rel=1e-5), (run.stdout, alone.stdout)


def _mismatch_worker(rank: int, world: int, port: int, out: str, mode: str) -> None:
    """Ranks that differ in a setting or in their images, or find different checkpoints to resume
    (rank 1's folder empty, as a second machine's local disk): every rank
    records the error it raised."""
    _join(rank, world, port)
    folder = Path(out) / ("run" if mode == "settings" or rank == 0 else "local")
    trainer = make_trainer(folder, steps=STEPS + (rank if mode == "settings" else 0),
                           images=64 + (8 * rank if mode == "data" else 0))
    _train_recording_mismatch(trainer, out, rank)
    _leave(failed=False)


def _train_recording_mismatch(trainer, out: str, rank: int) -> None:
    """Train, and write to out/error<rank> the RankMismatchError raised (or "trained")."""
    try:
        trainer.train(final_samples=False)
        message = "trained"
    except distributed.RankMismatchError as error:
        message = str(error)
    (Path(out) / f"error{rank}").write_text(message)


@pytest.mark.slow
@pytest.mark.parametrize("mode, expected", [
    ("settings", "the ranks differ in their settings (train.steps: 4 on rank 0, 5 on rank 1)"),
    # Each rank takes its slice of the same batch indices: of other images, silently other batches.
    ("data", "the ranks differ in their images (sha256: {0!r} on rank 0, {1!r} on rank 1; "
             "shape: [64, 1, 8, 8] on rank 0, [72, 1, 8, 8] on rank 1): give every rank the same data"),
    ("folder", "the ranks differ in the checkpoint to resume ('checkpoint-00000002' on rank 0, None on rank 1): "
               "every rank must see the same run folder"),
])
def test_ranks_that_differ_stop_alike_before_training(tmp_path, mode, expected):
    """Rank 0 resumed step 2 while rank 1 started afresh: a checkpoint mixed
    from both was written, then the ranks' loops parted and the run hung."""
    if mode == "folder":
        make_trainer(tmp_path / "run", steps=2).train(final_samples=False)
    _spawn_two_ranks(_mismatch_worker, str(tmp_path), mode)
    expected = expected.format(*(toy_dataset(n=n).fingerprint()["sha256"] for n in (64, 72)))
    for rank in (0, 1):
        assert expected in (tmp_path / f"error{rank}").read_text()


def _bpd_worker(rank: int, world: int, port: int, out: str) -> None:
    """evaluate_bpd sharded over the ranks, then (rank 0 alone, as a script's
    `if rank == 0:` may call it) not sharded: no collective to wait in."""
    _join(rank, world, port)
    from ddpm_fast.evaluate import evaluate_bpd

    torch.manual_seed(0)
    model, seen = TinyEps().eval(), []
    model.register_forward_hook(lambda module, args, output: seen.append(len(args[0])))
    bpd = functools.partial(evaluate_bpd, model, toy_dataset(n=5), NoiseSchedule("linear", timesteps=10), batch_size=2, seed=4)
    results = {"sharded": bpd(sharded=True)}
    results["sharded"]["seen"] = sum(seen)
    if rank == 0:
        seen.clear()
        results["alone"] = bpd()
        results["alone"]["seen"] = sum(seen)
    (Path(out) / f"bpd{rank}.json").write_text(json.dumps(results))
    _leave(failed=False)


@pytest.mark.slow
def test_bits_per_dim_sharded_over_ranks_equals_one_process(tmp_path):
    """Each rank takes its share of the 5 images (3 and 2); every rank returns
    the whole dataset's bound (each evaluated all 5 before)."""
    from ddpm_fast.evaluate import evaluate_bpd

    _spawn_two_ranks(_bpd_worker, str(tmp_path))
    torch.manual_seed(0)
    alone = evaluate_bpd(TinyEps().eval(), toy_dataset(n=5), NoiseSchedule("linear", timesteps=10), batch_size=5, seed=4)
    results = [json.loads((tmp_path / f"bpd{rank}.json").read_text()) for rank in (0, 1)]
    got = [(results[0]["sharded"], 3), (results[1]["sharded"], 2), (results[0]["alone"], 5)]
    for result, images in got:
        assert result["images"] == 5 and result["seen"] == images * 10  # its images, at each of the 10 timesteps
        for key in ("total", "prior", "vb", "decoder", "terms"):
            np.testing.assert_allclose(result[key], alone[key], rtol=1e-6, err_msg=key)


def _nonfinite_worker(rank: int, world: int, port: int, out: str) -> None:
    _join(rank, world, port)
    from ddpm_fast.train import NonFiniteLossError

    trainer = make_trainer(Path(out) / "run", steps=STEPS, max_nonfinite=2)
    with torch.no_grad():
        trainer.model.out.bias.fill_(float("nan"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            trainer.train(final_samples=False)
        except NonFiniteLossError:
            pass
    (Path(out) / f"warnings{rank}").write_text(str(sum("non-finite loss" in str(w.message) for w in seen)))
    _leave(failed=False)


@pytest.mark.slow
def test_only_rank_0_warns_of_a_skipped_step(tmp_path):
    """The ranks share the decision and the loss: each rank warned the same line."""
    _spawn_two_ranks(_nonfinite_worker, str(tmp_path))
    assert [(tmp_path / f"warnings{rank}").read_text() for rank in (0, 1)] == ["2", "0"]


class _Unpicklable(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.callback = lambda: None  # pickle cannot take it


def _rank0_check_worker(rank: int, world: int, port: int, out: str) -> None:
    _join(rank, world, port)
    messages = []
    for error in (ValueError(f"--out is bad (checked on rank {rank})"), _Unpicklable("no pickle")):
        def check() -> None:
            raise error

        try:
            distributed.run_on_rank0(check)
            messages.append("passed")
        except Exception as caught:  # noqa: BLE001
            messages.append(f"{type(caught).__name__}: {caught}")
    messages.append(f"result: {distributed.run_on_rank0(lambda: f'found on rank {rank}')}")
    try:  # a result pickle cannot take: an error on every rank, not rank 0's alone with the others waiting
        distributed.run_on_rank0(lambda: lambda: None)
    except RuntimeError as caught:
        messages.append(str(caught).split(":")[0])
    (Path(out) / f"error{rank}").write_text("\n".join(messages))
    _leave(failed=False)


def test_run_on_rank0_raises_rank_0s_error_on_every_rank(tmp_path):
    """The CLI checks --out on rank 0: the other ranks waited at the run's first
    collective, then printed their own traceback once rank 0 had left."""
    _spawn_two_ranks(_rank0_check_worker, str(tmp_path))
    for rank in (0, 1):  # an error pickle cannot take reaches the others as a RuntimeError naming it
        assert (tmp_path / f"error{rank}").read_text().splitlines() == [
            "ValueError: --out is bad (checked on rank 0)", "RuntimeError: _Unpicklable: no pickle",
            "result: found on rank 0", "rank 0's result cannot be sent to the other ranks"]


@pytest.mark.parametrize("shape", [(4, 8, 8), (3, 8), None])
def test_sample_sharded_refuses_non_images_before_sampling(shape):
    def model(x, t):
        pytest.fail("sampled a chain whose images could not be returned")

    sampler = Sampler(model, NoiseSchedule("linear", timesteps=10), sample_shape=shape, device="cpu", cuda_graph=False)
    with pytest.raises(ValueError, match=r"sample_shape must be \(C, H, W\) with C 1 or 3"):
        distributed.sample_sharded(sampler, 2, seed=0, batch_size=2, progress=False)


def test_sample_sharded_checks_progress_on_every_rank():
    """progress was only read as `progress and rank == 0` (0 on rank 0, by the
    Sampler, after the other ranks' work): checked first now, on every rank."""
    sampler = Sampler(TinyEps(), NoiseSchedule("linear", timesteps=10), device="cpu", cuda_graph=False)
    with pytest.raises(TypeError, match="progress must be a bool, got 'no'"):
        distributed.sample_sharded(sampler, 2, seed=0, batch_size=2, progress="no")



def test_sample_sharded_draws_a_progress_bar_on_rank_0_only(monkeypatch):
    """Every rank's bar over the others' on one terminal: rank 1 of 2 (faked,
    its collectives no-ops) samples its share without one."""
    seen = []

    class Recording(Sampler):
        def sample(self, *args, progress=True, **kwargs):
            seen.append(progress)
            return super().sample(*args, progress=progress, **kwargs)

    monkeypatch.setattr(distributed, "rank_and_world", lambda: (1, 2))
    monkeypatch.setattr(distributed.dist, "broadcast_object_list", lambda objects, src=0: None)
    monkeypatch.setattr(distributed.dist, "gather_object", lambda obj, gathered=None, dst=0: None)
    monkeypatch.setattr(distributed.dist, "all_gather_object", lambda values, value: values.__setitem__(
        slice(None), [value] * len(values)))  # the ranks agree on what to sample
    sampler = Recording(TinyEps(), NoiseSchedule("linear", timesteps=10), device="cpu", cuda_graph=False)
    assert distributed.sample_sharded(sampler, 4, seed=0, batch_size=1, progress=True) is None
    assert seen == [False, False]
