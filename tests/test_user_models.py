"""Models users bring, not the library's U-Net: one that writes into its input,
BatchNorm buffers through a skipped step, an integer parameter, lazy and
TorchScript modules, weights left on the meta device, 16-bit and float64
models in evaluate_bpd, and dropout inside a TorchScript model."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from ddpm_fast import NoiseSchedule, Sampler, diffusion
from ddpm_fast.evaluate import evaluate_bpd
from ddpm_fast.train import TrainConfig, Trainer
from train_helpers import TinyEps, toy_dataset

SCHEDULE = NoiseSchedule("linear", timesteps=20)


class InPlace(nn.Module):
    """eps = 0.5 x_t, written into x_t itself (``in_place``) or not: the same model."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.in_place = in_place
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x.mul_(self.scale) if self.in_place else x * self.scale


def test_the_bound_of_a_model_that_writes_into_its_input_is_its_bound():
    """The bound read x_t after the model had scaled it: 232.9 bits/dim for 8.40."""
    x0 = toy_dataset(n=2).batch(torch.arange(2))
    with torch.no_grad():
        got, want = (diffusion.bits_per_dim(InPlace(flag), x0, SCHEDULE, generator=torch.Generator().manual_seed(0))
                     for flag in (True, False))
    assert torch.equal(got.total, want.total) and torch.equal(got.terms, want.terms)
    data = toy_dataset(n=4)
    got, want = (evaluate_bpd(InPlace(flag), data, SCHEDULE, batch_size=2) for flag in (True, False))
    assert got["total"] == want["total"]


@pytest.mark.parametrize("loss", ["vlb", "hybrid"])
def test_the_bound_losses_of_a_model_that_writes_into_its_input_are_its_losses(tmp_path, loss):
    """vlb's 0.505 was 6.045 for a model scaling its input in place."""
    losses = []
    for flag in (True, False):
        trainer = Trainer(InPlace(flag), toy_dataset(n=8), SCHEDULE, TrainConfig(steps=2, batch_size=4, loss=loss),
                          tmp_path / str(flag), device="cpu", progress=False)
        losses.append([trainer.train_step() for _ in range(2)])
    assert losses[0] == losses[1]


class BatchNormEps(TinyEps):
    """TinyEps with a BatchNorm (running statistics: buffers the forward pass updates)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.norm(self.inp(x) + self.embed(t)[:, :, None, None]))
        return self.out(torch.nn.functional.silu(self.mid(h)))


def test_a_skipped_step_leaves_the_buffers_as_they_were(tmp_path):
    """The forward pass of a step whose loss is NaN wrote NaN running statistics,
    kept by every later step and copied into the EMA: its samples all NaN."""
    torch.manual_seed(0)
    trainer = Trainer(BatchNormEps(), toy_dataset(n=16), SCHEDULE, TrainConfig(steps=4, batch_size=4, warmup=0),
                      tmp_path, device="cpu", progress=False)
    trainer.train_step()
    before = {name: b.clone() for name, b in trainer.model.named_buffers()}
    real = trainer.model.inp.weight.detach().clone()
    with torch.no_grad():
        trainer.model.inp.weight[0, 0, 0, 0] = float("nan")  # the forward's BatchNorm sees NaN
    with pytest.warns(UserWarning, match="update skipped"):
        assert trainer.train_step() is None
    for name, b in trainer.model.named_buffers():
        assert torch.equal(b, before[name]), name
    with torch.no_grad():
        trainer.model.inp.weight.copy_(real)
    assert isinstance(trainer.train_step(), float)
    assert all(torch.isfinite(b).all() for b in trainer.ema.buffers())


class CountingEps(TinyEps):
    """TinyEps whose training forward reassigns a buffer (nn.Module.__setattr__
    files the new tensor under the buffer's name), as a norm layer that writes
    `self.running_mean = ...` does."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen = self.seen + x.shape[0]
        return super().forward(x, t)


def test_a_buffer_the_model_reassigns_reaches_the_ema_and_a_skipped_step_puts_it_back(tmp_path):
    """Buffers listed once, when the Trainer was made, left the EMA with the
    first tensor's value (0 samples seen for 16); a skipped step put the old
    value into that first tensor, not into the model's."""
    trainer = Trainer(CountingEps(), toy_dataset(n=16), SCHEDULE, TrainConfig(steps=4, batch_size=4, warmup=0),
                      tmp_path, device="cpu", progress=False)
    for _ in range(2):
        trainer.train_step()
    assert trainer.model.seen.item() == trainer.ema.seen.item() == 8
    real = trainer.model.inp.weight.detach().clone()
    with torch.no_grad():
        trainer.model.inp.weight[0, 0, 0, 0] = float("nan")
    with pytest.warns(UserWarning, match="update skipped"):
        assert trainer.train_step() is None
    assert trainer.model.seen.item() == 8  # the skipped step's forward counted 12
    with torch.no_grad():
        trainer.model.inp.weight.copy_(real)
    assert isinstance(trainer.train_step(), float)
    assert trainer.model.seen.item() == trainer.ema.seen.item() == 12


def test_an_integer_parameter_is_copied_into_the_ema(tmp_path):
    """A frozen integer nn.Parameter (a lookup table) passed the checks and
    failed the first EMA update in torch's words (lerp has no Long kernel)."""
    model = TinyEps()
    model.table = nn.Parameter(torch.arange(4), requires_grad=False)
    trainer = Trainer(model, toy_dataset(n=8), SCHEDULE, TrainConfig(steps=2, batch_size=4), tmp_path, device="cpu",
                      progress=False)
    with torch.no_grad():
        model.table.add_(1)
    assert isinstance(trainer.train_step(), float)
    assert torch.equal(trainer.ema.table, torch.arange(1, 5))


def _scripted(model: nn.Module, how: str = "script") -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.10+: "torch.jit.script is deprecated"
        if how == "trace":
            return torch.jit.trace(model, (torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.int64)))
        return torch.jit.script(model)


def test_lazy_and_torchscript_models_are_refused_when_the_trainer_is_made(tmp_path):
    lazy = TinyEps()
    lazy.inp = nn.LazyConv2d(16, 3, padding=1)
    with pytest.raises(ValueError, match=r"uninitialized lazy parameters .*run it once on a batch"):
        Trainer(lazy, toy_dataset(n=8), SCHEDULE, TrainConfig(steps=1, batch_size=4), tmp_path, progress=False)
    lazy(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.int64))  # initialized: trains
    Trainer(lazy, toy_dataset(n=8), SCHEDULE, TrainConfig(steps=1, batch_size=4), tmp_path, progress=False)
    for how in ("script", "trace"):
        with pytest.raises(TypeError, match="not a TorchScript one"):
            Trainer(_scripted(TinyEps(), how), toy_dataset(n=8), SCHEDULE, TrainConfig(steps=1, batch_size=4), tmp_path,
                    progress=False)


def test_a_model_on_the_meta_device_is_refused():
    """The chain ran on meta tensors and failed at its end (Tensor.item() on a
    meta tensor); with device= given, the model read memory never written."""
    with torch.device("meta"):
        model = TinyEps()
    for device in (None, "cpu"):
        with pytest.raises(ValueError, match="the model's weights are on the meta device"):
            Sampler(model, SCHEDULE, device=device).sample(2, seed=0, progress=False)
    with pytest.raises(ValueError, match="evaluate_bpd: the model's weights are on the meta device"):
        evaluate_bpd(model, toy_dataset(n=2), SCHEDULE)


class Recording(TinyEps):
    """TinyEps noting the dtype of each input it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[torch.dtype] = set()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.add(x.dtype)
        return super().forward(x, t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_evaluate_bpd_feeds_a_model_its_own_dtype(dtype):
    """float32 input failed in torch's words for a 16-bit model (the Sampler
    feeds a model its parameters' dtype); a float64 model's bound is computed in float64."""
    torch.manual_seed(0)
    model = Recording().eval()
    data = toy_dataset(n=4)
    want = evaluate_bpd(model, data, SCHEDULE, batch_size=2)["total"]
    cast = copy.deepcopy(model).to(dtype)
    cast.seen.clear()
    got = evaluate_bpd(cast, data, SCHEDULE, batch_size=2)["total"]
    assert cast.seen == {dtype} and model.seen == {torch.float32}
    assert got == pytest.approx(want, rel=1e-6 if dtype == torch.float64 else 1e-2)


def test_an_integer_model_output_is_refused_by_the_bound():
    """Cast and scored as eps: the Sampler refuses it."""
    x0 = toy_dataset(n=2).batch(torch.arange(2))
    with pytest.raises(TypeError, match="model output must be a floating tensor, got torch.int64"):
        diffusion.bits_per_dim(lambda x, t: x.round().long(), x0, SCHEDULE)


def test_dropout_inside_a_torchscript_model_is_warned_of():
    """Its dropout modules are ScriptModules, not nn.Dropout: no warning, and the
    same seed gave other samples."""
    scripted = _scripted(TinyEps(dropout=0.5).train())
    with pytest.warns(RuntimeWarning, match="active dropout"):
        Sampler(scripted, SCHEDULE).sample(2, seed=0, progress=False)
    with pytest.warns(RuntimeWarning, match="active dropout"):
        evaluate_bpd(scripted, toy_dataset(n=2), SCHEDULE)
    scripted.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Sampler(scripted, SCHEDULE).sample(2, seed=0, progress=False)
