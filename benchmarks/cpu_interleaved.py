"""Our CPU ops against their eager peers, interleaved in one process.

pytest-benchmark times each implementation in its own block of rounds, so on a
noisy VM a peer can be measured in a slow minute and ours in a fast one. This
script alternates the two (a few calls of ours, a few of eager, forty times)
and prints both medians and their ratio; for GroupNorm+SiLU also those of
x.clone(), which moves the bytes the op must move (its floor on the CPU). Run
it after the README's set-up:

    .venv/bin/python benchmarks/cpu_interleaved.py

It sets glibc malloc's thresholds first, as the benchmarks' conftest does
(benchmarks/allocator.py: eager's temporaries kept off freshly mapped pages;
see BENCHMARKS.md). DDPM_FAST_CPU_SIMD=avx2 or none runs our narrower loops.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from allocator import keep_freed_pages
from ddpm_fast import NoiseSchedule, ops
from ddpm_fast.nn import GroupNormSiLU

SCHEDULE = NoiseSchedule("linear", timesteps=1000)
T_STEP = 500


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(name: str, ours: Callable[[], object], eager: Callable[[], object], rounds: int, calls: int = 3,
            floor: Callable[[], object] | None = None, same_result: bool = True) -> None:
    """Prints the medians of ours and eager (and of `floor`, a copy that moves
    the bytes the op must move, where given) and their ratios. With
    ``same_result`` (pairs that draw no noise of their own) ours must first give
    eager's result, float32 rounding apart: a wrong pair is not timed."""
    if same_result:
        torch.testing.assert_close(ours(), eager(), rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: wrong result, not timed: {m}")
    fns = [ours, eager] + ([floor] if floor is not None else [])
    for _ in range(3):  # warm-up
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, seconds in zip(fns, times):
            seconds += [_seconds(fn) for _ in range(calls)]
    a, b, *c = (statistics.median(seconds) * 1e3 for seconds in times)
    line = f"{name:36s} ours {a:8.3f} ms   eager {b:8.3f} ms   eager/ours {b / a:5.2f}x"
    if c:
        line += f"   copy {c[0]:7.3f} ms (ours at {c[0] / a:4.0%} of its speed; eager/copy {b / c[0]:4.2f}x)"
    print(line, flush=True)


SWEEP_SHAPES = [(32, 128, 32, 32), (32, 256, 16, 16), (32, 256, 8, 8), (32, 256, 4, 4), (2, 128, 128, 128),
                (1, 64, 256, 256)]


def sweep(rounds: int) -> None:
    """GroupNorm+SiLU (fp32, 32 groups, affine) on each shape and layout,
    without and with the ResBlock's per-(sample, channel) add."""
    with torch.inference_mode():
        for shape in SWEEP_SHAPES:
            for layout in (torch.contiguous_format, torch.channels_last):
                x = torch.randn(shape).contiguous(memory_format=layout)
                w, bias, add = torch.randn(shape[1]), torch.randn(shape[1]), torch.randn(shape[:2])
                name = f"{'x'.join(map(str, shape))} {'NHWC' if layout is torch.channels_last else 'NCHW'}"
                compare(f"group_norm_silu {name}", lambda: ops.group_norm_silu(x, 32, w, bias, backend="cpu"),
                        lambda: F.silu(F.group_norm(x, 32, w, bias)), rounds, floor=x.clone)
                compare(f"  with add {name}", lambda: ops.group_norm_silu(x, 32, w, bias, add=add, backend="cpu"),
                        lambda: F.silu(F.group_norm(x + add[..., None, None], 32, w, bias)), rounds, floor=x.clone)


SMALL_SHAPES = [(1, 16, 8, 8), (1, 32, 4, 4), (16, 32, 4, 4), (128, 64, 4, 4), (128, 256, 4, 4)]


def small(rounds: int) -> None:
    """Per-call costs: the GroupNormSiLU module against nn.GroupNorm + SiLU
    (fp32, NCHW, groups of 4 channels) on small maps, as the tiny U-Net at
    batch 1 and 16 and the CIFAR-10 U-Net's 4x4 level meet them, forward in
    inference mode and forward + backward."""
    for shape in SMALL_SHAPES:
        c = shape[1]
        fused, norm = GroupNormSiLU(c // 4, c), torch.nn.GroupNorm(c // 4, c)
        norm.load_state_dict(fused.state_dict())
        x = torch.randn(shape)
        xg, dy = x.clone().requires_grad_(), torch.randn(shape)
        name = "x".join(map(str, shape))
        with torch.inference_mode():
            compare(f"GroupNormSiLU {name}", lambda: fused(x), lambda: F.silu(norm(x)), rounds)
        # Gradients returned, not accumulated into .grad (as after
        # zero_grad(set_to_none=True) in training): .backward() in a loop
        # would add each call's into the last from the second call on.
        leaves_fused, leaves_norm = (xg, *fused.parameters()), (xg, *norm.parameters())
        compare(f"  forward+backward {name}", lambda: torch.autograd.grad(fused(xg), leaves_fused, dy),
                lambda: torch.autograd.grad(F.silu(norm(xg)), leaves_norm, dy), rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--sweep", action="store_true",
                        help="GroupNorm+SiLU over the U-Net's shapes and larger images, with and without add, only")
    parser.add_argument("--small", action="store_true",
                        help="per-call costs: GroupNorm+SiLU on small maps, forward and forward+backward, only")
    args = parser.parse_args()
    print(keep_freed_pages())
    torch.set_num_threads(args.threads)
    sqrt_ab = SCHEDULE.sqrt_alphas_cumprod.float()
    sqrt_1m_ab = SCHEDULE.sqrt_one_minus_alphas_cumprod.float()
    a, b, sigma = (float(SCHEDULE.sqrt_recip_alphas[T_STEP]), float(SCHEDULE.eps_coef[T_STEP]),
                   float(SCHEDULE.fixed_large_variance[T_STEP].sqrt()))
    if args.sweep:
        sweep(args.rounds)
        return
    if args.small:
        small(args.rounds)
        return
    with torch.inference_mode():
        for shape in [(128, 3, 32, 32), (8, 1, 512, 512)]:
            label = "x".join(map(str, shape))
            x0 = torch.randn(shape)
            t = torch.randint(0, SCHEDULE.num_timesteps, (shape[0],))
            view = (-1,) + (1,) * (len(shape) - 1)

            def eager_q_sample():
                eps = torch.randn_like(x0)
                return sqrt_ab[t].view(view) * x0 + sqrt_1m_ab[t].view(view) * eps, eps

            compare(f"q_sample {label}", lambda: ops.q_sample(x0, t, SCHEDULE, seed=1, backend="cpu"), eager_q_sample,
                    args.rounds, same_result=False)  # each its own noise
            x_t, eps = torch.randn(shape), torch.randn(shape)
            compare(f"ddpm_step {label}", lambda: ops.ddpm_step(x_t, eps, T_STEP, SCHEDULE, seed=1, backend="cpu"),
                    lambda: a * (x_t - b * eps) + sigma * torch.randn_like(x_t), args.rounds, same_result=False)
        for layout in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(32, 128, 32, 32).contiguous(memory_format=layout)
            w, bias = torch.randn(128), torch.randn(128)
            compare(f"group_norm_silu 32x128x32x32 {'NHWC' if layout is torch.channels_last else 'NCHW'}",
                    lambda: ops.group_norm_silu(x, 32, w, bias, backend="cpu"),
                    lambda: F.silu(F.group_norm(x, 32, w, bias)), args.rounds, floor=x.clone)


if __name__ == "__main__":
    main()
