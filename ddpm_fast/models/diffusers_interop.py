"""Interop with diffusers (optional: nothing here imports it at module load).

- ``from_diffusers``: a diffusers ``UNet2DModel`` of the DDPM layout (an
  instance, or its ``save_pretrained`` folder; a folder needs no diffusers
  install) -> our ``UNet``, through an explicit key map and a strict load.
- ``patch_diffusers``: fuse GroupNorm+SiLU (and the ResBlock's time-embedding
  add) inside a diffusers U-Net, in place.
"""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .._checks import is_int
from .._interrupts import sigint_deferred
from .._memory import check_unpacked_fits
from ..nn import GroupNormSiLU
from ..nn.group_norm_silu import has_hooks
from ..ops import BACKENDS
from .serialization import build_to_fit, load_safetensors, load_state_dict_checked, meta_build, read_json

__all__ = ["from_diffusers", "patch_diffusers", "diffusers_config_to_kwargs", "diffusers_key_map"]

# UNet2DModel's defaults for keys an old config.json may lack.
_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "sample_size": None, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896), "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
    "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
}
# What the DDPM layout (the paper's TF model) requires of them.
_REQUIRED: dict[str, tuple] = {
    "center_input_sample": (False,), "time_embedding_type": ("positional",), "flip_sin_to_cos": (False,),
    "freq_shift": (1,), "mid_block_type": ("UNetMidBlock2D",), "mid_block_scale_factor": (1,),
    "downsample_padding": (0,), "downsample_type": ("conv",), "upsample_type": ("conv",),
    "act_fn": ("silu", "swish"), "resnet_time_scale_shift": ("default",), "add_attention": (True,),
    "class_embed_type": (None,), "num_class_embeds": (None,),
}
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def diffusers_config_to_kwargs(config: Mapping[str, Any], image_size: int | None = None) -> dict[str, Any]:
    """Our constructor's arguments for a ``UNet2DModel`` config, or a ValueError
    naming each setting that is not the DDPM layout. ``image_size`` replaces the
    config's ``sample_size`` (which it then need not have); the attention
    resolutions follow it."""
    cfg = {**_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    bad = [f"{k}={cfg[k]!r} (need {' or '.join(map(repr, ok))})" for k, ok in _REQUIRED.items() if cfg[k] not in ok]
    channels = cfg["block_out_channels"]
    if not (isinstance(channels, (list, tuple)) and channels and all(is_int(c) and c > 0 for c in channels)):
        # ([] was an IndexError, [0] a ZeroDivisionError: tracebacks from the command line)
        raise ValueError(f"not a DDPM UNet2DModel (the layout UNet.from_diffusers converts): "
                         f"block_out_channels={channels!r} (need a non-empty list of positive ints)")
    channels = [int(c) for c in channels]
    ch, levels = channels[0], len(channels)
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    attn = [kind == "AttnDownBlock2D" for kind in down]
    if len(down) != levels or any(kind not in ("DownBlock2D", "AttnDownBlock2D") for kind in down):
        bad.append(f"down_block_types={down} (need {levels} of DownBlock2D / AttnDownBlock2D)")
    elif up != ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]:
        bad.append(f"up_block_types={up} (need the mirror of down_block_types)")
    if any(c % ch for c in channels):
        bad.append(f"block_out_channels={channels} (need multiples of the first)")
    head_dim = cfg["attention_head_dim"]  # None: one head as wide as the block (also in the mid block)
    if head_dim is not None and any(c != head_dim for c, a in zip(channels + channels[-1:], attn + [True]) if a):
        bad.append(f"attention_head_dim={head_dim!r} (need None: one attention head)")
    if cfg["attn_norm_num_groups"] not in (None, cfg["norm_num_groups"]):
        bad.append(f"attn_norm_num_groups={cfg['attn_norm_num_groups']!r} (need None)")
    if cfg["time_embedding_dim"] not in (None, 4 * ch):
        bad.append(f"time_embedding_dim={cfg['time_embedding_dim']!r} (need None or {4 * ch})")
    size = cfg["sample_size"] if image_size is None else image_size
    if isinstance(size, (list, tuple)):
        size = size[0] if len(size) == 2 and size[0] == size[1] else None
    if not is_int(size) and image_size is None:
        bad.append(f"sample_size={cfg['sample_size']!r} (need one square image size: pass "
                   "UNet.from_diffusers(..., image_size=N), or set sample_size in its config.json)")
    if bad:
        raise ValueError("not a DDPM UNet2DModel (the layout UNet.from_diffusers converts): " + "; ".join(bad))
    return dict(
        in_channels=cfg["in_channels"], out_channels=cfg["out_channels"], image_size=size, ch=ch,
        ch_mult=[c // ch for c in channels], num_res_blocks=cfg["layers_per_block"],
        # (a bad image_size= is refused by the constructor, naming it)
        attn_resolutions=[size // 2**i for i, a in enumerate(attn) if a] if is_int(size) else [],
        dropout=float(cfg["dropout"]),
        num_groups=cfg["norm_num_groups"], eps=float(cfg["norm_eps"]),
    )


# (our name, diffusers' name, the name of its deprecated AttentionBlock) of each layer inside a block.
_RES_LAYERS = [("norm1",) * 2, ("conv1",) * 2, ("temb_proj", "time_emb_proj"), ("norm2",) * 2, ("conv2",) * 2,
               ("shortcut", "conv_shortcut")]
_ATTN_LAYERS = [("norm", "group_norm", "group_norm"), ("q", "to_q", "query"), ("k", "to_k", "key"),
                ("v", "to_v", "value"), ("proj_out", "to_out.0", "proj_attn")]


def diffusers_key_map(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """For every state_dict key of our ``model``, the diffusers key(s) it comes from
    (the current name first, then the deprecated AttentionBlock's name, if any)."""
    blocks: list[tuple[str, str, list[tuple[str, ...]]]] = [
        ("conv_in", "conv_in", [("",)]),
        ("temb", "time_embedding", [("linear1", "linear_1"), ("linear2", "linear_2")]),
        ("mid.res1", "mid_block.resnets.0", _RES_LAYERS),
        ("mid.attn", "mid_block.attentions.0", _ATTN_LAYERS),
        ("mid.res2", "mid_block.resnets.1", _RES_LAYERS),
        ("norm_out", "conv_norm_out", [("",)]),
        ("conv_out", "conv_out", [("",)]),
    ]
    levels = len(model.down)
    for path, diffusers_path, index in (("down", "down_blocks", lambda i: i), ("up", "up_blocks", lambda i: levels - 1 - i)):
        for i, level in enumerate(getattr(model, path)):
            theirs = f"{diffusers_path}.{index(i)}"
            for j in range(len(level.res)):
                blocks.append((f"{path}.{i}.res.{j}", f"{theirs}.resnets.{j}", _RES_LAYERS))
            for j in range(len(level.attn)):
                blocks.append((f"{path}.{i}.attn.{j}", f"{theirs}.attentions.{j}", _ATTN_LAYERS))
            blocks.append((f"{path}.{i}.downsample", f"{theirs}.downsamplers.0", [("conv",) * 2]))
            blocks.append((f"{path}.{i}.upsample", f"{theirs}.upsamplers.0", [("conv",) * 2]))
    ours = model.state_dict()
    key_map: dict[str, tuple[str, ...]] = {}
    for our_prefix, their_prefix, layers in blocks:
        for our_layer, *their_layers in layers:
            their_layers = their_layers or [our_layer]
            for param in ("weight", "bias"):
                key = ".".join(p for p in (our_prefix, our_layer, param) if p)
                if key in ours:
                    key_map[key] = tuple(".".join(p for p in (their_prefix, t, param) if p) for t in their_layers)
    unmapped = sorted(set(ours) - set(key_map))
    assert not unmapped, f"diffusers_key_map misses {unmapped}"  # a bug here, not bad input
    return key_map


def _read_folder(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not folder.is_dir():
        raise FileNotFoundError(f"UNet.from_diffusers: {folder} does not exist or is not a folder")
    if not (folder / "config.json").is_file() and (folder / "unet" / "config.json").is_file():
        folder = folder / "unet"  # a pipeline folder
    config = read_json(folder / "config.json")
    if "_class_name" not in config and ({"ch", "ch_mult"} <= config.keys() or "model" in config):
        # ours: read as a diffusers folder it was "has no diffusion_pytorch_model.safetensors"
        kind, use = (("a checkpoint of ddpm_fast's Trainer", "ddpm_fast.pretrained.load_model") if "model" in config
                     else ("a UNet.save_pretrained folder", "UNet.from_pretrained"))
        raise ValueError(f"UNet.from_diffusers: {folder} is {kind}, not a diffusers one: load it with {use}")
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"UNet.from_diffusers: {folder} holds a {config['_class_name']}, not a UNet2DModel")
    for name in _WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".safetensors"):
            return config, load_safetensors(path)
        check_unpacked_fits(path, f"loading {path}")
        try:
            return config, torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"{path} is not a readable PyTorch weights file ({type(error).__name__}: {error})") from error
    raise FileNotFoundError(f"UNet.from_diffusers: {folder} has no {' or '.join(_WEIGHT_FILES)}")


def from_diffusers(cls: type, model_or_folder: Any, **overrides: Any) -> nn.Module:
    """See ``UNet.from_diffusers``."""
    if isinstance(model_or_folder, (str, os.PathLike)):
        config, state = _read_folder(Path(model_or_folder))
        source = str(model_or_folder)
    elif isinstance(model_or_folder, nn.Module) and type(model_or_folder).__name__ == "UNet2DModel":
        config, state = dict(model_or_folder.config), model_or_folder.state_dict()
        source = "the UNet2DModel"
    else:
        raise TypeError(
            f"UNet.from_diffusers takes a diffusers UNet2DModel or the folder it was saved to, got {type(model_or_folder).__name__}"
        )
    kwargs = diffusers_config_to_kwargs(config, overrides.pop("image_size", None))  # e.g. for a config without sample_size
    # An override (dropout= to fine-tune) replaces the config's value.
    def make() -> nn.Module:
        return cls(**{**kwargs, **overrides})

    skeleton = meta_build(make, len(state), source)  # the key map, from a model that takes no memory
    converted, used = {}, set()
    for ours, candidates in diffusers_key_map(skeleton).items():
        found = [c for c in candidates if c in state]
        if found:
            converted[ours] = state[found[0]]
            used.add(found[0])
    unexpected = sorted(set(state) - used)
    if unexpected:
        raise ValueError(f"{source}: weights {unexpected[:8]} ({len(unexpected)} in all) have no place in the DDPM U-Net")
    model = build_to_fit(make, {k: v.shape for k, v in converted.items()}, source, skeleton)  # not one far larger
    load_state_dict_checked(model, {k: v.to("cpu") for k, v in converted.items()}, source)
    return model.eval()


# ------------------------------------------------------------ patch_diffusers


@functools.lru_cache(maxsize=None)
def _fused_resnet_class() -> type:
    """A subclass of diffusers' ResnetBlock2D whose forward runs norm1+SiLU and
    (temb add)+norm2+SiLU as fused ops; the rest is the same computation, as
    the installed diffusers computes it:
    - before 0.15 a block has no ``skip_time_act``: the time embedding always
      goes through the SiLU;
    - 0.21 to 0.26 take a LoRA ``scale`` (``block(x, temb, scale)``) and hand it
      to conv1, time_emb_proj, conv2 and conv_shortcut (unless diffusers runs
      LoRA through peft); later ones ignore it, and so does this forward there.
    """
    from diffusers.models import resnet

    block_class = resnet.ResnetBlock2D
    lora_scale = "scale" in inspect.signature(block_class.forward).parameters and not getattr(
        resnet, "USE_PEFT_BACKEND", False)

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args: Any, **kwargs: Any) -> torch.Tensor:
        scale = (args[0] if args else kwargs.get("scale", 1.0),) if lora_scale else ()
        h = self.conv1(self.norm1(input_tensor), *scale)
        add = None
        if self.time_emb_proj is not None and temb is not None:
            act = not getattr(self, "skip_time_act", False)
            add = self.time_emb_proj(self.nonlinearity(temb) if act else temb, *scale)
        elif temb is not None:
            add = temb
        if add is not None and add.shape != h.shape[:2]:  # a broadcast the op does not take: add it here
            h, add = h + add.reshape(*add.shape, *([1] * (h.dim() - add.dim()))), None
        h = self.conv2(self.dropout(self.norm2(h, add)), *scale)
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor.contiguous() if self.training else input_tensor, *scale)
        return (input_tensor + h) / self.output_scale_factor

    attrs = {"forward": forward, "__module__": __name__, "__qualname__": "FusedResnetBlock2D"}
    return type("FusedResnetBlock2D", (block_class,), attrs)


def __getattr__(name: str) -> Any:
    # Makes the class created above importable by name, so a patched model pickles.
    if name == "FusedResnetBlock2D":
        return _fused_resnet_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _patchable(block: nn.Module) -> bool:
    return (
        getattr(block, "time_embedding_norm", None) == "default"
        and getattr(block, "upsample", None) is None
        and getattr(block, "downsample", None) is None
        and type(getattr(block, "nonlinearity", None)) is nn.SiLU  # a subclass may compute another function
        and type(block.norm1) is nn.GroupNorm
        and type(block.norm2) is nn.GroupNorm
        and not any(has_hooks(m) for m in (block.norm1, block.norm2, block.nonlinearity))
    )


def patch_diffusers(unet: nn.Module, *, backend: str = "auto") -> int:
    """Fuse, in place, the GroupNorm+SiLU pairs of a diffusers U-Net: both norms of
    every ``ResnetBlock2D`` with the default time-embedding add (folded into the
    second norm) and no resampling inside, and the output ``conv_norm_out`` +
    ``conv_act``. Returns how many norms were fused (0 on a second call).

    Parameters (the same objects: an optimizer built before keeps training them)
    and state_dict keys do not change; attention GroupNorms (no SiLU),
    ResnetBlock2D variants (scale-shift, up/down inside) and norms or SiLUs
    with hooks (they would stop running) are left as they are.
    """
    try:
        from diffusers.models.resnet import ResnetBlock2D
    except ImportError as error:
        raise ImportError("ddpm_fast.patch_diffusers needs diffusers: pip install diffusers") from error
    if not isinstance(unet, nn.Module):
        raise TypeError(f"patch_diffusers: unet must be an nn.Module, got {type(unet).__name__}")
    if backend not in BACKENDS:  # here, not only once a model has a norm to fuse
        raise ValueError(f"patch_diffusers: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    # Every replacement is made before any is put in: one that fails (a norm whose
    # weight is neither a parameter nor a buffer) leaves the model as it was, not
    # a block with a fused norm1 under diffusers' forward, which applies SiLU again.
    blocks = [
        (block, GroupNormSiLU.from_group_norm(block.norm1, backend=backend),
         GroupNormSiLU.from_group_norm(block.norm2, backend=backend))
        # Exactly ResnetBlock2D: a subclass may compute something else in its forward.
        for block in unet.modules() if type(block) is ResnetBlock2D and _patchable(block)
    ]
    norm, act = getattr(unet, "conv_norm_out", None), getattr(unet, "conv_act", None)
    out_norm = None
    if type(norm) is nn.GroupNorm and type(act) is nn.SiLU and not (has_hooks(norm) or has_hooks(act)):
        out_norm = GroupNormSiLU.from_group_norm(norm, backend=backend)
    fused_class = _fused_resnet_class() if blocks else None
    with sigint_deferred():  # nor a Ctrl-C between a block's norms and its class
        for block, norm1, norm2 in blocks:
            block.norm1, block.norm2 = norm1, norm2
            block.__class__ = fused_class
        if out_norm is not None:
            unet.conv_norm_out = out_norm
            unet.conv_act = nn.Identity().train(act.training)  # keeps unet.training consistent
    return 2 * len(blocks) + (out_norm is not None)
