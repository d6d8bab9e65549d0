"""Multi-process runs under ``torchrun``: process-group set-up and sampling
sharded across ranks.

``torchrun --nproc-per-node=K -m ddpm_fast.cli train ...`` sets RANK,
WORLD_SIZE and LOCAL_RANK; ``setup()`` then joins the group (NCCL on GPUs,
gloo on CPUs) and picks this rank's device. Without those variables it is a
no-op and the run is a single process.
"""

from __future__ import annotations

import atexit
import functools
import gc
import hashlib
import math
import os
import pickle
import sys
import time
import weakref
from typing import Any, Callable, Iterable, NoReturn, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from ._checks import check_bool, is_int
from ._extension import running_torch
from ._memory import check_fits_in_memory
from ._progress import batch_of
from .images import to_uint8
from .ops._args import as_seed
from .sampler import Sampler

T = TypeVar("T")

__all__ = ["setup", "teardown", "rank_and_world", "sample_sharded", "exit_process", "RankMismatchError",
           "check_ranks_agree", "run_on_rank0", "digest", "model_digest"]


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(count: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share [lo, hi) of ``count`` items (the last
    ranks' shares may be short or empty)."""
    share = math.ceil(count / world)
    return min(count, rank * share), min(count, (rank + 1) * share)


class RankMismatchError(ValueError):
    """The ranks of one run hold different settings or states (they would
    deadlock, or train on a mix): raised on every rank alike."""


def digest(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 of tensors' shapes, dtypes and values (read on the host, in
    logical order: a channels_last copy hashes as the contiguous one), which
    ranks compare: bit for bit, where a sum would depend on each device's
    reduction order."""
    sha = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        sha.update(f"{tuple(t.shape)} {t.dtype};".encode())
        sha.update(t.reshape(-1).view(torch.uint8).numpy())
    return sha.hexdigest()


def model_digest(model: object) -> str | None:
    """``digest`` of a module's parameters and buffers (None for a plain
    function): a rank that loaded other weights (another file at the same
    path on its machine) is told apart from the others."""
    if not isinstance(model, torch.nn.Module):
        return None
    return digest([*model.parameters(), *model.buffers()])


def rank_seed(seed: int, rank: int) -> int:
    """A seed of rank ``rank``'s own from one shared ``seed``: each rank's
    generator then draws its own dropout masks."""
    return (seed * 1_000_003 + rank + 1) % 2**63


def check_ranks_agree(what: str, value: Any, advice: str) -> None:
    """Raise ``RankMismatchError`` on every rank unless all ranks hold an equal
    ``value`` (for dicts the message names the keys that differ). A collective:
    every rank must call it; a no-op in a single process."""
    world = rank_and_world()[1]
    if world == 1:
        return
    values: list[Any] = [None] * world
    dist.all_gather_object(values, value)
    other = next((r for r in range(1, world) if values[r] != values[0]), None)
    if other is None:
        return
    first, second = values[0], values[other]
    if isinstance(first, dict) and isinstance(second, dict):
        keys = sorted(k for k in first.keys() | second.keys() if first.get(k) != second.get(k))
        shown = "; ".join(f"{k}: {first.get(k)!r} on rank 0, {second.get(k)!r} on rank {other}" for k in keys[:4])
    else:
        shown = f"{first!r} on rank 0, {second!r} on rank {other}"
    raise RankMismatchError(f"the ranks differ in {what} ({shown}): {advice}")


def run_on_rank0(check: Callable[[], T]) -> T:
    """Run ``check`` on rank 0 alone and return its result on every rank, or
    raise what it raised on every rank (the others would otherwise wait at the
    run's first collective until a timeout, and then print their own
    traceback). A collective: every rank calls it."""
    rank, world = rank_and_world()
    error = result = None
    if rank == 0:
        try:
            result = check()
        except Exception as caught:  # noqa: BLE001 (raised again below, on every rank)
            error = caught
        if error is None and world > 1:
            try:  # the broadcast pickles it too
                pickle.dumps(result)
            except Exception as caught:  # noqa: BLE001
                error, result = RuntimeError(f"rank 0's result cannot be sent to the other ranks: {caught}"), None
        if error is not None and world > 1:
            try:  # the broadcast pickles it: one that cannot be (un)pickled would leave the others waiting
                pickle.loads(pickle.dumps(error))
            except Exception:  # noqa: BLE001
                error = RuntimeError(f"{type(error).__name__}: {error}")
    if world > 1:
        shared = [error, result]
        dist.broadcast_object_list(shared, src=0)
        error, result = shared
    if error is not None:
        raise error
    return result


_joined = False  # whether setup() joined a process group in this process


def launched_world_size() -> int:
    """The number of ranks torchrun launched (its WORLD_SIZE; 1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: str | None = None) -> torch.device:
    """Join the process group if launched by torchrun; return this rank's device."""
    global _joined
    world = launched_world_size()
    want_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if world > 1 and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if want_cuda:
            if local >= (count := torch.cuda.device_count()):  # else a raw error from torch.cuda.set_device
                raise ValueError(f"this rank is local rank {local}, but {count} GPU(s) are visible: start at most "
                                 f"{count} processes per machine (torchrun --nproc-per-node)")
            torch.cuda.set_device(local)
            # The group bound to this rank's GPU: NCCL's barriers then know it
            # (unbound, torch warns at the first one that it guesses the device).
            dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        else:
            dist.init_process_group("gloo")
        _joined = True
    if want_cuda:
        if world == 1 and device is not None and torch.device(device).index is not None:
            return torch.device(device)  # a single process on the GPU it was given (cuda:K)
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device or "cpu")


# Before torch 2.8 (pytorch#154976) the gloo group's destructor joined its worker
# threads holding the GIL, while a worker could still be dropping the last
# collective's work, whose tensors' Python objects need the GIL to go: both
# waited forever (2 of about 15 two-rank test runs on torch 2.7 hung there).
# The workers need the GIL for microseconds; torch offers no way to wait until
# they are idle, so a short sleep first narrows the race rather than closing it.
_GLOO_DESTRUCTOR_HOLDS_GIL = running_torch() < (2, 8)


def teardown(*, failed: bool = False) -> None:
    """Leave the process group. After a normal run the ranks first meet at a
    barrier, so that none closes its connections while a peer is still
    finishing the last collective (gloo can abort the peer then). After a
    failure there is no barrier: a crashed peer would never arrive."""
    if dist.is_available() and dist.is_initialized():
        if not failed:
            dist.barrier()
        if _GLOO_DESTRUCTOR_HOLDS_GIL and dist.get_backend() == "gloo":
            time.sleep(0.1)
        dist.destroy_process_group()


# Objects (trainers) whose ``net`` is a DistributedDataParallel wrapper of their ``model``.
_DDP_OWNERS: weakref.WeakSet[Any] = weakref.WeakSet()


def release_ddp_at_exit(owner: Any) -> None:
    """Have ``owner.net`` (a DDP wrapper of ``owner.model``) destroyed at exit
    while the interpreter is still whole. A trainer often outlives its run in a
    reference cycle (an exception traceback that holds its ``__init__`` frame
    is one), so its wrapper would otherwise go only while the interpreter
    finalizes, and gloo then aborts the process ("terminate called without an
    active exception", SIGABRT) in about one run in 40, after the run has
    succeeded."""
    _register_exit_hook()
    _DDP_OWNERS.add(owner)


@functools.cache
def _register_exit_hook() -> None:
    atexit.register(_release_ddp)


def _release_ddp() -> None:
    for owner in list(_DDP_OWNERS):
        owner.net = owner.model
    gc.collect()  # wrappers held only by cycles of garbage


def exit_process(code: int) -> NoReturn:
    """End the process with ``code``. After a process group was joined (and,
    by then, left), the atexit handlers run and the output is flushed, but the
    interpreter is not finalized: gloo now and then aborts a rank there
    (SIGABRT, "terminate called without an active exception") after the run
    has succeeded, even with the wrappers released (see release_ddp_at_exit;
    cause not established), which would turn a finished run's exit status
    into a crash's. The ``ddpm-fast`` command ends this way; a script that
    calls ``cli.main`` itself is not ended by it."""
    if _joined:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def sample_sharded(
    sampler: Sampler,
    n: int,
    *,
    seed: int | None,
    batch_size: int,
    steps: int | None = None,
    eta: float | None = None,
    progress: bool = True,
) -> np.ndarray | None:
    """Draw samples 0..n-1 of ``seed``, each rank a contiguous share in batches of
    ``batch_size``; rank 0 returns all of them as uint8 N x H x W x C, the
    others None. Sample i is the same whatever the number of ranks or the batch
    size (the Sampler's per-sample noise streams). ``seed=None`` draws one seed
    from torch's generator (rank 0's, shared with the others) for the whole run."""
    if not is_int(n) or n < 1:
        raise ValueError(f"the number of samples must be a positive int, got {n!r}")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    check_bool(progress, "progress")  # here, not on rank 0 alone after the other ranks' work
    n, batch_size = int(n), int(batch_size)
    shape = sampler.sample_shape
    if shape is None or len(shape) != 3 or shape[0] not in (1, 3):  # before the chain, not after it
        raise ValueError(f"sample_sharded returns images, so the Sampler's sample_shape must be (C, H, W) with C 1 or 3, "
                         f"got {shape}")
    rank, world = rank_and_world()
    # One process fills one array; under DDP rank 0 ends holding every sample
    # twice (the shares gathered, and their join): a count that cannot fit is
    # refused now, not after hours of sampling.
    check_fits_in_memory((1 if world == 1 else 2) * n * math.prod(shape),
                         f"holding {n} samples of {'x'.join(map(str, shape))}")
    if world > 1:  # else each rank's share comes from other settings, silently (a mix of two runs' samples)
        check_ranks_agree("what to sample", {
            "n": n, "seed": seed, "steps": steps, "eta": eta, "shape": list(shape), "variance": sampler.variance,
            "clip_denoised": sampler.clip_denoised, "schedule": digest([sampler.schedule.betas]),
            "model": model_digest(sampler.model),
        }, "start every rank with the same checkpoint and options")
    sampler._plan(n, steps, eta, 0, None)  # steps, eta, ...: refused before a seed is drawn, on every rank alike
    seed = as_seed(seed, "sample_sharded")  # one seed for every batch (None: each batch would draw its own)
    if world > 1:
        shared = [seed]
        dist.broadcast_object_list(shared, src=0)
        seed = shared[0]
    lo, hi = shard(n, rank, world)
    channels, height, width = shape
    mine = np.empty((hi - lo, height, width, channels), dtype=np.uint8) if hi > lo else None  # filled batch by batch
    starts = range(lo, hi, batch_size)
    for index, start in enumerate(starts):
        count = min(batch_size, hi - start)
        with batch_of(index, len(starts)):
            x = sampler.sample(count, seed=seed, steps=steps, eta=eta, first_sample=start,
                               progress=progress and rank == 0)
        mine[start - lo : start - lo + count] = to_uint8(x)
    if world == 1:
        return mine
    # To rank 0 only: an all-gather would hold every rank's images on every rank.
    gathered: list | None = [None] * world if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    return np.concatenate([p for p in gathered if p is not None]) if rank == 0 else None
