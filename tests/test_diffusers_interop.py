"""diffusers interop: ``UNet.from_diffusers`` reproduces a ``UNet2DModel`` of the
DDPM layout (``google/ddpm-cifar10-32``'s config, narrower for speed) from an
instance or a saved folder, and ``patch_diffusers`` leaves a diffusers U-Net's
output unchanged."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import ddpm_fast  # noqa: E402
from conftest import requires_extension  # noqa: E402
from ddpm_fast.models import UNet  # noqa: E402
from ddpm_fast.nn import GroupNormSiLU  # noqa: E402

# google/ddpm-cifar10-32's UNet2DModel config.
CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
    norm_num_groups=32, attention_head_dim=None, act_fn="silu", time_embedding_type="positional",
)
NARROW = {**CIFAR10, "block_out_channels": (32, 64, 64, 64), "norm_num_groups": 8}
TOL = dict(rtol=1e-4, atol=1e-5)
TIMESTEPS = [0, 999, torch.tensor([0, 1, 500, 999])]


# A small UNet2DModel of the DDPM layout (1 x 8 x 8).
_DDPM_SMALL = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                   norm_num_groups=4, attention_head_dim=None, flip_sin_to_cos=False, freq_shift=1,
                   downsample_padding=0, norm_eps=1e-6)


def unet2d(**config) -> torch.nn.Module:
    """A UNet2DModel, or a skip where the installed diffusers has no such setting
    (0.20's takes no dropout, 0.21's no attn_norm_num_groups, 0.30's no time_embedding_dim)."""
    missing = sorted(set(config) - set(inspect.signature(diffusers.UNet2DModel.__init__).parameters))
    if missing:
        pytest.skip(f"diffusers {diffusers.__version__}'s UNet2DModel takes no {', '.join(missing)}")
    return diffusers.UNet2DModel(**config)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights (a fresh UNet2DModel zeroes nothing, but keeps GroupNorm at
    identity; randomise everything so that every tensor matters)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = p[0].numel() ** -0.5 if p.dim() > 1 else 0.2
            p.copy_(scale * torch.randn(p.shape, generator=gen))
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.add_(1.0)
    return model


@pytest.fixture(scope="module")
def narrow():
    return randomize(diffusers.UNet2DModel(**NARROW)).eval()


def _compare(ours: UNet, theirs, n: int = 4, seed: int = 0) -> None:
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for t in TIMESTEPS if n == 4 else [torch.tensor([321])]:
            expected = theirs(x, t).sample
            torch.testing.assert_close(ours(x, t), expected, **TOL)
    assert expected.abs().mean() > 0.1  # the comparison is not of near-zero outputs


@pytest.mark.parametrize("reference", [False, True], ids=["fused", "reference"])
def test_from_an_instance_reproduces_diffusers(narrow, reference):
    ours = UNet.from_diffusers(narrow, reference=reference).eval()
    assert ours.config == dict(
        in_channels=3, out_channels=3, image_size=32, ch=32, ch_mult=[1, 2, 2, 2], num_res_blocks=2,
        attn_resolutions=[16], dropout=0.0, num_groups=8, eps=1e-6,
    )
    _compare(ours, narrow)


def test_overrides_replace_the_configs_values(narrow):
    """dropout= to fine-tune a dropout-free model: Python's 'got multiple values
    for keyword argument' before."""
    ours = UNet.from_diffusers(narrow, dropout=0.1).eval()
    assert ours.config["dropout"] == 0.1
    _compare(ours, narrow)  # in eval mode dropout changes nothing


def test_the_configs_norm_eps_is_kept():
    """(Every other test uses diffusers' 1e-6, which a converter that ignored
    norm_eps would give anyway.)"""
    ours = UNet.from_diffusers(diffusers.UNet2DModel(**{**NARROW, "norm_eps": 1e-3}))
    assert ours.config["eps"] == 1e-3
    assert {m.eps for m in ours.modules() if isinstance(m, torch.nn.GroupNorm)} == {1e-3}


def test_from_a_saved_folder_and_a_pipeline_folder(narrow, tmp_path):
    narrow.save_pretrained(tmp_path / "unet")
    loaded = UNet.from_diffusers(tmp_path / "unet")
    assert not loaded.training  # eval mode, as diffusers' own from_pretrained
    _compare(loaded, narrow)
    _compare(UNet.from_diffusers(str(tmp_path)).eval(), narrow)  # <pipeline>/unet


def test_from_a_folder_with_deprecated_attention_names(narrow, tmp_path):
    from safetensors.torch import load_file, save_file

    narrow.save_pretrained(tmp_path, safe_serialization=True)  # (the default only since diffusers 0.18)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    renames = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    old = {}
    for key, value in load_file(path).items():
        for new_name, old_name in renames.items():
            key = key.replace(new_name, old_name)
        old[key] = value
    assert any("proj_attn" in k for k in old)
    save_file(old, path)
    _compare(UNet.from_diffusers(tmp_path).eval(), narrow)


def test_the_full_cifar10_config():
    theirs = randomize(diffusers.UNet2DModel(**CIFAR10)).eval()
    ours = UNet.from_diffusers(theirs).eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 35_746_307
    _compare(ours, theirs, n=1)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(flip_sin_to_cos=True), "flip_sin_to_cos"),
        (dict(freq_shift=0), "freq_shift"),
        (dict(downsample_padding=1), "downsample_padding"),
        (dict(attention_head_dim=8), "attention_head_dim"),
        (dict(resnet_time_scale_shift="scale_shift"), "resnet_time_scale_shift"),
        (dict(down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D")), "up_block_types"),
        (dict(block_out_channels=(32, 48, 64, 64)), "multiples"),
    ],
)
def test_other_layouts_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        UNet.from_diffusers(unet2d(**{**NARROW, **change}))


def test_bad_sources(tmp_path, narrow):
    with pytest.raises(TypeError, match="UNet2DModel"):
        UNet.from_diffusers(torch.nn.Linear(2, 2))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        UNet.from_diffusers(tmp_path / "nowhere")
    narrow.save_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
        UNet.from_diffusers(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        UNet.from_diffusers(tmp_path)


# ----------------------------------------------------------- patch_diffusers


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=requires_extension)])
def test_patch_diffusers_keeps_the_output(narrow, backend):
    patched = copy.deepcopy(narrow)
    keys = patched.state_dict().keys()
    params = list(patched.parameters())  # an optimizer built before patching keeps training them
    resnets = sum(type(m).__name__ == "ResnetBlock2D" for m in narrow.modules())
    assert ddpm_fast.patch_diffusers(patched, backend=backend) == 2 * resnets + 1
    assert ddpm_fast.patch_diffusers(patched, backend=backend) == 0  # already fused
    assert patched.state_dict().keys() == keys
    assert len(list(patched.parameters())) == len(params)
    assert all(a is b for a, b in zip(patched.parameters(), params))
    assert sum(isinstance(m, GroupNormSiLU) for m in patched.modules()) == 2 * resnets + 1
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for t in TIMESTEPS:
            torch.testing.assert_close(patched(x, t).sample, narrow(x, t).sample, **TOL)


def test_patch_diffusers_leaves_hooked_norms_alone(narrow):
    """A forward hook on a replaced norm stopped running."""
    patched = copy.deepcopy(narrow)
    calls = []
    first = next(m for m in patched.modules() if type(m).__name__ == "ResnetBlock2D")
    first.norm1.register_forward_hook(lambda *args: calls.append("norm1"))
    patched.conv_norm_out.register_forward_hook(lambda *args: calls.append("out"))
    resnets = sum(type(m).__name__ == "ResnetBlock2D" for m in narrow.modules())
    assert ddpm_fast.patch_diffusers(patched) == 2 * (resnets - 1)
    x, t = torch.randn(2, 3, 32, 32), TIMESTEPS[0]
    with torch.no_grad():
        torch.testing.assert_close(patched(x, t).sample, narrow(x, t).sample, **TOL)
    assert calls == ["norm1", "out"]


def test_patch_diffusers_takes_norms_frozen_as_buffers_and_keeps_the_mode(narrow):
    """A norm2 whose weights are buffers (frozen; diffusers' output is the same)
    made the patch raise after the block's norm1 was fused: under diffusers'
    forward, SiLU then ran twice, silently. The output's SiLU slot kept
    training mode in an eval model."""
    patched = copy.deepcopy(narrow).eval()
    block = next(m for m in patched.modules() if type(m).__name__ == "ResnetBlock2D")
    weight, bias = block.norm2.weight.detach().clone(), block.norm2.bias.detach().clone()
    del block.norm2.weight, block.norm2.bias
    block.norm2.register_buffer("weight", weight)
    block.norm2.register_buffer("bias", bias)
    x, t = torch.randn(2, 3, 32, 32), TIMESTEPS[0]
    with torch.no_grad():
        before = patched(x, t).sample
    resnets = sum(type(m).__name__ == "ResnetBlock2D" for m in narrow.modules())
    assert ddpm_fast.patch_diffusers(patched) == 2 * resnets + 1
    assert block.norm2.weight is weight and not any(m.training for m in patched.modules())
    with torch.no_grad():
        torch.testing.assert_close(patched(x, t).sample, before, **TOL)


def test_patch_diffusers_that_fails_leaves_the_model_as_it_was(narrow):
    patched = copy.deepcopy(narrow)
    blocks = [m for m in patched.modules() if type(m).__name__ == "ResnetBlock2D"]
    del blocks[-1].norm2.weight
    blocks[-1].norm2.weight = 1.0  # a plain attribute: no GroupNormSiLU can hold it
    with pytest.raises(TypeError, match="weight is neither a parameter nor a buffer"):
        ddpm_fast.patch_diffusers(patched)
    assert all(type(b).__name__ == "ResnetBlock2D" and type(b.norm1) is torch.nn.GroupNorm for b in blocks)
    assert type(patched.conv_norm_out) is torch.nn.GroupNorm and type(patched.conv_act) is torch.nn.SiLU


def test_a_patched_model_pickles(narrow):
    import io

    patched = copy.deepcopy(narrow)
    ddpm_fast.patch_diffusers(patched, backend="reference")
    buffer = io.BytesIO()
    torch.save(patched, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 5).sample, patched(x, 5).sample, rtol=0, atol=0)


@requires_extension
def test_patched_diffusers_trains_like_the_original(narrow):
    patched = copy.deepcopy(narrow).train()
    ddpm_fast.patch_diffusers(patched, backend="cpu")
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 700])
    grads = []
    for model in (copy.deepcopy(narrow).train(), patched):
        model(x, t).sample.square().mean().backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_image_size_override_replaces_sample_size_and_moves_the_attention():
    """from_diffusers(..., image_size=) was refused for a config without
    sample_size (the case it is for), and with one its attention resolution was
    the config size's: 8 px with attention at 4 became 16 px asking for 4."""
    small = {k: v for k, v in _DDPM_SMALL.items() if k != "sample_size"}
    for sample_size in (None, 8):
        theirs = randomize(diffusers.UNet2DModel(sample_size=sample_size, **small), seed=1).eval()
        ours = UNet.from_diffusers(theirs, image_size=16)
        assert ours.config["image_size"] == 16 and ours.config["attn_resolutions"] == [8]
        x, t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2)), torch.tensor([3, 700])
        with torch.no_grad():
            torch.testing.assert_close(ours(x, t), theirs(x, t).sample, **TOL)
    with pytest.raises(ValueError, match=r"sample_size=None \(need one square image size: pass UNet.from_diffusers\(..., image_size=N\), or set sample_size in its config.json\)"):
        UNet.from_diffusers(diffusers.UNet2DModel(sample_size=None, **small))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(center_input_sample=True), "center_input_sample"),  # 2x-1 on the input, which we do not do
        (dict(attn_norm_num_groups=4), "attn_norm_num_groups"),  # other groups in the attention norms
        (dict(time_embedding_dim=256), "time_embedding_dim"),  # a wider time embedding than 4 ch
        (dict(sample_size=(32, 16)), "sample_size"),  # not square
        # one 64-wide head at 64 channels, but two in the 128-channel mid block
        (dict(block_out_channels=(32, 64, 64, 128), attention_head_dim=64), "attention_head_dim"),
    ],
)
def test_more_layouts_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        UNet.from_diffusers(unet2d(**{**NARROW, **change}))


# Why: a config.json with block_out_channels [] (an IndexError) or [0] (a
# ZeroDivisionError) gave the command line a traceback, not its one-line error.
@pytest.mark.parametrize("channels", [[], [0], [32, 0], None, [32.5]])
def test_a_config_with_unusable_block_out_channels_is_refused(channels):
    from ddpm_fast.models.diffusers_interop import diffusers_config_to_kwargs

    with pytest.raises(ValueError, match=r"not a DDPM UNet2DModel .*: block_out_channels=.* \(need a non-empty list of "
                                         r"positive ints\)"):
        diffusers_config_to_kwargs({**NARROW, "block_out_channels": channels})


def test_a_folder_with_extra_weights_is_refused(narrow, tmp_path):
    """Weights of a layer the DDPM U-Net lacks (a class embedding) were dropped silently."""
    from safetensors.torch import load_file, save_file

    narrow.save_pretrained(tmp_path, safe_serialization=True)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({**load_file(path), "class_embedding.weight": torch.zeros(10, 128)}, path)
    with pytest.raises(ValueError, match=r"\['class_embedding.weight'\] \(1 in all\) have no place"):
        UNet.from_diffusers(tmp_path)


def _resnet_block_and_input(**variant):
    from diffusers.models.resnet import ResnetBlock2D

    block = randomize(ResnetBlock2D(**{"in_channels": 8, "temb_channels": 12, "groups": 4, **variant}), seed=3).eval()
    gen = torch.Generator().manual_seed(4)
    return block, torch.randn(2, 8, 6, 6, generator=gen), torch.randn(2, 12, generator=gen)


@pytest.mark.parametrize("variant, fused_norms", [
    (dict(output_scale_factor=2.0), 2),  # the (x + h) / output_scale_factor was dropped
    (dict(skip_time_act=True), 2),  # the time embedding went through SiLU anyway
    (dict(out_channels=16), 2),  # a width change: through conv_shortcut
    (dict(time_embedding_norm="scale_shift"), 0),  # another computation: left alone
    (dict(down=True), 0),  # resampling between norm1 and conv1: left alone
    (dict(up=True), 0),  # likewise (patching it dropped the upsampling: 4x4 out of 8x8)
], ids=["output_scale", "skip_time_act", "shortcut", "scale_shift", "down", "up"])
def test_patch_diffusers_keeps_each_resnet_block_variants_output(variant, fused_norms):
    """Every block of a UNet2DModel of the DDPM layout has scale 1, time act
    and default norm, so the U-Net-level comparisons cannot see these settings."""
    block, x, temb = _resnet_block_and_input(**variant)
    patched = copy.deepcopy(block)
    assert ddpm_fast.patch_diffusers(patched, backend="reference") == fused_norms
    with torch.no_grad():
        torch.testing.assert_close(patched(x, temb), block(x, temb), **TOL)


def test_a_patched_block_of_a_diffusers_without_skip_time_act_keeps_its_output():
    """diffusers before 0.15 had no skip_time_act (the time embedding always went
    through the SiLU): a patched block failed on its first call with an AttributeError."""
    block, x, temb = _resnet_block_and_input()
    patched = copy.deepcopy(block)
    assert ddpm_fast.patch_diffusers(patched, backend="reference") == 2
    del patched.skip_time_act
    with torch.no_grad():
        torch.testing.assert_close(patched(x, temb), block(x, temb), **TOL)


def test_a_patched_block_takes_a_lora_scale_as_this_diffusers_does():
    """diffusers 0.21 to 0.26 hand a block's LoRA scale (``block(x, temb, scale)``)
    to its LoRA-compatible convolutions and linear layer: the patched forward
    dropped it, so a LoRA ran at full strength whatever the scale asked. Later
    diffusers ignore the scale, as the patched block must then too. (CI's
    diffusers has no LoRA-compatible layers; BENCHMARKS.md records this test on
    0.21 to 0.26.)"""
    block, x, temb = _resnet_block_and_input(out_channels=16)  # with conv_shortcut
    lora = hasattr(block.conv1, "set_lora_layer")  # LoRA-compatible layers: diffusers 0.20 to 0.26 (without peft)
    if lora:
        from diffusers.models.lora import LoRAConv2dLayer, LoRALinearLayer

        for conv, kernel, padding in ((block.conv1, 3, 1), (block.conv2, 3, 1), (block.conv_shortcut, 1, 0)):
            conv.set_lora_layer(LoRAConv2dLayer(conv.in_channels, conv.out_channels, rank=2, kernel_size=kernel, padding=padding))
        block.time_emb_proj.set_lora_layer(LoRALinearLayer(12, 16, rank=2))
        randomize(block, seed=5)  # (a LoRA's up weights start at zero)
    patched = copy.deepcopy(block)
    assert ddpm_fast.patch_diffusers(patched, backend="reference") == 2
    takes_scale = len(inspect.signature(type(block).forward).parameters) > 3  # (0.20's takes none)
    calls = [lambda m: m(x, temb)]
    if takes_scale:
        calls += [lambda m: m(x, temb, 0.5), lambda m: m(x, temb, scale=0.5)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # newer diffusers: "the scale argument is deprecated"
        for call in calls:
            torch.testing.assert_close(call(patched), call(block), **TOL)
        if lora and takes_scale:  # and the scale did something here
            assert not torch.allclose(block(x, temb, 0.5), block(x, temb), **TOL)


def test_patch_diffusers_gives_every_fused_norm_the_backend_asked_for():
    theirs = randomize(diffusers.UNet2DModel(**_DDPM_SMALL), seed=2)
    assert ddpm_fast.patch_diffusers(theirs, backend="reference") > 0
    assert {m.backend for m in theirs.modules() if isinstance(m, GroupNormSiLU)} == {"reference"}
    with pytest.raises(ValueError, match="backend must be one of"):  # also where there is nothing to fuse
        ddpm_fast.patch_diffusers(torch.nn.Linear(2, 2), backend="tritonn")


def test_from_diffusers_keeps_out_channels_and_dropout():
    """Every other test had in == out channels and dropout 0: out_channels read
    from in_channels, or a dropout left behind, passed unseen."""
    theirs = randomize(unet2d(**{**_DDPM_SMALL, "out_channels": 2, "dropout": 0.1}), seed=5).eval()
    ours = UNet.from_diffusers(theirs)
    assert ours.config["out_channels"] == 2 and ours.config["dropout"] == 0.1
    assert {m.p for m in ours.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 7])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), theirs(x, t).sample, **TOL)


class _Payload:
    """Pickled into a .bin: loading it with weights_only=False would create the file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_bin_file_is_loaded_without_running_its_pickle(tmp_path):
    theirs = diffusers.UNet2DModel(**_DDPM_SMALL)
    theirs.save_pretrained(tmp_path, safe_serialization=False)
    ran = tmp_path / "payload-ran"
    torch.save({"payload": _Payload(str(ran))}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="is not a readable PyTorch weights file"):
        UNet.from_diffusers(tmp_path)
    assert not ran.exists()
