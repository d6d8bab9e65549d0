"""Every CUDA C++ kernel path once, on small inputs, for compute-sanitizer
(issue 7: memcheck and racecheck report nothing): q_sample (drawn and given
noise), ddpm_step (each variance, the clipped form, DDIM, the model-input
output, 16-bit x_t, given noise), randn (with per-sample streams too), and
GroupNorm+SiLU forward (fused, split and cluster paths) and backward, in
float32 and bfloat16, NCHW and channels_last; and q_sample and ddpm_step on
one sample in float16 and bfloat16, and on empty tensors. Each result is
compared with the reference, so a run that reports nothing also computed
right. Run by tests/sanitize/run.sh on a GPU machine."""

from __future__ import annotations

import os

import torch

from ddpm_fast import NoiseSchedule, _extension, ops

SCHEDULE = NoiseSchedule("linear")
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}


def layouts(x: torch.Tensor):
    yield x
    if x.dim() == 4:
        yield x.contiguous(memory_format=torch.channels_last)


def close(got, want, what: str) -> None:
    torch.testing.assert_close(got.float(), want.float(), **TOL[want.dtype], msg=lambda m: f"{what}: {m}")


def elementwise() -> int:
    count = 0
    for dtype in (torch.float32, torch.bfloat16):
        for x in layouts(torch.randn(3, 5, 7, 9, device="cuda", dtype=dtype)):
            t = torch.tensor([0, 500, 999], device="cuda")
            got = ops.q_sample(x, t, SCHEDULE, seed=1, backend="cuda")
            want = ops.q_sample(x, t, SCHEDULE, seed=1, backend="reference")
            close(got[0], want[0], f"q_sample {dtype}")
            noise = torch.randn_like(x)
            close(ops.q_sample(x, t, SCHEDULE, noise=noise, backend="cuda")[0],
                  ops.q_sample(x, t, SCHEDULE, noise=noise, backend="reference")[0], f"q_sample given {dtype}")
            eps = torch.randn_like(x)
            for kwargs in (dict(variance="fixed_large"), dict(variance="fixed_small"), dict(clip_denoised=True), dict(eta=0.5)):
                x32 = x.float()
                model_input = torch.empty_like(x)
                got = ops.ddpm_step(x32, eps, t, SCHEDULE, seed=2, out_model_input=model_input, backend="cuda", **kwargs)
                want = ops.ddpm_step(x32, eps, t, SCHEDULE, seed=2, backend="reference", **kwargs)
                close(got, want, f"ddpm_step {kwargs} {dtype}")
                close(model_input, want.to(dtype), f"ddpm_step model input {kwargs} {dtype}")
                count += 1
    close(ops.randn(100_003, 5, 7, device="cuda", backend="cuda"), ops.randn(100_003, 5, 7, device="cuda", backend="reference"), "randn")
    strided = dict(sample_stride=2**32, device="cuda")  # per-sample streams
    close(ops.randn((7, 1001), 5, 3, backend="cuda", **strided), ops.randn((7, 1001), 5, 3, backend="reference", **strided),
          "randn sample_stride")
    return count + 2 + edge_cases()


def edge_cases() -> int:
    """float16 and 16-bit x_t (the step's x_t in its own dtype), given noise,
    one sample, and empty tensors (no launch at all)."""
    count = 0
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(1, 3, 5, 5, device="cuda", dtype=dtype)
        eps, z, t = torch.randn_like(x), torch.randn_like(x), torch.tensor([7], device="cuda")
        close(ops.q_sample(x, t, SCHEDULE, seed=1, backend="cuda")[0],
              ops.q_sample(x, t, SCHEDULE, seed=1, backend="reference")[0], f"q_sample one sample {dtype}")
        for noise in (dict(noise=z), dict(seed=3)):
            close(ops.ddpm_step(x, eps, t, SCHEDULE, backend="cuda", **noise),
                  ops.ddpm_step(x, eps, t, SCHEDULE, backend="reference", **noise), f"ddpm_step {dtype} x_t {list(noise)}")
        count += 3
    empty = torch.empty(0, 3, 4, 4, device="cuda")
    assert ops.q_sample(empty, 5, SCHEDULE, seed=1, backend="cuda")[0].shape == empty.shape
    assert ops.ddpm_step(empty, empty, 5, SCHEDULE, seed=1, backend="cuda").shape == empty.shape
    assert ops.randn((0, 5), 1, device="cuda", backend="cuda").shape == (0, 5)
    return count + 3


def group_norm(shapes) -> int:
    count = 0
    for shape, groups in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            for x in layouts(torch.randn(shape, device="cuda", dtype=dtype)):
                # In x's dtype: ATen's GPU group_norm (the reference) takes no mixed dtypes.
                w, b = torch.randn(shape[1], device="cuda", dtype=dtype), torch.randn(shape[1], device="cuda", dtype=dtype)
                add = torch.randn(shape[:2], device="cuda", dtype=dtype)
                dy = torch.randn_like(x)
                results = []
                for backend in ("cuda", "reference"):
                    xs, ws, bs, adds = (v.clone().requires_grad_() for v in (x, w, b, add))
                    y = ops.group_norm_silu(xs, groups, ws, bs, add=adds, backend=backend)
                    results.append((y, *torch.autograd.grad(y, (xs, ws, bs, adds), dy)))
                for k, (got, want) in enumerate(zip(*results)):
                    # Relative to the result's norm, or to 1e-2 per element where that is
                    # near 0 (the add's gradient when a group is one channel: exactly 0).
                    scale = max(want.float().norm().item(), 1e-2 * want.numel() ** 0.5)
                    error = (got.float() - want.float()).norm().item() / scale
                    assert error < (1e-4 if dtype == torch.float32 else 2e-2), f"group_norm_silu {shape} {dtype} output {k}: {error}"
                count += 1
    return count


def main() -> None:
    assert _extension.WITH_CUDA, "the CUDA kernels are not built"
    count = elementwise()
    small = [((4, 64, 17, 19), 8), ((2, 6, 5, 5), 3), ((3, 6, 31), 3)]  # fused path (N x C x L too)
    large = [((2, 32, 160, 160), 4)]  # a group of 204,800 values: past the fused path
    count += group_norm(small)
    os.environ["DDPM_FAST_GN_CLUSTER"] = "0"  # read per call: the split path
    count += group_norm(large)
    del os.environ["DDPM_FAST_GN_CLUSTER"]  # the cluster path (the default), where the GPU has it (sm_90+)
    count += group_norm(large)
    torch.cuda.synchronize()
    print(f"sanitize kernels: {count} cases ran and matched the reference")


if __name__ == "__main__":
    main()
