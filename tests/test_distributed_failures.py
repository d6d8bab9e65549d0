"""Two gloo ranks that part ways: one cannot read the checkpoint the other
resumed, or they are asked to sample or evaluate different things. Every rank
stops alike with RankMismatchError, rather than hanging in collectives that
the other never reaches, or returning a mix of two runs' results."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from ddpm_fast import Sampler, distributed
from ddpm_fast.schedules import NoiseSchedule
from test_distributed import _join, _leave, _spawn_two_ranks, _train_recording_mismatch
from train_helpers import TinyEps, make_trainer, toy_dataset


def _unreadable_worker(rank: int, world: int, port: int, out: str, which: str) -> None:
    """Rank 1 cannot read the newest checkpoint's weights, or any's (an I/O error on its machine)."""
    _join(rank, world, port)
    import ddpm_fast.train_checkpoints as checkpoints

    if rank == 1:
        read, calls = checkpoints.load_safetensors, []

        def load_safetensors(path, device):
            calls.append(path)
            if which == "every" or len(calls) == 1:
                raise OSError(errno.EIO, f"injected read error {path}")
            return read(path, device)

        checkpoints.load_safetensors = load_safetensors
    _train_recording_mismatch(make_trainer(Path(out) / "run", steps=6), out, rank)
    _leave(failed=True)


@pytest.mark.slow
@pytest.mark.parametrize("which, resumed", [("newest", "'checkpoint-00000002'"), ("every", "None")])
def test_a_rank_that_cannot_read_the_checkpoint_the_others_resumed_stops_every_rank(tmp_path, which, resumed):
    """Rank 1 fell back to an older checkpoint and waited at the barrier that
    sets damaged ones aside, rank 0 in the check of the step resumed: a hang,
    without a word (or, reading none, rank 1 stopped and rank 0 printed gloo's
    traceback). Nothing is renamed: the checkpoint is not damaged."""
    make_trainer(tmp_path / "run", steps=4).train(final_samples=False)  # checkpoints 2 and 4
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    _spawn_two_ranks(_unreadable_worker, str(tmp_path), which)
    for rank in (0, 1):
        message = (tmp_path / f"error{rank}").read_text()
        assert message.startswith("the ranks differ in the checkpoint each resumed (") and \
            f"checkpoint: 'checkpoint-00000004' on rank 0, {resumed} on rank 1" in message and \
            "injected read error" in message and "every rank must see the same run folder" in message, message
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


def _differ_worker(rank: int, world: int, port: int, out: str, what: str) -> None:
    """sample_sharded and evaluate_bpd(sharded=True) with rank 1 given another ``what``."""
    _join(rank, world, port)
    from ddpm_fast.evaluate import evaluate_bpd

    torch.manual_seed(0)
    model = TinyEps().eval()
    if what == "weights" and rank == 1:  # another checkpoint file at the same path on its machine
        with torch.no_grad():
            model.out.bias.add_(1e-3)
    n = 5 + (rank if what == "n" else 0)
    seed = 4 + (rank if what == "seed" else 0)
    schedule = NoiseSchedule("linear", timesteps=10)
    messages = []
    for run in (lambda: distributed.sample_sharded(Sampler(model, schedule, device="cpu", cuda_graph=False), n,
                                                   seed=seed, batch_size=2, progress=False),
                lambda: evaluate_bpd(model, toy_dataset(n=6), schedule, n=n, batch_size=2, seed=seed, sharded=True)):
        try:
            run()
            messages.append("ran")
        except distributed.RankMismatchError as error:
            messages.append(str(error))
    (Path(out) / f"error{rank}").write_text("\n".join(messages))
    _leave(failed=False)


@pytest.mark.slow
@pytest.mark.parametrize("what, shown", [
    ("n", ["n: 5 on rank 0, 6 on rank 1"] * 2),
    ("seed", ["seed: 4 on rank 0, 5 on rank 1"] * 2),
    ("weights", ["model: '"] * 2),
])
def test_sharded_sampling_and_evaluation_refuse_ranks_that_differ(tmp_path, what, shown):
    """Each rank's share came from its own settings: `sample` wrote 7 samples
    for 8 (rank 1 asked for 6), `bpd` averaged two bounds; exit status 0."""
    _spawn_two_ranks(_differ_worker, str(tmp_path), what)
    for rank in (0, 1):
        messages = (tmp_path / f"error{rank}").read_text().splitlines()
        assert [m.split(" (")[0] for m in messages] == ["the ranks differ in what to sample",
                                                         "the ranks differ in what to evaluate"], messages
        for message, part in zip(messages, shown):
            assert part in message, message
