"""Two gloo ranks where rank 0 once worked alone or each rank for itself:
the grids of a run (every rank draws a share), the checkpoint that sample
loads (rank 0 finds it), and the dropout generators of a run resumed by
another number of ranks (each rank its own)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm_fast import Sampler
from test_distributed import _assert_same_images, _join, _leave, _spawn_two_ranks
from train_helpers import make_trainer, save_toy_npz


def _grid_worker(rank: int, world: int, port: int, out: str) -> None:
    """A run with grids; each rank records the samples its Sampler drew."""
    _join(rank, world, port)
    failed = True
    try:
        real = Sampler.sample

        def sample(self, n, **kwargs):
            with open(Path(out) / f"drawn-{rank}.txt", "a") as f:
                f.write(f"{kwargs.get('first_sample', 0)} {n}\n")
            return real(self, n, **kwargs)

        Sampler.sample = sample
        trainer = make_trainer(Path(out) / "run", steps=2, sample_every=2, sample_count=5, sample_steps=3)
        trainer.train(final_samples=True)
        grid = trainer.sample_grid(Path(out) / "again.png")
        if rank == 0:
            np.save(Path(out) / "grid.npy", grid)
        elif grid is not None:
            raise AssertionError(f"sample_grid returned images on rank {rank}")
        failed = False
    finally:
        _leave(failed)


@pytest.mark.slow
def test_every_rank_draws_a_share_of_the_grids(tmp_path):
    """Rank 0 drew every grid alone while the others waited in the next
    collective: for a long chain on CPUs past gloo's 30-minute timeout, which
    crashed the run. Each rank now draws its share; the grid is one process's."""
    _spawn_two_ranks(_grid_worker, str(tmp_path))
    drawn = [(tmp_path / f"drawn-{rank}.txt").read_text().split("\n")[:-1] for rank in (0, 1)]
    assert drawn == [["0 3"] * 2, ["3 2"] * 2]  # the step-2 grid (samples.png is its copy) and the one asked for
    assert (tmp_path / "run" / "samples.png").is_file() and (tmp_path / "run" / "samples" / "step-00000002.png").is_file()
    single = make_trainer(tmp_path / "single", steps=2, sample_count=5, sample_steps=3)
    single.train(final_samples=False)
    _assert_same_images(np.load(tmp_path / "grid.npy"), single.sample_grid(tmp_path / "single.png"))


def _sample_race_worker(rank: int, world: int, port: int, out: str) -> None:
    """`ddpm-fast sample` on a run folder, with rank 1 finding an older newest
    checkpoint, as when training writes a checkpoint while the ranks start."""
    import ddpm_fast.pretrained as pretrained
    from ddpm_fast.cli import main

    _join(rank, world, port)
    failed = True
    try:
        if rank == 1:
            older = Path(out) / "run" / "checkpoint-00000002"
            pretrained.latest_checkpoint = lambda folder: older
        code = main(["sample", "--checkpoint", str(Path(out) / "run"), "--out", str(Path(out) / "two"), "-n", "2",
                     "--steps", "4", "--batch-size", "1", "--weights", "model", "--device", "cpu"])
        failed = code != 0
    finally:
        _leave(failed)


@pytest.mark.slow
def test_sample_ranks_load_the_checkpoint_rank_0_found(tmp_path):
    """Each rank read the run's newest checkpoint itself: samples.npz mixed two
    models when a checkpoint was written meanwhile, silently."""
    from ddpm_fast.cli import main

    data = tmp_path / "toy.npz"
    save_toy_npz(data)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--model", "tiny", "--steps", "4",
                 "--batch-size", "8", "--timesteps", "20", "--checkpoint-every", "2", "--lr", "0.01", "--warmup", "1",
                 "--device", "cpu"]) == 0
    _spawn_two_ranks(_sample_race_worker, str(tmp_path))
    for step in (4, 2):
        assert main(["sample", "--checkpoint", str(tmp_path / "run" / f"checkpoint-0000000{step}"), "--out",
                     str(tmp_path / f"one-{step}"), "-n", "2", "--steps", "4", "--weights", "model", "--device", "cpu"]) == 0
    two, newest, older = (np.load(tmp_path / name / "samples.npz")["images"] for name in ("two", "one-4", "one-2"))
    assert not np.array_equal(newest[1], older[1])  # the case tells the two checkpoints apart
    _assert_same_images(two, newest)


def _resume_other_world_worker(rank: int, world: int, port: int, out: str) -> None:
    _join(rank, world, port)
    failed = True
    try:
        make_trainer(Path(out) / "run", steps=4, dropout=0.3).train(final_samples=False)
        failed = False
    finally:
        _leave(failed)


@pytest.mark.slow
def test_ranks_resuming_a_single_process_run_draw_their_own_dropout(tmp_path):
    """A checkpoint of one process holds one generator state: every rank
    restored it and drew the same dropout masks from then on."""
    make_trainer(tmp_path / "run", steps=2, dropout=0.3).train(final_samples=False)
    _spawn_two_ranks(_resume_other_world_worker, str(tmp_path))
    states = torch.load(tmp_path / "run" / "checkpoint-00000004" / "trainer.pt", weights_only=False)["rank_rng"]
    assert not torch.equal(states[0]["torch_rng"], states[1]["torch_rng"])
