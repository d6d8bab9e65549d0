"""Loading a trained model and its noise schedule from disk, whatever wrote it:
a training run folder (its newest checkpoint), one ``checkpoint-<step>``
folder, a ``UNet.save_pretrained`` folder, or a diffusers ``UNet2DModel`` /
DDPM pipeline folder."""

from __future__ import annotations

import json
import numbers
import os
from pathlib import Path
from typing import Any, Callable

import torch

from ._checks import as_device, is_int, is_out_of_memory
from ._warn import warn
from .checkpoint import CheckpointError, latest_checkpoint
from .models.serialization import build_to_fit, load_safetensors, load_state_dict_checked, safetensors_shapes
from .schedules import NoiseSchedule

__all__ = ["diffusers_sampling", "load_model", "resolve_run_folder"]


def _read_json(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as error:  # RecursionError: nested too deeply (a traceback)
        raise CheckpointError(f"cannot read {path}: {error}") from error
    if not isinstance(config, dict):  # `"x" in 5` raised "argument of type 'int' is not iterable"
        raise CheckpointError(f"cannot read {path}: it must hold a JSON object, got {type(config).__name__}")
    return config


def _schedule_from(source: Path, build: Callable[[], NoiseSchedule]) -> NoiseSchedule:
    """``build()``, the schedule that ``source`` describes; one whose tables
    do not fit in memory (a hostile or mistaken ``timesteps`` of 10^9: 150
    bytes a step) is the file's fault, not the batch size's."""
    try:
        return build()
    except RuntimeError as error:
        if not is_out_of_memory(error):
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{source} describes a noise schedule too long to fit in memory ({first[:200]})") from None


def _assumed_schedule(folder: Path) -> NoiseSchedule:
    """DDPM's linear T=1000 schedule, said out loud: a model trained on another
    would sample wrongly with it, and nothing in ``folder`` tells."""
    warn(f"{folder} records no noise schedule: assuming DDPM's linear schedule of 1000 timesteps")
    return NoiseSchedule("linear")


_SCHEDULER_CONFIG = Path("scheduler", "scheduler_config.json")  # in a diffusers pipeline folder


def _diffusers_schedule(folder: Path, model_folder: Path | None = None) -> NoiseSchedule:
    """The DDPMScheduler betas of the pipeline in ``folder`` if its config is
    there, else linear T=1000 (with a warning naming ``model_folder``, the
    folder the model was loaded from, else ``folder``).

    Settings this library cannot honour are refused, not ignored: a model
    trained for v- or x0-prediction, with a learned variance, or on a
    zero-terminal-SNR schedule, would sample silently wrong as an ε-predictor on
    our schedule, and neither dynamic thresholding nor clipping x0 to a range
    other than [-1, 1] is offered."""
    config_path = folder / _SCHEDULER_CONFIG
    if not config_path.is_file():
        return _assumed_schedule(folder if model_folder is None else model_folder)
    config = _read_json(config_path)
    prediction = config.get("prediction_type", "epsilon")
    said = f"prediction_type={prediction!r}"
    if config.get("predict_epsilon") is not None:  # its name before diffusers 0.10 (and, until 0.13, the one that won)
        predict_epsilon = _flag(config, "predict_epsilon", True, config_path)
        prediction = "epsilon" if predict_epsilon else "sample"
        said = f"predict_epsilon={str(predict_epsilon).lower()} (prediction_type={prediction!r})"
    if prediction != "epsilon":
        raise CheckpointError(f"{config_path} says {said}; load_model supports only 'epsilon' models")
    if config.get("rescale_betas_zero_snr", False):
        raise CheckpointError(f"{config_path} sets rescale_betas_zero_snr, which ddpm_fast does not support")
    if config.get("variance_type") in ("learned", "learned_range"):  # the model also predicts the variance
        raise CheckpointError(f"{config_path} says variance_type={config['variance_type']!r}; load_model supports "
                              "only models of fixed variances (eps-prediction alone)")
    if config.get("thresholding", False):
        raise CheckpointError(f"{config_path} sets thresholding (dynamic thresholding of x0), which ddpm_fast's "
                              "Sampler does not do")
    clip_range = config.get("clip_sample_range", 1.0)
    if isinstance(clip_range, bool) or not isinstance(clip_range, numbers.Real):  # "1.0" != 1.0
        raise CheckpointError(f"{config_path} has clip_sample_range={clip_range!r}, not a number")
    if _flag(config, "clip_sample", True, config_path) and clip_range != 1.0:
        raise CheckpointError(f"{config_path} clips x0 to [-{clip_range}, {clip_range}] (clip_sample_range); "
                              "ddpm_fast's Sampler clips to [-1, 1] only")
    if config.get("trained_betas") is not None:  # diffusers uses them instead of beta_schedule
        try:
            return _schedule_from(config_path, lambda: NoiseSchedule(
                betas=torch.tensor(config["trained_betas"], dtype=torch.float64)))
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{config_path} has unusable trained_betas: {error}") from None
    names = {"linear": "linear", "scaled_linear": "quad", "squaredcos_cap_v2": "cosine"}
    name = names.get(config.get("beta_schedule", "linear"))
    if name is None:
        raise CheckpointError(f"unsupported diffusers beta_schedule {config.get('beta_schedule')!r} in {config_path}")
    timesteps = config.get("num_train_timesteps", 1000)
    if not is_int(timesteps):  # int() would truncate 10.7 or fail on "abc" naming no file
        raise CheckpointError(f"{config_path} has num_train_timesteps={timesteps!r}, not an int")
    try:
        if name == "cosine":
            return _schedule_from(config_path, lambda: NoiseSchedule("cosine", timesteps=int(timesteps)))
        return _schedule_from(config_path, lambda: NoiseSchedule(
            name, timesteps=int(timesteps), beta_start=config.get("beta_start", 1e-4),
            beta_end=config.get("beta_end", 0.02)))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{config_path} describes no usable noise schedule: {error}") from None


def _flag(config: dict[str, Any], key: str, default: bool, config_path: Path) -> bool:
    """The config's boolean ``key`` (``default`` if absent); a string such as "false" would read as on."""
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise CheckpointError(f"{config_path} has {key}={value!r}, not true or false")
    return value


def resolve_run_folder(path: str | os.PathLike) -> Path:
    """The folder ``load_model(path)`` reads: a run folder's newest checkpoint
    (``CheckpointError`` if it holds none), any other folder itself. Resolved
    once, on rank 0, by the commands that load a model on several ranks: a
    checkpoint written meanwhile would give ranks different models."""
    folder = Path(path)
    if not folder.is_dir() or (folder / "config.json").is_file() or (folder / "unet" / "config.json").is_file():
        return folder
    newest = latest_checkpoint(folder)
    if newest is None:
        raise CheckpointError(f"{folder} holds no checkpoint (no config.json and no checkpoint-* folder)")
    return newest


def _diffusers_layout(folder: Path) -> tuple[Path, Path] | None:
    """(the UNet folder, the pipeline folder) where ``folder`` is a diffusers
    pipeline folder (``unet/`` in it) or a diffusers UNet folder (whose
    pipeline, if any, is its parent); None for any other folder."""
    folder = Path(os.path.abspath(folder))  # Path(".").parent is ".": the pipeline above "." or ".." was missed
    if (folder / "unet" / "config.json").is_file():
        return folder / "unet", folder
    if (folder / "config.json").is_file() and "_class_name" in _read_json(folder / "config.json"):
        return folder, folder.parent
    return None


def diffusers_sampling(path: str | os.PathLike) -> dict[str, Any]:
    """How the diffusers pipeline in ``path`` (a pipeline folder, or its
    ``unet`` folder) samples: ``{"variance": "fixed_small" | "fixed_large",
    "clip_denoised": bool, "source": Path}`` from its scheduler_config.json,
    with DDPMScheduler's defaults (fixed_small, clip on) for keys it lacks;
    ``{}`` for any other folder. ``ddpm-fast sample`` takes these as its
    defaults, so that it draws the chain the pipeline draws."""
    layout = _diffusers_layout(Path(path))
    config_path = layout[1] / _SCHEDULER_CONFIG if layout is not None else None
    if config_path is None or not config_path.is_file():
        return {}
    config = _read_json(config_path)
    variance = str(config.get("variance_type", "fixed_small")).removesuffix("_log")  # *_log: the same variance
    if variance not in ("fixed_small", "fixed_large"):
        raise CheckpointError(f"{config_path} says variance_type={config.get('variance_type')!r}; ddpm_fast samples "
                              "with fixed_small or fixed_large only")
    clip = _flag(config, "clip_sample", True, config_path)  # DDPMScheduler's default: on
    return {"variance": variance, "clip_denoised": clip, "source": config_path}


def load_model(
    path: str | os.PathLike, *, weights: str = "ema", device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, NoiseSchedule]:
    """(model in eval mode, its training schedule) from ``path``.

    ``weights``: ``ema`` (the default: what the paper samples from) or ``model``
    (the raw trained weights) for our checkpoints; ignored for other folders.
    """
    from .models import UNet

    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    device = as_device("cpu" if device is None else device, "load_model: device")  # before the weights load
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist or is not a folder")
    diffusers = _diffusers_layout(folder)
    if diffusers is not None:  # the schedule's warning, if any, names the folder given
        unet, pipeline = diffusers
        return UNet.from_diffusers(unet).to(device).eval(), _diffusers_schedule(pipeline, folder)
    folder = resolve_run_folder(folder)
    config = _read_json(folder / "config.json")
    if "train" not in config:  # a UNet.save_pretrained folder
        return UNet.from_pretrained(folder, map_location=device).eval(), _assumed_schedule(folder)
    file = f"{weights}.safetensors"
    if config.get("model") is None:
        raise CheckpointError(f"{folder / 'config.json'} does not describe a UNet")
    try:
        model = build_to_fit(lambda: UNet.from_config(config["model"]), safetensors_shapes(folder / file),
                             str(folder / file))
        load_state_dict_checked(model, load_safetensors(folder / file), str(folder / file))
    except (FileNotFoundError, ValueError) as error:
        raise CheckpointError(str(error)) from error
    try:
        schedule = _schedule_from(folder / "config.json", lambda: NoiseSchedule.from_config(config["schedule"]))
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{folder / 'config.json'} has no usable noise schedule ('schedule': {error})") from None
    return model.to(device).eval(), schedule

