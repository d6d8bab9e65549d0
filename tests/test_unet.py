"""The DDPM U-Net: the paper's parameter count, the fused path against the
plain-PyTorch reference path (outputs and gradients, every local backend),
memory formats and dtypes, save/load, argument checks, the Sampler on it, and
torch.compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import requires_extension
from ddpm_fast import NoiseSchedule, Sampler
from ddpm_fast.models import UNet
from ddpm_fast.models import serialization
from ddpm_fast.nn import GroupNormSiLU
from ddpm_fast.ops._backend import triton_available

# Two levels (8x8, 4x4), attention at 4x4, groups of 4 channels: every kind of
# block at a fraction of a millisecond per call.
MINI = dict(in_channels=3, image_size=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4, dropout=0.0)
FP32 = dict(rtol=1e-4, atol=1e-5)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights far from the init (which zeroes each residual branch's last layer)
    so that every block changes the output; activations stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.add_(1.0)  # GroupNorm scales around 1
    return model


def pair(backend: str = "auto", seed: int = 0, **config) -> tuple[UNet, UNet]:
    """(fused, reference) models with the same random weights."""
    config = {**MINI, **config}
    fused = randomize(UNet(**config, backend=backend), seed).eval()
    reference = UNet(**config, reference=True).eval()
    reference.load_state_dict(fused.state_dict())
    return fused, reference


def inputs(n: int = 4, config=MINI, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, config["in_channels"], config["image_size"], config["image_size"], generator=gen)
    return x, torch.randint(0, 1000, (n,), generator=gen)


# ------------------------------------------------------------------ structure


def test_ddpm_cifar10_has_the_papers_parameter_count_and_runs():
    model = UNet.ddpm_cifar10()
    assert sum(p.numel() for p in model.parameters()) == 35_746_307
    assert model.config == dict(
        in_channels=3, out_channels=3, image_size=32, ch=128, ch_mult=[1, 2, 2, 2], num_res_blocks=2,
        attn_resolutions=[16], dropout=0.1, num_groups=32, eps=1e-6,
    )
    with torch.no_grad():
        out = randomize(model).eval()(torch.randn(1, 3, 32, 32), torch.tensor([999]))
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_every_group_norm_with_silu_is_fused():
    fused, reference = pair()
    norms = [m for m in fused.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(isinstance(m, GroupNormSiLU) for m in norms)
    assert sum(not m.act for m in norms) == 4  # attention: 1 down + 1 mid + 2 up (at 4x4)
    assert not any(isinstance(m, GroupNormSiLU) for m in reference.modules())
    assert fused.state_dict().keys() == reference.state_dict().keys()


@pytest.mark.parametrize("preset", ["tiny", "small", "ddpm_cifar10"])
def test_presets_and_configs_round_trip(preset):
    model = getattr(UNet, preset)()
    config = json.loads(json.dumps(model.config))  # plain JSON
    again = UNet.from_config(config)
    assert again.config == model.config
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert model.in_channels == config["in_channels"] and model.image_size == config["image_size"]


def test_preset_overrides():
    model = UNet.tiny(image_size=16, in_channels=3, dropout=0.2)
    assert (model.image_size, model.in_channels, model.config["dropout"]) == (16, 3, 0.2)
    assert model.config["attn_resolutions"] == [8]
    assert UNet.small(image_size=64).config["attn_resolutions"] == [32]
    assert UNet.ddpm_cifar10(dropout=0.0, backend="reference").backend == "reference"


def test_init_starts_each_residual_branch_near_zero():
    model = UNet(**MINI)
    assert model.conv_out.weight.abs().max() < 1e-4
    assert model.down[0].res[0].conv2.weight.abs().max() < 1e-4
    assert model.mid.attn.proj_out.weight.abs().max() < 1e-4
    assert model.conv_in.weight.abs().max() > 0.05 and model.conv_in.bias.abs().max() == 0


# ------------------------------------------------------ fused against reference


def _backend_cases():
    cases = [pytest.param("reference", id="reference")]
    cases.append(pytest.param("cpu", id="cpu", marks=requires_extension))
    return cases


@pytest.mark.parametrize("backend", _backend_cases())
def test_fused_path_matches_reference_path(backend):
    fused, reference = pair(backend)
    x, t = inputs()
    with torch.no_grad():
        expected = reference(x, t)
        torch.testing.assert_close(fused(x, t), expected, **FP32)
        # scalar timesteps broadcast over the batch
        torch.testing.assert_close(fused(x, 7), reference(x, torch.full((4,), 7)), **FP32)
        torch.testing.assert_close(fused(x, torch.tensor(7)), fused(x, 7), rtol=0, atol=0)
        torch.testing.assert_close(fused(x, torch.tensor(2.5)), fused(x, 2.5), rtol=0, atol=0)  # a float t too
    assert expected.abs().mean() > 0.1  # the weights make the comparison meaningful


@pytest.mark.skipif(not triton_available(), reason="triton missing")
def test_triton_backend_matches_reference_on_a_micro_model():
    # Triton runs in its interpreter here: a model of 8 channels at 4x4.
    fused, reference = pair("triton", in_channels=1, image_size=4, ch=8, num_groups=2, attn_resolutions=(2,))
    x, t = torch.randn(2, 1, 4, 4), torch.tensor([3, 900])
    with torch.no_grad():
        torch.testing.assert_close(fused(x, t), reference(x, t), **FP32)


@pytest.mark.parametrize("backend", _backend_cases())
def test_gradients_match_reference_path(backend):
    fused, reference = pair(backend)
    x, t = inputs()
    target = torch.randn_like(x)
    grads = []
    for model in (fused, reference):
        model.zero_grad()
        xg = x.clone().requires_grad_(True)
        ((model(xg, t) - target) ** 2).mean().backward()
        grads.append({"x": xg.grad, **{k: p.grad for k, p in model.named_parameters()}})
    assert all(g is not None for g in grads[0].values())
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@requires_extension
def test_channels_last_gives_the_same_output():
    fused, _ = pair("cpu")
    x, t = inputs()
    with torch.no_grad():
        expected = fused(x, t)
        fused.to(memory_format=torch.channels_last)
        out = fused(x.to(memory_format=torch.channels_last), t)
        torch.testing.assert_close(out, expected, **FP32)
        torch.testing.assert_close(fused(x, t), expected, **FP32)  # NCHW input to a channels_last model


@pytest.mark.parametrize("reference_path", [False, True], ids=["fused", "reference"])
def test_bfloat16_model_is_close_to_float32(reference_path):
    fused, reference = pair()
    model = reference if reference_path else fused
    x, t = inputs()
    with torch.no_grad():
        expected = model(x, t)
        model.to(torch.bfloat16)
        out = model(x.bfloat16(), t)
        out_cl = model.to(memory_format=torch.channels_last)(x.bfloat16().to(memory_format=torch.channels_last), t)
        out_from_fp32 = model(x, t)  # float32 input: cast in, float32 out
    assert out.dtype == out_cl.dtype == torch.bfloat16 and out_from_fp32.dtype == torch.float32
    scale = expected.abs().max()
    for got in (out, out_cl, out_from_fp32):
        assert (got.float() - expected).abs().max() < 0.05 * scale


def test_autocast_runs_and_keeps_the_input_dtype():
    fused, _ = pair()
    x, t = inputs()
    with torch.no_grad():
        expected = fused(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fused(x, t)
    assert out.dtype == torch.float32
    assert (out - expected).abs().max() < 0.05 * expected.abs().max()


def test_dropout_only_in_training():
    model = randomize(UNet(**{**MINI, "dropout": 0.5}))
    x, t = inputs()
    with torch.no_grad():
        assert not torch.equal(model.train()(x, t), model(x, t))
        assert torch.equal(model.eval()(x, t), model(x, t))


# -------------------------------------------------------------- save and load


def test_save_and_load_round_trip_exactly(tmp_path):
    model, _ = pair()
    model.to(memory_format=torch.channels_last)  # non-contiguous weights must save too
    model.save_pretrained(tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "m" / "config.json").read_text()) == model.config
    loaded = UNet.from_pretrained(tmp_path / "m")
    assert not loaded.training  # eval mode, as diffusers' from_pretrained: dropout off
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    loaded.to(memory_format=torch.channels_last)  # the same conv algorithms as the original
    x, t = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t), model(x, t))
        reference = UNet.from_pretrained(tmp_path / "m", reference=True)
        torch.testing.assert_close(reference(x, t), model(x, t), **FP32)
    assert reference.reference and not loaded.reference


def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    model, _ = pair()
    model.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def killed(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(serialization.os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        randomize(model, seed=5).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # no temporary left


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        UNet.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        UNet.from_pretrained(tmp_path)
    UNet(**MINI).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="ema.safetensors"):
        UNet.from_pretrained(tmp_path, weights="ema.safetensors")
    with pytest.raises(ValueError, match=r"does not match the model: missing: down\.0\.res\.1"):
        UNet.from_pretrained(tmp_path, num_res_blocks=2)  # mismatched architectures
    with pytest.raises(ValueError, match=r"shape mismatch \(file vs model\): conv_in.bias: \(16,\) vs \(32,\)"):
        UNet.from_pretrained(tmp_path, ch=32)
    # a good file onto a bad or missing device: an error about the device, not "unreadable file"
    with pytest.raises(ValueError, match="onto 'bogus': not a device"):
        UNet.from_pretrained(tmp_path, map_location="bogus")
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, AssertionError)) as missing:
            UNet.from_pretrained(tmp_path, map_location="cuda")
        assert "safetensors" not in str(missing.value)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        UNet.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        UNet.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="from_diffusers"):
        UNet.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unknown keys"):
        UNet.from_config({"channels": 3})


def test_integer_weights_for_float_parameters_are_refused(tmp_path):
    """load_state_dict would cast them silently."""
    from safetensors.torch import load_file, save_file

    UNet(**MINI).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["conv_in.bias"] = torch.zeros(16, dtype=torch.int64)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"\['conv_in.bias'\] are not floating point"):
        UNet.from_pretrained(tmp_path)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(ch=24, num_groups=16), "divisible by num_groups"),
        (dict(image_size=10, ch_mult=(1, 2, 2)), "divisible by 2"),
        (dict(ch_mult=()), "at least one level"),
        (dict(ch_mult=(1, 0)), r"ch_mult\[1\]"),
        (dict(attn_resolutions=(16,)), "not among the model's resolutions"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(dropout=1.0), "dropout"),
        (dict(eps=0.0), "eps"),
        (dict(eps=float("inf")), "eps must be a finite number > 0, got inf"),  # zeroed every output; config "Infinity"
        (dict(ch=5, num_groups=5), "even"),
        (dict(in_channels=0), "in_channels"),
        (dict(image_size=2.5), "image_size"),
        (dict(backend="gpu"), "backend"),
        (dict(image_size=2, ch_mult=(1, 1), num_groups=16, attn_resolutions=()), "single value"),
        # the first ResBlock of the 1x1 level takes the 2x2 level's 32 channels: groups of one value
        # (accepted, and every forward failed)
        (dict(image_size=4, ch=32, ch_mult=(1, 1, 2), num_groups=32, attn_resolutions=()), "single value"),
        # level 0's first ResBlock normalizes conv_in's ch channels, not ch * ch_mult[0] (accepted;
        # the fused path refused every forward, the reference path ran)
        (dict(image_size=1, ch=4, ch_mult=(2,), num_res_blocks=1, num_groups=4, attn_resolutions=()), "single value"),
    ],
)
def test_bad_constructor_arguments(change, match):
    with pytest.raises(ValueError, match=match):
        UNet(**{**MINI, **change})


@pytest.mark.parametrize("preset", [UNet.tiny, UNet.small])
@pytest.mark.parametrize("image_size, match", [
    ((8, 8), r"image_size must be a positive int, got \(8, 8\)"),  # was a TypeError from image_size // 2
    (1, r"image_size \(1\) must be divisible"),  # named attn_resolutions[0], an argument never given
])
def test_presets_name_a_bad_image_size(preset, image_size, match):
    with pytest.raises(ValueError, match=match):
        preset(image_size=image_size)


def test_bad_forward_inputs():
    model = UNet(**MINI)
    x, t = inputs()
    with pytest.raises(ValueError, match=r"shape \(N, 3, 8, 8\)"):
        model(x[:, :2], t)
    with pytest.raises(ValueError, match=r"shape \(N, 3, 8, 8\)"):
        model(torch.randn(4, 3, 16, 16), t)
    with pytest.raises(ValueError, match=r"shape \(N, 3, 8, 8\)"):
        model(x[0], t)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        model(x, t[:3])
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        model(x, t[:, None])
    with pytest.raises(TypeError, match="bool"):
        model(x, True)
    with pytest.raises(TypeError, match="floating point"):
        model(x.long(), t)
    with pytest.raises(TypeError, match="torch.Tensor"):
        model(x.numpy(), t)


def test_sampler_runs_end_to_end_on_the_tiny_preset():
    model = randomize(UNet.tiny()).eval()
    sampler = Sampler(model, NoiseSchedule("linear", timesteps=20))
    samples = sampler.sample(3, seed=0, progress=False)
    assert samples.shape == (3, 1, 8, 8) and torch.isfinite(samples).all()
    # the same noise stream; the network itself is batch-independent up to float rounding
    torch.testing.assert_close(sampler.sample(1, seed=0, first_sample=2, progress=False)[0], samples[2], **FP32)


def test_sampler_warns_when_dropout_is_on():
    """A model left in training mode samples with dropout: its samples are not
    reproducible from the seed, so sample() says so; eval mode, or a model
    without dropout, samples silently."""
    schedule = NoiseSchedule("linear", timesteps=3)
    with_dropout = randomize(UNet.tiny(dropout=0.3))
    assert with_dropout.training
    with pytest.warns(RuntimeWarning, match="active dropout .a dropout module in training mode.*model.eval"):
        Sampler(with_dropout, schedule).sample(1, seed=0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Sampler(with_dropout.eval(), schedule).sample(1, seed=0, progress=False)
        Sampler(randomize(UNet.tiny(dropout=0.0)).train(), schedule).sample(1, seed=0, progress=False)


# ------------------------------------------------------------- torch.compile


@requires_extension
def test_torch_compile_fullgraph_traces_forward_and_backward():
    fused, _ = pair("cpu")
    x, t = inputs(2)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    out = compiled(x, t)
    torch.testing.assert_close(out, fused(x, t), **FP32)
    out.square().mean().backward()
    assert all(p.grad is not None for p in fused.parameters())


@pytest.mark.slow
@requires_extension
def test_torch_compile_inductor_on_the_tiny_preset():
    model = randomize(UNet.tiny(backend="cpu")).eval()
    x, t = torch.randn(8, 1, 8, 8), torch.randint(0, 1000, (8,))
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x, t), model(x, t), **FP32)


@pytest.mark.slow
@requires_extension
def test_torch_compile_inductor_differentiates_the_tiny_preset():
    """What TrainConfig(compile=True) runs: inductor's forward and backward
    around our ops (channels_last, as the Trainer's default), against eager."""
    model = randomize(UNet.tiny(backend="cpu")).train().to(memory_format=torch.channels_last)
    x, t = torch.randn(8, 1, 8, 8), torch.randint(0, 1000, (8,))
    grads = []
    for run in (model, torch.compile(model, fullgraph=True)):
        torch.manual_seed(0)  # the same dropout masks, if the preset draws any
        loss = run(x, t).square().mean()
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ imports


def test_import_does_not_import_diffusers():
    code = "import sys, ddpm_fast; ddpm_fast.patch_diffusers; ddpm_fast.models.UNet; assert 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_patch_diffusers_without_diffusers_says_what_to_install(monkeypatch):
    import ddpm_fast

    monkeypatch.setitem(sys.modules, "diffusers", None)
    monkeypatch.setitem(sys.modules, "diffusers.models", None)
    monkeypatch.setitem(sys.modules, "diffusers.models.resnet", None)
    with pytest.raises(ImportError, match="pip install diffusers"):
        ddpm_fast.patch_diffusers(torch.nn.Linear(2, 2))
