"""``ddpm-fast demo``: the whole pipeline in minutes on a laptop CPU — train a
tiny U-Net on the 8x8 handwritten digits bundled with scikit-learn (no
download), then sample from its EMA weights.

The recipe is the paper's, shrunk to fit: the same linear schedule over
T = 1000 steps and L_simple, but a 0.18M-parameter U-Net, a higher learning rate
with a short warm-up, a faster EMA (0.999, warmed up) and no flips (mirrored
digits are not digits).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ._checks import check_bool, is_int
from ._interrupts import default_device
from .checkpoint import CheckpointError
from .data import ImageDataset, load_digits
from .images import GRID_SAMPLES, save_grid, save_npz, to_uint8
from .models import UNet
from .sampler import Sampler
from .schedules import NoiseSchedule
from .train import ConfigMismatchError, TrainConfig, Trainer

__all__ = ["run_demo", "digit_quality", "DEMO_STEPS", "DEMO_SAMPLE_STEPS", "MAX_DEMO_SAMPLES"]

DEMO_STEPS = 1200
DEMO_SAMPLE_STEPS = 250  # respaced: 4x faster than all 1000 steps; tests/test_demo.py samples this way too
MAX_DEMO_SAMPLES = 10_000  # drawn in one batch


def demo_config(steps: int, seed: int) -> TrainConfig:
    return TrainConfig(
        steps=steps, batch_size=128, lr=1e-3, warmup=100, ema_decay=0.999, flip=False,
        seed=seed, log_every=50, checkpoint_every=max(steps // 4, 1), keep_checkpoints=1,
        sample_count=100,
    )


def digit_quality(images: np.ndarray, *, fit: slice | np.ndarray = slice(None)) -> dict[str, float]:
    """How digit-like uint8 N x 8 x 8 x 1 samples are, judged by an RBF support
    vector classifier of the real digits with libsvm's pairwise-coupled Platt
    probabilities (which, unlike a linear model's or a recalibrated one-vs-rest
    SVM's, stay low on noise and on blends of two digits): the mean top-class
    probability (``confidence``), the share of samples classified with p > 0.8
    (``confident``) and how many of the 10 classes those cover (``classes``).
    It is fit on the real digits (``fit``: which of them; all by default). Real
    digits it was not fit on score about 0.90 / 0.85 / 10 (those it was fit on,
    0.96 / 0.96); uniform noise 0.23 / 0; averages of two digits 0.59 / 0.18."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.svm import SVC

    digits = sklearn_digits()
    with warnings.catch_warnings():  # `probability=True` is deprecated in 1.9 for a
        warnings.simplefilter("ignore", FutureWarning)  # wrapper that lacks the coupling
        classifier = SVC(probability=True, random_state=0).fit(digits.data[fit], digits.target[fit])
    features = images.reshape(len(images), -1).astype(np.float64) * 16 / 255  # back to the 0..16 scale
    probs = classifier.predict_proba(features)
    top = probs.max(1)
    confident = top > 0.8
    return {
        "confidence": float(top.mean()),
        "confident": float(confident.mean()),
        "classes": int(len(set(probs.argmax(1)[confident].tolist()))),
    }


def _tiny_unet(dataset: ImageDataset) -> UNet:
    """The demo's U-Net: float32 on the CPU, with the same initial weights whatever
    torch's default dtype and device (under a float64 default it came out float64,
    which the Trainer refuses)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with default_device("cpu"):
            return UNet.tiny(image_size=dataset.image_size, in_channels=dataset.channels)
    finally:
        torch.set_default_dtype(default)


def run_demo(
    out: str | Path,
    *,
    steps: int | None = None,
    samples: int = 100,
    sample_steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> str:
    """Train, then write ``samples.png``, ``samples.npz`` (key ``images``, uint8
    N x 8 x 8 x 1) and ``loss.png`` (for two logged losses or more: the demo logs
    every 50 steps and at its last, so not for ``steps`` up to 50) into ``out``;
    the run itself (checkpoints, log) goes to ``out/run`` and is resumed if the
    demo is started again."""
    steps = DEMO_STEPS if steps is None else steps
    sample_steps = DEMO_SAMPLE_STEPS if sample_steps is None else sample_steps
    schedule = NoiseSchedule("linear", timesteps=1000)
    # Checked before training, not after minutes of it (as the Sampler would).
    if not is_int(sample_steps) or not 1 <= sample_steps <= schedule.num_timesteps:
        raise ValueError(f"sample_steps must be an int in [1, {schedule.num_timesteps}], got {sample_steps!r}")
    if not is_int(samples) or not 1 <= samples <= MAX_DEMO_SAMPLES:  # one batch: 10,000 took 1.4 GB here
        raise ValueError(f"samples must be an int in [1, {MAX_DEMO_SAMPLES}] (the demo draws them in one batch; "
                         f"draw more from its run with ddpm-fast sample --checkpoint OUT/run), got {samples!r}")
    check_bool(progress, "progress")  # before training, not when sampling starts after it
    config = demo_config(steps, seed)  # checks steps and seed, before anything is made
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)  # the model's initial weights and dropout
    dataset = load_digits()
    model = _tiny_unet(dataset)
    start = time.perf_counter()
    trainer = Trainer(model, dataset, schedule, config, out / "run", device="cpu", progress=progress)
    try:
        trained_steps = trainer.train(final_samples=False)["trained"]
    except ConfigMismatchError as error:  # the demo has no --no-resume: say what does apply
        raise CheckpointError(f"{out / 'run'} holds a demo run with other settings "
                              f"({'; '.join(error.differences)}): rerun with its settings, or pass another --out") from None
    trained = time.perf_counter() - start
    sampler = Sampler(trainer.ema, schedule, device="cpu", cuda_graph=False, channels_last=trainer.config.channels_last)
    x = sampler.sample(samples, seed=seed, steps=sample_steps, progress=progress)
    images = to_uint8(x)
    save_grid(images[:GRID_SAMPLES], out / "samples.png", nrow=10)
    save_npz(images, out / "samples.npz")
    loss_curve = out / "run" / "loss.png"
    if loss_curve.exists():
        (out / "loss.png").write_bytes(loss_curve.read_bytes())
    quality = digit_quality(images)
    return (
        f"demo: trained {trained_steps} steps{'' if trained_steps == steps else f' (to step {trainer.step})'} "
        f"in {trained:.0f} s, sampled {samples} digits in "
        f"{time.perf_counter() - start - trained:.0f} s; wrote {out / 'samples.png'} and {out / 'samples.npz'}\n"
        f"a classifier of the real digits is confident (p > 0.8) on {quality['confident']:.0%} of the samples "
        f"(mean top probability {quality['confidence']:.2f}), which cover {quality['classes']} of the 10 digits"
    )
