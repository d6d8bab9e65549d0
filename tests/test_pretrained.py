"""``load_model`` finds the model and schedule in every kind of folder we or
diffusers write, and fails clearly on the rest."""

from __future__ import annotations

import pytest
import torch

from conftest import save_tiny_diffusers_pipeline
from ddpm_fast.checkpoint import CheckpointError, latest_checkpoint
from ddpm_fast.data import ImageDataset
from ddpm_fast.models import UNet
from ddpm_fast.pretrained import diffusers_sampling, load_model
from ddpm_fast.nn import has_channels_last_weights
from ddpm_fast.schedules import NoiseSchedule
from ddpm_fast.train import TrainConfig, Trainer

X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
T = torch.tensor([3, 17])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    data = ImageDataset(torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8))
    trainer = Trainer(UNet.tiny(), data, NoiseSchedule("cosine", timesteps=30),
                      TrainConfig(steps=3, batch_size=8, warmup=0, lr=1e-2, ema_decay=0.5, checkpoint_every=3),
                      out, device="cpu", progress=False)
    trainer.train(final_samples=False)
    return out, trainer


def _same(loaded: torch.nn.Module, trained: torch.nn.Module) -> bool:
    """The same outputs, bit for bit, with the loaded model in the trained one's
    memory format (a Trainer's are channels_last; the convolutions round
    differently in NCHW)."""
    fmt = torch.channels_last if has_channels_last_weights(trained) else torch.contiguous_format
    with torch.no_grad():
        return torch.equal(loaded.to(memory_format=fmt)(X, T), trained(X, T))


def test_run_folder_and_checkpoint_folder_give_ema_weights_and_schedule(run):
    out, trainer = run
    for path in (out, latest_checkpoint(out)):
        model, schedule = load_model(path)
        assert _same(model, trainer.ema) and not model.training
        assert schedule.name == "cosine" and schedule.num_timesteps == 30
    raw, _ = load_model(out, weights="model")
    assert _same(raw, trainer.model) and not _same(raw, trainer.ema)


def test_loading_leaves_torchs_generator_alone(run, tmp_path):
    """The model built for the weights drew its random initialization from torch's
    generator: a load advanced the user's stream (and ddpm-fast sample --seed's)."""
    out, trainer = run
    trainer.ema.save_pretrained(tmp_path)
    for load in (lambda: load_model(out), lambda: UNet.from_pretrained(tmp_path)):
        state = torch.get_rng_state()
        load()
        assert torch.equal(torch.get_rng_state(), state)


def test_from_pretrained_of_a_training_checkpoint_names_load_model(run):
    """The checkpoint folder holds model.safetensors and config.json, so
    from_pretrained is a natural first try: it said the config had unknown keys."""
    out, _ = run
    with pytest.raises(ValueError, match=r"is a training checkpoint .* load it with ddpm_fast\.pretrained\.load_model"):
        UNet.from_pretrained(latest_checkpoint(out))


def test_from_pretrained_of_a_run_or_pipeline_folder_names_their_loaders(run, tmp_path):
    """Neither has a config.json of its own: "config.json does not exist" said nothing of what to do."""
    out, _ = run
    with pytest.raises(ValueError, match=r"is a training run folder .* load it with ddpm_fast\.pretrained\.load_model"):
        UNet.from_pretrained(out)
    save_tiny_diffusers_pipeline(tmp_path, timesteps=10)
    with pytest.raises(ValueError, match="is a diffusers pipeline folder; load its U-Net with UNet.from_diffusers"):
        UNet.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):  # an empty folder: as before
        UNet.from_pretrained(tmp_path / "scheduler")


def test_from_diffusers_of_our_folders_names_their_loaders(run, tmp_path):
    """Either folder was read as a diffusers one without weights: 'has no
    diffusion_pytorch_model.safetensors'."""
    out, trainer = run
    with pytest.raises(ValueError, match=r"is a checkpoint of ddpm_fast's Trainer, not a diffusers one: load it with "
                                         r"ddpm_fast\.pretrained\.load_model"):
        UNet.from_diffusers(latest_checkpoint(out))
    trainer.ema.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is a UNet.save_pretrained folder, not a diffusers one: load it with UNet.from_pretrained"):
        UNet.from_diffusers(tmp_path)


def test_loaders_put_the_model_on_the_device_asked_for(run, tmp_path):
    """The meta device stands in for a GPU here: a loader that skipped its .to()
    returned a CPU model (ddpm-fast sample --device cuda would run on the CPU)."""
    out, trainer = run
    model, _ = load_model(latest_checkpoint(out), device="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    trainer.ema.save_pretrained(tmp_path)
    assert {p.device.type for p in UNet.from_pretrained(tmp_path, map_location="meta").parameters()} == {"meta"}


def test_save_pretrained_folder(run, tmp_path):
    _, trainer = run
    trainer.ema.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="records no noise schedule: assuming DDPM's linear schedule of 1000"):
        model, schedule = load_model(tmp_path)
    assert _same(model, trainer.ema) and schedule.num_timesteps == 1000


def test_diffusers_folder_and_pipeline_folder(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    unet = save_tiny_diffusers_pipeline(tmp_path, timesteps=500)
    for path in (tmp_path, tmp_path / "unet"):
        model, schedule = load_model(path)
        with torch.no_grad():
            torch.testing.assert_close(model(X, T), unet(X, T).sample, rtol=1e-4, atol=1e-5)
        assert schedule.num_timesteps == 500 and schedule.betas[-1].item() == pytest.approx(0.03)
    # The UNet folder given as "." (from inside it): Path(".").parent is ".", so
    # the pipeline above was missed and a T=500 model sampled on T=1000.
    monkeypatch.chdir(tmp_path / "unet")
    assert load_model(".")[1].num_timesteps == 500
    assert diffusers_sampling(".") == diffusers_sampling(tmp_path) != {}
    (tmp_path / "unet" / "notes").mkdir()  # and ".." (absolute() keeps it: the parent of "unet/notes/..")
    monkeypatch.chdir(tmp_path / "unet" / "notes")
    assert load_model("..")[1].num_timesteps == 500
    # A UNet folder alone: the warning names it, not the folder above it.
    (tmp_path / "scheduler" / "scheduler_config.json").unlink()
    with pytest.warns(UserWarning, match=f"^{tmp_path / 'unet'} records no noise schedule") as seen:
        load_model(tmp_path / "unet")
    assert {w.filename for w in seen} == {__file__}  # the caller's line, one call deeper than above


def test_errors(run, tmp_path):
    out, _ = run
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="weights must be 'ema' or 'model'"):
        load_model(out, weights="best")
    with pytest.raises(ValueError, match="load_model: device 'cdua' is not a device"):  # was torch's RuntimeError
        load_model(out, device="cdua")
    assert next(load_model(out, device=None)[0].parameters()).device.type == "cpu"  # None: the default, as before
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("5")  # JSON, not an object: was a TypeError from `in`
    with pytest.raises(CheckpointError, match="must hold a JSON object, got int"):
        load_model(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    ckpt = latest_checkpoint(out)
    (broken / "config.json").write_text((ckpt / "config.json").read_text())
    (broken / "ema.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(broken)


def _scheduler_config(folder, **config):
    import json

    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return folder


def test_diffusers_scheduler_trained_betas_are_used(tmp_path):
    from ddpm_fast.pretrained import _diffusers_schedule

    betas = [0.001, 0.01, 0.1, 0.2]
    schedule = _diffusers_schedule(_scheduler_config(tmp_path, beta_schedule="linear", trained_betas=betas))
    # read in float64: via float32 they came back as 0.0010000000474974513 ...
    assert schedule.num_timesteps == 4 and schedule.betas.dtype == torch.float64 and schedule.betas.tolist() == betas


@pytest.mark.parametrize("setting, match", [
    ({"prediction_type": "v_prediction"}, "prediction_type='v_prediction'"),
    ({"prediction_type": "sample"}, "prediction_type='sample'"),
    # diffusers before 0.10 named it predict_epsilon (an x0 model read as an eps one, silently)
    ({"predict_epsilon": False}, r"says predict_epsilon=false \(prediction_type='sample'\); load_model supports only"),
    ({"predict_epsilon": False, "prediction_type": "epsilon"}, r"predict_epsilon=false"),  # 0.10-0.12 followed it
    ({"predict_epsilon": "no"}, "has predict_epsilon='no', not true or false"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ({"variance_type": "learned_range"}, "variance_type='learned_range'"),
    ({"variance_type": "learned"}, "variance_type='learned'"),
    ({"thresholding": True}, "thresholding"),
    ({"trained_betas": [0.1, 2.0]}, "unusable trained_betas"),
    ({"clip_sample_range": 3.0}, r"clips x0 to \[-3.0, 3.0\] \(clip_sample_range\)"),  # was accepted, then clipped to [-1, 1]
    ({"clip_sample_range": 0.5}, r"clips x0 to \[-0.5, 0.5\] \(clip_sample_range\)"),  # as wrong as a wider one
    # malformed values: each was a bare TypeError/ValueError naming no file, or worse
    ({"num_train_timesteps": 10.7}, r"scheduler_config.json has num_train_timesteps=10.7, not an int"),  # was truncated to 10
    ({"num_train_timesteps": "abc"}, "has num_train_timesteps='abc', not an int"),
    ({"beta_start": 0}, r"scheduler_config.json describes no usable noise schedule: beta_start must lie in \(0, 1\]"),
    ({"clip_sample_range": "1.0"}, "has clip_sample_range='1.0', not a number"),  # said it clips to [-1.0, 1.0], not [-1, 1]
    ({"clip_sample": "false"}, "has clip_sample='false', not true or false"),  # read as on
])
def test_diffusers_scheduler_settings_we_cannot_honour_are_refused(tmp_path, setting, match):
    from ddpm_fast.pretrained import _diffusers_schedule

    with pytest.raises(CheckpointError, match=match):
        _diffusers_schedule(_scheduler_config(tmp_path, beta_schedule="linear", **setting))


def test_an_old_eps_config_saying_predict_epsilon_true_is_read(tmp_path):
    from ddpm_fast.pretrained import _diffusers_schedule

    config = _scheduler_config(tmp_path, beta_schedule="linear", num_train_timesteps=10, predict_epsilon=True)
    assert _diffusers_schedule(config).num_timesteps == 10


def test_a_clip_range_of_a_scheduler_that_does_not_clip_is_no_reason_to_refuse(tmp_path):
    from ddpm_fast.pretrained import _diffusers_schedule

    config = _scheduler_config(tmp_path, beta_schedule="linear", num_train_timesteps=10, clip_sample=False,
                               clip_sample_range=2.0)
    assert _diffusers_schedule(config).num_timesteps == 10


@pytest.mark.parametrize("config, want", [
    # diffusers' scaled_linear: linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2 (was read as plain linear)
    (dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=10),
     torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 10, dtype=torch.float64) ** 2),
    # DDPMScheduler's defaults for keys an old config lacks: linear, 1e-4 .. 0.02
    (dict(num_train_timesteps=10), torch.linspace(1e-4, 0.02, 10, dtype=torch.float64)),
], ids=["scaled_linear", "defaults"])
def test_diffusers_scheduler_betas_follow_diffusers(tmp_path, config, want):
    from ddpm_fast.pretrained import _diffusers_schedule

    schedule = _diffusers_schedule(_scheduler_config(tmp_path, **config))
    torch.testing.assert_close(schedule.betas.to(torch.float64), want, rtol=1e-6, atol=0)


def test_a_diffusers_cosine_schedule_is_ours_and_an_unknown_one_is_refused(tmp_path):
    """squaredcos_cap_v2 is read as our cosine schedule: diffusers' own betas
    (float32) to its rounding; a beta_schedule we lack is refused by name."""
    diffusers = pytest.importorskip("diffusers")
    from ddpm_fast.pretrained import _diffusers_schedule

    schedule = _diffusers_schedule(_scheduler_config(tmp_path, beta_schedule="squaredcos_cap_v2", num_train_timesteps=50))
    want = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", num_train_timesteps=50).betas
    assert schedule.name == "cosine"
    torch.testing.assert_close(schedule.betas, want.to(torch.float64), rtol=2e-7, atol=0)
    with pytest.raises(CheckpointError, match="unsupported diffusers beta_schedule 'sigmoid' in .*scheduler_config.json"):
        _diffusers_schedule(_scheduler_config(tmp_path, beta_schedule="sigmoid"))
