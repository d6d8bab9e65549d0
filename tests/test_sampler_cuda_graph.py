"""The Sampler's CUDA-graph path: on a GPU against the plain loop, and its
logic on the CPU with torch.cuda faked (capture, replay, fallback, the
allocator's pool, the autocast cache, the progress bar)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import warnings

import pytest
import torch

import ddpm_fast.sampler as sampler_module
from ddpm_fast import Sampler, _extension, graph_capture
from ddpm_fast.ops._backend import triton_available
from ddpm_fast.sampler import _NoBar
from test_sampler import SCHEDULE, GaussianOracle

# A CUDA-graph test that silently fell back to the plain loop would compare the
# plain loop with itself: here a failed capture is an error (pytest.warns, where
# a test expects one, still records it).
pytestmark = pytest.mark.filterwarnings("error:ddpm_fast. CUDA graph capture failed:RuntimeWarning")

def graph_backends() -> list:
    """The kernel backends a CUDA graph captures: GPU tests, skipped where not built."""
    built = {"cuda": _extension.WITH_CUDA, "triton": triton_available()}
    return [
        pytest.param(b, marks=[pytest.mark.gpu, pytest.mark.skipif(not built[b], reason=f"no {b} backend")])
        for b in built
    ]


@pytest.mark.parametrize("backend", graph_backends())
@pytest.mark.parametrize(
    "steps,eta",
    # 1000 steps: many replays; 120: two replays of 50 and leftover plain steps; DDIM.
    [(None, None), (120, None), (120, 0.0)],
)
def test_cuda_graph_equals_plain_loop(backend, steps, eta):
    kw = dict(clip_denoised=True, sample_shape=(3, 8, 8), device="cuda", backend=backend)
    run = dict(seed=2, steps=steps, eta=eta, progress=False)
    oracle = GaussianOracle()
    graphed = Sampler(oracle, SCHEDULE, cuda_graph=True, **kw).sample(16, **run)
    plain = Sampler(GaussianOracle(), SCHEDULE, cuda_graph=False, **kw).sample(16, **run)
    assert torch.equal(graphed, plain)
    # The model ran in Python for the 3 warm-up steps, the capture of 50 and the
    # leftover steps only: the replays did the rest.
    total = steps or 1000
    assert len(oracle.seen) == 3 + 50 + (total - 3) % 50


@pytest.mark.parametrize("backend", graph_backends())
def test_cuda_graph_of_the_unet_equals_plain_loop(backend):
    """The configuration the Sampler's defaults run: the U-Net (fused
    GroupNorm+SiLU with the time-embedding add, attention) in bf16
    channels_last, its input written by the step (out_model_input)."""
    from ddpm_fast.models import UNet

    torch.manual_seed(0)
    model = UNet.tiny(image_size=8, in_channels=3).cuda().eval().to(torch.bfloat16).to(memory_format=torch.channels_last)
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    kw = dict(dtype=torch.bfloat16, channels_last=True, device="cuda", backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to the plain loop, no non-finite samples
        graphed = Sampler(model, SCHEDULE, cuda_graph=True, **kw).sample(16, seed=5, steps=120, progress=False)
    assert len(calls) == 3 + 50 + (120 - 3) % 50  # the replays ran the rest
    plain = Sampler(model, SCHEDULE, cuda_graph=False, **kw).sample(16, seed=5, steps=120, progress=False)
    assert torch.equal(graphed, plain)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_graph_on_a_device_that_is_not_the_current_one():
    # Streams and graphs made on the current device (cuda:0) would capture nothing
    # of the work on cuda:1: the replays would do nothing and return about x_T.
    kw = dict(clip_denoised=True, sample_shape=(3, 8, 8), device="cuda:1")
    with torch.cuda.device(0):
        graphed = Sampler(GaussianOracle(), SCHEDULE, **kw).sample(16, seed=2, steps=120, progress=False)
        assert torch.cuda.current_device() == 0
    plain = Sampler(GaussianOracle(), SCHEDULE, cuda_graph=False, **kw).sample(16, seed=2, steps=120, progress=False)
    assert graphed.device == torch.device("cuda:1") and torch.equal(graphed, plain)


@pytest.mark.gpu
@pytest.mark.parametrize("weight_cache", ["off", "on"], ids=["sampler", "pre-fix-control"])
def test_cuda_graph_does_not_read_the_callers_autocast_cache(monkeypatch, weight_cache):
    """A graph captured under the caller's autocast must not read the weight casts
    autocast cached in the warm-up: autocast frees them when the caller's block
    exits, while the replays may still be queued. Here they are: the model sleeps
    on the GPU every step (~10 ms, ~1 s for the 100 replayed steps), so sample()
    returns and the block exits long before the replays run. The freed casts'
    blocks belong to the warm-up's (side) stream, the only stream the caching
    allocator hands them out on again: the test takes that stream, fills all its
    free blocks with NaN while the replays are queued, and only then waits for
    the samples. The Sampler (cache off in warm-up and capture; the graph owns its
    casts) must then equal the plain loop; the control reruns the same probe on
    the pre-fix Sampler (cache on: the graph reads the warm-up's cached cast), for
    which the probe must see different samples, or it could not catch the bug."""

    class SlowThroughConv(torch.nn.Module):  # the oracle, then a 1x1 identity conv that autocast runs in bfloat16
        def __init__(self):
            super().__init__()
            self.oracle = GaussianOracle()
            self.conv = torch.nn.Conv2d(3, 3, 1, bias=False)
            torch.nn.init.dirac_(self.conv.weight)
            self.sleep_cycles = 0

        def forward(self, x, t):
            if self.sleep_cycles:
                torch.cuda._sleep(self.sleep_cycles)  # a kernel: captured, and replayed every step
            return self.conv(self.oracle(x, t))

    model = SlowThroughConv().cuda()
    kw = dict(sample_shape=(3, 8, 8), clip_denoised=False)  # unclipped: a NaN weight reaches the samples
    run = dict(seed=1, steps=120, progress=False)  # 3 warm-up steps, 2 replays of 50, 17 plain steps
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = Sampler(model, SCHEDULE, cuda_graph=False, **kw).sample(4, **run)
    assert torch.isfinite(plain).all()

    if weight_cache == "on":  # the Sampler before the fix: warm-up and capture under the caller's cache
        monkeypatch.setattr(graph_capture, "autocast_without_cache", contextlib.nullcontext)
    streams = []

    def recording_stream(*args, _stream=torch.cuda.Stream, **kwargs):
        streams.append(_stream(*args, **kwargs))
        return streams[-1]

    monkeypatch.setattr(torch.cuda, "Stream", recording_stream)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # few free blocks left over from other tests: a short fill below
    model.sleep_cycles = 20_000_000  # ~10 ms a step at the H100/H200 clocks
    with torch.autocast("cuda", dtype=torch.bfloat16):
        graphed = Sampler(model, SCHEDULE, **kw).sample(4, **run)
    # The block has exited: with the cache on, the cached casts are free now.
    # The Sampler's side stream is the first made (a torch.cuda.graph may also make its
    # class-wide default capture stream through the patch, on a process's first capture).
    side = streams[0]
    poison, reserved = [], torch.cuda.memory_reserved()
    with torch.cuda.stream(side):  # 512-byte NaN blocks until the stream's free blocks run out (a new segment)
        while torch.cuda.memory_reserved() == reserved and len(poison) < 1 << 16:
            poison += [torch.full((256,), float("nan"), dtype=torch.bfloat16, device="cuda") for _ in range(64)]
    assert torch.cuda.memory_reserved() > reserved, "the side stream's free blocks did not run out"
    assert not torch.cuda.current_stream().query(), "the chain finished before the probe: it would show nothing"
    if weight_cache == "off":
        assert torch.equal(graphed, plain)
    else:
        assert not torch.equal(graphed, plain), "the probe did not see the pre-fix Sampler's use-after-free"


@pytest.mark.gpu
def test_cuda_graph_falls_back_when_capture_fails():
    def syncing_model(x, t):
        _ = t.max().item()  # a host sync: not capturable
        return torch.zeros_like(x)

    sampler = Sampler(syncing_model, SCHEDULE, sample_shape=(1, 4, 4), device="cuda")
    caller = torch.cuda.current_stream()
    with pytest.warns(RuntimeWarning, match="capture failed") as record:
        x = sampler.sample(2, seed=0, steps=120, progress=False)  # long enough for graphs
    assert "previous error" not in str(record[0].message)  # the sync's error, not capture_end's
    assert torch.cuda.current_stream() == caller
    assert torch.isfinite(x).all()
    assert sampler.cuda_graph is False  # remembered: the next call does not try again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(sampler.sample(2, seed=0, steps=120, progress=False), x)


# ---------------------------------------------------------------------------
# The graph path's logic on the CPU, with torch.cuda faked (the GPU tests above
# check that real graphs compute the same samples).


class FakeCuda:
    """Enough of torch.cuda for the Sampler's graph path to run on CPU tensors.

    Queued work runs at once, except what a capture records: a fake graph runs
    the recorded steps on each replay (as a real capture records work without
    running it). ``log`` lists, in order, model calls (with the stream and the
    device they ran under), warm-up and capture streams, replays, event records
    and syncs, and progress-bar updates.
    """

    def __init__(self, monkeypatch, real_capture: bool = False):
        self.log: list[tuple] = []
        self.current = FakeStream("caller")  # the current stream
        self.device = None  # the current device, as torch.cuda.device set it
        self.streams = self.events = self.captures = 0
        self.capturing = False
        monkeypatch.setattr(sampler_module, "_on_cuda", lambda x: True)
        # CPU tensors on a GPU machine too (the Sampler's default device would be
        # cuda there, and with real_capture the faked current device, cuda:3).
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        if real_capture:  # graph_capture.capture, on a fake torch.cuda.graph and allocator
            self.pools: list[tuple] = []  # the pools captures were given
            self.ended_pools: list[tuple] = []  # (device, pool) of each _cuda_endAllocateToPool call
            self.end_pool_raises = False  # as torch >= 2.12 does after a failed capture_end
            monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda *args, **kwargs: object())
            monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, 100 + len(self.pools)))
            monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
            monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", self.end_allocate_to_pool, raising=False)
            monkeypatch.setattr(torch.cuda, "graph", self.graph)
        else:
            monkeypatch.setattr(graph_capture, "capture", self.capture)
        monkeypatch.setattr(sampler_module, "_progress", lambda total, on: FakeBar(self.log) if on else _NoBar())
        monkeypatch.setattr(torch.cuda, "Stream", self.new_stream)
        monkeypatch.setattr(torch.cuda, "stream", self.stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.current)
        monkeypatch.setattr(torch.cuda, "device", self.use_device)
        monkeypatch.setattr(torch.cuda, "Event", self.new_event)

    def new_event(self, *args, **kwargs):
        self.events += 1
        return FakeEvent(self.log, self.events)

    def new_stream(self, *args, **kwargs):
        self.streams += 1
        return FakeStream(f"side{self.streams}")

    def stream(self, stream):
        return FakeStreamContext(self, stream)

    @contextlib.contextmanager
    def use_device(self, device):
        previous, self.device = self.device, torch.device(device)
        try:
            yield
        finally:
            self.device = previous

    def graph(self, graph, pool=None, stream=None, **kwargs):
        self.pools.append(pool)
        return FakeGraphContext(self, stream)

    def end_allocate_to_pool(self, device, pool):
        self.ended_pools.append((device, pool))
        if self.end_pool_raises:
            raise RuntimeError("endAllocatePool: not currently recording to mempool_id")

    def capture(self, steps, stream):
        self.captures += 1
        self.log.append(("capture", stream.name))
        self.autocast_cache_at_capture = torch.is_autocast_cache_enabled()
        return FakeGraph(steps, self.log)

    def model(self, oracle):
        def model(x, t):
            self.log.append(("model", str(self.current), self.device, torch.is_autocast_cache_enabled()))
            return oracle(x, t)

        return model


class FakeStreamContext:
    """torch.cuda.stream: sets the current stream; its exit restores the previous one."""

    def __init__(self, fake, stream):
        self.fake, self.stream = fake, stream

    def __enter__(self):
        self.previous, self.fake.current = self.fake.current, self.stream

    def __exit__(self, *args):
        self.fake.current = self.previous


class FakeGraphContext:
    """torch.cuda.graph as torch (2.11 to 2.14) writes it: enter the capture
    stream, begin capture; on exit end the capture, which raises after any failure
    during capture, and only then restore the previous stream."""

    def __init__(self, fake, stream):
        self.fake, self.stream_ctx = fake, fake.stream(stream)

    def __enter__(self):
        self.stream_ctx.__enter__()
        self.fake.capturing = True

    def __exit__(self, *args):
        self.fake.capturing = False
        if args[0] is not None:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        self.stream_ctx.__exit__(None, None, None)


class FakeStream:
    def __init__(self, name):
        self.name = name

    def wait_stream(self, other):
        pass

    def __str__(self):
        return self.name


class FakeGraph:
    def __init__(self, steps, log):
        self.steps, self.log = steps, log

    def replay(self):
        self.log.append(("replay",))
        self.steps()


class FakeEvent:
    def __init__(self, log, number):
        self.log, self.number = log, number

    def record(self):
        self.log.append(("record", self.number))

    def synchronize(self):
        self.log.append(("sync", self.number))


class FakeBar:
    def __init__(self, log):
        self.log = log

    def update(self, n):
        self.log.append(("bar", n))

    def close(self):
        pass


def model_streams(log):
    """The streams of the model calls in ``log``, run-length encoded."""
    runs = []
    for entry in log:
        if entry[0] == "model":
            if runs and runs[-1][0] == entry[1]:
                runs[-1][1] += 1
            else:
                runs.append([entry[1], 1])
    return [tuple(r) for r in runs]


@pytest.mark.parametrize("steps", [1, 3, 4, 53, 102, 103, 120, None])
def test_graph_path_equals_the_plain_loop_on_fake_cuda(monkeypatch, steps):
    fake = FakeCuda(monkeypatch)
    kw = dict(clip_denoised=True, sample_shape=(2, 3, 3))
    run = dict(seed=5, steps=steps, progress=False)
    graphed = Sampler(fake.model(GaussianOracle()), SCHEDULE, **kw).sample(4, **run)
    assert torch.equal(graphed, Sampler(GaussianOracle(), SCHEDULE, cuda_graph=False, **kw).sample(4, **run))
    # From 103 steps (room for two replays after the warm-up): 3 real chain
    # steps on the side stream, then graphs of 50 steps replayed on the caller's
    # stream while 50 remain, then plain steps. Shorter chains: the plain loop.
    total = steps or 1000
    if total >= 103:
        replays = (total - 3) // 50
        expected = [("side1", 3), ("caller", total - 3)]
    else:
        replays = 0
        expected = [("caller", total)]
    assert model_streams(fake.log) == expected
    # ... all with the sampler's device current (torch.cuda.device), graphs or not.
    assert all(e[2] == torch.device("cpu") for e in fake.log if e[0] == "model")
    assert fake.captures == (replays > 0) and [e for e in fake.log if e[0] == "replay"] == [("replay",)] * replays


def test_failed_capture_restores_the_stream_names_its_cause_and_is_not_retried(monkeypatch):
    fake = FakeCuda(monkeypatch, real_capture=True)
    oracle = GaussianOracle()

    def syncing(x, t):
        if fake.capturing:  # as t.item() would on the GPU
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return oracle(x, t)

    kw = dict(clip_denoised=True, sample_shape=(2, 3, 3))
    sampler = Sampler(fake.model(syncing), SCHEDULE, **kw)
    plain = Sampler(GaussianOracle(), SCHEDULE, cuda_graph=False, **kw)
    with pytest.warns(RuntimeWarning, match="capture failed") as record:
        x = sampler.sample(4, seed=5, steps=120, progress=False)
    message = str(record[0].message)
    assert "not permitted when stream is capturing" in message and "previous error" not in message
    assert torch.equal(x, plain.sample(4, seed=5, steps=120, progress=False))
    # 3 warm-up steps and the failed capture on the side stream; the rest, after
    # the failure, on the caller's stream again.
    assert model_streams(fake.log) == [("side1", 4), ("caller", 117)] and str(fake.current) == "caller"
    # The failure is remembered: the next call neither warms up nor captures.
    assert sampler.cuda_graph is False
    fake.log.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = sampler.sample(4, seed=6, steps=120, progress=False)
    assert torch.equal(y, plain.sample(4, seed=6, steps=120, progress=False))
    assert model_streams(fake.log) == [("caller", 120)] and fake.streams == 1


@pytest.mark.parametrize("fixed_torch, old_name", [(False, True), (False, False), (True, False)],
                         ids=["torch-2.6-2.7", "torch-2.8-2.11", "torch-2.12+"])
def test_failed_capture_stops_the_allocator_recording_to_its_pool(monkeypatch, fixed_torch, old_name):
    """torch before 2.12 leaves the caching allocator recording to a capture's
    pool when capture_end fails (pytorch#180395); its next synchronize aborts the
    process. The Sampler ends the recording to the pool its capture was given, on
    the current device; where torch already did, the allocator's refusal is fine.
    Before torch 2.8 the call had another name: looked up by the new one alone,
    nothing was ended there."""
    fake = FakeCuda(monkeypatch, real_capture=True)
    fake.end_pool_raises = fixed_torch
    if old_name:
        monkeypatch.delattr(torch._C, "_cuda_endAllocateToPool", raising=False)
        monkeypatch.setattr(torch._C, "_cuda_endAllocateCurrentStreamToPool", fake.end_allocate_to_pool, raising=False)

    def syncing(x, t):
        if fake.capturing:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return torch.zeros_like(x)

    with pytest.warns(RuntimeWarning, match="capture failed"):
        x = Sampler(fake.model(syncing), SCHEDULE, sample_shape=(1, 2, 2)).sample(2, seed=0, steps=120, progress=False)
    assert torch.isfinite(x).all()
    assert len(fake.pools) == 1 and fake.ended_pools == [(3, fake.pools[0])]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_process_survives_a_failed_capture_and_empty_cache():
    """On the GPU, in a process of its own (an abort would take the test run with
    it): a capture that fails, then the allocator's synchronize (empty_cache)."""
    script = (
        "import torch, warnings\n"
        "from ddpm_fast import Sampler, NoiseSchedule\n"
        "def syncing(x, t):\n"
        "    _ = t.max().item()\n"
        "    return torch.zeros_like(x)\n"
        "warnings.simplefilter('ignore')\n"
        "s = Sampler(syncing, NoiseSchedule('linear'), sample_shape=(1, 4, 4), device='cuda')\n"
        "x = s.sample(2, seed=0, steps=120, progress=False)\n"
        "assert s.cuda_graph is False\n"
        "torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.synchronize()\n"
        "y = torch.ones(1 << 20, device='cuda').sum().item()\n"
        "print('ok', float(x.abs().sum()), y)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("steps", [120, 203])
def test_progress_bar_counts_a_replay_once_it_has_run(monkeypatch, steps):
    fake = FakeCuda(monkeypatch)
    sampler = Sampler(fake.model(GaussianOracle()), SCHEDULE, sample_shape=(1, 2, 2))
    sampler.sample(2, seed=0, steps=steps, progress=True)
    log = [(e[0], "abcd"[e[1] - 1]) if e[0] in ("record", "sync") else e for e in fake.log if e[0] != "model"]
    # Each replay's event is waited for once the next replay is queued (the last,
    # once the leftover plain steps are), and only then is the replay counted.
    if steps == 120:  # 3 warm-up steps, 2 replays of 50, 17 plain steps
        assert log == [
            ("bar", 3), ("capture", "side1"),
            ("replay",), ("record", "a"), ("replay",), ("record", "b"), ("sync", "a"), ("bar", 50),
            *[("bar", 1)] * 17, ("sync", "b"), ("bar", 50),
        ]
    else:  # 3 warm-up steps, 4 replays of 50
        assert log == [
            ("bar", 3), ("capture", "side1"),
            ("replay",), ("record", "a"),
            ("replay",), ("record", "b"), ("sync", "a"), ("bar", 50),
            ("replay",), ("record", "c"), ("sync", "b"), ("bar", 50),
            ("replay",), ("record", "d"), ("sync", "c"), ("bar", 50),
            ("sync", "d"), ("bar", 50),
        ]
    # Without a bar: no events, no waits.
    fake.log.clear()
    sampler.sample(2, seed=0, steps=steps, progress=False)
    assert not [e for e in fake.log if e[0] in ("record", "sync")]


def test_warm_up_and_capture_run_without_the_autocast_weight_cache(monkeypatch):
    # Cached casts made in the warm-up would be read by the graph but freed when
    # the caller's autocast block exits; uncached, the graph makes its own.
    fake = FakeCuda(monkeypatch)
    Sampler(fake.model(GaussianOracle()), SCHEDULE, sample_shape=(1, 2, 2)).sample(2, seed=0, steps=120, progress=False)
    cache = [(e[1], e[3]) for e in fake.log if e[0] == "model"]
    assert cache[:3] == [("side1", False)] * 3 and fake.autocast_cache_at_capture is False
    assert torch.is_autocast_cache_enabled()  # as it was


def test_intermediates_run_the_plain_loop_on_fake_cuda(monkeypatch):
    """Graph replays record nothing: a chain long enough for graphs, asked for
    intermediates, runs the plain loop and returns every picture."""
    fake = FakeCuda(monkeypatch)
    kw = dict(sample_shape=(1, 2, 2))
    run = dict(seed=0, steps=120, return_intermediates=10, progress=False)
    x, pictures = Sampler(fake.model(GaussianOracle()), SCHEDULE, **kw).sample(2, **run)
    want, want_pictures = Sampler(GaussianOracle(), SCHEDULE, cuda_graph=False, **kw).sample(2, **run)
    assert fake.captures == 0 and [p.t for p in pictures] == [p.t for p in want_pictures] == list(range(110, -1, -10))
    assert torch.equal(x, want) and all(torch.equal(p.x_t, q.x_t) for p, q in zip(pictures, want_pictures))
