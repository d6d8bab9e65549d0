"""Bad input, table-driven: every public op, the GroupNormSiLU module,
NoiseSchedule, the Sampler, the diffusion math, the Trainer and the command
line (exit status 2, one line) reject it with a clear
exception (its type, and a message naming the argument) or, where the input is
merely unusual (strided views, empty batches, negative seeds), handle it
correctly. Each case says which: ``error`` and ``match``, or ``error=None`` and
a body that checks the result itself. Cases of calls that take ``backend`` run
on the reference and on every kernel backend of this machine.

Mixed devices use the ``meta`` device as the second device: every such check
compares devices before anything runs, so it is the same check that catches a
CUDA tensor next to a CPU one.
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from typing import Callable
from unittest import mock

import numpy as np
import pytest
import torch

from conftest import TOLERANCES, device_backends
from ddpm_fast import NoiseSchedule, Sampler, diffusion, ops
from ddpm_fast.data import ImageDataset
from ddpm_fast.evaluate import evaluate_bpd
from ddpm_fast.nn import GroupNormSiLU, fuse_group_norm_silu
from train_helpers import TinyEps, toy_dataset

T = 10
S = NoiseSchedule("linear", timesteps=T)
NAN, INF = float("nan"), float("inf")
KERNEL_BACKENDS = [b for d, b in device_backends() if d == "cpu"]
BACKENDS = ["reference"] + KERNEL_BACKENDS


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[str], object]  # the backend -> the call under test
    error: type[Exception] | None  # None: must not raise (the body checks the result)
    match: str = ""  # regex the message must match; it names the argument
    backends: tuple[str, ...] | None = None  # None: every backend (if per_backend)
    per_backend: bool = True  # False: the call takes no backend, run once


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def x4(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape or (2, 4, 3, 3), generator=gen(seed)).to(dtype)


def close(got, want, dtype=torch.float32) -> None:
    if isinstance(want, tuple):
        for g, w in zip(got, want):
            close(g, w, dtype)
        return
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])


def contiguous(v):
    return v.contiguous() if isinstance(v, torch.Tensor) else v


def same_as_contiguous(op, *args, check_layout=None, **kwargs) -> Callable[[str], object]:
    """A case body: ``op`` on the views as given, on the backend, equals ``op`` on
    contiguous copies on the reference backend (the views are handled, not rejected)."""

    def call(backend: str):
        got = op(*args, backend=backend, **kwargs)
        want = op(*map(contiguous, args), backend="reference", **{k: contiguous(v) for k, v in kwargs.items()})
        close(got, want)
        if check_layout is not None:
            check_layout(got)
        return got

    return call


def empty_result(op, *args, shape, **kwargs) -> Callable[[str], object]:
    def call(backend: str):
        got = op(*args, backend=backend, **kwargs)
        for g in got if isinstance(got, tuple) else (got,):
            assert isinstance(g, torch.Tensor) and tuple(g.shape) == shape
        return got

    return call


def step(x=None, eps=None, t=3, **kwargs):
    x = x4(seed=1) if x is None else x
    eps = x4(seed=2) if eps is None else eps
    kwargs.setdefault("seed", 5)
    return lambda backend: ops.ddpm_step(x, eps, t, S, backend=backend, **kwargs)


def qs(x=None, t=3, **kwargs):
    x = x4(seed=1) if x is None else x
    if "noise" not in kwargs:
        kwargs.setdefault("seed", 5)
    return lambda backend: ops.q_sample(x, t, S, backend=backend, **kwargs)


def gn(x=None, groups=2, weight=None, bias=None, **kwargs):
    x = x4(seed=1) if x is None else x
    return lambda backend: ops.group_norm_silu(x, groups, weight, bias, backend=backend, **kwargs)


def module(*args, x=None, add=None, **kwargs):
    x = x4(seed=1) if x is None else x
    return lambda backend: GroupNormSiLU(*args, backend=backend, **kwargs)(x, add)


def never_called(x, t):
    raise AssertionError("the model ran although the arguments were bad")


def sample(n=2, model=lambda x, t: 0.1 * x, sampler_kwargs=None, **kwargs):
    kwargs.setdefault("seed", 0)
    kwargs.setdefault("steps", 2)
    sampler_kwargs = dict(sample_shape=(1, 2, 2), device="cpu", cuda_graph=False) | (sampler_kwargs or {})
    return lambda backend: Sampler(model, S, backend=backend, **sampler_kwargs).sample(n, progress=False, **kwargs)


def once(fn: Callable[[], object]) -> Callable[[str], object]:
    return lambda backend: fn()


def trainer(model: Callable[[], object] | None = None, dataset: Callable[[], object] | None = None,
            schedule: object = S, device: object = "cpu", train: dict | None = None) -> Callable[[str], object]:
    """Makes a Trainer (into a temporary folder) of the toy model and 16 toy
    images, batch 8, with the model or dataset made by the given callable instead;
    given ``train``, calls its ``train(**train)`` for one step."""
    from ddpm_fast.train import TrainConfig, Trainer

    def call(backend):
        with tempfile.TemporaryDirectory() as tmp:
            run = Trainer((model or TinyEps)(), (dataset or toy(16))(), schedule, TrainConfig(batch_size=8, steps=1),
                          tmp, device=device, progress=False)
            if train is not None:
                run.train(**train)

    return call


class AugmentedImages(ImageDataset):
    """A dataset whose batch() augments (flips rows): the Trainer reads images itself."""

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        return super().batch(indices).flip(-2)


class TupleEps(TinyEps):
    """A model whose forward returns (eps,), as some wrappers' do."""

    def forward(self, x, t):
        return (super().forward(x, t),)


class NeverTrained(TinyEps):
    def forward(self, x, t):
        raise AssertionError("the model ran although the arguments were bad")


def tiny_eps(**kwargs) -> Callable[[], object]:
    return lambda: TinyEps(**kwargs)


def toy(n: int) -> Callable[[], object]:
    return lambda: toy_dataset(n)


class CommandFailed(Exception):
    """ddpm-fast ended with exit status 2, a usage error: its last line."""


def cli(*argv: str) -> Callable[[str], object]:
    """Runs ddpm-fast with ``argv`` ({tmp}: a temporary folder that holds a
    tiny model folder ``good``, the same with damaged weights ``bad``, and
    8 px and 16 px one-channel data files ``d8.npz``, ``d16.npz``)."""
    import numpy as np

    from ddpm_fast.cli import main
    from ddpm_fast.models import UNet

    def call(backend):
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the folders record no schedule: assumed, with a warning
            UNet.tiny(image_size=8, in_channels=1).save_pretrained(f"{tmp}/good")
            shutil.copytree(f"{tmp}/good", f"{tmp}/bad")
            (pathlib.Path(tmp) / "bad" / "model.safetensors").write_bytes(b"damaged")
            for size in (8, 16):
                np.savez(f"{tmp}/d{size}.npz", images=np.zeros((4, size, size, 1), np.uint8))
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main([arg.format(tmp=tmp) for arg in argv])
        if code != 2:
            raise AssertionError(f"ddpm-fast {argv[0]} exited {code}, not 2: {err.getvalue()[-500:]}")
        raise CommandFailed(err.getvalue().strip().splitlines()[-1])

    return call


# ---------------------------------------------------------------------- checks


def randn_negative_seed_is_its_64_bit_twin(backend):
    # Seeds span [-2^63, 2^64) as torch.manual_seed's do; -1 and 2^64 - 1 are the same key.
    close(ops.randn((2, 5), -1, backend=backend), ops.randn((2, 5), 2**64 - 1, backend=backend))


def randn_most_negative_seed(backend):
    # -2^63, the low end of the seed range, is the same key as 2^63
    close(ops.randn((2, 5), -(2**63), backend=backend), ops.randn((2, 5), 2**63, backend=backend))


def step_in_place(backend):
    x, eps = x4(seed=1), x4(seed=2)
    want = ops.ddpm_step(x, eps, 4, S, seed=9, backend="reference")
    buf = x.clone()
    got = ops.ddpm_step(buf, eps, 4, S, seed=9, out=buf, backend=backend)
    assert got is buf
    close(got, want)


def step_disjoint_slices_of_one_buffer(backend):
    buf = torch.cat([x4(seed=1), torch.empty(2, 4, 3, 3)])
    x, out = buf[:2], buf[2:]
    want = ops.ddpm_step(x.clone(), x4(seed=2), 4, S, seed=9, backend="reference")
    ops.ddpm_step(x, x4(seed=2), 4, S, seed=9, out=out, backend=backend)
    close(out, want)


def step_partial_overlap(name: str):
    def call(backend):
        buf = torch.randn(2 * 36 + 5, generator=gen(3))
        x = buf[:72].view(2, 4, 3, 3)
        shifted = buf[5:77].view(2, 4, 3, 3)  # shares 67 of x's 72 elements
        kwargs = {name: shifted}
        return ops.ddpm_step(x, x4(seed=2), 4, S, seed=9, backend=backend, **kwargs)

    return call


def step_model_input_over_x_in_the_other_memory_format(backend):
    x = x4(seed=1)
    as_channels_last = x.as_strided(x.shape, (36, 1, 12, 4))  # x's own memory, read channels_last
    return ops.ddpm_step(x, x4(seed=2), 4, S, seed=9, out_model_input=as_channels_last, backend=backend)


def step_model_input_over_x_in_another_dtype(backend):
    buf = torch.randn(72, generator=gen(1))
    as_half = buf.view(torch.float16)[:72].view(2, 4, 3, 3)  # the first half of x's bytes, as float16
    return ops.ddpm_step(buf.view(2, 4, 3, 3), x4(seed=2), 4, S, seed=9, out_model_input=as_half, backend=backend)


def step_model_input_over_out(backend):
    buf = torch.empty(77)
    out, shifted = buf[:72].view(2, 4, 3, 3), buf[5:77].view(2, 4, 3, 3)
    return ops.ddpm_step(x4(seed=1), x4(seed=2), 4, S, seed=9, out=out, out_model_input=shifted, backend=backend)


def step_given_noise_sample_stride_zero(backend):
    # Given noise reads no counters: a sample_stride that would overlap drawn streams is harmless.
    x, eps, z = x4(seed=1), x4(seed=2), x4(seed=3)
    got = ops.ddpm_step(x, eps, 4, S, noise=z, sample_stride=0, backend=backend)
    close(got, ops.ddpm_step(x, eps, 4, S, noise=z, backend="reference"))


def gn_float64_weight_with_float32_x(backend):
    x, w, b = x4(seed=1), torch.randn(4, generator=gen(2)), torch.randn(4, generator=gen(3))
    got = ops.group_norm_silu(x, 2, w.double(), b.half(), backend=backend)
    close(got, ops.group_norm_silu(x, 2, w, b.half().float(), backend="reference"))


def gn_float64(backend):
    x = x4(seed=1, dtype=torch.float64)
    got = ops.group_norm_silu(x, 2, backend=backend)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ops.group_norm_silu(x, 2, backend="reference"))


def is_channels_last(y):
    y = y[0] if isinstance(y, tuple) else y
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()


def sampler_negative_seed(backend):
    close(sample(seed=-1)(backend), sample(seed=2**64 - 1)(backend))


def sampler_model_nan(backend):
    # No per-step check of eps's values (it would sync): NaN flows to the samples,
    # and the clipped x0-step keeps it NaN (torch.clamp does), never +-1.
    out = sample(model=lambda x, t: torch.full_like(x, NAN))(backend)
    assert torch.isnan(out).all()


def resolve_backend_with_device_string(backend):
    assert ops.resolve_backend(backend, "cpu", "test") == backend


def backend_env_var_typo():
    with mock.patch.dict(os.environ, {"DDPM_FAST_BACKEND": "gpu"}):
        ops.q_sample(x4(), 1, S, seed=0)


def backend_env_var_auto():
    # DDPM_FAST_BACKEND=auto chooses as if it were unset
    cpu = torch.device("cpu")
    with mock.patch.dict(os.environ):
        os.environ.pop("DDPM_FAST_BACKEND", None)
        want = ops.resolve_backend("auto", cpu, "q_sample")
    with mock.patch.dict(os.environ, {"DDPM_FAST_BACKEND": "auto"}):
        assert ops.resolve_backend("auto", cpu, "q_sample") == want
        ops.q_sample(x4(), 1, S, seed=0)


# ----------------------------------------------------------------------- cases

x = x4()
meta = dict(device="meta")

CASES = [
    # ops.randn
    Case("randn-shape-float", lambda b: ops.randn((2, 2.5), 0, backend=b), TypeError, "shape must be an int or a sequence of ints"),
    Case("randn-shape-negative", lambda b: ops.randn((2, -1), 0, backend=b), ValueError, "shape must not have negative sizes"),
    Case("randn-dtype-int", lambda b: ops.randn((2, 3), 0, dtype=torch.int32, backend=b), TypeError, "dtype must be float32"),
    Case("randn-dtype-float64", lambda b: ops.randn((2, 3), 0, dtype=torch.float64, backend=b), TypeError, "dtype must be float32"),
    Case("randn-seed-float", lambda b: ops.randn((2, 3), 1.5, backend=b), TypeError, "seed must be an int, got float"),
    Case("randn-seed-bool", lambda b: ops.randn((2, 3), True, backend=b), TypeError, "seed must be an int, got bool"),
    Case("randn-seed-too-large", lambda b: ops.randn((2, 3), 2**64, backend=b), ValueError, "seed must fit in 64 bits"),
    Case("randn-seed-too-negative", lambda b: ops.randn((2, 3), -(2**63) - 1, backend=b), ValueError, "seed must fit in 64 bits"),
    Case("randn-seed-negative", randn_negative_seed_is_its_64_bit_twin, None),
    Case("randn-seed-most-negative", randn_most_negative_seed, None),
    Case("randn-offset-negative", lambda b: ops.randn((2, 3), 0, -1, backend=b), ValueError, r"offset must lie in \[0, 2\^63"),
    Case("randn-offset-float", lambda b: ops.randn((2, 3), 0, 1.0, backend=b), TypeError, "offset must be an int"),
    Case("randn-offset-overflow", lambda b: ops.randn((2, 3), 0, 2**63 - 3, backend=b), ValueError, "offset must lie in"),
    Case("randn-sample-stride-overlap", lambda b: ops.randn((3, 4), 0, sample_stride=2, backend=b), ValueError, "sample_stride 2 is below"),
    Case("randn-sample-stride-zero-1d", lambda b: ops.randn((5,), 0, sample_stride=0, backend=b), ValueError, "sample_stride 0 is below"),
    Case("randn-sample-stride-negative", lambda b: ops.randn((3, 4), 0, sample_stride=-4, backend=b), ValueError, "sample_stride must lie in"),
    Case("randn-empty", empty_result(ops.randn, (0, 3), 0, shape=(0, 3)), None),
    Case("randn-device-typo", lambda b: ops.randn((2, 3), 0, device="cdua", backend=b), ValueError, "randn: device 'cdua' is not a device"),
    Case("randn-backend-unknown", lambda b: ops.randn((2, 3), 0, backend="gpu"), ValueError, "backend must be one of", per_backend=False),
    Case("randn-backend-cuda-unavailable", lambda b: ops.randn((2, 3), 0, backend="cuda"), RuntimeError, "backend 'cuda' is unavailable", per_backend=False),
    # ops.q_sample: dtypes and types
    Case("q_sample-x0-int", qs(x=torch.ones(2, 3, dtype=torch.int64)), TypeError, "x0 must be float32, float16 or bfloat16, got torch.int64"),
    Case("q_sample-x0-float64", qs(x=x.double()), TypeError, "x0 must be float32, float16 or bfloat16, got torch.float64"),
    Case("q_sample-x0-list", qs(x=[1.0, 2.0]), TypeError, "x0 must be a torch.Tensor"),
    Case("q_sample-x0-0d", qs(x=torch.tensor(1.0)), ValueError, "x0 must have a batch dimension"),
    Case("q_sample-schedule-str", lambda b: ops.q_sample(x, 1, "linear", seed=0, backend=b), TypeError, "schedule must be a NoiseSchedule"),
    Case("q_sample-t-bool", qs(t=True), TypeError, "t must be an int or an integer tensor, got a bool"),
    Case("q_sample-t-bool-tensor", qs(t=torch.tensor([True, False])), TypeError, "t must be .*bool"),
    Case("q_sample-t-float-tensor", qs(t=torch.tensor([1.0, 2.0])), TypeError, r"t must hold integers \(int8/16/32/64 or uint8/16/32/64\), got torch.float32"),
    Case("q_sample-t-complex-tensor", qs(t=torch.tensor([1, 2], dtype=torch.complex64)), TypeError, "t must hold integers .*got torch.complex64"),
    Case("q_sample-t-uint16-T", qs(t=torch.tensor([0, T]).to(torch.uint16)), ValueError, r"timesteps must lie in \[0, 10\), got min 0, max 10"),
    Case("q_sample-t-python-float", qs(t=2.0), TypeError, "t must be an int or an integer tensor, got float"),
    # timesteps out of range, wrong shape, other device
    Case("q_sample-t-minus-one", qs(t=-1), ValueError, r"timestep -1 is out of range \[0, 10\)"),
    Case("q_sample-t-equals-T", qs(t=T), ValueError, r"timestep 10 is out of range \[0, 10\)"),
    Case("q_sample-t-tensor-T", qs(t=torch.tensor([0, T])), ValueError, r"timesteps must lie in \[0, 10\), got min 0, max 10"),
    Case("q_sample-t-tensor-negative", qs(t=torch.tensor([-1, 3])), ValueError, r"timesteps must lie in \[0, 10\), got min -1"),
    # one-element tensors are read as one int (as_timesteps' short path)
    Case("q_sample-t-1-element-T", qs(t=torch.tensor([T])), ValueError, r"timesteps must lie in \[0, 10\), got min 10, max 10"),
    Case("q_sample-t-0d-negative", qs(t=torch.tensor(-3, dtype=torch.int16)), ValueError, r"timesteps must lie in \[0, 10\), got min -3, max -3"),
    Case("q_sample-t-0d-uint64-huge", qs(t=torch.tensor(-1).to(torch.uint64)), ValueError, r"timesteps must lie in \[0, 10\), got min -1"),
    Case("q_sample-t-wrong-length", qs(t=torch.tensor([1, 2, 3])), ValueError, r"t must be a scalar or have one entry per sample \(2\), got shape \(3,\)"),
    Case("q_sample-t-2d", qs(t=torch.tensor([[1, 2]])), ValueError, "t must be a scalar or have one entry per sample"),
    Case("q_sample-t-meta", qs(t=torch.tensor([1, 2], **meta)), ValueError, "t is on meta but x is on cpu"),
    # noise, seed, offset
    Case("q_sample-noise-shape", qs(noise=x4(2, 4, 3)), ValueError, r"noise has shape \(2, 4, 3\) but x0 has \(2, 4, 3, 3\)"),
    Case("q_sample-noise-meta", qs(noise=torch.empty(2, 4, 3, 3, **meta)), ValueError, "noise is on meta but x0 is on cpu"),
    Case("q_sample-noise-int", qs(noise=torch.ones(2, 4, 3, 3, dtype=torch.int32)), TypeError, "noise must be float32"),
    Case("q_sample-noise-and-seed", qs(noise=x4(seed=2), seed=3), ValueError, "give noise or a seed to draw it, not both"),
    # counters were ignored (a negative offset too) when noise was given
    Case("q_sample-noise-and-offset", qs(noise=x4(seed=2), offset=-5), ValueError, r"give noise or the counters to draw it \(offset=-5\), not both"),
    Case("q_sample-seed-str", qs(seed="7"), TypeError, "seed must be an int, got str"),
    Case("q_sample-seed-too-large", qs(seed=2**64), ValueError, "seed must fit in 64 bits"),
    Case("q_sample-offset-negative", qs(offset=-5), ValueError, "offset must lie in"),
    Case("q_sample-offset-overflow", qs(offset=2**63 - 10), ValueError, r"offset must lie in \[0, 2\^63 - 1 - 72\]"),
    # empty batches: an empty result
    Case("q_sample-empty-batch", empty_result(ops.q_sample, x4(0, 4, 3, 3), 3, S, seed=0, shape=(0, 4, 3, 3)), None),
    Case("q_sample-empty-batch-t-tensor", empty_result(ops.q_sample, x4(0, 4, 3, 3), torch.zeros(0, dtype=torch.int64), S, seed=0, shape=(0, 4, 3, 3)), None),
    # strided views: handled (copied to a kernel layout), as on a contiguous copy
    Case("q_sample-x0-transposed", same_as_contiguous(ops.q_sample, x4(2, 4, 3, 5).transpose(2, 3), torch.tensor([1, 8]), S, seed=4), None),
    Case("q_sample-x0-step2", same_as_contiguous(ops.q_sample, x4(2, 4, 3, 6)[..., ::2], 5, S, seed=4), None),
    Case("q_sample-x0-expanded", same_as_contiguous(ops.q_sample, x4(1, 4, 3, 3).expand(3, 4, 3, 3), 5, S, seed=4), None),
    Case("q_sample-noise-transposed", same_as_contiguous(ops.q_sample, x4(2, 4, 3, 5), 5, S, noise=x4(2, 4, 5, 3, seed=6).transpose(2, 3)), None),
    Case("q_sample-t-step2", same_as_contiguous(ops.q_sample, x4(2, 4, 3, 3), torch.tensor([1, 0, 9, 0])[::2], S, seed=4), None),
    Case("q_sample-t-expanded", same_as_contiguous(ops.q_sample, x4(3, 4, 3, 3), torch.tensor(7).expand(3), S, seed=4), None),
    Case("q_sample-channels-last", same_as_contiguous(ops.q_sample, x4(2, 4, 3, 3).to(memory_format=torch.channels_last), 5, S, seed=4, check_layout=is_channels_last), None),
    # ops.ddpm_step: dtypes, shapes, devices
    Case("ddpm_step-x_t-int", step(x=torch.ones(2, 4, 3, 3, dtype=torch.int32)), TypeError, "x_t must be float32, float16 or bfloat16, got torch.int32"),
    Case("ddpm_step-x_t-float64", step(x=x.double()), TypeError, "x_t must be float32, float16 or bfloat16, got torch.float64"),
    Case("ddpm_step-eps-float64", step(eps=x.double()), TypeError, "eps must be float32, float16 or bfloat16"),
    Case("ddpm_step-eps-bool", step(eps=x > 0), TypeError, "eps must be float32, float16 or bfloat16, got torch.bool"),
    Case("ddpm_step-eps-shape", step(eps=x4(2, 4, 3)), ValueError, r"eps has shape \(2, 4, 3\) but x_t has \(2, 4, 3, 3\)"),
    Case("ddpm_step-eps-meta", step(eps=torch.empty(2, 4, 3, 3, **meta)), ValueError, "eps is on meta but x_t is on cpu"),
    Case("ddpm_step-schedule-none", lambda b: ops.ddpm_step(x, x, 1, None, backend=b), TypeError, "schedule must be a NoiseSchedule, got NoneType"),
    Case("ddpm_step-t-T", step(t=T), ValueError, "timestep 10 is out of range"),
    Case("ddpm_step-t-tensor-negative", step(t=torch.tensor([-1, 2])), ValueError, "timesteps must lie in"),
    Case("ddpm_step-t-float-tensor", step(t=torch.tensor(3.0)), TypeError, "t must hold integers"),
    Case("ddpm_step-t-uint64-T", step(t=torch.tensor([T, 2]).to(torch.uint64)), ValueError, r"timesteps must lie in \[0, 10\), got min 2, max 10"),
    Case("ddpm_step-t-wrong-length", step(t=torch.tensor([1, 2, 3])), ValueError, "t must be a scalar or have one entry per sample"),
    # options
    Case("ddpm_step-variance-unknown", step(variance="learned"), ValueError, "variance must be one of fixed_small, fixed_large, got 'learned'"),
    Case("ddpm_step-clip-int", step(clip_denoised=1), TypeError, "clip_denoised must be a bool, got int"),
    Case("ddpm_step-clip-numpy-bool", step(clip_denoised=np.True_), TypeError, "clip_denoised must be a bool, got numpy.bool"),
    Case("ddpm_step-eta-negative", step(eta=-0.5), ValueError, "ddpm_step: eta must be a finite number >= 0"),
    Case("ddpm_step-eta-nan", step(eta=NAN), ValueError, "ddpm_step: eta must be a finite number >= 0"),
    Case("ddpm_step-eta-inf", step(eta=INF), ValueError, "ddpm_step: eta must be a finite number >= 0"),
    Case("ddpm_step-eta-str", step(eta="0.5"), TypeError, "ddpm_step: eta must be a number, got str"),
    Case("ddpm_step-eta-bool", step(eta=True), TypeError, "ddpm_step: eta must be a number, got bool"),
    Case("ddpm_step-noise-shape", step(noise=x4(2, 4, 9), seed=None), ValueError, "noise has shape"),
    Case("ddpm_step-noise-and-seed", step(noise=x4(seed=3)), ValueError, "not both"),
    Case("ddpm_step-seed-too-large", step(seed=2**64), ValueError, "seed must fit in 64 bits"),
    Case("ddpm_step-offset-negative", step(offset=-1), ValueError, "offset must lie in"),
    Case("ddpm_step-sample-stride-negative", step(sample_stride=-1), ValueError, "sample_stride must lie in"),
    # the counter checks of randn and q_sample: no two samples share noise, every counter fits in int64
    Case("ddpm_step-sample-stride-zero", step(sample_stride=0), ValueError, "sample_stride 0 is below the 36 elements per sample"),
    Case("ddpm_step-sample-stride-overlap", step(sample_stride=35), ValueError, "sample_stride 35 is below the 36 elements per sample"),
    Case("ddpm_step-offset-overflow", step(offset=2**63 - 2), ValueError, r"offset must lie in \[0, 2\^63 - 1 - 72\]"),
    Case("ddpm_step-offset-overflow-at-the-last-timestep", step(offset=2**63 - 5000, step_stride=1000), ValueError, r"offset must lie in \[0, 2\^63 - 1 - 9072\]"),
    Case("ddpm_step-step-stride-overflow", step(step_stride=2**62), ValueError, "the noise counters must fit in int64"),
    Case("ddpm_step-given-noise-ignores-sample-stride", step_given_noise_sample_stride_zero, None),
    # other counters were ignored silently when noise was given
    Case("ddpm_step-noise-and-offset", step(noise=x4(seed=3), seed=None, offset=3), ValueError, r"give noise or the counters to draw it \(offset=3\), not both"),
    Case("ddpm_step-noise-and-strides", step(noise=x4(seed=3), seed=None, sample_stride=64, step_stride=7), ValueError, r"\(sample_stride=64, step_stride=7\), not both"),
    Case("ddpm_step-step-stride-float", step(step_stride=2.0), TypeError, "step_stride must be an int, got float"),
    # outputs
    Case("ddpm_step-out-dtype", step(out=torch.empty(2, 4, 3, 3, dtype=torch.float16)), TypeError, "out must have x_t's dtype torch.float32"),
    Case("ddpm_step-out-shape", step(out=torch.empty(2, 4, 3, 4)), ValueError, r"out must have x_t's shape \(2, 4, 3, 3\)"),
    Case("ddpm_step-out-meta", step(out=torch.empty(2, 4, 3, 3, **meta)), ValueError, "out must have x_t's shape .* on cpu"),
    Case("ddpm_step-out-not-tensor", step(out=[0.0]), TypeError, "out must be a torch.Tensor"),
    Case("ddpm_step-out-step2", step(out=torch.empty(2, 4, 3, 6)[..., ::2]), ValueError, "out must be contiguous or channels_last"),
    Case("ddpm_step-out-memory-format", step(out=torch.empty(2, 4, 3, 3).to(memory_format=torch.channels_last)), ValueError, "out must have the memory format of x_t"),
    Case("ddpm_step-out-partial-overlap", step_partial_overlap("out"), ValueError, "out partially overlaps x_t"),
    Case("ddpm_step-out_model_input-partial-overlap", step_partial_overlap("out_model_input"), ValueError, "out_model_input partially overlaps x_t"),
    Case("ddpm_step-out_model_input-over-x_t-in-the-other-memory-format", step_model_input_over_x_in_the_other_memory_format,
         ValueError, "out_model_input partially overlaps x_t"),
    Case("ddpm_step-out_model_input-over-x_t-in-another-dtype", step_model_input_over_x_in_another_dtype, ValueError,
         "out_model_input partially overlaps x_t"),
    Case("ddpm_step-out_model_input-partial-overlap-with-out", step_model_input_over_out, ValueError,
         "out_model_input partially overlaps out"),
    Case("ddpm_step-out_model_input-int", step(out_model_input=torch.empty(2, 4, 3, 3, dtype=torch.int32)), TypeError, "out_model_input must be float32, float16 or bfloat16"),
    Case("ddpm_step-out_model_input-transposed", step(out_model_input=torch.empty(2, 4, 3, 3).transpose(2, 3)), ValueError, "out_model_input must be contiguous or channels_last"),
    Case("ddpm_step-out-in-place", step_in_place, None),
    Case("ddpm_step-out-disjoint-slices", step_disjoint_slices_of_one_buffer, None),
    Case("ddpm_step-empty-batch", empty_result(ops.ddpm_step, x4(0, 4, 3, 3), x4(0, 4, 3, 3), 3, S, seed=0, shape=(0, 4, 3, 3)), None),
    Case("ddpm_step-empty-channels", empty_result(ops.ddpm_step, x4(2, 0, 3, 3), x4(2, 0, 3, 3), torch.tensor([1, 2]), S, seed=0, shape=(2, 0, 3, 3)), None),
    Case("ddpm_step-x_t-transposed", same_as_contiguous(ops.ddpm_step, x4(2, 4, 5, 3).transpose(2, 3), x4(2, 4, 3, 5, seed=2), torch.tensor([0, 7]), S, seed=4), None),
    Case("ddpm_step-eps-step2-bfloat16", same_as_contiguous(ops.ddpm_step, x4(2, 4, 3, 3), x4(2, 4, 3, 6, seed=2, dtype=torch.bfloat16)[..., ::2], 6, S, seed=4, clip_denoised=True), None),
    Case("ddpm_step-eps-expanded", same_as_contiguous(ops.ddpm_step, x4(2, 4, 3, 3), x4(1, 4, 3, 3, seed=2).expand(2, 4, 3, 3), 6, S, eta=0.5, seed=4), None),
    Case("ddpm_step-noise-transposed", same_as_contiguous(ops.ddpm_step, x4(2, 4, 3, 5), x4(2, 4, 3, 5, seed=2), 6, S, noise=x4(2, 4, 5, 3, seed=3).transpose(2, 3)), None),
    Case("ddpm_step-channels-last-x-contiguous-eps", same_as_contiguous(ops.ddpm_step, x4(2, 4, 3, 3).to(memory_format=torch.channels_last), x4(2, 4, 3, 3, seed=2), 6, S, seed=4, check_layout=is_channels_last), None),
    # ops.group_norm_silu
    Case("group_norm_silu-x-int", gn(x=torch.ones(2, 4, 3, 3, dtype=torch.int64)), TypeError, "x must be float32, float16 or bfloat16 .*got torch.int64"),
    Case("group_norm_silu-x-list", gn(x=[[1.0, 2.0]]), TypeError, "x must be a torch.Tensor"),
    Case("group_norm_silu-x-1d", gn(x=x4(8)), ValueError, r"x must be N x C x \.\.\., got shape \(8,\)"),
    Case("group_norm_silu-x-float64", gn_float64, None, backends=("reference", "cpu")),
    Case("group_norm_silu-x-float64-triton", gn(x=x.double()), TypeError, "x is float64, which runs on the cpu and reference backends only", backends=("triton",)),
    Case("group_norm_silu-groups-not-dividing", gn(x=x4(2, 6, 3, 3), groups=4), ValueError, r"channels \(6\) must be divisible by num_groups \(4\)"),
    Case("group_norm_silu-groups-zero", gn(groups=0), ValueError, "num_groups must be a positive int, got 0"),
    Case("group_norm_silu-groups-float", gn(groups=2.0), ValueError, "num_groups must be a positive int, got 2.0"),
    Case("group_norm_silu-groups-of-one-value", gn(x=x4(2, 4, 1, 1), groups=4), ValueError, "each group needs more than one value"),
    Case("group_norm_silu-no-channels", gn(x=x4(2, 0, 3, 3)), ValueError, "each group needs more than one value"),
    Case("group_norm_silu-no-pixels", gn(x=x4(2, 4, 0, 3)), ValueError, "each group needs more than one value"),
    Case("group_norm_silu-empty-batch", empty_result(ops.group_norm_silu, x4(0, 4, 3, 3), 2, shape=(0, 4, 3, 3)), None),
    Case("group_norm_silu-weight-size", gn(weight=torch.ones(5)), ValueError, r"weight must be a tensor of shape \(4,\), got \(5,\)"),
    Case("group_norm_silu-weight-int", gn(weight=torch.ones(4, dtype=torch.int64)), TypeError, "weight must be floating point, got torch.int64"),
    Case("group_norm_silu-weight-list", gn(weight=[1.0] * 4), TypeError, "weight must be a torch.Tensor, got list"),
    Case("group_norm_silu-weight-meta", gn(weight=torch.ones(4, **meta)), ValueError, "weight is on meta but x is on cpu"),
    Case("group_norm_silu-weight-float64-with-float32-x", gn_float64_weight_with_float32_x, None),
    Case("group_norm_silu-bias-size", gn(bias=torch.ones(2, 2)), ValueError, r"bias must be a tensor of shape \(4,\)"),
    Case("group_norm_silu-bias-bool", gn(bias=torch.ones(4, dtype=torch.bool)), TypeError, "bias must be floating point, got torch.bool"),
    Case("group_norm_silu-add-shape", gn(add=torch.ones(2, 5)), ValueError, r"add must be a tensor of shape \(N, C\) = \(2, 4\), got \(2, 5\)"),
    Case("group_norm_silu-add-int", gn(add=torch.ones(2, 4, dtype=torch.int32)), TypeError, "add must be floating point"),
    Case("group_norm_silu-add-meta", gn(add=torch.ones(2, 4, **meta)), ValueError, "add is on meta but x is on cpu"),
    Case("group_norm_silu-eps-zero", gn(eps=0.0), ValueError, "eps must be a positive number, got 0.0"),
    Case("group_norm_silu-eps-nan", gn(eps=NAN), ValueError, "eps must be a positive number, got nan"),
    Case("group_norm_silu-eps-bool", gn(eps=True), ValueError, "eps must be a positive number, got True"),
    Case("group_norm_silu-eps-below-float32", gn(eps=1e-50), ValueError, r"eps must be representable in float32 \(at least about 1.4e-45\) on the triton backend, got 1e-50", backends=("triton",)),
    Case("group_norm_silu-act-int", gn(act=1), TypeError, "act must be a bool, got int"),
    Case("group_norm_silu-act-numpy-bool", gn(act=np.False_), TypeError, "act must be a bool, got numpy.bool"),
    Case("group_norm_silu-x-transposed", same_as_contiguous(ops.group_norm_silu, x4(2, 4, 5, 3).transpose(2, 3), 2), None),
    Case("group_norm_silu-x-step2-3d", same_as_contiguous(ops.group_norm_silu, x4(2, 4, 10)[..., ::2], 4, torch.randn(4)), None),
    Case("group_norm_silu-x-expanded", same_as_contiguous(ops.group_norm_silu, x4(1, 4, 3, 3).expand(3, 4, 3, 3), 2), None),
    Case("group_norm_silu-weight-step2", same_as_contiguous(ops.group_norm_silu, x4(2, 4, 3, 3), 2, torch.randn(8)[::2], torch.randn(4, 2)[:, 1]), None),
    Case("group_norm_silu-add-transposed", same_as_contiguous(ops.group_norm_silu, x4(2, 4, 3, 3), 2, add=torch.randn(4, 2).t()), None),
    Case("group_norm_silu-channels-last", same_as_contiguous(ops.group_norm_silu, x4(2, 4, 3, 3).to(memory_format=torch.channels_last), 2, check_layout=is_channels_last), None),
    # nn.GroupNormSiLU
    Case("GroupNormSiLU-channels-not-dividing", module(3, 8), ValueError, r"num_channels \(8\) must be divisible by num_groups \(3\)"),
    Case("GroupNormSiLU-x-channels", module(2, 8), ValueError, r"GroupNormSiLU: x has 4 channels \(shape \(2, 4, 3, 3\)\), expected num_channels = 8"),
    Case("GroupNormSiLU-x-channels-no-affine", module(2, 2, affine=False), ValueError, "x has 4 channels .* expected num_channels = 2"),
    Case("GroupNormSiLU-x-int", module(2, 4, x=torch.ones(2, 4, 3, 3, dtype=torch.int32)), TypeError, "x must be float32"),
    Case("GroupNormSiLU-add-shape", module(2, 4, add=torch.ones(4)), ValueError, r"add must be a tensor of shape \(N, C\)"),
    Case("GroupNormSiLU-act-int", module(2, 4, act=1), TypeError, "GroupNormSiLU: act must be a bool, got int"),
    Case("GroupNormSiLU-backend-unknown", lambda b: GroupNormSiLU(2, 4, backend="gpu"), ValueError, "GroupNormSiLU: backend must be one of .*got 'gpu'", per_backend=False),
    # also for a model with nothing to fuse: the misspelling must not wait for one that has
    Case("fuse_group_norm_silu-model-int", once(lambda: fuse_group_norm_silu(5)), TypeError, "fuse_group_norm_silu: model must be an nn.Module, got int", per_backend=False),
    Case("GroupNormSiLU-from_group_norm-linear", once(lambda: GroupNormSiLU.from_group_norm(torch.nn.Linear(2, 2))), TypeError, "from_group_norm: norm must be an nn.GroupNorm, got torch.nn.modules.linear.Linear", per_backend=False),
    Case("fuse_group_norm_silu-backend-unknown", lambda b: fuse_group_norm_silu(torch.nn.Linear(2, 2), backend="gpu"), ValueError, "fuse_group_norm_silu: backend must be one of .*got 'gpu'", per_backend=False),
    # NoiseSchedule
    Case("NoiseSchedule-name-unknown", once(lambda: NoiseSchedule("sigmoid")), ValueError, "unknown beta schedule 'sigmoid'; expected one of linear", per_backend=False),
    Case("NoiseSchedule-name-none", once(lambda: NoiseSchedule(None)), ValueError, "give a schedule name or betas", per_backend=False),
    Case("NoiseSchedule-timesteps-zero", once(lambda: NoiseSchedule("linear", timesteps=0)), ValueError, r"timesteps must be a positive int up to 2\^31 - 1, got 0", per_backend=False),
    Case("NoiseSchedule-timesteps-float", once(lambda: NoiseSchedule("linear", timesteps=10.0)), ValueError, r"timesteps must be a positive int up to 2\^31 - 1, got 10.0", per_backend=False),
    Case("NoiseSchedule-betas-nan", once(lambda: NoiseSchedule(betas=[0.1, NAN])), ValueError, r"betas must be finite \(found NaN or Inf\)", per_backend=False),
    Case("NoiseSchedule-betas-inf", once(lambda: NoiseSchedule(betas=torch.tensor([0.1, INF]))), ValueError, "betas must be finite", per_backend=False),
    Case("NoiseSchedule-betas-minus-inf", once(lambda: NoiseSchedule(betas=[-INF, 0.1])), ValueError, "betas must be finite", per_backend=False),
    Case("NoiseSchedule-betas-negative", once(lambda: NoiseSchedule(betas=[0.1, -0.2])), ValueError, r"betas must lie in \(0, 1\], got min -0.2", per_backend=False),
    Case("NoiseSchedule-betas-zero", once(lambda: NoiseSchedule(betas=[0.0, 0.1])), ValueError, r"betas must lie in \(0, 1\]", per_backend=False),
    Case("NoiseSchedule-betas-above-one", once(lambda: NoiseSchedule(betas=[0.5, 1.5])), ValueError, r"betas must lie in \(0, 1\], got .* max 1.5", per_backend=False),
    Case("NoiseSchedule-betas-2d", once(lambda: NoiseSchedule(betas=[[0.1, 0.2]])), ValueError, "betas must be a non-empty 1-d tensor", per_backend=False),
    Case("NoiseSchedule-betas-empty", once(lambda: NoiseSchedule(betas=[])), ValueError, "betas must be a non-empty 1-d tensor", per_backend=False),
    Case("NoiseSchedule-betas-str", once(lambda: NoiseSchedule(betas="0.1,0.2")), TypeError, "betas must be a tensor or a sequence of numbers, got str", per_backend=False),
    Case("NoiseSchedule-betas-bool-tensor", once(lambda: NoiseSchedule(betas=torch.tensor([True, True]))), TypeError, "betas must hold real numbers, got torch.bool", per_backend=False),
    Case("NoiseSchedule-beta_start-nan", once(lambda: NoiseSchedule("linear", beta_start=NAN)), ValueError, r"beta_start must lie in \(0, 1\], got nan", per_backend=False),
    Case("NoiseSchedule-beta_start-negative", once(lambda: NoiseSchedule("quad", beta_start=-1e-4)), ValueError, r"beta_start must lie in \(0, 1\]", per_backend=False),
    Case("NoiseSchedule-beta_end-str", once(lambda: NoiseSchedule("linear", beta_end="0.02")), TypeError, "beta_end must be a number, got str", per_backend=False),
    Case("NoiseSchedule-beta_end-inf", once(lambda: NoiseSchedule("warmup10", beta_end=INF)), ValueError, "beta_end must lie in", per_backend=False),
    Case("NoiseSchedule-cosine-beta_start", once(lambda: NoiseSchedule("cosine", beta_start=1e-4)), ValueError, "the cosine schedule takes no beta_start/beta_end", per_backend=False),
    Case("NoiseSchedule-table-unknown", once(lambda: S.table("sqrt_betas")), KeyError, "unknown table 'sqrt_betas'", per_backend=False),
    Case("NoiseSchedule-step_table-kind", once(lambda: S.step_table("learned")), ValueError, "step kind must be one of", per_backend=False),
    Case("NoiseSchedule-step_table-eta-without-ddim", once(lambda: S.step_table("fixed_small", eta=0.5)), ValueError, "eta applies to the ddim step only", per_backend=False),
    Case("NoiseSchedule-respace-empty", once(lambda: S.respace([])), ValueError, "respaced timesteps must name at least one timestep, got none", per_backend=False),
    Case("NoiseSchedule-respace-out-of-range", once(lambda: S.respace([0, 5, T])), ValueError, "respaced timesteps must lie in", per_backend=False),
    Case("NoiseSchedule-respace-float", once(lambda: S.respace([0, 4.5, 9])), TypeError, "respaced timesteps must be ints", per_backend=False),
    # Sampler: construction
    Case("Sampler-model-not-callable", lambda b: Sampler("unet", S, backend=b), TypeError, "model must be callable as model"),
    Case("Sampler-schedule-str", lambda b: Sampler(never_called, "linear", backend=b), TypeError, "schedule must be a NoiseSchedule, got str"),
    Case("Sampler-device-typo", lambda b: Sampler(never_called, S, device="cdua", backend=b), ValueError, "device 'cdua' is not a device"),
    Case("Sampler-device-float", lambda b: Sampler(never_called, S, device=0.5, backend=b), TypeError, "device must be a torch.device or a device string .*got float"),
    Case("Sampler-variance-unknown", lambda b: Sampler(never_called, S, variance="learned", backend=b), ValueError, "variance must be 'fixed_small' or 'fixed_large', got 'learned'"),
    Case("Sampler-backend-unknown", lambda b: Sampler(never_called, S, backend="fastest"), ValueError, "backend must be one of", per_backend=False),
    Case("Sampler-dtype-float64", lambda b: Sampler(never_called, S, dtype=torch.float64, backend=b), TypeError, "dtype must be float32, float16 or bfloat16, got torch.float64"),
    # Sampler.sample: n or shape, steps, eta, seed, first_sample
    Case("Sampler-n-zero", sample(n=0, model=never_called), ValueError, r"shape must be \(N, \.\.\.\) with positive sizes"),
    Case("Sampler-n-negative", sample(n=-2, model=never_called), ValueError, "shape must be .* positive sizes"),
    Case("Sampler-n-float", sample(n=2.0, model=never_called), TypeError, "n_or_shape must be an int or a shape, got 2.0"),
    Case("Sampler-n-bool", sample(n=True, model=never_called), TypeError, "n_or_shape must be an int or a shape"),
    Case("Sampler-shape-1d", sample(n=(4,), model=never_called), ValueError, r"shape must be \(N, \.\.\.\)"),
    Case("Sampler-shape-with-bool", sample(n=(True, 1, 2, 2), model=never_called), TypeError, "n_or_shape must be an int or a shape"),
    Case("Sampler-shape-zero-size", sample(n=(2, 1, 0, 2), model=never_called), ValueError, "positive sizes"),
    Case("Sampler-n-without-sample_shape", sample(model=never_called, sampler_kwargs=dict(sample_shape=None)), ValueError, "give the full shape, or sample_shape="),
    Case("Sampler-channels-last-3d", sample(model=never_called, sampler_kwargs=dict(channels_last=True, sample_shape=(2, 3))), ValueError, r"channels_last needs 4-d samples"),
    Case("Sampler-steps-zero", sample(steps=0, model=never_called), ValueError, r"steps must be an int in \[1, 10\], got 0"),
    Case("Sampler-steps-too-many", sample(steps=T + 1, model=never_called), ValueError, r"steps must be an int in \[1, 10\], got 11"),
    Case("Sampler-steps-float", sample(steps=2.5, model=never_called), ValueError, "steps must be an int"),
    Case("Sampler-eta-negative", sample(eta=-1.0, model=never_called), ValueError, "eta must be a finite number >= 0, got -1.0"),
    Case("Sampler-eta-nan", sample(eta=NAN, model=never_called), ValueError, "eta must be a finite number >= 0, got nan"),
    Case("Sampler-eta-str", sample(eta="0", model=never_called), TypeError, "eta must be a number, got str"),
    Case("Sampler-seed-float", sample(seed=1.0, model=never_called), TypeError, "Sampler.sample: seed must be an int, got float"),
    Case("Sampler-seed-too-large", sample(seed=2**64, model=never_called), ValueError, "Sampler.sample: seed must fit in 64 bits"),
    Case("Sampler-seed-negative", sampler_negative_seed, None),
    Case("Sampler-first_sample-negative", sample(first_sample=-1, model=never_called), ValueError, "first_sample must be an int >= 0, got -1"),
    Case("Sampler-first_sample-too-large", sample(first_sample=2**31 - 1, model=never_called), ValueError, r"first_sample \+ N must stay below 2\^31"),
    Case("Sampler-return_intermediates-zero", sample(return_intermediates=0, model=never_called), ValueError, "return_intermediates must be a positive int, got 0"),
    Case("Sampler-return_intermediates-bool", sample(return_intermediates=True, model=never_called), ValueError, "return_intermediates must be a positive int, got True"),
    # Sampler: what the model returns (checked on metadata only: no sync per step)
    Case("Sampler-model-shape", sample(model=lambda x, t: x[:, :, :1]), ValueError, r"the model returned torch.Size\(\[2, 1, 1, 2\]\); expected eps of shape \(2, 1, 2, 2\)"),
    Case("Sampler-model-float64", sample(model=lambda x, t: x.double()), TypeError, "the model returned eps of dtype torch.float64; expected float32, float16 or bfloat16"),
    Case("Sampler-model-int", sample(model=lambda x, t: t.reshape(-1, 1, 1, 1).expand(x.shape)), TypeError, "the model returned eps of dtype torch.int64"),
    Case("Sampler-model-none", sample(model=lambda x, t: None), TypeError, "the model returned a NoneType; expected eps as a torch.Tensor"),
    Case("Sampler-model-meta", sample(model=lambda x, t: torch.empty(x.shape, **meta)), ValueError, "the model returned eps on meta; expected it on the sampler's device cpu"),
    Case("Sampler-model-nan", sampler_model_nan, None),
    # diffusion (plain PyTorch, no backend)
    Case("diffusion-q_sample-x0-int", once(lambda: diffusion.q_sample(S, torch.ones(2, 3, dtype=torch.int64), 1, torch.randn(2, 3))), TypeError, "x0 must be a floating tensor, got torch.int64", per_backend=False),
    Case("diffusion-q_sample-noise-shape", once(lambda: diffusion.q_sample(S, x4(2, 3), 1, x4(3, 2))), ValueError, r"noise has shape \(3, 2\) but x0 has \(2, 3\)", per_backend=False),
    Case("diffusion-t-float-tensor", once(lambda: diffusion.q_sample(S, x4(2, 3), torch.tensor([1.0, 2.0]), x4(2, 3))), TypeError, r"t must be an int or an integer .*tensor, got a torch.float32 tensor", per_backend=False),
    Case("diffusion-t-bool", once(lambda: diffusion.q_mean_variance(S, x4(2, 3), True)), TypeError, "t must be an int or an integer tensor, got a bool", per_backend=False),
    Case("diffusion-t-out-of-range", once(lambda: diffusion.predict_x0_from_eps(S, x4(2, 3), T, x4(2, 3))), ValueError, r"timestep 10 is out of range \[0, 10\)", per_backend=False),
    Case("diffusion-t-tensor-out-of-range", once(lambda: diffusion.q_posterior_mean_variance(S, x4(2, 3), x4(2, 3), torch.tensor([-1, 0]))), ValueError, r"timesteps out of range \[0, 10\): min -1", per_backend=False),
    Case("diffusion-t-wrong-length", once(lambda: diffusion.q_sample(S, x4(2, 3), torch.tensor([1, 2, 3]), x4(2, 3))), ValueError, r"t must be a scalar or have one entry per sample \(2\)", per_backend=False),
    Case("diffusion-p_mean_variance-mean_type", once(lambda: diffusion.p_mean_variance(S, x4(2, 3), x4(2, 3), 1, mean_type="v")), ValueError, "mean_type must be one of 'eps', 'x0', got 'v'", per_backend=False),
    Case("diffusion-p_mean_variance-variance", once(lambda: diffusion.p_mean_variance(S, x4(2, 3), x4(2, 3), 1, variance="learned")), ValueError, "variance must be one of", per_backend=False),
    Case("diffusion-p_mean_variance-shape", once(lambda: diffusion.p_mean_variance(S, x4(2, 4), x4(2, 3), 1)), ValueError, r"model output has shape \(2, 4\), x_t has \(2, 3\)", per_backend=False),
    Case("diffusion-loss_simple-shape", once(lambda: diffusion.loss_simple(x4(2, 3), x4(3, 2))), ValueError, "eps has shape .* the prediction", per_backend=False),
    Case("diffusion-bits_per_dim-schedule-name", once(lambda: diffusion.bits_per_dim(never_called, x4(2, 3).clamp(-1, 1), "linear")), TypeError, r"schedule must be a NoiseSchedule \(e.g. NoiseSchedule\('linear'\)\), got str", per_backend=False),
    Case("diffusion-q_sample-schedule-name", once(lambda: diffusion.q_sample("linear", x4(2, 3), 1, x4(2, 3))), TypeError, "schedule must be a NoiseSchedule .*got str", per_backend=False),
    Case("diffusion-prior_bpd-schedule-name", once(lambda: diffusion.prior_bpd("linear", x4(2, 3))), TypeError, "schedule must be a NoiseSchedule .*got str", per_backend=False),
    # bool("no") is True: a string flag would clip
    Case("diffusion-bits_per_dim-clip-str", once(lambda: diffusion.bits_per_dim(never_called, x4(2, 3).clamp(-1, 1), S, clip_denoised="no")), TypeError, "clip_denoised must be a bool, got 'no'", per_backend=False),
    Case("diffusion-p_mean_variance-clip-str", once(lambda: diffusion.p_mean_variance(S, x4(2, 3), x4(2, 3), 1, clip_denoised="no")), TypeError, "clip_denoised must be a bool, got 'no'", per_backend=False),
    Case("evaluate_bpd-schedule-name", once(lambda: evaluate_bpd(never_called, toy(4)(), "linear")), TypeError, "evaluate_bpd: schedule must be a NoiseSchedule, got str", per_backend=False),
    Case("evaluate_bpd-progress-str", once(lambda: evaluate_bpd(never_called, toy(4)(), S, progress="no")), TypeError, "progress must be a bool, got 'no'", per_backend=False),
    Case("evaluate_bpd-device-typo", once(lambda: evaluate_bpd(never_called, toy(4)(), S, device="cdua")), ValueError, "evaluate_bpd: device 'cdua' is not a device", per_backend=False),
    Case("diffusion-bits_per_dim-empty", once(lambda: diffusion.bits_per_dim(never_called, x4(0, 3), S)), ValueError, "x0 must be a non-empty batch", per_backend=False),
    Case("diffusion-bits_per_dim-int", once(lambda: diffusion.bits_per_dim(never_called, torch.ones(2, 3, dtype=torch.uint8), S)), TypeError, "x0 must be a floating tensor", per_backend=False),
    Case("diffusion-bits_per_dim-x0-range", once(lambda: diffusion.bits_per_dim(never_called, torch.tensor([[0.0, 255.0]]), S)), ValueError, r"x0 must be data in \[-1, 1\] .*got values in \[0.0, 255.0\]", per_backend=False),
    Case("diffusion-bits_per_dim-model-tuple", once(lambda: diffusion.bits_per_dim(lambda x, t: (x,), x4(2, 3).clamp(-1, 1), S)), TypeError, r"model output must be a torch.Tensor of x_t's shape \(2, 3\), got a tuple", per_backend=False),
    Case("diffusion-bits_per_dim-numpy", once(lambda: diffusion.bits_per_dim(never_called, np.zeros((2, 1, 4, 4), np.float32), S)), TypeError, r"bits_per_dim: x0 must be a torch.Tensor of data in \[-1, 1\], got a numpy.ndarray", per_backend=False),
    # datasets
    Case("ImageDataset-sparse", once(lambda: ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8).to_sparse())), TypeError, r"ImageDataset: images must be a dense \(strided\) tensor, got a sparse_coo tensor", per_backend=False),
    Case("ImageDataset-meta", once(lambda: ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8, device="meta"))), ValueError, "images must hold data: got a tensor on the meta device", per_backend=False),
    Case("ImageDataset-images-set-to-floats", once(lambda: setattr(toy(4)(), "images", torch.zeros(4, 1, 8, 8))), ValueError, r"images must be a uint8 N x C x H x W tensor or numpy array, got torch.float32 \(4, 1, 8, 8\)", per_backend=False),
    # the Trainer
    Case("Trainer-dataset-overrides-batch", trainer(dataset=lambda: AugmentedImages(toy(16)().images)), TypeError, "AugmentedImages overrides ImageDataset.batch, which the Trainer does not call", per_backend=False),
    Case("Trainer-model-function", trainer(model=lambda: (lambda x, t: x)), TypeError, "model must be an nn.Module, got function", per_backend=False),
    Case("Trainer-dataset-tensor", trainer(dataset=lambda: torch.zeros(16, 1, 8, 8)), TypeError, "dataset must be a ddpm_fast.data.ImageDataset, got Tensor", per_backend=False),
    Case("Trainer-schedule-name", trainer(schedule="linear"), TypeError, "schedule must be a NoiseSchedule, got str", per_backend=False),
    Case("Trainer-device-typo", trainer(device="cdua"), ValueError, "device 'cdua' is not a device", per_backend=False),
    Case("Trainer-model-returns-tuple", trainer(model=lambda: TupleEps(), train={}), TypeError, "the model returned a tuple; expected eps as a torch.Tensor", per_backend=False),
    # resume=None started the run afresh, deleting its log; resume="no" resumed
    Case("Trainer-train-resume-none", trainer(model=lambda: NeverTrained(), train={"resume": None}), TypeError, "resume must be a bool, got None", per_backend=False),
    Case("Trainer-train-final_samples-str", trainer(model=lambda: NeverTrained(), train={"final_samples": "no"}), TypeError, "final_samples must be a bool, got 'no'", per_backend=False),
    Case("Trainer-model-other-size", trainer(model=tiny_eps(image_size=16)), ValueError, "the model takes 1-channel 16px images, the dataset has 1-channel 8px images", per_backend=False),
    Case("Trainer-model-float64", trainer(model=lambda: tiny_eps()().double()), TypeError, r"the Trainer trains float32 parameters .*torch.float64", per_backend=False),
    Case("Trainer-batch-above-data", trainer(dataset=toy(4)), ValueError, "the dataset has 4 images, fewer than batch_size 8", per_backend=False),
    # the command line (exit status 2 and one line naming what is wrong)
    Case("cli-sample-damaged-weights", cli("sample", "--checkpoint", "{tmp}/bad", "--out", "{tmp}/out", "-n", "2", "--device", "cpu"), CommandFailed, r"ddpm-fast sample: error: .*bad/model.safetensors is not a readable safetensors file", per_backend=False),
    Case("cli-bpd-damaged-weights", cli("bpd", "--checkpoint", "{tmp}/bad", "--data", "{tmp}/d8.npz", "--device", "cpu"), CommandFailed, r"ddpm-fast bpd: error: .*bad/model.safetensors is not a readable safetensors file", per_backend=False),
    Case("cli-bpd-other-image-size", cli("bpd", "--checkpoint", "{tmp}/good", "--data", "{tmp}/d16.npz", "--device", "cpu"), CommandFailed, "ddpm-fast bpd: error: the model takes 1-channel 8px images, the dataset has 1-channel 16px images", per_backend=False),
    Case("cli-train-missing-data", cli("train", "--data", "{tmp}/none.npz", "--out", "{tmp}/run", "--device", "cpu"), CommandFailed, r"ddpm-fast train: error: .*none.npz", per_backend=False),
    Case("cli-fid-missing-weights", cli("fid", "--samples", "{tmp}/d8.npz", "--data", "{tmp}/d16.npz", "--inception-weights", "{tmp}/none.pth", "--device", "cpu"), CommandFailed, r"ddpm-fast fid: error: Inception weights file .*none.pth does not exist", per_backend=False),
    # backend selection
    Case("resolve_backend-device-string", resolve_backend_with_device_string, None),
    Case("backend-env-var-unknown", once(backend_env_var_typo), ValueError, "DDPM_FAST_BACKEND='gpu' is not a backend", per_backend=False),
    Case("backend-env-var-auto", once(backend_env_var_auto), None, per_backend=False),
]


def _params():
    params = []
    for case in CASES:
        if not case.per_backend:
            params.append(pytest.param(case, None, id=case.id))
            continue
        for backend in case.backends or BACKENDS:
            marks = [] if backend in BACKENDS else [pytest.mark.skip(reason=f"backend {backend} is not available here")]
            params.append(pytest.param(case, backend, id=f"{case.id}[{backend}]", marks=marks))
    return params


def test_the_table_is_large_and_its_ids_unique():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 45


@pytest.mark.parametrize("case,backend", _params())
def test_bad_input(case: Case, backend: str | None):
    if case.error is None:
        case.call(backend)
        return
    with pytest.raises(case.error, match=case.match):
        case.call(backend)


def test_the_largest_offset_the_message_names_is_accepted():
    """The message said [0, 2^63 - count] while 2^63 - count itself was refused."""
    x = torch.randn(2, 3, 2, 2)  # 24 counters
    ops.q_sample(x, 3, NoiseSchedule("linear", timesteps=10), seed=1, offset=2**63 - 1 - 24, backend="reference")
    with pytest.raises(ValueError, match=r"\[0, 2\^63 - 1 - 24\], got 9223372036854775784"):
        ops.q_sample(x, 3, NoiseSchedule("linear", timesteps=10), seed=1, offset=2**63 - 24, backend="reference")
