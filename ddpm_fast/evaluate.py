"""Evaluating a trained model on a dataset: the variational bound in bits/dim
(Ho et al. 2020, table 2), total and per term, over batches."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch
import torch.distributed as dist

from ._checks import as_device, check_bool, is_int
from ._progress import batch_of
from ._warn import warn
from . import ops
from .data import ImageDataset
from .diffusion import bits_per_dim
from .distributed import check_ranks_agree, digest, model_digest, rank_and_world, shard
from .nn import has_channels_last_weights
from .ops._args import as_seed, check_schedule
from .sampler import _SAMPLE_STRIDE, _check_materialized, _dropout_active, _first_float_parameter
from .schedules import NoiseSchedule

__all__ = ["evaluate_bpd"]

def _image_noise(shape: torch.Size, seed: int, first: int, per_image: int, device: torch.device, t: int) -> torch.Tensor:
    """The noise of timestep t for images first, first + 1, ...: each image's own
    stream, 2^32 counters apart as the Sampler's samples."""
    return ops.randn(shape, seed, first * _SAMPLE_STRIDE + t * per_image, sample_stride=_SAMPLE_STRIDE, device=device)


def _fed_in(dtype: torch.dtype, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
            t: torch.Tensor) -> torch.Tensor:
    return model(x.to(dtype), t)


@torch.no_grad()
def evaluate_bpd(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    dataset: ImageDataset,
    schedule: NoiseSchedule,
    *,
    n: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str | None = None,
    channels_last: bool | None = None,
    progress: bool = False,
    sharded: bool = False,
) -> dict[str, Any]:
    """The bound of the first ``n`` images of ``dataset`` (all by default), every
    timestep evaluated as in the original ``calc_bpd_loop``. Image i's noise at
    timestep t is its own stream of the project's generator (``ops.randn``:
    seed, counters from i * 2^32 + t * its size), drawn on ``device``: the result
    depends on ``seed`` only, not on ``batch_size``.
    ``sharded``: in a joined process group (under torchrun), each rank evaluates
    a contiguous share of the images and every rank returns the whole result,
    the same as one process's up to float rounding; a collective, so every
    rank must call it.
    ``channels_last`` feeds the model channels_last batches; by default it
    follows the model's 4-d weights, as the Sampler's does. ``device``: where
    the images go and the noise is drawn; by default the model's (the CPU for
    a model without parameters).

    Returns a dict of dataset means: ``total``, ``prior`` (L_T), ``decoder``
    (L_0), ``vb`` (sum of L_1..L_{T-1}), ``terms`` (one per timestep) and a
    printable ``summary``.
    """
    check_schedule(schedule, "evaluate_bpd")
    check_bool(progress, "progress")
    check_bool(sharded, "sharded")
    if not isinstance(dataset, ImageDataset):  # a tensor has a len, and failed later on a missing method
        raise TypeError(f"evaluate_bpd: dataset must be a ddpm_fast.data.ImageDataset (ImageDataset(images) wraps "
                        f"uint8 N x C x H x W images), got {type(dataset).__name__}")
    count = len(dataset) if n is None else n
    if not is_int(count) or not 1 <= count <= len(dataset):
        raise ValueError(f"n must be an int in [1, {len(dataset)}] (the dataset's size), got {n!r}")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    count, batch_size = int(count), int(batch_size)
    dataset.check_model(model)
    if _dropout_active(model):
        warn(
            "evaluate_bpd: the model has active dropout (a dropout module in training mode), so the bound depends on more than "
            "the seed (and on the batch size); call model.eval() before evaluating",
            RuntimeWarning,
        )
    _check_materialized(model, "evaluate_bpd")
    if channels_last is None:
        channels_last = has_channels_last_weights(model)
    param = _first_float_parameter(model)
    if device is not None:
        device = as_device(device, "evaluate_bpd: device")
    else:
        device = param.device if param is not None else torch.device("cpu")
    # The model gets input in its parameters' dtype, as the Sampler feeds it (float32
    # input failed in torch's words for a bfloat16 model); a float64 model's bound is
    # computed in float64.
    model_dtype = param.dtype if param is not None else torch.float32
    fed = functools.partial(_fed_in, model_dtype, model) if model_dtype in (torch.float16, torch.bfloat16) else model
    data_dtype = torch.float64 if model_dtype == torch.float64 else torch.float32
    fmt = torch.channels_last if channels_last else torch.contiguous_format  # images are N x C x H x W
    per_image = math.prod(dataset.images.shape[1:])
    if schedule.num_timesteps * per_image > _SAMPLE_STRIDE:
        raise ValueError(f"{schedule.num_timesteps} timesteps of {per_image} values per image exceed an image's "
                         "2^32 noise counters")
    seed = as_seed(seed, "evaluate_bpd")
    rank, world = rank_and_world() if sharded else (0, 1)
    if world > 1:  # else each rank's share is of another bound, silently averaged with the others'
        check_ranks_agree("what to evaluate", {
            "n": count, "seed": seed, "images": dataset.fingerprint(), "schedule": digest([schedule.betas]),
            "model": model_digest(model),
        }, "start every rank with the same checkpoint, data and options")
    lo, hi = shard(count, rank, world)
    # Sums of the total, the prior and each timestep's term over this rank's images.
    sums = torch.zeros(2 + schedule.num_timesteps, dtype=torch.float64, device="cpu")
    starts = range(lo, hi, batch_size)
    for number, start in enumerate(starts):
        index = torch.arange(start, min(hi, start + batch_size), device="cpu")
        x0 = dataset.batch(index).to(device, data_dtype).contiguous(memory_format=fmt)
        noise_fn = functools.partial(_image_noise, x0.shape, seed, start, per_image, x0.device)
        with batch_of(number, len(starts)):
            result = bits_per_dim(fed, x0, schedule, noise_fn=noise_fn, progress=progress and rank == 0)
        sums[0] += result.total.double().sum().item()
        sums[1] += result.prior.double().sum().item()
        sums[2:] += result.terms.double().sum(0).cpu()
    if world > 1:  # NCCL reduces CUDA tensors only: this rank's, where the images went
        on = torch.device("cpu")
        if dist.get_backend() == "nccl":
            on = torch.device(device)
            on = on if on.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
        reduced = sums.to(on)
        dist.all_reduce(reduced)
        sums = reduced.cpu()
    sums /= count
    terms = sums[2:]
    out: dict[str, Any] = {"total": sums[0].item(), "prior": sums[1].item()}
    out["decoder"] = terms[0].item()
    out["vb"] = terms[1:].sum().item()
    out["terms"] = terms.tolist()
    out["images"] = count
    out["summary"] = (
        f"{count} images: {out['total']:.4f} bits/dim "
        f"(prior {out['prior']:.4f} + L_1..L_T-1 {out['vb']:.4f} + decoder {out['decoder']:.4f})"
    )
    return out
