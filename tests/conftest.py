"""Shared test set-up.

Without a GPU, Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET
must be set before any kernel module is imported, which happens lazily, on the
first call of a Triton backend.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import importlib
import os
import sys

import pytest
import torch

# Under pytest-xdist (the README's test command runs `-n auto`) the workers
# share the cores: each takes its share of torch's threads, and so do the
# processes it starts, so that no OpenMP team spins waiting for a core another
# worker holds (on the 2-core VM, two workers of 2 threads each ran the demo's
# training in 423 s, against 128 s alone).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, len(os.sched_getaffinity(0)) // _WORKERS) if hasattr(os, "sched_getaffinity") else 1
    torch.set_num_threads(_THREADS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ddpm_fast import _extension  # noqa: E402
from ddpm_fast.ops._backend import triton_available  # noqa: E402

# Per-dtype tolerances for a backend against the reference: both compute in
# float32, so outputs differ by float32 rounding, plus one ulp of the output
# type where a value lands near a rounding boundary.
TOLERANCES = {
    torch.float32: dict(atol=2e-6, rtol=2e-6),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=8e-3, rtol=8e-3),
}
DTYPES = list(TOLERANCES)


def skip_without_gpu_memory(gib: int = 40) -> None:
    """Skip a huge-tensor test on a GPU of less memory."""
    if torch.cuda.get_device_properties(0).total_memory < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of GPU memory")


# Issue 7's huge tensors over many samples: 1025 samples of 2^21 + 1 values (2.15e9
# elements), each with its own t (huge_timesteps); the windows (sample, start) of 1000
# values checked lie in the first sample, across element 2^31 (in sample 1023) and
# at the end of the last.
HUGE_SAMPLES, HUGE_PER_SAMPLE = 1025, 2**21 + 1
HUGE_WINDOWS = ((0, 0), (1023, 2**31 - 1023 * HUGE_PER_SAMPLE - 500), (1024, HUGE_PER_SAMPLE - 1000))


def huge_timesteps(num_timesteps: int) -> torch.Tensor:
    return torch.randint(0, num_timesteps, (HUGE_SAMPLES,), generator=torch.Generator().manual_seed(1)).cuda()


def device_backends() -> list[tuple[str, str]]:
    """(device, backend) pairs to test against the reference on this machine."""
    pairs = []
    if _extension.AVAILABLE:
        pairs.append(("cpu", "cpu"))
    if triton_available() and not HAS_CUDA:
        pairs.append(("cpu", "triton"))  # the interpreter
    if HAS_CUDA:
        pairs.append(("cuda", "reference"))
        if _extension.WITH_CUDA:
            pairs.append(("cuda", "cuda"))
        if triton_available():
            pairs.append(("cuda", "triton"))
    return pairs


def backend_params() -> list:
    marks = {"cuda": [pytest.mark.gpu]}
    return [pytest.param(d, b, id=f"{d}-{b}", marks=marks.get(d, [])) for d, b in device_backends()]


def layout_params(cases, shape=lambda case: case, case_id=lambda case: "x".join(map(str, case))) -> list:
    """(layout, case) for each case and both memory formats, channels_last only
    where the case's shape is 4-d: a pair that cannot exist is not made, so no
    test skips here for a reason other than a missing GPU."""
    return [pytest.param(layout, case, id=f"{layout}-{case_id(case)}")
            for layout in ("contiguous", "channels_last") for case in cases
            if layout == "contiguous" or len(shape(case)) == 4]


# glibc's malloc fills each block it hands out with the byte perturb ^ 0xFF
# while M_PERTURB is set (mallopt), but not the blocks it recycles through its
# thread cache (a CI run at a11d21e got a stale one), so that is only a
# best-effort extra for raw mallocs; torch's tensors are poisoned by torch.
_M_PERTURB = -6
_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallopt") else None
_PERTURB_BYTE = 0x80  # malloc fills with 0x7F: float32 3.4e38, float16 NaN


@contextlib.contextmanager
def _torch_fills_new_tensors():
    """torch's own mode: in deterministic mode (warn_only: no op refuses) every
    tensor torch.empty / at::empty makes is filled with NaN (ints with their
    maximum) whatever allocator handed out its memory. None of our kernels
    reads the flag, so the code paths under test stay the same."""
    was = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
        torch.utils.deterministic.fill_uninitialized_memory = was[2]


@contextlib.contextmanager
def poisoned_outputs(device: str, nbytes: int):
    """Inside, new tensors start as garbage rather than as stale or zeroed
    memory, so that an output element a kernel fails to write (or a scratch
    buffer it reads unwritten) shows up. On CUDA the caching allocator's next
    blocks (of about ``nbytes``) are filled with NaN first; on the CPU torch
    fills every new tensor with NaN, and glibc (where present) fills other
    fresh malloc blocks with 0x7F bytes."""
    if device.startswith("cuda"):
        blocks = [torch.full((nbytes // 4 + 1,), float("nan"), device=device) for _ in range(3)]
        del blocks
        yield
        return
    with _torch_fills_new_tensors():
        if _LIBC is None:
            yield
            return
        _LIBC.mallopt(_M_PERTURB, _PERTURB_BYTE)
        try:
            yield
        finally:
            _LIBC.mallopt(_M_PERTURB, 0)


def host_to_device_copies(fn):
    """(fn(), how many tensors it copied from the CPU to another device): the
    copies (aten._to_copy, aten.copy_) counted as they dispatch, so that meta
    tensors can stand in for a GPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
                source = args[1] if func is torch.ops.aten.copy_.default else args[0]
                Copies.count += source.device.type == "cpu" and out.device.type != "cpu"
            return out

    with Copies():
        result = fn()
    return result, Copies.count


def assert_one_graph_for_every_height(fn, make_inputs, heights=(4, 6)) -> None:
    """``fn(*make_inputs(height))`` compiled once (fullgraph, aot_eager) serves
    every height, marked dynamic on the inputs' dim 2, bit for bit as eager: a
    plain-int argument derived from the shape would pin the graph to one."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for height in heights:
            inputs = make_inputs(height)
            for tensor in inputs:
                torch._dynamo.mark_dynamic(tensor, 2)
            want = fn(*inputs)  # (eager first: it fills the backend cache, which the graph guards on)
            torch.testing.assert_close(compiled(*inputs), want, rtol=0, atol=0)


def gpu_if_present(test):
    """For a test that runs on the GPU where there is one and on the CPU
    (Triton's interpreter) otherwise: marked `gpu` only where CUDA is present,
    so that `pytest -m gpu` (benchmarks/run_gpu.sh) selects it there, while
    without a GPU it is not skipped and runs on the CPU as before."""
    return pytest.mark.gpu(test) if HAS_CUDA else test


def _gpu_run_order(item) -> int:
    """0: the CUDA C++ kernels and the other tests; 1: Triton; 2: the reference
    backend on CUDA (plain PyTorch)."""
    params = item.callspec.params if hasattr(item, "callspec") else {}
    if params.get("backend") == "triton" or "triton" in item.name:
        return 1
    return 2 if params.get("backend") == "reference" and params.get("device", "cuda") == "cuda" else 0


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        # The GPU tests (about 5300) may not all fit a time-limited run such as
        # benchmarks/run_gpu.sh's: run the CUDA C++ kernels' tests first, then
        # Triton's (hundreds of specializations compile on first use), then the
        # reference on CUDA, so that a cut drops the least telling ones.
        # A stable sort: the order within each class stays the collected one.
        items.sort(key=_gpu_run_order)
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
    if _WORKERS > 1:
        # The modules with the most slow tests first (xdist hands out whole
        # modules, in this order: see pytest_configure): the demo's test alone
        # takes 2-3 minutes, which last would run on one worker while the
        # others idle. A stable sort: each module's tests stay together, in
        # their order.
        slow = collections.Counter(item.path for item in items if "slow" in item.keywords)
        items.sort(key=lambda item: -slow[item.path])


def pytest_configure(config):
    # `--dist loadscope` (the README's test command) would hand out modules
    # in order of their number of tests, putting the demo's (five tests, one
    # of them 2-3 minutes long) last; keep the order above instead.
    if getattr(config.option, "dist", "no") == "loadscope":
        config.option.loadscopereorder = False


requires_extension = pytest.mark.skipif(not _extension.AVAILABLE, reason="the C++ extension is not built")


def save_tiny_diffusers_pipeline(folder, timesteps: int):
    """A tiny diffusers UNet2DModel of the DDPM layout (1 x 8 x 8), saved with a
    linear scheduler config of ``timesteps`` steps (beta 2e-4 to 0.03) as a
    pipeline folder (``unet/``, ``scheduler/``); returns the model, in eval mode."""
    import json

    diffusers = pytest.importorskip("diffusers")  # each caller is skipped without it
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
        norm_num_groups=4, attention_head_dim=None,
    ).eval()
    unet.save_pretrained(folder / "unet")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"beta_schedule": "linear", "beta_start": 2e-4, "beta_end": 0.03, "num_train_timesteps": timesteps}))
    return unet


@pytest.fixture(autouse=True)
def _torch_generator_seeded():
    """Every test starts from the same torch generator state, whatever ran
    before it: a test that draws unseeded inputs sees the same ones alone, in
    the full run, or after a test is added."""
    torch.manual_seed(0)


@pytest.fixture
def triton_split_path(monkeypatch):
    """Shrink the Triton tiles so that every case takes the split path (partial
    moments per position tile, combined by torch) with several position tiles."""
    gn = importlib.import_module("ddpm_fast.kernels.group_norm_silu")
    monkeypatch.setattr(gn, "MAX_TILE", 8)
    monkeypatch.setattr(gn, "MAX_TILE_BACKWARD", 8)
    monkeypatch.setattr(gn, "SPLIT_TILE", 16)
    return gn


# test_cli.py's and test_cli_errors.py's: a small .npz dataset and a finished
# 4-step run of the tiny U-Net on it, made once per module.
@pytest.fixture(scope="module")
def toy_npz(tmp_path_factory):
    from train_helpers import save_toy_npz

    path = tmp_path_factory.mktemp("data") / "toy.npz"
    save_toy_npz(path)
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, toy_npz):
    from ddpm_fast.cli import main as cli_main

    out = tmp_path_factory.mktemp("run")
    code = cli_main([
        "train", "--data", str(toy_npz), "--out", str(out), "--model", "tiny", "--steps", "4",
        "--batch-size", "8", "--timesteps", "20", "--checkpoint-every", "2", "--log-every", "1",
        "--warmup", "2", "--no-flip", "--device", "cpu",
    ])
    assert code == 0
    return out


@pytest.fixture
def sigint_inside_safetensors_read(monkeypatch):
    """Sends this process a SIGINT from inside safetensors' read of a tensor, on
    the third one (torch.asarray's C++ reads element 0 of the storage to find
    its shape: where torch turned a KeyboardInterrupt into a ValueError). The
    calls so far, for the test to check that the read still goes this way."""
    import signal

    getitem = torch.UntypedStorage.__getitem__
    calls = []

    def ctrl_c_inside(self, index, *args):
        if index == 0:
            calls.append(1)
            if len(calls) == 3:
                signal.raise_signal(signal.SIGINT)
        return getitem(self, index, *args)

    monkeypatch.setattr(torch.UntypedStorage, "__getitem__", ctrl_c_inside)
    return calls
