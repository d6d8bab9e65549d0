"""The models package where its other tests could not see a change (each test
failed on a mutant that every test of test_unet, test_unet_structure,
test_diffusers_interop and test_pretrained passed): the config's copies, the
tiny preset's settings, gradients by finite differences, clear errors for odd
inputs, the diffusers settings that keep the weights but change the output, and
patch_diffusers on a block without a time projection. (The loaders' float32
CPU models whatever torch's defaults are test_global_defaults'.)"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from ddpm_fast.models import UNet
from test_unet import MINI, inputs, randomize


# ------------------------------------------------------------------ the UNet


def test_the_config_is_a_copy():
    """model.config hands out a copy: editing it (as a caller building another
    run's config does) must not change the model's own, which save_pretrained writes."""
    model = UNet(**MINI)
    config = model.config
    config["ch_mult"].append(4)
    config["attn_resolutions"].clear()
    config["ch"] = 99
    assert model.config["ch_mult"] == [1, 2] and model.config["attn_resolutions"] == [4] and model.config["ch"] == 16


def test_the_tiny_preset_has_groups_of_four_and_no_dropout():
    """Its docstring: groups of 4 channels, no dropout (the parameter count, the
    only other check of the preset, sees neither)."""
    config = UNet.tiny().config
    assert (config["num_groups"], config["dropout"], config["eps"]) == (4, 0.0, 1e-6)
    assert {m.p for m in UNet.tiny().modules() if isinstance(m, torch.nn.Dropout)} == {0.0}


@pytest.mark.parametrize("reference", [False, True], ids=["fused", "reference"])
def test_every_norm_takes_the_eps_asked_for(reference):
    """eps reaches every GroupNorm of either path (a reference path on
    nn.GroupNorm's default 1e-5 shows only as a small numeric difference)."""
    model = UNet(**{**MINI, "eps": 1e-2}, reference=reference)
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.GroupNorm)} == {1e-2}


def test_parameter_gradients_match_finite_differences():
    """A directional derivative over every parameter at once, in float64, on
    the reference path: a gradient lost on a path both model paths share (the
    time embedding's through the down path's ResBlocks: temb.detach()) passed
    the fused-vs-reference gradient comparison and the gradcheck in x."""
    model = randomize(UNet(**MINI, reference=True)).double().eval()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=gen)
    t, target = torch.tensor([5, 700]), torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=gen)
    params = dict(model.named_parameters())
    direction = {k: torch.randn(p.shape, dtype=torch.float64, generator=gen) for k, p in params.items()}

    def loss(names=(), step: float = 0.0) -> torch.Tensor:
        shifted = {k: p + step * direction[k] if k in names else p for k, p in params.items()}
        return ((torch.func.functional_call(model, shifted, (x, t)) - target) ** 2).mean()

    grads = dict(zip(params, torch.autograd.grad(loss(), list(params.values()))))
    for names in (list(params), [k for k in params if k.startswith("temb.")]):
        analytic = sum((grads[k] * direction[k]).sum() for k in names)
        with torch.no_grad():
            numeric = (loss(names, 1e-6) - loss(names, -1e-6)) / 2e-6
        torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8)


def test_a_scalar_float_tensor_timestep_is_not_truncated():
    """A 0-dim float tensor t means what the Python float does (the existing
    check covers the float and the (N,) tensor, not the scalar tensor)."""
    model = randomize(UNet(**MINI)).eval()
    x, _ = inputs()
    with torch.no_grad():
        got = model(x, torch.tensor(2.5))
        assert torch.equal(got, model(x, 2.5))
        assert not torch.equal(got, model(x, torch.tensor(2)))


def test_a_two_channel_base_width_is_refused():
    """ch=2 gives a sinusoidal embedding of one frequency, f = 10000^(-0/0): NaN everywhere."""
    with pytest.raises(ValueError, match="even and >= 4"):
        UNet(**{**MINI, "ch": 2, "num_groups": 1})


# ------------------------------------------------------------ save and load


def test_odd_map_locations_and_configs_fail_clearly(tmp_path):
    UNet(**MINI).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="onto None: not a device"):  # a TypeError inside torch.device
        UNet.from_pretrained(tmp_path, map_location=None)
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="must hold a JSON object, got list"):
        UNet.from_pretrained(tmp_path)


# ------------------------------------------------------------------ diffusers


diffusers_tests = pytest.mark.skipif(
    not __import__("importlib").util.find_spec("diffusers"), reason="diffusers missing"
)


def _small(**change):
    from test_diffusers_interop import _DDPM_SMALL, unet2d

    return unet2d(**{**_DDPM_SMALL, **change})


@diffusers_tests
@pytest.mark.parametrize("change, match", [
    # the same weights, another output: converted silently, they would give wrong noise predictions
    (dict(mid_block_scale_factor=2), "mid_block_scale_factor"),
    (dict(act_fn="gelu"), "act_fn"),
    (dict(act_fn="mish"), "act_fn"),
    # other layers: refused naming the setting, not as a weights mismatch
    (dict(class_embed_type="timestep"), "class_embed_type"),
    (dict(num_class_embeds=10), "num_class_embeds"),
    (dict(upsample_type="resnet"), "upsample_type"),
    (dict(downsample_type="resnet"), "downsample_type"),
    (dict(time_embedding_dim=16), "time_embedding_dim"),  # 2 ch, not 4 ch
])
def test_diffusers_settings_outside_the_ddpm_layout_are_named(change, match):
    with pytest.raises(ValueError, match=f"not a DDPM UNet2DModel.*{match}"):
        UNet.from_diffusers(_small(**change))


def test_a_config_with_fewer_block_types_than_widths_is_refused():
    """(diffusers' own constructor refuses it, so only a hand-written config.json reaches us.)"""
    from ddpm_fast.models.diffusers_interop import diffusers_config_to_kwargs

    config = dict(sample_size=8, block_out_channels=[8, 16], down_block_types=["DownBlock2D"],
                  up_block_types=["UpBlock2D"], flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
                  attention_head_dim=None)
    with pytest.raises(ValueError, match=r"down_block_types=\['DownBlock2D'\] \(need 2 of"):
        diffusers_config_to_kwargs(config)


@diffusers_tests
def test_from_diffusers_refuses_another_model_class_by_name(tmp_path):
    _small().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="holds a UNet2DConditionModel, not a UNet2DModel"):
        UNet.from_diffusers(tmp_path)


@diffusers_tests
def test_patch_diffusers_keeps_a_block_without_time_projection():
    """temb_channels=None: diffusers adds temb itself (here (N, C, 1, 1)); the
    fused forward must add it too."""
    import ddpm_fast
    from diffusers.models.resnet import ResnetBlock2D

    block = randomize(ResnetBlock2D(in_channels=8, temb_channels=None, groups=4), seed=3).eval()
    patched = copy.deepcopy(block)
    assert ddpm_fast.patch_diffusers(patched, backend="reference") == 2
    gen = torch.Generator().manual_seed(4)
    x, temb = torch.randn(2, 8, 6, 6, generator=gen), torch.randn(2, 8, 1, 1, generator=gen)
    with torch.no_grad():
        expected = block(x, temb)
        torch.testing.assert_close(patched(x, temb), expected, rtol=1e-4, atol=1e-5)
        assert (expected - block(x, None)).abs().max() > 0.1  # the add matters


@diffusers_tests
def test_patch_diffusers_leaves_a_block_with_a_group_norm_subclass_alone():
    """A subclass may compute something else: the block keeps it (and its output)."""
    import ddpm_fast
    from diffusers.models.resnet import ResnetBlock2D

    class Doubled(torch.nn.GroupNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    block = randomize(ResnetBlock2D(in_channels=8, temb_channels=12, groups=4), seed=3).eval()
    doubled = Doubled(4, 8, eps=block.norm1.eps)
    doubled.load_state_dict(block.norm1.state_dict())
    block.norm1 = doubled
    patched = copy.deepcopy(block)
    assert ddpm_fast.patch_diffusers(patched, backend="reference") == 0
    assert type(patched.norm1) is Doubled
    gen = torch.Generator().manual_seed(4)
    x, temb = torch.randn(2, 8, 6, 6, generator=gen), torch.randn(2, 12, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(patched(x, temb), block(x, temb), rtol=1e-4, atol=1e-5)
