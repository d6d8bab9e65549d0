"""How far a bfloat16 or float16 model moves the samples from float32's.

Samples a trained checkpoint with the model in each dtype and the same seed
(so the same noise: x_t and the step stay float32), then reports each dtype's
distance from the float32 samples and the demo's digit-classifier score (for
checkpoints of the 8x8 digits). This is the evidence behind ``ddpm-fast sample
--dtype auto`` (README, the Sampler's precision note).

Usage: python benchmarks/sample_precision.py CHECKPOINT [-n 400] [--steps K]
       [--seed 1] [--dtypes fp32,bf16,fp16] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

from ddpm_fast.cli import DTYPES
from ddpm_fast.demo import digit_quality
from ddpm_fast.images import to_uint8
from ddpm_fast.pretrained import load_model
from ddpm_fast.sampler import Sampler

def sample(checkpoint: str, dtype: torch.dtype, n: int, steps: int | None, seed: int, device: str) -> torch.Tensor:
    model, schedule = load_model(checkpoint, weights="ema", device=device)
    model = model.to(dtype).to(memory_format=torch.channels_last)
    sampler = Sampler(model, schedule, dtype=dtype, device=device)
    return sampler.sample(n, seed=seed, steps=steps, progress=False).float().cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("-n", type=int, default=400)
    parser.add_argument("--steps", type=int, default=None, help="respaced steps (default: all T)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dtypes", default="fp32,bf16,fp16")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    unknown = set(args.dtypes.split(",")) - set(DTYPES)
    if unknown:
        parser.error(f"--dtypes: unknown {', '.join(sorted(unknown))}; expected some of {', '.join(DTYPES)}")
    names = ["fp32"] + [name for name in args.dtypes.split(",") if name != "fp32"]  # the baseline first, once
    baseline = None
    for name in names:
        start = time.perf_counter()
        x = sample(args.checkpoint, DTYPES[name], args.n, args.steps, args.seed, args.device)
        seconds = time.perf_counter() - start
        baseline = x if baseline is None else baseline
        diff = (x - baseline).abs()
        images, base_images = to_uint8(x), to_uint8(baseline)
        line = (f"{name}: {seconds:.0f} s; |x - x_fp32| mean {diff.mean():.5f} max {diff.max():.4f}; "
                f"uint8 pixels that differ {(images != base_images).mean():.2%}")
        if images.shape[1:] == (8, 8, 1):
            q = digit_quality(images)
            line += f"; digits: confident {q['confident']:.1%}, mean top p {q['confidence']:.3f}, classes {q['classes']}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
