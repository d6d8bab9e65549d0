"""Beta schedules and the per-timestep coefficient tables (shared/DESIGN.md).

Timesteps are zero-based: index t is the paper's t+1 (Ho et al. 2020), as in the
original code and in diffusers. Tables are computed in float64; kernels read
float32 copies on the tensor's device (``NoiseSchedule.table``).
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch

from ._checks import is_int, is_traced, outside_transforms
from ._memory import check_fits_in_memory

__all__ = ["NoiseSchedule", "make_betas", "SCHEDULES", "STEP_COLUMNS", "STEP_KINDS"]

SCHEDULES = ("linear", "quad", "const", "warmup10", "warmup50", "jsd", "cosine")

# Ho et al. (2020): beta_1 = 1e-4 rising linearly to beta_T = 0.02, T = 1000.
DEFAULT_BETA_START = 1e-4
DEFAULT_BETA_END = 0.02
# Nichol & Dhariwal (2021), eq. 17: offset s and the cap on beta.
COSINE_OFFSET = 0.008
COSINE_MAX_BETA = 0.999

# Columns of a reverse-step table (NoiseSchedule.step_table); "pad" keeps rows 32 bytes.
STEP_COLUMNS = ("a", "b", "sqrt_recip_ac", "sqrt_recipm1_ac", "c1", "c2", "sigma", "pad")
STEP_KINDS = ("fixed_small", "fixed_large", "ddim")

# Names of the float64 tables every NoiseSchedule carries.
TABLES = (
    "betas",
    "alphas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "one_minus_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "sqrt_recip_alphas",
    "eps_coef",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "fixed_large_variance",
    "fixed_large_log_variance",
)


# A schedule is host-side float64 data: made on the CPU whatever
# torch.set_default_device / set_default_dtype say (under "meta" it could not
# be built; under "cuda" every lookup would wait for the device, and respaced
# schedules, made from CPU betas, would not match their parents). Explicit
# arguments, not a torch.device("cpu") context, which Dynamo before torch 2.12
# cannot enter where a table is first made inside a compiled function.
_F64 = {"dtype": torch.float64, "device": "cpu"}
# A schedule keeps the step tables (and undefined_steps answers) of this many
# DDIM etas, the least recently made dropped first: an eta sweep or annealed
# eta made one T x 8 table per value, and kept them all (2 MiB per device for
# 64 at T = 1000; cycling through more etas rebuilds each, ~0.15 ms a step).
_ETA_TABLES_KEPT = 64
# More would take over 16 GiB per float64 table; far more failed in torch with
# errors that named no argument (a storage size overflow, a SymInt).
MAX_TIMESTEPS = 2**31 - 1
# What building a schedule's float64 tables takes at its peak (measured: 154
# bytes a timestep from a name, 197 from betas): a schedule that cannot fit is
# refused before it is built, not answered by the kernel's OOM killer.
_PEAK_BYTES_PER_TIMESTEP = 200


def _warmup(beta_start: float, beta_end: float, timesteps: int, fraction: float) -> torch.Tensor:
    betas = torch.full((timesteps,), beta_end, **_F64)
    warmup_steps = int(timesteps * fraction)
    betas[:warmup_steps] = torch.linspace(beta_start, beta_end, warmup_steps, **_F64)
    return betas


def _cosine(timesteps: int) -> torch.Tensor:
    # beta_t = min(1 - abar(t/T) / abar((t-1)/T), 0.999), abar(s) = cos²((s + offset)/(1 + offset) · π/2)
    # (Nichol & Dhariwal eq. 17), in tensors: a list of Python floats took 1 s per million steps.
    s = torch.arange(timesteps + 1, **_F64) / timesteps
    alpha_bar = torch.cos((s + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=COSINE_MAX_BETA)


def make_betas(
    name: str,
    timesteps: int = 1000,
    beta_start: float | None = None,
    beta_end: float | None = None,
) -> torch.Tensor:
    """The float64 betas of a named schedule, as the original works define them."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown beta schedule {name!r}; expected one of {', '.join(SCHEDULES)}")
    if not is_int(timesteps) or not 1 <= timesteps <= MAX_TIMESTEPS:
        raise ValueError(f"timesteps must be a positive int up to 2^31 - 1, got {timesteps!r}")
    timesteps = int(timesteps)
    if name == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError("the cosine schedule takes no beta_start/beta_end")
        return _cosine(timesteps)
    if name == "jsd":  # 1/T, 1/(T-1), ..., 1
        if beta_start is not None or beta_end is not None:
            raise ValueError("the jsd schedule takes no beta_start/beta_end")
        return 1.0 / torch.linspace(timesteps, 1, timesteps, **_F64)
    start = DEFAULT_BETA_START if beta_start is None else _beta_bound(beta_start, "beta_start")
    end = DEFAULT_BETA_END if beta_end is None else _beta_bound(beta_end, "beta_end")
    if name == "linear":
        return torch.linspace(start, end, timesteps, **_F64)
    if name == "quad":
        return torch.linspace(start**0.5, end**0.5, timesteps, **_F64) ** 2
    if name == "const":
        return torch.full((timesteps,), end, **_F64)
    return _warmup(start, end, timesteps, 0.1 if name == "warmup10" else 0.5)


def _check_fits(timesteps: int) -> None:
    check_fits_in_memory(timesteps * _PEAK_BYTES_PER_TIMESTEP, f"a noise schedule of {timesteps} timesteps")


def _beta_bound(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not 0.0 < value <= 1.0:  # NaN fails too
        raise ValueError(f"{name} must lie in (0, 1], got {value}")
    return value


class NoiseSchedule:
    """A diffusion's betas and every coefficient derived from them.

    ``NoiseSchedule("linear", timesteps=1000)`` or ``NoiseSchedule(betas=tensor)``.
    Each name in ``TABLES`` is an attribute holding a float64 CPU tensor of length
    ``num_timesteps``; ``table(name, device)`` gives a cached float32 copy for kernels.
    """

    def __init__(
        self,
        name: str | None = "linear",
        *,
        timesteps: int = 1000,
        beta_start: float | None = None,
        beta_end: float | None = None,
        betas: torch.Tensor | np.ndarray | Sequence[float] | None = None,
    ) -> None:
        if betas is not None:
            # Betas define the schedule: a name other than the default, a length or
            # bounds given beside them would be ignored, so they are refused.
            if name not in (None, "linear") or timesteps != 1000 or beta_start is not None or beta_end is not None:
                raise ValueError("give betas= alone, or a schedule name with timesteps/beta_start/beta_end, not both")
            betas = _as_betas(betas)
            _check_fits(betas.numel())
            self.name = "custom"
            self._config: dict = {"betas": betas.tolist()}
        else:
            if name is None:
                raise ValueError("give a schedule name or betas")
            if is_int(timesteps) and 1 <= timesteps <= MAX_TIMESTEPS and name in SCHEDULES:  # (else make_betas's errors)
                _check_fits(int(timesteps))
            betas = make_betas(name, timesteps, beta_start, beta_end)
            self.name = name
            self._config = {  # JSON-ready: numpy's numbers (which make_betas takes) as Python's
                "name": name, "timesteps": int(timesteps),
                "beta_start": None if beta_start is None else float(beta_start),
                "beta_end": None if beta_end is None else float(beta_end),
            }
        _check_betas(betas)
        self.num_timesteps = int(betas.numel())
        self._compute_tables(betas)
        # Original timestep of each index (the identity unless respaced).
        self.timestep_map = torch.arange(self.num_timesteps, dtype=torch.int64, device="cpu")
        # (table, its version when made) per (name, device)
        self._device_tables: dict[tuple[str, torch.device], tuple[torch.Tensor, int | None]] = {}

    @property
    def config(self) -> dict:
        """What ``from_config`` rebuilds this schedule from (JSON-ready; what
        checkpoints record). A copy: editing it changes no schedule (the live
        dict let a caller's edit, or one of a respaced child's, make a schedule's
        config describe another schedule than its tables)."""
        return copy.deepcopy(self._config)

    @classmethod
    def from_config(cls, config: dict) -> "NoiseSchedule":
        """The schedule that ``config`` (a ``NoiseSchedule.config``, e.g. read back
        from a checkpoint's JSON) describes."""
        if not isinstance(config, dict) or not ({"name", "betas", "respace_of"} & config.keys()):
            raise ValueError(f"a schedule config needs 'name', 'betas' or 'respace_of', got {config!r}")
        kind = "respace_of" if "respace_of" in config else "betas" if "betas" in config else "name"
        unknown = sorted(set(config) - _CONFIG_KEYS[kind], key=str)
        if unknown:  # a misspelt key would be dropped silently, and the schedule another
            raise ValueError(f"a schedule config with {kind!r} takes only {sorted(_CONFIG_KEYS[kind])}, "
                             f"got also {unknown}")
        if "respace_of" in config:  # a respaced schedule: its parent's config and the kept timesteps
            return cls.from_config(config["respace_of"]).respace(config.get("timesteps", ()))
        if "betas" in config:
            return cls(betas=config["betas"])
        return cls(
            config["name"],
            timesteps=config.get("timesteps", 1000),
            beta_start=config.get("beta_start"),
            beta_end=config.get("beta_end"),
        )

    def _compute_tables(self, betas: torch.Tensor, alphas_cumprod: torch.Tensor | None = None,
                        one_minus_alphas_cumprod: torch.Tensor | None = None) -> None:
        # No inference tensors, even for a schedule made under inference mode: the
        # float64 math of diffusion.* differentiates through rows of these tables.
        def usable(table: torch.Tensor | None) -> torch.Tensor | None:
            return table.clone() if table is not None and table.is_inference() else table

        with torch.inference_mode(False):
            self._fill_tables(usable(betas), usable(alphas_cumprod), usable(one_minus_alphas_cumprod))

    def _fill_tables(self, betas: torch.Tensor, alphas_cumprod: torch.Tensor | None,
                     one_minus_alphas_cumprod: torch.Tensor | None) -> None:
        if alphas_cumprod is None:
            alphas = 1.0 - betas
            ac = torch.cumprod(alphas, dim=0)
            # 1 - abar from log abar: 1 - cumprod(1 - beta) keeps only ~1e-16 / beta_0 of
            # its digits near t = 0 (beta_0 = 2e-16 put posterior_mean_coef1[0] at 0.90, not 1).
            om = -torch.expm1(torch.cumsum(torch.log1p(-betas), dim=0))
        else:  # respaced: the parent's abar as it is (rebuilt from 1 - beta it would round, see respace)
            ac, om = alphas_cumprod, one_minus_alphas_cumprod
        ac_prev = torch.cat([torch.ones(1, **_F64), ac[:-1]])
        if alphas_cumprod is not None:
            alphas = ac / ac_prev
        om_prev = torch.cat([torch.zeros(1, **_F64), om[:-1]])
        self.betas = betas
        self.alphas = alphas
        self.alphas_cumprod = ac
        self.alphas_cumprod_prev = ac_prev
        self.one_minus_alphas_cumprod = om
        self.sqrt_alphas_cumprod = ac.sqrt()
        self.sqrt_one_minus_alphas_cumprod = om.sqrt()
        self.log_one_minus_alphas_cumprod = torch.where(ac < 0.5, torch.log1p(-ac), om.log())  # each exact where it is used
        self.sqrt_recip_alphas_cumprod = ac.rsqrt()
        self.sqrt_recipm1_alphas_cumprod = (om / ac).sqrt()
        self.sqrt_recip_alphas = alphas.rsqrt()
        # The epsilon-form reverse step: x_{t-1} = (x_t - eps_coef * eps) / sqrt(alpha_t) + ...
        self.eps_coef = betas / om.sqrt()
        # q(x_{t-1} | x_t, x_0), Ho et al. eqs. 6-7.
        self.posterior_variance = betas * om_prev / om
        # posterior_variance[0] is 0; log uses the next value in its place.
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2], pv[1:]])) if pv.numel() > 1 else torch.log(betas)
        self.posterior_mean_coef1 = betas * ac_prev.sqrt() / om
        self.posterior_mean_coef2 = om_prev * alphas.sqrt() / om
        # sigma_t^2 = beta_t ("fixed_large"); the original code puts beta~_1 at t = 0.
        large = torch.cat([pv[1:2], betas[1:]]) if pv.numel() > 1 else betas.clone()
        self.fixed_large_variance = large
        self.fixed_large_log_variance = torch.log(large)

    def table(self, name: str, device: torch.device | str | None = None) -> torch.Tensor:
        """The float32 table ``name`` on ``device``, made once per device: the
        cached tensor the kernels read, so read-only (not copied per call; one
        edited in place is made again from the float64 table at the next call)."""
        if name not in TABLES:
            raise KeyError(f"unknown table {name!r}; expected one of {', '.join(TABLES)}")
        return self._cached(name, device, lambda: getattr(self, name))

    def step_table(
        self, kind: str = "fixed_large", *, eta: float = 0.0, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """The float32 (T, 8) coefficient table of one reverse step, cached per
        device: the tensor the kernels read, so read-only (not copied per call;
        one edited in place is made again at the next call).

        ``kind``: ``fixed_small`` / ``fixed_large`` (ancestral DDPM, sigma_t^2 =
        beta~_t or beta_t) or ``ddim`` (Song et al. 2021, with ``eta``). Columns
        (``STEP_COLUMNS``) let one kernel run every kind:

        * unclipped: x_{t-1} = a x_t + b eps + sigma z
        * clipped:   x0 = clip(sqrt_recip_ac x_t - sqrt_recipm1_ac eps, -1, 1),
                     x_{t-1} = c1 x0 + c2 x_t + sigma z

        sigma is 0 at t = 0 (no noise on the last step).

        DDIM's sigma_t = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1})
        and its direction coefficient sqrt(1 - abar_{t-1} - sigma_t^2) (Song et al.
        eq. 12). For eta > 1, where sigma_t^2 exceeds 1 - abar_{t-1}, that square
        root is clamped to 0 while sigma keeps its formula: such steps add more
        noise than q(x_{t-1} | x_0) has and drop the eps direction.
        """
        if kind not in STEP_KINDS:
            raise ValueError(f"step kind must be one of {', '.join(STEP_KINDS)}, got {kind!r}")
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real):
            raise TypeError(f"eta must be a number, got {type(eta).__name__}")
        eta = float(eta)
        if kind != "ddim" and eta != 0.0:
            raise ValueError("eta applies to the ddim step only")
        if not (math.isfinite(eta) and eta >= 0.0):
            raise ValueError(f"eta must be a finite number >= 0, got {eta}")
        make = (lambda: self._ddim_table(eta)) if kind == "ddim" else (lambda: self._ddpm_table(kind))
        return self._cached(f"step:{kind}:{eta!r}", device, lambda: _cap_x0_columns(make()))

    def undefined_steps(self, kind: str = "fixed_large", *, eta: float = 0.0, clip_denoised: bool = False) -> list[int]:
        """Timesteps where this reverse step is undefined: a coefficient of the
        form it uses (``step_table``'s a, b, sigma; or, clipped, the x0 and
        posterior columns) is infinite or NaN. That happens where alpha_t = 0
        (beta_t = 1, as at t = T-1 of the jsd schedule) or abar_t underflows
        float64 to 0: every form divides by sqrt(alpha_t) or sqrt(abar_t) there.
        Empty for the usual schedules."""
        found = self.__dict__.setdefault("_undefined_steps", {})
        key = (kind, type(eta), eta, bool(clip_denoised))  # the type: True == 1.0 must not find 1.0's answer
        try:  # every reverse step asks: the lookup first, the checks once per key
            return list(found[key])  # a copy: a caller's edit must not switch off every later guard
        except (KeyError, TypeError):
            pass
        self.step_table(kind, eta=eta)  # checks kind and eta
        with outside_transforms():
            table = self._ddim_table(float(eta)) if kind == "ddim" else self._ddpm_table(kind)
            columns = [2, 3, 4, 5, 6] if clip_denoised else [0, 1, 6]
            answer = found[key] = tuple((~torch.isfinite(table[:, columns]).all(dim=1)).nonzero().flatten().tolist())
        if len(found) > 2 * len(STEP_KINDS) + _ETA_TABLES_KEPT:  # bounded: the oldest answer goes
            # (a snapshot of the keys, and pop: another thread may add or drop one meanwhile)
            found.pop(tuple(found)[0], None)
        return list(answer)

    def _cached(self, name: str, device: torch.device | str | None, make) -> torch.Tensor:
        """The float32 copy on ``device`` of the float64 table ``make()``, made
        once per device, and made again where it was changed in place since (it
        is read-only, but an edit must not stay in every later kernel call; its
        version is one attribute read, where watching the float64 tables it
        comes from cost 15% of an op call)."""
        device = torch.device("cpu" if device is None else device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        # torch.export runs this on fake tensors (and make_fx and FakeTensorMode make
        # them): kept, they poisoned later eager calls.
        exporting = torch.compiler.is_exporting()
        compiling = torch.compiler.is_compiling()  # traced: the tables are constants of the graph, no versions read
        entry = None if exporting else self._device_tables.get((name, device))
        if entry is not None and (compiling or entry[1] == entry[0]._version):
            return entry[0]
        # Not an inference tensor even when first asked for under inference
        # mode: training may later save it for backward.
        with torch.inference_mode(False), outside_transforms():
            cached = make().to(device=device, dtype=torch.float32)
        if exporting or (not compiling and is_traced(cached)):
            return cached
        # (under compile, no version: made again by the next eager call)
        self._device_tables[(name, device)] = (cached, None if compiling else cached._version)
        # A snapshot of the keys, and pop: another thread may add or drop one meanwhile.
        etas = [key for key in tuple(self._device_tables) if key[0].startswith("step:ddim:") and key[1] == device]
        if len(etas) > _ETA_TABLES_KEPT:  # a chain that captured a dropped one into a CUDA graph holds it
            self._device_tables.pop(etas[0], None)
        return cached

    def _ddpm_table(self, variance: str) -> torch.Tensor:
        table = torch.zeros(self.num_timesteps, len(STEP_COLUMNS), **_F64)
        # eq. 11: (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)
        table[:, 0] = self.sqrt_recip_alphas
        table[:, 1] = -self.sqrt_recip_alphas * self.eps_coef
        table[:, 2] = self.sqrt_recip_alphas_cumprod
        table[:, 3] = self.sqrt_recipm1_alphas_cumprod
        table[:, 4] = self.posterior_mean_coef1  # eq. 7
        table[:, 5] = self.posterior_mean_coef2
        var = self.posterior_variance if variance == "fixed_small" else self.fixed_large_variance
        table[:, 6] = var.sqrt()
        table[0, 6] = 0.0
        return table

    def _ddim_table(self, eta: float) -> torch.Tensor:
        # Song et al. (2021), eq. 12: x_{t-1} = sqrt(abar_prev) x0 + dir * eps + sigma z,
        # dir = sqrt(1 - abar_prev - sigma^2), eps recomputed from x0 when x0 is clipped.
        ab, ab_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        sigma = eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt()
        direction = (1 - ab_prev - sigma**2).clamp_min(0.0).sqrt()
        k2, k3 = self.sqrt_recip_alphas_cumprod, self.sqrt_recipm1_alphas_cumprod
        table = torch.zeros(self.num_timesteps, len(STEP_COLUMNS), **_F64)
        table[:, 0] = ab_prev.sqrt() * k2
        table[:, 1] = direction - ab_prev.sqrt() * k3
        table[:, 2] = k2
        table[:, 3] = k3
        table[:, 4] = ab_prev.sqrt() - direction / k3
        table[:, 5] = direction * k2 / k3
        table[:, 6] = sigma
        table[0, 6] = 0.0
        return table

    def respace(self, timesteps: Sequence[int] | torch.Tensor | np.ndarray) -> "NoiseSchedule":
        """The schedule of the sub-chain through ``timesteps`` (zero-based; a set:
        taken in increasing order, whatever order they come in, repeats dropped),
        with the betas that keep its alphas_cumprod (Nichol & Dhariwal 2021, sec. 4).
        ``timestep_map[i]`` is the original timestep of new index i, which the model
        sees (the parent's original timestep, when this schedule is itself respaced);
        ``config`` records the parent's config and ``timesteps``, so that
        ``from_config`` rebuilds the same sub-chain."""
        if (isinstance(timesteps, torch.Tensor) and timesteps.dim() != 1) or not isinstance(
            timesteps, (torch.Tensor, Sequence, range, np.ndarray)
        ):
            hint = (f"; for {timesteps} evenly spread steps: respace(ddpm_fast.sampler.respaced_timesteps(T, {timesteps}))"
                    if isinstance(timesteps, numbers.Integral) and not isinstance(timesteps, bool) else "")
            raise TypeError(f"respaced timesteps must be a sequence of ints (the original timesteps to keep), "
                            f"got {timesteps!r}{hint}")
        timesteps = timesteps.tolist() if isinstance(timesteps, (torch.Tensor, np.ndarray)) else list(timesteps)
        if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in timesteps):
            raise TypeError(f"respaced timesteps must be ints, got {list(timesteps)[:5]}...")
        steps = sorted(set(int(s) for s in timesteps))
        if not steps:
            raise ValueError("respaced timesteps must name at least one timestep, got none")
        if steps[0] < 0 or steps[-1] >= self.num_timesteps:
            raise ValueError(f"respaced timesteps must lie in [0, {self.num_timesteps}), got {list(timesteps)[:5]}...")
        ab = self.alphas_cumprod[steps]
        ab_prev = torch.cat([torch.ones(1, **_F64), ab[:-1]])
        om = self.one_minus_alphas_cumprod[steps]
        om_prev = torch.cat([torch.zeros(1, **_F64), om[:-1]])
        # beta = 1 - abar_t / abar_s, from 1 - abar while it is small (exact there; the
        # ratio's 1 - ... would keep only ~1e-16 / beta of beta's digits), else from the ratio.
        betas = torch.where(om < 0.5, (om - om_prev) / ab_prev, 1.0 - ab / ab_prev)
        # abar at 0 (0/0: NaN), or so deep in the denormals that the next kept
        # step's equals it (a beta of 0), leaves no later step of the sub-chain defined.
        undefined = ~(betas[1:] > 0)
        if undefined.any():
            i = int(undefined.nonzero()[0])
            raise ValueError(
                f"cannot respace this schedule through timestep {steps[i]}: its alphas_cumprod is {float(ab[i]):.3g} "
                "there (beta_t = 1 or float64 underflow), so no later step of the sub-chain is defined"
            )
        respaced = NoiseSchedule(betas=betas)
        # The tables from abar itself: abar_t / abar_{t-1} through 1 - beta keeps only
        # ~1e-16 / ratio of its digits, and a ratio below 1e-16 becomes 0.
        respaced._compute_tables(respaced.betas, alphas_cumprod=ab.clone(), one_minus_alphas_cumprod=om)
        respaced.name = f"{self.name}[{len(steps)} of {self.num_timesteps}]"
        respaced.timestep_map = self.timestep_map[steps]
        respaced._config = {"respace_of": self.config, "timesteps": steps}
        return respaced

    def __len__(self) -> int:
        return self.num_timesteps

    def __getstate__(self) -> dict:
        """Without the per-device caches, made again on demand: a pickle (a
        checkpoint, a spawned worker's copy) of a schedule used on a GPU carried
        its CUDA tables, which a machine without one cannot load."""
        state = dict(self.__dict__)
        state["_device_tables"] = {}
        state.pop("_extract_tables", None)  # diffusion's per-device float64 copies
        state.pop("_undefined_steps", None)
        return state

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule({self.name!r}, timesteps={self.num_timesteps}, "
            f"beta_1={self.betas[0].item():.3g}, beta_T={self.betas[-1].item():.3g})"
        )


# The clipped step's x0 = clip(sqrt_recip_ac x_t - sqrt_recipm1_ac eps, -1, 1): where
# abar_t < ~1e-77 both coefficients overflow float32 and x0 would be inf - inf = NaN.
# The float32 tables cap them at 2^100. Capping changes nothing: it only applies where
# abar_t < 2^-200, where the two are equal in float64 as well (sqrt(1 - abar_t) = 1), so
# x0 saturates to the sign of x_t - eps either way; and 2^100 x_t stays finite for any
# |x_t| < 2^27.
_X0_COEF_CAP = 2.0**100


def _cap_x0_columns(table: torch.Tensor) -> torch.Tensor:
    table[:, 2:4] = table[:, 2:4].clamp(max=_X0_COEF_CAP)
    return table


# The keys of each kind of NoiseSchedule.config.
_CONFIG_KEYS = {
    "name": {"name", "timesteps", "beta_start", "beta_end"},
    "betas": {"betas"},
    "respace_of": {"respace_of", "timesteps"},
}


def _as_betas(betas: object) -> torch.Tensor:
    """Given betas as a plain float64 CPU tensor: real numbers only (no bools, no
    complex). Plain: a subclass's tables would look like a trace's to the caches
    (``_checks.is_traced``), which then never kept them."""
    if isinstance(betas, torch.Tensor):
        if betas.dtype == torch.bool or betas.is_complex():
            raise TypeError(f"betas must hold real numbers, got {betas.dtype}")
        return betas.detach().to("cpu", torch.float64).clone().as_subclass(torch.Tensor)
    try:  # lists and arrays straight to float64, never via float32
        tensor = torch.tensor(betas, **_F64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"betas must be a tensor or a sequence of numbers, got {type(betas).__name__} ({error})") from None
    if any(isinstance(b, (bool, np.bool_)) for b in (betas if isinstance(betas, (list, tuple)) else ())) or (
        isinstance(betas, np.ndarray) and betas.dtype == np.bool_
    ):
        raise TypeError("betas must hold real numbers, got a bool")
    return tensor


def _check_betas(betas: torch.Tensor) -> None:
    if betas.dim() != 1 or betas.numel() == 0:
        raise ValueError(f"betas must be a non-empty 1-d tensor, got shape {tuple(betas.shape)}")
    if not torch.isfinite(betas).all():
        raise ValueError("betas must be finite (found NaN or Inf)")
    if (betas <= 0).any() or (betas > 1).any():
        raise ValueError(
            f"betas must lie in (0, 1], got min {betas.min().item():.3g}, max {betas.max().item():.3g}"
        )
    # Leading betas below float64's resolution next to 1 (about 1.1e-16) give
    # abar = 1 exactly: the coefficients that divide by 1 - abar become inf/NaN.
    no_noise = torch.cumprod(1.0 - betas, dim=0) >= 1.0
    if no_noise.any():
        last = int(no_noise.nonzero()[-1])
        raise ValueError(
            f"betas[{last}] = {betas[last].item():.3g}: 1 - beta rounds to 1 in float64 through timestep {last}, "
            "so no noise is added there and the schedule's coefficients (which divide by 1 - abar_t) are infinite; "
            "use betas of at least about 1e-15"
        )
