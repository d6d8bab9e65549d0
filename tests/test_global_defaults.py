"""The library under torch's global defaults that a user may have changed:
``torch.set_default_dtype(torch.float64)`` and a default device
(``torch.set_default_device``, or ``torch.device`` as a context manager; "meta"
stands in here for "cuda", which would put the library's host-side tensors on
the GPU the same way). What the library makes for itself keeps its own dtype
and device, so results do not change."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from conftest import save_tiny_diffusers_pipeline
from ddpm_fast import NoiseSchedule, Sampler, ops
from ddpm_fast.data import _set_channels
from ddpm_fast.demo import run_demo
from ddpm_fast.evaluate import evaluate_bpd
from ddpm_fast.models import UNet
from ddpm_fast.ops._backend import triton_available
from ddpm_fast.pretrained import load_model
from ddpm_fast.schedules import make_betas
from ddpm_fast.selfcheck import _self_check
from ddpm_fast.train import TrainConfig, Trainer
from train_helpers import make_trainer, toy_dataset


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def test_training_draws_do_not_depend_on_the_default_dtype(tmp_path):
    """The flips were drawn with torch.rand in the default dtype: a float64 draw
    takes other bits from the generator, so the same seed flipped other images."""
    want = [make_trainer(tmp_path / "a")._stage(step) for step in (0, 1)]
    trainer = make_trainer(tmp_path / "b")
    with default_dtype(torch.float64):
        got = [trainer._stage(step) for step in (0, 1)]
    for a, b in zip(want, got):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_training_under_another_default_device_gives_the_same_losses(tmp_path):
    a, b = make_trainer(tmp_path / "a", steps=4), make_trainer(tmp_path / "b", steps=4)
    want = [a.train_step() for _ in range(3)]
    with torch.device("meta"):
        got = [b.train_step() for _ in range(3)]
    assert got == want


def test_pretrained_models_load_as_float32_under_a_float64_default(tmp_path):
    """The README: from_pretrained and from_diffusers give float32 models. Built in
    the default dtype, they were float64, and the Sampler refused them."""
    UNet.tiny(image_size=8, in_channels=1).save_pretrained(tmp_path / "ours")
    theirs = save_tiny_diffusers_pipeline(tmp_path / "pipeline", timesteps=10)
    x, t = torch.randn(2, 1, 8, 8, dtype=torch.float32), torch.tensor([3, 7])
    with torch.no_grad():
        want = {"ours": UNet.from_pretrained(tmp_path / "ours")(x, t), "diffusers": theirs(x, t).sample}
    with default_dtype(torch.float64):
        models = {
            "ours": UNet.from_pretrained(tmp_path / "ours"),
            "diffusers": UNet.from_diffusers(tmp_path / "pipeline" / "unet"),
        }
        with pytest.warns(UserWarning, match="records no noise schedule"):
            models["load_model"] = load_model(tmp_path / "ours")[0]
        for name, model in models.items():
            assert {p.dtype for p in model.parameters()} == {torch.float32} and not model.training, name
        with torch.no_grad():
            torch.testing.assert_close(models["ours"](x, t), want["ours"], rtol=0, atol=0)
            torch.testing.assert_close(models["diffusers"](x, t), want["diffusers"], rtol=1e-5, atol=1e-5)
        samples = Sampler(models["ours"], NoiseSchedule("linear", timesteps=5)).sample(1, seed=0, progress=False)
    assert samples.dtype == torch.float32


def test_loading_and_evaluating_under_another_default_device(tmp_path):
    """Models loaded under a meta default device came out on meta (from_diffusers,
    with only torch's no-op load warning) or failed (from_pretrained), and so did
    evaluate_bpd's sums and the grey conversion."""
    UNet.tiny(image_size=8, in_channels=1).save_pretrained(tmp_path / "ours")
    save_tiny_diffusers_pipeline(tmp_path / "pipeline", timesteps=10)
    model, data, schedule = UNet.from_pretrained(tmp_path / "ours"), toy_dataset(n=4), NoiseSchedule("linear", timesteps=5)
    kw = dict(n=4, batch_size=2, seed=0, progress=False)
    want = evaluate_bpd(model, data, schedule, **kw)
    rgb = torch.randint(0, 256, (2, 3, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.device("meta"):
        loaded = [UNet.from_pretrained(tmp_path / "ours"), UNet.from_diffusers(tmp_path / "pipeline" / "unet")]
        for each in loaded:
            assert {p.device.type for p in each.parameters()} == {"cpu"}
        got = evaluate_bpd(model, data, schedule, **kw)
        grey = _set_channels(rgb, 1)
    assert got["total"] == want["total"] and grey.device.type == "cpu"
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])
    with torch.no_grad():
        assert all(torch.isfinite(each(x, t)).all() for each in loaded)  # weights read, not left empty


def test_a_run_loads_as_float32_on_the_cpu_whatever_the_defaults(tmp_path):
    """load_model of a run's checkpoint built its U-Net in the default dtype and
    device (float64; meta), unlike from_pretrained and from_diffusers."""
    torch.manual_seed(0)
    trainer = Trainer(UNet.tiny(), toy_dataset(n=8), NoiseSchedule("linear", timesteps=10),
                      TrainConfig(steps=1, batch_size=4, warmup=0, checkpoint_every=1), tmp_path, device="cpu", progress=False)
    trainer.train(final_samples=False)
    want = [p.detach().clone() for p in load_model(tmp_path)[0].parameters()]
    with default_dtype(torch.float64):
        as_float64 = load_model(tmp_path)[0]
    with torch.device("meta"):
        as_meta = load_model(tmp_path)[0]
    for model in (as_float64, as_meta):
        assert {(p.dtype, p.device.type) for p in model.parameters()} == {(torch.float32, "cpu")}
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), want))


def test_weights_load_on_the_cpu_where_safetensors_follows_the_default_device(tmp_path, monkeypatch):
    """safetensors 0.4.0's load_file made its tensors on torch's default device
    (meta, under torch.device("meta")), whatever its device argument: simulated
    here, load_safetensors still returns the file's values on the CPU."""
    import safetensors.torch

    from ddpm_fast.models.serialization import load_safetensors

    want = {"w": torch.arange(6.0).reshape(2, 3)}
    safetensors.torch.save_file(want, tmp_path / "w.safetensors")
    read = safetensors.torch.load_file

    def load_as_0_4_0(path: str, device: str = "cpu") -> dict[str, torch.Tensor]:
        # torch.empty follows the default device; a copy into a meta tensor keeps no data.
        return {name: torch.empty(t.shape, dtype=t.dtype).copy_(t) for name, t in read(path, device).items()}

    monkeypatch.setattr(safetensors.torch, "load_file", load_as_0_4_0)
    with torch.device("meta"):
        got = load_safetensors(tmp_path / "w.safetensors")
    assert got["w"].device.type == "cpu" and torch.equal(got["w"], want["w"])


def test_the_demo_does_not_depend_on_the_default_dtype_or_device(tmp_path):
    """The demo built its U-Net in the default dtype, which the Trainer refused as
    float64; its initial weights must not depend on the default either."""
    kw = dict(steps=1, samples=2, sample_steps=2, progress=False)
    run_demo(tmp_path / "plain", **kw)
    with default_dtype(torch.float64):
        run_demo(tmp_path / "float64", **kw)
        assert torch.get_default_dtype() == torch.float64  # the caller's default, put back
    with torch.device("meta"):
        run_demo(tmp_path / "meta", **kw)
    want = np.load(tmp_path / "plain" / "samples.npz")["images"]
    for name in ("float64", "meta"):
        assert np.array_equal(np.load(tmp_path / name / "samples.npz")["images"], want), name


def test_grey_conversion_does_not_depend_on_the_default_dtype():
    """Luma weights in float64 rounded some pixels to the other level."""
    rgb = torch.randint(0, 256, (8, 3, 80, 80), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    want = _set_channels(rgb, 1)
    with default_dtype(torch.float64):
        assert torch.equal(_set_channels(rgb, 1), want)


def test_self_check_runs_under_a_float64_default():
    """`ddpm-fast info`'s self-check drew its inputs in the default dtype, which
    the ops refuse as float64."""
    with default_dtype(torch.float64):
        rows = _self_check(torch.device("cpu"))
    assert rows and not [row for row in rows if "MISMATCH" in row[2] or ("unavailable" in row[2] and row[1] == "cpu")]


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_backward_without_weight_does_not_depend_on_the_default_dtype(triton_split_path):
    """The split backward's stand-in weight was made in the default dtype: its
    float64 moments moved dx by an ulp."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, 7, generator=g, dtype=torch.float32)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float32)

    def dx() -> torch.Tensor:
        leaf = x.clone().requires_grad_()
        ops.group_norm_silu(leaf, 3, backend="triton").backward(dy)
        return leaf.grad

    want = dx()
    with default_dtype(torch.float64):
        assert torch.equal(dx(), want)


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_schedules_are_built_on_the_cpu_whatever_the_default_device(device):
    """Under a meta default device a schedule could not be built at all."""
    want = NoiseSchedule("cosine", timesteps=12)
    with torch.device(device):
        made = {
            "named": NoiseSchedule("cosine", timesteps=12),
            "betas": NoiseSchedule(betas=want.betas.tolist()),
            "respaced": want.respace([0, 5, 11]),
            "from_config": NoiseSchedule.from_config(want.respace([0, 5, 11]).config),
        }
        tables = [want.step_table("fixed_small"), want.step_table("ddim", eta=0.5), make_betas("linear", 10)]
        assert {t.device.type for t in tables} == {"cpu"}
        for name, schedule in made.items():
            assert {v.device.type for v in vars(schedule).values() if isinstance(v, torch.Tensor)} == {"cpu"}, name
    torch.testing.assert_close(made["named"].alphas_cumprod, want.alphas_cumprod, rtol=0, atol=0)
    torch.testing.assert_close(made["respaced"].alphas_cumprod, made["from_config"].alphas_cumprod, rtol=0, atol=0)
