"""bits/dim of a dataset: a trained model beats an untrained one, and the
batched evaluation equals one call of the reference bound."""

from __future__ import annotations

import pytest
import torch

from ddpm_fast import ops
from ddpm_fast.data import ImageDataset, load_digits
from ddpm_fast.diffusion import bits_per_dim
from ddpm_fast.evaluate import evaluate_bpd
from ddpm_fast.models import UNet
from ddpm_fast.schedules import NoiseSchedule
from ddpm_fast.train import TrainConfig, Trainer

SCHEDULE = NoiseSchedule("linear", timesteps=100, beta_start=1e-3, beta_end=0.2)


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    data = load_digits()
    return ImageDataset(data.images[:256], name="digits-256")


@pytest.mark.slow
def test_trained_model_has_lower_bits_per_dim(digits, tmp_path):
    torch.manual_seed(0)
    untrained = UNet.tiny()
    trained = UNet.tiny()
    trained.load_state_dict(untrained.state_dict())
    config = TrainConfig(steps=150, batch_size=64, lr=2e-3, warmup=20, flip=False, checkpoint_every=150, ema_decay=0.95)
    trainer = Trainer(trained, digits, SCHEDULE, config, tmp_path, device="cpu", progress=False)
    trainer.train(final_samples=False)
    before = evaluate_bpd(untrained.eval(), digits, SCHEDULE, n=32, batch_size=32)
    after = evaluate_bpd(trainer.ema, digits, SCHEDULE, n=32, batch_size=32)
    assert after["total"] < before["total"] - 0.5, (before["summary"], after["summary"])
    assert after["vb"] < before["vb"]


def test_batches_equal_one_call_of_the_bound(digits):
    """Image i's noise at timestep t is normal(seed, i * 2^32 + t * 64 + j), its
    own stream: one bits_per_dim call over the six images with that noise gives
    the bound, and any split into batches gives it too (with a generator drawn
    batch by batch, --batch-size changed the result: 8.49 against 8.60)."""
    torch.manual_seed(1)
    model = UNet.tiny().eval()
    x0 = digits.batch(torch.arange(6))
    noise = lambda t: ops.randn(x0.shape, 5, t * 64, sample_stride=2**32)  # noqa: E731
    direct = bits_per_dim(model, x0, SCHEDULE, noise_fn=noise)
    for batch_size in (6, 4, 1):
        result = evaluate_bpd(model, digits, SCHEDULE, n=6, batch_size=batch_size, seed=5)
        assert result["total"] == pytest.approx(direct.total.double().mean().item(), rel=1e-6)
        assert result["prior"] == pytest.approx(direct.prior.double().mean().item(), rel=1e-6)
        assert result["decoder"] == pytest.approx(direct.decoder.double().mean().item(), rel=1e-6)
    assert result["total"] == pytest.approx(result["prior"] + result["vb"] + result["decoder"], rel=1e-6)
    assert len(result["terms"]) == 100 and result["images"] == 6
    assert evaluate_bpd(model, digits, SCHEDULE, n=6, seed=6)["total"] != pytest.approx(result["total"], rel=1e-6)


def test_channels_last_batches_follow_the_model_and_give_the_same_bound():
    data = ImageDataset(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)))
    torch.manual_seed(3)
    model = UNet.tiny(in_channels=3).eval()
    seen = []
    model.register_forward_pre_hook(lambda _, args: seen.append(not args[0].is_contiguous()))  # 3 channels: CL is not contiguous
    nchw = evaluate_bpd(model, data, SCHEDULE, n=4)
    assert set(seen) == {False}
    seen.clear()
    cl = evaluate_bpd(model.to(memory_format=torch.channels_last), data, SCHEDULE, n=4)
    assert set(seen) == {True}
    seen.clear()
    evaluate_bpd(model, data, SCHEDULE, n=4, channels_last=False)
    assert set(seen) == {False}
    # The same noise either way: only the convolutions' rounding differs.
    assert cl["total"] == pytest.approx(nchw["total"], rel=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, r"n must be an int in \[1, 256\]"),
    ({"n": 1000}, r"n must be an int in \[1, 256\]"),
    ({"batch_size": 0}, "batch_size must be a positive int"),
])
def test_bad_arguments(digits, kwargs, message):
    with pytest.raises(ValueError, match=message):
        evaluate_bpd(UNet.tiny(), digits, SCHEDULE, **kwargs)


@pytest.mark.parametrize("dataset", [torch.rand(4, 1, 8, 8), [torch.zeros(1, 8, 8)] * 4])
def test_the_dataset_must_be_an_image_dataset(dataset):
    """A tensor of images (it has a len) failed with an AttributeError on a
    missing method; the Trainer already said what it wants."""
    with pytest.raises(TypeError, match=r"evaluate_bpd: dataset must be a ddpm_fast.data.ImageDataset .* got (Tensor|list)"):
        evaluate_bpd(UNet.tiny(), dataset, SCHEDULE)


def test_model_and_data_must_match(digits):
    with pytest.raises(ValueError, match="the model takes 3-channel 8px images"):
        evaluate_bpd(UNet.tiny(in_channels=3), digits, SCHEDULE)


def test_active_dropout_is_warned_about(digits):
    """As the Sampler does: in training mode, dropout makes the bound depend on
    more than the seed (it was evaluated silently, and differed run to run)."""
    torch.manual_seed(4)
    model = UNet.tiny(dropout=0.5)
    with pytest.warns(RuntimeWarning, match="evaluate_bpd: the model has active dropout"):
        evaluate_bpd(model, digits, NoiseSchedule("linear", timesteps=4), n=2)


def test_terms_are_listed_by_timestep(digits):
    """terms[t] is L_t: terms[0] the decoder, terms[1:] adding up to vb."""
    torch.manual_seed(4)
    result = evaluate_bpd(UNet.tiny().eval(), digits, NoiseSchedule("linear", timesteps=4), n=2)
    assert len(result["terms"]) == 4 and result["terms"][0] == result["decoder"]
    assert sum(result["terms"][1:]) == pytest.approx(result["vb"], rel=1e-12)


def test_the_images_go_to_the_models_device_by_default(digits, monkeypatch):
    """device=None follows the model's parameters (as the Sampler's does): a
    CUDA model was fed CPU images by the old default, device="cpu". Here a
    model on the meta device stands in for one on a GPU."""
    import ddpm_fast.evaluate as evaluate

    class Seen(Exception):
        pass

    def bound(model, x0, schedule, noise_fn, progress):
        raise Seen(x0.device, noise_fn(0).device)

    on_meta = torch.nn.Conv2d(1, 1, 1, device="meta")
    on_meta.in_channels, on_meta.image_size = 1, 8
    monkeypatch.setattr(evaluate, "bits_per_dim", bound)
    monkeypatch.setattr(evaluate, "_check_materialized", lambda model, op: None)  # (meta weights are refused)
    for model, device in [(on_meta, "meta"), (lambda x, t: x, "cpu")]:  # no parameters: the CPU
        with pytest.raises(Seen) as seen:
            evaluate_bpd(model, digits, SCHEDULE, n=2)
        assert seen.value.args == (torch.device(device),) * 2


def test_more_noise_than_an_images_counters_is_refused_before_any_work(monkeypatch):
    """Image i's noise lives in counters [i * 2^32, (i + 1) * 2^32): past them it
    would reuse image i+1's, a silently wrong bound. A smaller range stands in."""
    import ddpm_fast.evaluate

    monkeypatch.setattr(ddpm_fast.evaluate, "_SAMPLE_STRIDE", 64)
    data = ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8))

    def model(x, t):
        raise AssertionError("the model ran")

    with pytest.raises(ValueError, match=r"10 timesteps of 16 values per image exceed an image's 2\^32 noise counters"):
        evaluate_bpd(model, data, NoiseSchedule("linear", timesteps=10), device="cpu")
