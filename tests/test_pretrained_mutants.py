"""``load_model``, the diffusers schedule it reads and ``latest_checkpoint``:
behaviour that mutants of pretrained.py and checkpoint.py's reading side
changed without any other test failing. Fast: tiny models, hand-made folders."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from conftest import save_tiny_diffusers_pipeline
from test_pretrained import _scheduler_config, run  # noqa: F401 (run: the module's trained run, a fixture)
from ddpm_fast.checkpoint import CheckpointError, checkpoints, latest_checkpoint, write_checkpoint
from ddpm_fast.pretrained import _diffusers_schedule, load_model


def _copy_checkpoint(run, tmp_path):  # noqa: F811
    out, _ = run
    return shutil.copytree(latest_checkpoint(out), tmp_path / "ckpt")


@pytest.mark.parametrize("config", [
    dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=50),  # was read as linear, or with T=1000
    dict(beta_schedule="linear"),  # DDPMScheduler's default T=1000 where the config is silent
    dict(beta_schedule="squaredcos_cap_v2"),
], ids=["cosine-50", "linear-default-T", "cosine-default-T"])
def test_diffusers_schedules_have_diffusers_betas(tmp_path, config):
    diffusers = pytest.importorskip("diffusers")
    schedule = _diffusers_schedule(_scheduler_config(tmp_path, **config))
    want = diffusers.DDPMScheduler(**config).betas.to(torch.float64)
    assert schedule.num_timesteps == want.numel()
    torch.testing.assert_close(schedule.betas.to(torch.float64), want, rtol=1e-5, atol=1e-7)


def test_every_kind_of_folder_is_loaded_onto_the_device_asked_for(run, tmp_path):  # noqa: F811
    """The meta device stands in for a GPU: a UNet.save_pretrained folder and a
    diffusers pipeline (or its unet folder) came back on the CPU."""
    pytest.importorskip("diffusers")
    _, trainer = run
    trainer.ema.save_pretrained(tmp_path / "pretrained")
    save_tiny_diffusers_pipeline(tmp_path / "pipe", timesteps=20)
    for path in (tmp_path / "pretrained", tmp_path / "pipe", tmp_path / "pipe" / "unet"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the save_pretrained folder's assumed schedule
            model, _ = load_model(path, device="meta")
        assert {p.device.type for p in model.parameters()} == {"meta"}, path
        assert not model.training


def test_a_checkpoint_without_the_weights_asked_for_is_a_checkpoint_error(run, tmp_path):  # noqa: F811
    """Not a FileNotFoundError traceback; the other weights still load."""
    ckpt = _copy_checkpoint(run, tmp_path)
    (ckpt / "ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"ema\.safetensors does not exist"):
        load_model(ckpt)
    model, _ = load_model(ckpt, weights="model")
    assert not model.training


@pytest.mark.parametrize("change", ["null", "missing"])
def test_a_checkpoint_config_without_a_model_is_a_checkpoint_error(run, tmp_path, change):  # noqa: F811
    ckpt = _copy_checkpoint(run, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    if change == "null":
        config["model"] = None
    else:
        del config["model"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not describe a UNet"):
        load_model(ckpt)


def _write(run_dir, step):
    return write_checkpoint(run_dir, step, {"a.bin": lambda p: p.write_bytes(b"x")}, keep=0)


def test_a_checkpoint_folder_name_without_a_step_is_no_checkpoint(tmp_path):
    """A file, or a folder named checkpoint- with no step, is no checkpoint (was
    returned as the newest one, or an int('') ValueError)."""
    folder = _write(tmp_path, 2)
    (tmp_path / "latest").unlink()
    (tmp_path / "checkpoint-00000009").write_text("not a checkpoint")
    (tmp_path / "checkpoint-").mkdir()
    assert latest_checkpoint(tmp_path) == folder and checkpoints(tmp_path) == [(2, folder)]


def test_diffusers_sampling_of_a_pipeline_without_a_scheduler_config_is_empty(tmp_path):
    """No scheduler_config.json: nothing to follow ({}), not a 'cannot read' error."""
    pytest.importorskip("diffusers")
    from ddpm_fast.pretrained import diffusers_sampling

    save_tiny_diffusers_pipeline(tmp_path, timesteps=20)
    (tmp_path / "scheduler" / "scheduler_config.json").unlink()
    assert diffusers_sampling(tmp_path) == {} and diffusers_sampling(tmp_path / "unet") == {}


@pytest.mark.parametrize("variance", ["learned", "learned_range"])
def test_diffusers_sampling_refuses_a_learned_variance(tmp_path, variance):
    from ddpm_fast.pretrained import diffusers_sampling

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    _scheduler_config(tmp_path, variance_type=variance)
    with pytest.raises(CheckpointError, match=f"variance_type='{variance}'; ddpm_fast samples with fixed_small"):
        diffusers_sampling(tmp_path)
