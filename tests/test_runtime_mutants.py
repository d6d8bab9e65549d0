"""Process-level helpers checked in one process, their collectives faked:
the shares of the ranks, rank seeds, tear-down of the group,
run_on_rank0 and check_ranks_agree, and SIGTERM off the main thread.
(Mutation testing found these unpinned.)"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ddpm_fast import Sampler, distributed
from ddpm_fast.cli_signals import catch_sigterm
from ddpm_fast.schedules import NoiseSchedule
from test_distributed import _assert_same_images
from train_helpers import TinyEps


def _sampler() -> Sampler:
    torch.manual_seed(0)
    return Sampler(TinyEps(), NoiseSchedule("linear", timesteps=10), device="cpu", cuda_graph=False)


def _as_rank(monkeypatch, rank: int, world: int, seed0: int | None = None) -> dict:
    """Make this process rank ``rank`` of ``world``: rank 0's seed (``seed0``)
    arrives by the broadcast, and gather_object records what this rank sends
    (rank 0 receives its own share and empty shares from the others)."""
    sent = {}

    def broadcast_object_list(objects, src=0):
        if seed0 is not None:
            objects[0] = seed0

    def gather_object(obj, gathered=None, dst=0):
        sent["mine"] = obj
        if gathered is not None:
            gathered[:] = [obj] + [None] * (world - 1)

    def all_gather_object(values, value):  # the ranks agree on what to sample
        values[:] = [value] * world

    monkeypatch.setattr(distributed, "rank_and_world", lambda: (rank, world))
    monkeypatch.setattr(distributed.dist, "broadcast_object_list", broadcast_object_list)
    monkeypatch.setattr(distributed.dist, "gather_object", gather_object)
    monkeypatch.setattr(distributed.dist, "all_gather_object", all_gather_object)
    return sent


@pytest.mark.parametrize("count, world", [(5, 2), (1, 2), (5, 4), (7, 3), (6, 3), (2, 5)])
def test_shards_are_contiguous_cover_every_item_once_and_fill_the_first_ranks(count, world):
    shares = [distributed.shard(count, rank, world) for rank in range(world)]
    assert shares[0][0] == 0 and shares[-1][1] == count
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    size = -(-count // world)
    assert [hi - lo for lo, hi in shares] == [max(0, min(size, count - rank * size)) for rank in range(world)]


def test_rank_seeds_differ_by_rank_and_fit_torchs_seed_range():
    # train's --seed goes to 2^63 - 1: every rank's seed must still seed torch
    for seed in (0, 3, 2**63 - 1):
        seeds = [distributed.rank_seed(seed, rank) for rank in range(4)]
        assert len(set(seeds)) == 4 and all(0 <= s < 2**63 for s in seeds)
        torch.manual_seed(seeds[-1])


def test_rank_1_samples_its_own_share_with_rank_0s_seed(monkeypatch):
    """Rank 1 of 2 draws samples 3 and 4 of 5 with the seed rank 0 broadcast
    (its own torch generator drew another), in batches of 2."""
    sampler = _sampler()
    alone = distributed.sample_sharded(sampler, 5, seed=123, batch_size=5, progress=False)
    sent = _as_rank(monkeypatch, 1, 2, seed0=123)
    torch.manual_seed(99)
    assert distributed.sample_sharded(sampler, 5, seed=None, batch_size=2, progress=False) is None
    _assert_same_images(sent["mine"], alone[3:])


def test_rank_0_gathers_past_ranks_with_no_share(monkeypatch):
    """One sample over two ranks: rank 1 sends None, rank 0 returns its one image."""
    sampler = _sampler()
    alone = distributed.sample_sharded(sampler, 1, seed=5, batch_size=1, progress=False)
    _as_rank(monkeypatch, 0, 2)
    got = distributed.sample_sharded(sampler, 1, seed=5, batch_size=4, progress=False)
    np.testing.assert_array_equal(got, alone)


def test_one_process_draws_exactly_n_samples_whatever_the_batch_size():
    sampler = _sampler()
    torch.manual_seed(7)  # seed=None: one seed for the whole run, so batches do not matter
    whole = distributed.sample_sharded(sampler, 5, seed=None, batch_size=5, progress=False)
    torch.manual_seed(7)
    batched = distributed.sample_sharded(sampler, 5, seed=None, batch_size=2, progress=False)
    assert whole.shape[0] == 5
    _assert_same_images(batched, whole)
    with pytest.raises(ValueError, match="the number of samples must be a positive int, got 0"):
        distributed.sample_sharded(sampler, 0, seed=0, batch_size=2, progress=False)


def test_run_on_rank0_alone_returns_and_raises_as_given():
    """Pickling matters for the broadcast only: one process gets its own objects back."""
    def unsendable():
        return None

    assert distributed.run_on_rank0(lambda: unsendable) is unsendable

    class Unpicklable(Exception):
        pass

    error = Unpicklable("no pickle")
    error.callback = lambda: None

    def check():
        raise error

    with pytest.raises(Unpicklable) as raised:
        distributed.run_on_rank0(check)
    assert raised.value is error


def _gathered(monkeypatch, world: int, values: list) -> None:
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (0, world))
    monkeypatch.setattr(distributed.dist, "all_gather_object", lambda out, value: out.__setitem__(slice(None), values))


def test_check_ranks_agree_compares_every_rank_with_rank_0(monkeypatch):
    _gathered(monkeypatch, 3, [1, 1, 2])
    with pytest.raises(distributed.RankMismatchError, match=r"the ranks differ in steps \(1 on rank 0, 2 on rank 2\): fix"):
        distributed.check_ranks_agree("steps", 1, "fix")
    first, second = dict(a=1, b=2, c=3, d=4, e=5, same=0), dict(a=0, b=0, c=0, d=0, e=0, same=0)
    _gathered(monkeypatch, 2, [first, second])
    with pytest.raises(distributed.RankMismatchError) as raised:
        distributed.check_ranks_agree("settings", first, "fix")
    assert "(a: 1 on rank 0, 0 on rank 1; b: 2 on rank 0, 0 on rank 1; c: 3 on rank 0, 0 on rank 1; " \
           "d: 4 on rank 0, 0 on rank 1): fix" in str(raised.value)
    _gathered(monkeypatch, 3, [first, first, first])
    distributed.check_ranks_agree("settings", first, "fix")


@pytest.mark.parametrize("failed, expected", [(False, ["barrier", "destroy"]), (True, ["destroy"])])
@pytest.mark.parametrize("old_torch, backend", [(False, "gloo"), (True, "nccl"), (True, "gloo")])
def test_teardown_meets_at_a_barrier_only_after_a_normal_run(monkeypatch, failed, expected, old_torch, backend):
    """Before torch 2.8 a gloo group's destructor could deadlock with a worker
    still letting go of the last collective: a sleep first gives it the GIL."""
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda: backend)
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    monkeypatch.setattr(distributed, "_GLOO_DESTRUCTOR_HOLDS_GIL", old_torch)
    monkeypatch.setattr(distributed.time, "sleep", lambda seconds: calls.append("sleep"))
    distributed.teardown(failed=failed)
    assert calls == (expected[:-1] + ["sleep", "destroy"] if old_torch and backend == "gloo" else expected)


def test_sigterm_is_left_alone_off_the_main_thread():
    """cli.main called from a worker thread: no handler can be set there."""
    got = []
    thread = threading.Thread(target=lambda: got.append(catch_sigterm()))
    thread.start()
    thread.join()
    assert got == [None]
