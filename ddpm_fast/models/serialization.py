"""``UNet.save_pretrained`` / ``UNet.from_pretrained``: a folder with
``config.json`` (the constructor's arguments) and ``model.safetensors``.

Files are written whole to a temporary name in the target folder, flushed to
disk, then renamed over the final name (``os.replace`` is atomic on POSIX and
Windows): a process killed mid-save leaves the previous file or the new one,
never half of one.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_parameter_registration_hook,
)

from .._interrupts import default_device
from ..checkpoint import atomic_write, latest_checkpoint

M = TypeVar("M", bound=nn.Module)

__all__ = ["build_to_fit", "meta_build", "load_safetensors", "load_state_dict_checked", "load_pretrained",
           "safetensors_shapes", "save_pretrained"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as error:  # pragma: no cover - safetensors is a dependency
        raise ImportError("saving and loading models needs safetensors: pip install safetensors") from error
    return safetensors.torch


def _safetensors_open():
    _safetensors()  # its clear error if missing
    from safetensors import safe_open

    return safe_open


def save_pretrained(model: nn.Module, folder: str | os.PathLike) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # safetensors wants contiguous CPU tensors (channels_last conv weights are not).
    # Copies: tied weights share memory, which safetensors refuses.
    tensors = {k: v.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
               for k, v in model.state_dict().items()}
    weights = _safetensors().save(tensors, metadata={"format": "pt"})
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: tmp.write_bytes(weights))
    atomic_write(folder / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(model.config, indent=2) + "\n"))


def load_safetensors(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, with a clear error for a missing or unreadable one."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"cannot load {path.name} onto {device!r}: not a device ({error})") from None
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        with default_device("cpu"):  # safetensors 0.4.0 made them on a default device of torch.device("meta")
            tensors = _safetensors().load_file(str(path), device="cpu")
    except Exception as error:
        raise ValueError(f"{path} is not a readable safetensors file ({type(error).__name__}: {error})") from error
    # Moved after reading: a device that is missing here is not a damaged file.
    return {name: tensor.to(device) for name, tensor in tensors.items()}


def float32_on_cpu(make: Callable[[], M]) -> M:
    """The module ``make()`` builds, as float32 on the CPU whatever torch's default
    dtype and device: a model for weights to be loaded into (under a float64 or
    meta default it came out float64, or on meta). Its random initialization,
    which the weights replace, draws from a fork of torch's generator: loading a
    model left the user's random stream advanced."""
    with default_device("cpu"), torch.random.fork_rng(devices=[]):
        return make().float()


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in a safetensors file, read from its header alone."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        with _safetensors_open()(str(path), framework="pt") as file:
            return {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}
    except Exception as error:
        raise ValueError(f"{path} is not a readable safetensors file ({type(error).__name__}: {error})") from error


def meta_build(make: Callable[[], M], tensors: int, source: str) -> M:
    """``make()`` on the meta device (no memory), stopped once it has made far
    more tensors than the ``tensors`` of the weights of ``source``: a config
    deep enough (``"num_res_blocks": 10**6``) took hours, and more memory than
    the machine had, to build even there. (Within the margin, the mismatch is
    left to ``_check_fit``'s listing of what differs.)"""
    builder = threading.get_ident()
    limit = 4 * tensors + 64
    made = 0

    def count(*_: object) -> None:
        nonlocal made
        if threading.get_ident() == builder:  # (the hooks are global: not another thread's modules)
            made += 1
            if made > limit:
                raise ValueError(f"{source} does not match the model: the config asks for far more tensors "
                                 f"(over {limit}) than the {tensors} of the weights")

    hooks = [register_module_parameter_registration_hook(count), register_module_buffer_registration_hook(count)]
    try:
        with default_device("meta"):
            return make()
    finally:
        for hook in hooks:
            hook.remove()


def build_to_fit(make: Callable[[], M], shapes: Mapping[str, Sequence[int]], source: str,
                 skeleton: nn.Module | None = None) -> M:
    """``float32_on_cpu(make)``, built only once a copy on the meta device
    (``skeleton``, where the caller has made it with ``meta_build``) has shown
    that its tensors are those of ``shapes`` (the weights to be loaded, from
    ``source``): a config that asks for a far larger model than its weights
    file holds (``"ch": 4096`` is 146 GB) is refused before any of it is allocated."""
    if skeleton is None:
        skeleton = meta_build(make, len(shapes), source)
    _check_fit({k: tuple(v.shape) for k, v in skeleton.state_dict().items()}, shapes, source)
    return float32_on_cpu(make)


def _check_fit(own: Mapping[str, Sequence[int]], theirs: Mapping[str, Sequence[int]], source: str) -> None:
    """One error that lists every missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    shapes = sorted(
        f"{k}: {tuple(theirs[k])} vs {tuple(own[k])}" for k in set(own) & set(theirs) if tuple(theirs[k]) != tuple(own[k])
    )
    problems = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch (file vs model)", shapes)):
        if items:
            problems.append(f"{what}: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''} ({len(items)} in all)")
    if problems:
        raise ValueError(f"{source} does not match the model: " + "; ".join(problems))


def load_state_dict_checked(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with one error that lists every
    missing, unexpected and mis-shaped tensor."""
    own = model.state_dict()
    _check_fit({k: v.shape for k, v in own.items()}, {k: v.shape for k, v in state.items()}, source)
    # An integer tensor for a float one (or the reverse) would be cast silently
    # by load_state_dict; integer buffers of the model's own (BatchNorm's
    # num_batches_tracked) load as they are.
    bad = sorted(k for k, v in state.items() if v.is_floating_point() != own[k].is_floating_point())
    if bad:
        raise ValueError(f"{source}: tensors {bad[:8]} are not floating point where the model's are, or the reverse")
    model.load_state_dict(state, strict=True)


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:  # (nested too deeply: RecursionError)
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def load_pretrained(
    cls: type, folder: str | os.PathLike, *, weights: str, map_location: torch.device | str, overrides: Mapping[str, Any]
) -> nn.Module:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"UNet.from_pretrained: {folder} does not exist or is not a folder")
    if not (folder / CONFIG_NAME).exists():  # a run folder or a pipeline's: the error names their loader
        if latest_checkpoint(folder) is not None:
            raise ValueError(f"UNet.from_pretrained: {folder} is a training run folder (its checkpoints hold the "
                             "model); load it with ddpm_fast.pretrained.load_model (the newest checkpoint's EMA weights "
                             "and schedule)")
        if (folder / "model_index.json").is_file() or (folder / "unet" / CONFIG_NAME).is_file():
            raise ValueError(f"UNet.from_pretrained: {folder} is a diffusers pipeline folder; load its U-Net with "
                             "UNet.from_diffusers")
    config = read_json(folder / CONFIG_NAME)
    if "_class_name" in config:
        raise ValueError(
            f"UNet.from_pretrained: {folder} holds a diffusers {config['_class_name']}; load it with UNet.from_diffusers"
        )
    if isinstance(config.get("model"), dict) and "train" in config:  # a Trainer's checkpoint (or run) config
        raise ValueError(
            f"UNet.from_pretrained: {folder} is a training checkpoint (its config.json holds the whole run's); "
            "load it with ddpm_fast.pretrained.load_model (the model and its schedule; the EMA weights by default)"
        )
    model = build_to_fit(lambda: cls.from_config(config, **overrides), safetensors_shapes(folder / weights),
                         str(folder / weights))
    state = load_safetensors(folder / weights, map_location)
    model.to(map_location)
    load_state_dict_checked(model, state, str(folder / weights))
    return model.eval()
