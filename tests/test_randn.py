"""The shared Philox normal stream: the same numbers on every backend, the
numbers Triton's tl.randn gives, and statistically a standard normal stream."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import DTYPES, TOLERANCES, assert_one_graph_for_every_height, backend_params, gpu_if_present, requires_extension
from ddpm_fast import ops
from ddpm_fast.ops.randn import normal_reference, philox4x32_reference

SEEDS = [0, 123, 2**40 + 7, 2**63 - 1, 2**63, 2**64 - 1]  # 2^63 +- 1: where the signed conversion of the C++ ops turns
OFFSETS = [0, 12345, 2**32 - 5]  # the last one crosses into the counter's high word


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 7), (1031,)])
def test_backends_match_reference(device, backend, seed, offset, shape):
    expected = ops.randn(shape, seed, offset, backend="reference")
    got = ops.randn(shape, seed, offset, device=device, backend=backend)
    assert got.shape == shape and got.device.type == device
    torch.testing.assert_close(got.cpu(), expected, atol=2e-6, rtol=2e-6)


# Counters of seed 7 whose first Philox word folds to a uniform u1 below 1e-6
# (found by scanning philox4x32_reference): the stream's deep tail, where z
# shows the fold of a negative word (-x - 1, not -x: 1 part in 2000 of u1
# there) and the floor of u1 (1e-7, not 1e-6), which other counters never reach.
TAIL_SEED, TAIL_COUNTERS = 7, [1714520, 5454458, 6566458, 9182813]


@pytest.mark.parametrize("device,backend", backend_params())
def test_deep_tail_counters_match_reference(device, backend):
    c0 = philox4x32_reference(TAIL_SEED, torch.tensor(TAIL_COUNTERS))[0]
    folded = torch.where(c0 > 0x7FFFFFFF, (1 << 32) - 1 - c0, c0)
    assert (folded < 2147).all() and (c0 > 0x7FFFFFFF).sum() >= 2  # u1 < 1e-6; negative words among them
    for counter in TAIL_COUNTERS:
        want = normal_reference(TAIL_SEED, torch.arange(counter - 1, counter + 2))
        assert want[1].abs() > 3.5  # the tail indeed
        got = ops.randn((3,), TAIL_SEED, counter - 1, device=device, backend=backend).cpu()
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
def test_low_precision_outputs_are_the_rounded_stream(device, backend, dtype):
    expected = ops.randn(4099, 7, backend="reference").to(dtype)
    got = ops.randn(4099, 7, device=device, dtype=dtype, backend=backend)
    assert got.dtype == dtype
    # The float32 stream rounded once: where the backend's float32 value differs
    # from the reference's (by up to the float32 tolerance) across a rounding
    # boundary, the two roundings are one ulp apart (relative: the dtype's eps),
    # no more. (2^-7, the bound before, passed a float16 stream rounded through
    # bfloat16, or a float32 stream 60000 ulps off.)
    tol = TOLERANCES[torch.float32]
    rtol = tol["rtol"] if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(got.cpu().float(), expected.float(), atol=tol["atol"], rtol=rtol)
    # ... and only there: rare. (Under Triton's CPU interpreter, whose bfloat16
    # cast truncates, about half differed before the kernels rounded by bits.)
    if dtype != torch.float32:
        assert (got.cpu() != expected).float().mean() < 0.01


@gpu_if_present
def test_equals_triton_randn_for_32_bit_counters():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def draw(out_ptr, seed, offset, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(out_ptr + i, tl.randn(seed, offset + i))

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for seed, offset in [(0, 0), (123, 1000), (2**40 + 7, 2**30)]:
        out = torch.empty(256, device=device)
        draw[(1,)](out, seed, offset, N=256)
        ours = ops.randn(256, seed, offset, backend="reference")
        torch.testing.assert_close(out.cpu(), ours, atol=2e-6, rtol=2e-6)


def test_reference_philox_known_answer():
    # Random123's known-answer vector for philox4x32_10: counter 0, key 0.
    words = [int(w) for w in philox4x32_reference(0, torch.zeros(1, dtype=torch.int64))]
    assert words == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("device,backend", backend_params())
def test_offset_shifts_the_stream(device, backend):
    whole = ops.randn(600, 99, 1000, device=device, backend=backend)
    tail = ops.randn(100, 99, 1500, device=device, backend=backend)
    torch.testing.assert_close(whole[500:], tail, atol=0, rtol=0)


def test_signed_and_unsigned_seeds_are_the_same_key():
    torch.testing.assert_close(ops.randn(50, -1, backend="reference"), ops.randn(50, 2**64 - 1, backend="reference"))


def test_seeds_and_offsets_give_different_streams():
    a = ops.randn(64, 1, backend="reference")
    assert not torch.equal(a, ops.randn(64, 2, backend="reference"))
    assert not torch.equal(a, ops.randn(64, 1, 64, backend="reference"))


@pytest.fixture(scope="module")
def z():
    """2^20 draws from the CPU backend (the reference where it is not built)."""
    backend = "cpu" if ops.resolve_backend("auto", torch.device("cpu"), "t") == "cpu" else "reference"
    return ops.randn(TestStatistics.N, 2024, 10**9, backend=backend).double().numpy()


class TestStatistics:
    N = 1 << 20

    def test_mean_and_variance(self, z):
        se = 1 / math.sqrt(self.N)
        assert abs(z.mean()) < 5 * se
        assert abs(z.var() - 1) < 5 * math.sqrt(2) * se

    def test_higher_moments_and_tails(self, z):
        assert abs(stats.skew(z)) < 5 * math.sqrt(6 / self.N)
        assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24 / self.N)
        tail = np.mean(np.abs(z) > 3)
        expected = 2 * stats.norm.sf(3)
        assert abs(tail - expected) < 5 * math.sqrt(expected / self.N)

    def test_normality(self, z):
        assert stats.kstest(z, "norm").pvalue > 1e-4
        counts, edges = np.histogram(z, bins=np.linspace(-4, 4, 41))
        expected = self.N * np.diff(stats.norm.cdf(edges))
        assert stats.chisquare(counts, expected * counts.sum() / expected.sum()).pvalue > 1e-4

    def test_no_correlation_between_neighbours(self, z):
        bound = 5 / math.sqrt(self.N)
        for lag in (1, 2, 3, 4, 64):
            assert abs(np.corrcoef(z[:-lag], z[lag:])[0, 1]) < bound

    def test_no_correlation_across_seeds_and_high_counter_word(self, z):
        bound = 5 / math.sqrt(self.N)
        other_seed = ops.randn(self.N, 2025, 10**9, backend="reference").double().numpy()
        high_word = normal_reference(2024, torch.arange(self.N) + 10**9 + 2**32).double().numpy()
        assert abs(np.corrcoef(z, other_seed)[0, 1]) < bound
        assert abs(np.corrcoef(z, high_word)[0, 1]) < bound


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(shape=(-1, 3), seed=0), ValueError, "negative"),
        (dict(shape="abc", seed=0), TypeError, "shape"),
        (dict(shape=(2, True), seed=0), TypeError, "shape"),
        (dict(shape=(3,), seed=0, dtype=torch.float64), TypeError, "float32, float16 or bfloat16"),
        (dict(shape=(3,), seed=1.5), TypeError, "seed must be an int"),
        (dict(shape=(3,), seed=2**64), ValueError, "64 bits"),
        (dict(shape=(3,), seed=0, offset=-1), ValueError, "offset"),
        (dict(shape=(3,), seed=0, offset=2**63), ValueError, "offset"),
        (dict(shape=(3,), seed=0, backend="fast"), ValueError, "backend must be one of"),
        (dict(shape=(3,), seed=0, backend="cuda"), RuntimeError, "unavailable"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ops.randn(**kwargs)


def test_numpy_sizes_are_ints():
    """Refused ("shape must be an int or a sequence of ints, got (np.int64(2), 3)"),
    though every other count the ops take may be numpy's."""
    got = ops.randn((np.int64(2), np.int32(3)), 1)
    assert got.shape == (2, 3) and torch.equal(got, ops.randn((2, 3), 1))
    assert torch.equal(ops.randn(np.uint8(5), 1), ops.randn(5, 1))


def test_empty():
    assert ops.randn((0, 4), 1).shape == (0, 4)


@requires_extension
def test_opcheck_cpu():
    out = torch.empty(37)
    torch.library.opcheck(torch.ops.ddpm_fast.fill_randn_.default, (out, 5, 9))


@requires_extension
def test_cpp_op_rejects_bad_output():
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.ddpm_fast.fill_randn_(torch.empty(4, dtype=torch.float64), 0, 0)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.ddpm_fast.fill_randn_(torch.empty(4, 4).t(), 0, 0)


@requires_extension
@pytest.mark.parametrize("cap", ["avx2", "none"])
def test_cpu_vector_paths_are_bit_identical(tmp_path, cap):
    # The CPU kernel picks its widest vector path at run time (AVX-512, AVX2);
    # DDPM_FAST_CPU_SIMD caps it (none: the portable loops). The vector paths
    # must give the same bits; the portable loops, without fused multiply-adds,
    # the same normals to float rounding (the tolerance of the backends'
    # agreement, test_backends_match_reference). Where the CPU lacks a path, the
    # cap changes nothing.
    import os
    import subprocess
    import sys

    # The first case runs consecutive counters through every block (one
    # crosses 2^32); in the second, samples of 65 make blocks that span two;
    # the last two draw the clamped uniform of test_cpu_clamps_the_smallest_uniforms
    # (in a run, and in a block across samples).
    cases = [((4099, 2**40 + 3, 2**32 - 100), {}), (((5, 65), 7, 3), {"sample_stride": 2**33}),
             ((64, 0, 17758991 - 5), {}), (((2, 40), 0, 17758991 - 45), {})]
    script = (
        "import torch\n"
        "from ddpm_fast import ops\n"
        f"z = [ops.randn(*args, backend='cpu', **kwargs) for args, kwargs in {cases!r}]\n"
        f"torch.save(z, {str(tmp_path / 'z.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "DDPM_FAST_CPU_SIMD": cap})
    for (args, kwargs), capped in zip(cases, torch.load(tmp_path / "z.pt")):
        widest = ops.randn(*args, backend="cpu", **kwargs)
        if cap == "avx2":
            assert torch.equal(capped, widest)
        else:
            torch.testing.assert_close(capped, widest, atol=2e-6, rtol=2e-6)


@gpu_if_present
def test_opcheck_triton():
    pytest.importorskip("triton")
    from ddpm_fast.kernels import randn as _triton  # noqa: F401  (registers the op)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.empty(37, device=device)
    torch.library.opcheck(
        torch.ops.ddpm_fast.fill_randn_triton_.default, (out, 5, 9), test_utils=("test_schema", "test_faketensor")
    )


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("shape, stride", [((3, 2, 5), 2**32), ((3, 64), 100), ((3, 128), 2**32), ((5,), 1000)])
def test_sample_stride_gives_each_sample_its_own_range(device, backend, shape, stride):
    # Element j of sample n is normal(seed, offset + n * stride + j). Samples of
    # whole 64-value blocks: the CPU draws a block that ends a sample as a run and
    # must then move on to the next sample's counters (staying on the old one
    # drew past its end; a stride equal to the sample would hide that). A 1-d
    # tensor is a batch of one-element samples (a Triton kernel that took it for
    # one sample passed the rest).
    z = ops.randn(shape, 11, 7, sample_stride=stride, device=device, backend=backend).cpu()
    for n in range(3):
        alone = ops.randn((1, *shape[1:]), 11, 7 + n * stride, backend="reference")
        torch.testing.assert_close(z[n : n + 1], alone, atol=2e-6, rtol=2e-6)


def test_sample_stride_must_not_overlap():
    with pytest.raises(ValueError, match="overlap"):
        ops.randn((3, 10), 0, sample_stride=5)


@requires_extension
def test_cpp_op_compiles_for_a_dynamic_image_size():
    """The C++ op's counters were plain ints in its schema: the elements per
    sample (its default sample_stride) pinned a compiled graph to one image
    size (with mark_dynamic: a ConstraintViolationError)."""
    def noisy(x):
        return x + ops.randn(x.shape, 5, backend="cpu")

    assert_one_graph_for_every_height(noisy, lambda height: (torch.zeros(2, 3, height, 5),))


@pytest.mark.parametrize("device,backend", backend_params())
def test_clamps_the_smallest_uniforms(device, backend):
    """Counter 17758991 under seed 0 draws Philox word u1 = 121 * 2^-31 < 1e-7
    (found by searching the reference stream), which the stream clamps to 1e-7
    before the log (|z| <= 5.68). Every kernel must give the clamped normal (a
    Triton kernel clamping at 1e-8 passed the other tests), the C++ kernel both
    where it draws runs of consecutive counters (one sample) and where it draws
    counters one by one (a block across two samples)."""
    counter = 17758991
    c0 = philox4x32_reference(0, torch.tensor([counter]))[0].item()
    assert min(c0, 2**32 - 1 - c0) * 2.0**-31 < 1e-7
    run = ops.randn((64,), 0, offset=counter - 5, device=device, backend=backend).cpu()
    block = ops.randn((2, 40), 0, offset=counter - 45, device=device, backend=backend).cpu()
    want = normal_reference(0, torch.arange(counter - 45, counter + 59))
    assert want[45].abs() <= math.sqrt(-2 * math.log(1e-7)) + 1e-5
    torch.testing.assert_close(run, want[40:], atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(block.flatten(), want[:80], atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("device, backend", backend_params())
def test_rows_whose_run_crosses_2_to_the_32_match_reference(device, backend):
    """Rows of 64 or more elements are drawn as runs; a run whose counters cross
    a multiple of 2^32 must carry into the high word (the 1-d and 35-element
    cases above take the per-block path and never reach it). The CPU's vector
    paths share one high word over a run of 64 whose first and last counters
    share it: rows of 64 from 2^32 - k put each lane in turn at 2^32, the last
    lane alone for k = 63 (a run's last counter taken one short missed it)."""
    cases = [((2, 200), 3, 2**32 - 70)] + [((1, 64), 2**40 + 7, 2**32 - k) for k in range(1, 65)]
    for shape, seed, offset in cases:
        got = ops.randn(shape, seed, offset, device=device, backend=backend)
        want = ops.randn(shape, seed, offset, device=device, backend="reference")
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6, msg=f"{shape} from {offset}")
