"""Sampling: the reverse chain of DDPM (Ho et al. 2020, algorithm 2), respaced
DDPM (Nichol & Dhariwal 2021) and DDIM (Song et al. 2021), one fused kernel
per step, no host-device sync inside the chain, CUDA graphs on the GPU.

Noise layout (shared/DESIGN.md): sample i of a run draws from its own stream —
counters (i << 32) + k * D + j under the run's seed, for step index k and
element j of its D elements; its starting noise x_T takes step slot K (one
past the last step). Sample i is therefore the same whether drawn alone or in
a batch of 512, and a run is reproducible from its seed alone.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence, overload

import torch

from ._checks import as_device, check_bool, is_int
from ._progress import progress_bar
from ._warn import warn
from . import diffusion, graph_capture, ops
from .nn import has_channels_last_weights
from .ops._args import SUPPORTED_DTYPES, as_seed
from .schedules import NoiseSchedule

__all__ = ["Sampler", "Intermediate", "respaced_timesteps"]

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_SAMPLE_STRIDE = 1 << 32  # counter distance between samples: one 2^32 range each
# first_sample + N stays below this: the last sample's counters, up to
# (2^31 - 2) * 2^32 + 2^32 - 1, then stay within ops' bound (offset + count <= 2^63 - 1).
_MAX_SAMPLES = 1 << 31
_GRAPH_STEPS = 50  # steps per CUDA graph
# Real chain steps run on the capture stream before capture, so that what must
# not happen during capture (lazy initialisation, cuBLAS/cuDNN handles and
# workspaces, autotuning, Triton compilation) has happened. Every step launches
# the same kernels on the same shapes, so the first does all that; a few more,
# as torch's make_graphed_callables does (3), for models that settle later.
_WARMUP_STEPS = 3
# Graphs only where at least two replays follow the warm-up: a capture costs the
# host about what launching its steps does, without running them, so a single
# replay (capture, then run) cannot beat the plain loop, which launches and runs
# at once. Shorter chains (up to 102 steps) run the plain loop.
_MIN_GRAPH_CHAIN = _WARMUP_STEPS + 2 * _GRAPH_STEPS


def respaced_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` timesteps spread evenly over [0, T-1], both ends included."""
    if not is_int(steps) or not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be an int in [1, {num_timesteps}], got {steps!r}")
    steps = int(steps)
    if steps == 1:
        return [num_timesteps - 1]
    return sorted({round(i * (num_timesteps - 1) / (steps - 1)) for i in range(steps)})


@dataclass
class Intermediate:
    """A picture of the chain: x_t after the step at index ``t`` (from original
    timestep ``timestep`` to the one before it) and the x_0 that the model's
    prediction there implied."""

    t: int
    timestep: int
    x_t: torch.Tensor
    pred_x0: torch.Tensor


class _Plan(NamedTuple):
    """A ``sample`` call's checked arguments and what its chain is built from."""

    shape: tuple[int, ...]
    schedule: NoiseSchedule  # the respaced one, where steps= asks for it
    table: torch.Tensor  # its step coefficients (NoiseSchedule.step_table)
    first_sample: int
    return_intermediates: int | None
    per_sample: int  # elements of one sample


class Sampler:
    """Draws samples from a noise-prediction model ``model(x_t, t) -> eps``.

    Args:
        model: any callable taking x_t (N x ...) and int64 timesteps (N,) and
            returning eps of x_t's shape (an nn.Module, a function, ...). A module
            should be in eval mode: ``sample`` warns if its dropout is on. Its
            input is one buffer that every step rewrites in place: a model that
            keeps x_t for later must keep a copy (``x_t.clone()``). Under CUDA
            graphs its Python code runs only for the warm-up, the captures and the
            steps left over (the replays repeat its recorded GPU work): a model
            that keeps anything between calls needs ``cuda_graph=False``.
        schedule: the training noise schedule.
        variance: ``fixed_large`` (sigma_t^2 = beta_t, the default as in the paper's
            CIFAR-10 samples) or ``fixed_small`` (beta~_t).
        clip_denoised: use the x0-form step with the predicted x_0 clipped to [-1, 1].
        backend: op backend for the step (``auto``, ``reference``, ``cpu``, ``cuda``, ``triton``).
        dtype: the model input's dtype (x_t itself stays float32); default: the
            dtype of the model's first floating parameter, else float32.
        channels_last: feed the model channels_last input (and keep x_t in that
            format; the samples are the same, and returned contiguous). Default:
            the model's format, channels_last when its 4-d weights are (as after
            ``model.to(memory_format=torch.channels_last)`` or a Trainer's model).
        cuda_graph: on CUDA, capture model + step as CUDA graphs and replay them
            (chains of 103 steps or more: shorter ones gain nothing from a capture).
            If capture fails it warns, samples with the plain loop and sets
            ``cuda_graph`` to False, so later calls do not try again.
        sample_shape: one sample's shape (C, H, W); default from the model's
            ``in_channels`` and ``image_size`` attributes.
        device: where to sample; default the model's device, else CUDA if available.

    The defaults of ``dtype``, ``channels_last`` and ``device`` follow the model
    as it is when ``sample`` runs: a model cast or moved after the Sampler was
    made (``model.half()``, ``.to(memory_format=...)``, ``.cuda()``) is sampled so.
    """

    def __init__(
        self,
        model: Model,
        schedule: NoiseSchedule,
        *,
        variance: str = "fixed_large",
        clip_denoised: bool = True,
        backend: str = "auto",
        dtype: torch.dtype | None = None,
        channels_last: bool | None = None,
        cuda_graph: bool = True,
        sample_shape: Sequence[int] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable as model(x_t, t), got {type(model).__name__}")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        if variance not in ("fixed_small", "fixed_large"):
            raise ValueError(f"variance must be 'fixed_small' or 'fixed_large', got {variance!r}")
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(ops.BACKENDS)}, got {backend!r}")
        check_bool(clip_denoised, "clip_denoised")
        check_bool(cuda_graph, "cuda_graph")
        if channels_last is not None and not isinstance(channels_last, bool):
            raise TypeError(f"channels_last must be a bool or None, got {channels_last!r}")
        if sample_shape is not None and (
            not isinstance(sample_shape, (tuple, list, torch.Size))
            or not all(is_int(s) and s >= 1 for s in sample_shape)
            or not sample_shape
        ):
            raise ValueError(f"sample_shape must be a sequence of positive ints (C, H, W, ...), got {sample_shape!r}")
        self.model = model
        self.schedule = schedule
        self.variance = variance
        self.clip_denoised = bool(clip_denoised)
        self.backend = backend
        self.cuda_graph = bool(cuda_graph)
        # None: the model's, read when sampling (properties below), so a model cast
        # or moved later is followed (it was read here once: fed float32 to a model
        # cast to bfloat16 after, which failed or ran at the wrong precision).
        self.channels_last = channels_last
        self.device = device
        self.dtype = dtype
        _check_model_dtype(self.dtype, from_model=dtype is None)  # now too: a float64 model or dtype is refused when made
        if sample_shape is None and hasattr(model, "in_channels") and hasattr(model, "image_size"):
            size = model.image_size
            sample_shape = (model.in_channels, *((size, size) if isinstance(size, int) else size))
        self.sample_shape = tuple(int(s) for s in sample_shape) if sample_shape is not None else None

    @property
    def dtype(self) -> torch.dtype:
        """The model input's dtype: as given, else the model's now."""
        if self._dtype is not None:
            return self._dtype
        param = _first_float_parameter(self.model)
        return param.dtype if param is not None else torch.float32

    @dtype.setter
    def dtype(self, value: torch.dtype | None) -> None:
        self._dtype = value

    @property
    def device(self) -> torch.device:
        """Where to sample: as given, else the model's device now, else CUDA if available."""
        if self._device is not None:
            return self._device
        param = _first_float_parameter(self.model)
        return param.device if param is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @device.setter
    def device(self, value: torch.device | str | None) -> None:
        self._device = as_device(value, "device") if value is not None else None

    @property
    def channels_last(self) -> bool:
        """Whether the model gets channels_last input: as given, else as its 4-d weights are now."""
        return has_channels_last_weights(self.model) if self._channels_last is None else self._channels_last

    @channels_last.setter
    def channels_last(self, value: bool | None) -> None:
        self._channels_last = None if value is None else bool(value)

    # ------------------------------------------------------------------ public

    # Two signatures for type checkers: a call without return_intermediates
    # (the common one) gets a Tensor, not the union it would need narrowing.
    @overload
    def sample(
        self, n_or_shape: int | Sequence[int], *, seed: int | None = ..., steps: int | None = ...,
        eta: float | None = ..., first_sample: int = ..., progress: bool = ..., return_intermediates: None = ...,
    ) -> torch.Tensor: ...

    @overload
    def sample(
        self, n_or_shape: int | Sequence[int], *, seed: int | None = ..., steps: int | None = ...,
        eta: float | None = ..., first_sample: int = ..., progress: bool = ..., return_intermediates: int,
    ) -> tuple[torch.Tensor, list[Intermediate]]: ...

    @torch.no_grad()
    def sample(
        self,
        n_or_shape: int | Sequence[int],
        *,
        seed: int | None = None,
        steps: int | None = None,
        eta: float | None = None,
        first_sample: int = 0,
        progress: bool = True,
        return_intermediates: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[Intermediate]]:
        """Run the reverse chain; returns x_0 (float32, N x ...).

        Args:
            n_or_shape: a number of samples (needs ``sample_shape``) or the full shape.
            seed: the run's seed (None: drawn from torch's generator).
            steps: respace the chain to this many evenly spread steps (None: all T).
            eta: if given, DDIM with this eta (0: deterministic); else ancestral DDPM. Above 1
                a step's direction coefficient is clamped to 0 where sigma_t^2 > 1 - abar_{t-1}
                (``NoiseSchedule.step_table``).
            first_sample: global index of the first sample (for sharding a run:
                samples [first_sample, first_sample + N) of the same seed; below 2^31).
            progress: show a progress bar.
            return_intermediates: if k, also return an ``Intermediate`` every k steps.
        """
        check_bool(progress, "progress")
        plan = self._plan(n_or_shape, steps, eta, first_sample, return_intermediates)
        if _dropout_active(self.model):
            warn(
                "Sampler: the model has active dropout (a dropout module in training mode), so the samples depend on more "
                "than the seed (and sample i on the batch); call model.eval() before sampling",
                RuntimeWarning,
            )
        # Last: a seed of None draws from torch's generator, which a refused call leaves as it was.
        seed = as_seed(seed, "Sampler.sample")
        return_intermediates = plan.return_intermediates
        chain = _Chain(self, plan.schedule, plan.table, plan.shape, seed, plan.first_sample, eta, plan.per_sample)
        x, intermediates = chain.run(progress, return_intermediates)
        # One read at the end (the chain never syncs): NaN or Inf here came from
        # the model, and would otherwise pass unnoticed (as black pixels in a PNG).
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            warn(f"Sampler: {bad} of {x.numel()} sample values are NaN or Inf: the model's output was not "
                 "finite at some step", RuntimeWarning)
        return (x, intermediates) if return_intermediates else x

    # ----------------------------------------------------------------- helpers

    def _plan(self, n_or_shape: int | Sequence[int], steps: int | None, eta: float | None, first_sample: int,
              return_intermediates: int | None) -> _Plan:
        """``sample``'s arguments checked, and what its chain needs of them;
        ``sample_sharded`` checks its own through it before drawing a seed."""
        shape = self._shape(n_or_shape)
        _check_materialized(self.model, "Sampler")
        _check_model_dtype(self.dtype, from_model=self._dtype is None)  # (a model cast to float64 since it was made)
        if not is_int(first_sample) or first_sample < 0:
            raise ValueError(f"first_sample must be an int >= 0, got {first_sample!r}")
        first_sample = int(first_sample)
        if return_intermediates is not None:
            if not is_int(return_intermediates) or return_intermediates < 1:
                raise ValueError(f"return_intermediates must be a positive int, got {return_intermediates!r}")
            return_intermediates = int(return_intermediates)
        schedule = self.schedule if steps is None else self.schedule.respace(respaced_timesteps(self.schedule.num_timesteps, steps))
        # The step's coefficient table, built (and eta checked) before anything runs; the steps reuse it.
        kind = "ddim" if eta is not None else self.variance
        table = schedule.step_table(kind, eta=0.0 if eta is None else eta, device=self.device)
        undefined = schedule.undefined_steps(kind, eta=0.0 if eta is None else eta, clip_denoised=self.clip_denoised)
        if undefined:
            raise ValueError(
                f"the reverse step is undefined at timestep {undefined[0]} of this schedule (of {schedule.num_timesteps}): "
                "alpha_t or abar_t is 0 there (beta_t = 1, as at t = T-1 of the jsd schedule, or abar_t underflowing "
                "float64), so the chain cannot start from noise through it; use a schedule whose betas stay below 1 "
                "and whose abar_T stays above ~1e-300"
            )
        num_steps = schedule.num_timesteps
        per_sample = math.prod(shape[1:])
        if (num_steps + 1) * per_sample > _SAMPLE_STRIDE:
            raise ValueError(f"{num_steps} steps of {per_sample} elements per sample exceed a sample's 2^32 noise counters")
        if first_sample + shape[0] >= _MAX_SAMPLES:
            raise ValueError(f"first_sample + N must stay below 2^31 (noise counters are int64), got {first_sample} + {shape[0]}")
        return _Plan(shape, schedule, table, first_sample, return_intermediates, per_sample)

    def _shape(self, n_or_shape: int | Sequence[int]) -> tuple[int, ...]:
        if is_int(n_or_shape):
            if self.sample_shape is None:
                raise ValueError("give the full shape, or sample_shape= to Sampler (the model has no in_channels/image_size)")
            shape = (int(n_or_shape), *self.sample_shape)
        elif isinstance(n_or_shape, (tuple, list, torch.Size)) and all(is_int(s) for s in n_or_shape):
            shape = tuple(int(s) for s in n_or_shape)
        else:
            raise TypeError(f"n_or_shape must be an int or a shape, got {n_or_shape!r}")
        if len(shape) < 2 or any(s < 1 for s in shape):
            raise ValueError(f"shape must be (N, ...) with positive sizes, got {shape}")
        if self.channels_last and len(shape) != 4:
            raise ValueError("channels_last needs 4-d samples (N, C, H, W)")
        return shape


class _Chain:
    """One run of the reverse chain: its buffers, one step, and two drivers
    (the plain loop, and CUDA graphs of several steps)."""

    def __init__(self, sampler: Sampler, schedule: NoiseSchedule, table: torch.Tensor, shape, seed, first_sample, eta,
                 per_sample):
        self.s = sampler
        self.schedule = schedule
        self.seed = seed
        self.eta = eta
        self.per_sample = per_sample
        self.offset = first_sample * _SAMPLE_STRIDE
        self.n = shape[0]
        device = sampler.device
        num_steps = schedule.num_timesteps
        # The step's table, held for the run: a captured CUDA graph reads its memory,
        # and the schedule's cache keeps only the last few DDIM etas' (another thread's).
        self.table = table
        # x_T from each sample's stream, slot K (module docstring); the chain's float32
        # state, in the model input's memory format: a channels_last model's eps then
        # matches x (no copy to x's format every step) and the step writes the next
        # model input in its own order. The noise follows the logical index (n, c, h, w)
        # in either format (ops.ddpm_step), so the samples are the same.
        fmt = torch.channels_last if sampler.channels_last else torch.contiguous_format
        self.x = ops.randn(
            shape, seed, self.offset + num_steps * per_sample, sample_stride=_SAMPLE_STRIDE,
            device=device, backend=sampler.backend,
        ).contiguous(memory_format=fmt)
        dtype = sampler.dtype
        self.model_in = torch.empty(shape, dtype=dtype, device=device).to(memory_format=fmt)
        self.model_in.copy_(self.x)
        self.steps = torch.arange(num_steps, device=device)  # step index k as device scalars
        self.model_t = schedule.timestep_map.to(device)  # the timestep the model sees at index k
        self.remaining = num_steps  # steps k < remaining are still to run (to queue)
        self.last_replay: tuple[torch.cuda.Event, int] | None = None  # a graph replay not yet on the bar

    def step(self, k: torch.Tensor, pred_x0_at: int | None = None) -> torch.Tensor | None:
        """Step index k (0-d int64 on the device): the model, then the fused update
        of x in place, writing the next model input too. No host sync. With
        ``pred_x0_at`` (k as an int), returns the x_0 that eps implies, taken
        before the update: eps may share memory with the model's input
        (``lambda x, t: x.mul_(s)``), which the update overwrites."""
        # A real (N,) tensor, not a stride-0 view: a model may change it in place or hand it to a kernel.
        t_model = torch.index_select(self.model_t, 0, k.reshape(1).expand(self.n))
        eps = self.s.model(self.model_in, t_model)
        _check_model_output(eps, self.x)
        pred_x0 = None
        if pred_x0_at is not None:
            pred_x0 = _pred_x0(self.schedule, self.x, pred_x0_at, eps, self.s.clip_denoised).contiguous()
        ops.ddpm_step(
            self.x, eps, k, self.schedule, variance=self.s.variance, clip_denoised=self.s.clip_denoised,
            eta=self.eta, seed=self.seed, offset=self.offset, sample_stride=_SAMPLE_STRIDE,
            step_stride=self.per_sample, out=self.x, out_model_input=self.model_in, backend=self.s.backend,
        )
        return pred_x0

    def run(self, progress: bool, every: int | None) -> tuple[torch.Tensor, list[Intermediate]]:
        bar = _progress(self.schedule.num_timesteps, progress)
        intermediates: list[Intermediate] = []
        # Streams, graphs and events are made on the current device, and a model
        # may allocate there: make it x's (the sampler's device need not be current).
        try:  # closed on Ctrl-C and errors too: a bar left open redraws itself after the message
            with torch.cuda.device(self.x.device) if _on_cuda(self.x) else contextlib.nullcontext():
                if self.s.cuda_graph and _on_cuda(self.x) and every is None and self.remaining >= _MIN_GRAPH_CHAIN:
                    self._run_graphs(bar)
                while self.remaining > 0:
                    k = self.remaining - 1
                    record = every is not None and k % every == 0
                    pred_x0 = self.step(self.steps[k], pred_x0_at=k if record else None)
                    if record:
                        x_now = self.x.clone(memory_format=torch.contiguous_format)
                        intermediates.append(Intermediate(k, int(self.schedule.timestep_map[k]), x_now, pred_x0))
                    self.remaining = k
                    bar.update(1)
                self._count_last_replay(bar)  # waited for only now: the plain steps are queued behind it
        finally:
            bar.close()
        return self.x.contiguous(), intermediates  # returned contiguous whatever the chain's format

    def _steps(self, n: int) -> None:
        """n steps at the device step counter, counting it down: the same kernels every step, no host sync."""
        for _ in range(n):
            self.step(self.counter)
            self.counter.sub_(1)

    def _run_graphs(self, bar) -> None:
        """The steps as CUDA graphs: a few real steps on a side stream (the
        warm-up), then one graph of up to _GRAPH_STEPS steps captured on that
        stream and replayed while a whole graph's worth of steps remains; the
        plain loop runs what is left. A failed capture warns and turns the
        Sampler's cuda_graph off (the chain is as the warm-up left it)."""
        self.counter = torch.full((), self.remaining - 1, dtype=torch.int64, device=self.x.device)
        caller = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(caller)
        graph = None
        try:
            # Under the caller's autocast, without its weight cache: with it, the
            # warm-up would cache the weights' casts (on the side stream) and the
            # graph would read those casts, which the graph does not own: autocast
            # frees them when the caller's autocast block exits, while replays may
            # still be queued. Uncached, the graph makes its own casts every step
            # (torch's advice for graphs under autocast: cache_enabled=False).
            with graph_capture.autocast_without_cache():
                warmup = min(_WARMUP_STEPS, self.remaining)
                with torch.cuda.stream(side):
                    self._steps(warmup)
                self.remaining -= warmup
                bar.update(warmup)
                chunk = min(_GRAPH_STEPS, self.remaining)
                if chunk > 0:
                    graph = graph_capture.capture(lambda: self._steps(chunk), side)
        except graph_capture.CaptureFailed as failure:
            # A model that cannot be captured will not be on the next call either:
            # remember it rather than repeat the warm-up and the failing capture.
            self.s.cuda_graph = False
            warn(
                f"ddpm_fast: CUDA graph capture failed ({failure}); sampling with the plain loop "
                "(this Sampler's cuda_graph is now False: later calls do not try again)",
                RuntimeWarning,
            )
        finally:
            caller.wait_stream(side)
        if graph is None:
            return
        # The bar counts a replay once it has run, not when it is queued (all of
        # them are queued at once): after queuing replay k, wait for replay k-1,
        # while replay k keeps the GPU busy. Without a bar, no events, no waits.
        track = not isinstance(bar, _NoBar)
        while self.remaining >= chunk:
            graph.replay()
            self.remaining -= chunk
            if track:
                done = torch.cuda.Event(blocking=True)  # a wait on it sleeps rather than spin a CPU core
                done.record()
                self._count_last_replay(bar)
                self.last_replay = (done, chunk)

    def _count_last_replay(self, bar) -> None:
        """Wait for the last replay queued before now, then count its steps on the bar."""
        if self.last_replay is not None:
            done, steps = self.last_replay
            self.last_replay = None
            done.synchronize()
            bar.update(steps)


def _dropout_active(model: Model) -> bool:
    """Whether ``model`` is a module with dropout on: a dropout module of it in
    training mode, whatever the model's own mode (``model.eval()`` then
    ``model.drop.train()`` leaves that one on)."""
    if not isinstance(model, torch.nn.Module):
        return False
    return any(_is_dropout(m) and m.training and m.p > 0 for m in model.modules())


# torch.nn's dropout modules, as named in a TorchScript module (torch.jit.script or trace),
# whose submodules are ScriptModules that keep the original class's name.
_DROPOUT_NAMES = frozenset(("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout"))


def _is_dropout(m: torch.nn.Module) -> bool:
    if isinstance(m, torch.jit.ScriptModule):
        return getattr(m, "original_name", None) in _DROPOUT_NAMES and hasattr(m, "p")
    return isinstance(m, torch.nn.modules.dropout._DropoutNd)


def _check_materialized(model: Model, op: str) -> None:
    """Refuse a module with parameters or buffers on the meta device (shapes
    without values, as under torch.device("meta")): the chain ran on meta
    tensors and failed at its end in torch's words, and one given another
    device read memory never written."""
    if isinstance(model, torch.nn.Module) and any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise ValueError(f"{op}: the model's weights are on the meta device (shapes without values): give it its "
                         "weights first (model.to_empty(device=...), then load_state_dict)")


def _on_cuda(x: torch.Tensor) -> bool:
    """Whether x is on a CUDA device (where the graph path runs); a function
    of its own so that tests can run the graph path on the CPU with torch.cuda faked."""
    return x.is_cuda


def _check_model_output(eps: object, x: torch.Tensor) -> None:
    """The model's eps as the step takes it (metadata only: no sync, no look at its values)."""
    if not isinstance(eps, torch.Tensor):
        raise TypeError(f"the model returned a {type(eps).__name__}; expected eps as a torch.Tensor")
    if eps.shape != x.shape:
        raise ValueError(f"the model returned {eps.shape}; expected eps of shape {tuple(x.shape)}")
    if eps.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the model returned eps of dtype {eps.dtype}; expected float32, float16 or bfloat16")
    if eps.device != x.device:
        raise ValueError(f"the model returned eps on {eps.device}; expected it on the sampler's device {x.device}")


def _check_model_dtype(dtype: object, from_model: bool) -> None:
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return
    if from_model:
        raise TypeError(f"the model's parameters are {dtype}, and the Sampler feeds a model float32, float16 or "
                        "bfloat16 input: cast the model (model.float()), or pass dtype= if it casts its input itself")
    raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")


def _first_float_parameter(model: Model) -> torch.Tensor | None:
    return next((p for p in getattr(model, "parameters", lambda: [])() if p.is_floating_point()), None)


def _pred_x0(schedule: NoiseSchedule, x_t: torch.Tensor, k: int, eps: torch.Tensor, clip: bool) -> torch.Tensor:
    """The x_0 implied by eps at step index k (eq. 4 solved for x_0), for
    pictures of the chain: diffusion's, whose one factor of a difference gives
    +-inf (clipped to +-1) where abar is too small for float32, or 0 where eps
    is x_t; the difference of two products gave inf - inf = NaN there."""
    x0 = diffusion.predict_x0_from_eps(schedule, x_t.float(), k, eps.float())
    return x0.clamp(-1.0, 1.0) if clip else x0


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    return progress_bar(total=total, desc="sampling", unit="step")
