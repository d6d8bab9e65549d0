"""Compile every Triton kernel specialization our ops launch, for a real GPU
architecture, on a machine without a GPU.

Triton's CPU interpreter (which the other tests use) runs the kernels' Python
with numpy semantics: it accepts code that the compiler rejects (a scalar
argument that Triton specializes into a constant, a shape that is not a power
of two, a type mix). This script drives the public ops exactly as users call
them (``backend="triton"``), with the kernels built as real ``JITFunction``s and
a stand-in driver that reports the requested GPU: each launch compiles its
kernel (source -> TTIR -> TTGIR -> LLVM -> PTX -> cubin, with the ptxas that
Triton bundles) and returns without running it. The outputs are therefore
garbage; only compilation is checked, plus the shared memory each kernel asks
for against the GPU's limit.

With --as-inductor, every int argument equal to 1 becomes a constant, whatever
a kernel's do_not_specialize list says: what torch.compile's inductor does when
it compiles a triton_op's kernel into its graph (a seed of 1 made the noise
kernels fail to compile there).

Usage: python tests/triton_compile/compile_kernels.py --arch 90 [--quick] [--as-inductor]
Prints one line per compiled specialization and exits non-zero if any case failed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import re
import subprocess
import tempfile
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

# The kernels must be built as compilable JITFunctions: no interpreter at import.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# Shared memory a block may use (opt-in maximum), per compute capability.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


class CompileOnlyDriver:
    """The parts of Triton's CUDA driver a launch consults, for a GPU that is not
    there: the target architecture, device 0 and stream 0."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def is_active() -> bool:
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import ty_to_cpp

        return ty_to_cpp(ty)


class Recorder:
    """Replaces JITFunction.run: compile (warm-up mode: no launch) and record."""

    def __init__(self) -> None:
        self.kernels: dict[tuple, object] = {}
        self.current_case = ""

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        original = JITFunction.run
        recorder = self

        def run(self, *args, grid, warmup, **kwargs):
            kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
            key = (self.fn.__name__, kernel.hash if hasattr(kernel, "hash") else id(kernel))
            recorder.kernels.setdefault(key, (recorder.current_case, kernel))
            return kernel

        JITFunction.run = run
        try:
            yield
        finally:
            JITFunction.run = original


def cases(quick: bool) -> Iterator[tuple[str, Callable[[], object]]]:
    """(name, call) for every launch path of every Triton op."""
    from ddpm_fast import NoiseSchedule, ops

    schedule = NoiseSchedule("linear", timesteps=1000)
    dtypes = [torch.float32, torch.bfloat16] if quick else [torch.float32, torch.float16, torch.bfloat16]
    layouts = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}

    def data(shape, dtype, layout="nchw"):
        x = torch.randn(shape).to(dtype)
        return x.contiguous(memory_format=layouts[layout]) if len(shape) == 4 else x

    # Seeds and offsets whose 32-bit halves are 0, 1 and large: Triton turns an
    # int argument equal to 1 into a constant unless told not to.
    for seed, offset in [(1, 0), (1 << 32, 1), ((1 << 64) - 1, (1 << 33) + 5)]:
        for dtype in dtypes:
            yield f"randn seed={seed} offset={offset} {dtype}", (
                lambda s=seed, o=offset, d=dtype: ops.randn((3, 5, 7), s, o, dtype=d, backend="triton"))

    for dtype in dtypes:
        for layout in layouts:
            x0 = data((2, 3, 5, 7), dtype, layout)
            for t in (7, torch.tensor([0, 999])):
                name = f"q_sample {dtype} {layout} t={'per-sample' if isinstance(t, torch.Tensor) else t}"
                yield name + " drawn", (lambda x0=x0, t=t: ops.q_sample(x0, t, schedule, seed=1, backend="triton"))
                yield name + " given", (lambda x0=x0, t=t: ops.q_sample(
                    x0, t, schedule, noise=torch.randn_like(x0), backend="triton"))

    for eps_dtype in dtypes:
        for layout in layouts:
            x = data((2, 3, 5, 7), torch.float32, layout)
            eps = data((2, 3, 5, 7), eps_dtype, layout)
            for clip in (False, True):
                name = f"ddpm_step eps={eps_dtype} {layout} clip={clip}"
                yield name, (lambda x=x, e=eps, c=clip: ops.ddpm_step(
                    x, e, 500, schedule, clip_denoised=c, seed=1, backend="triton"))
            yield f"ddpm_step eps={eps_dtype} {layout} given noise, per-sample t", (
                lambda x=x, e=eps: ops.ddpm_step(x, e, torch.tensor([0, 3]), schedule, noise=torch.randn_like(x),
                                                 backend="triton"))
            for other in layouts:
                mi = torch.empty((2, 3, 5, 7), dtype=eps_dtype).contiguous(memory_format=layouts[other])
                yield f"ddpm_step eps={eps_dtype} {layout} model input {other}", (
                    lambda x=x, e=eps, mi=mi: ops.ddpm_step(x, e, 9, schedule, seed=(1 << 32) + 1, eta=0.5,
                                                         out=x, out_model_input=mi, backend="triton"))

    gn = importlib.import_module("ddpm_fast.kernels.group_norm_silu")
    # (shape, groups, shrink the tiles): small groups fused and, with shrunk
    # tiles, split; a group too large to fuse at the real tile sizes.
    configs = [((2, 32, 8, 8), 8, False), ((2, 32, 8, 8), 8, True), ((1, 64, 128, 256), 32, False)]
    if not quick:
        configs += [((3, 12, 5, 7), 4, False), ((3, 12, 5, 7), 4, True), ((2, 6, 11), 3, False),
                    ((2, 6, 11), 3, True), ((1, 1, 3, 3), 1, False), ((2, 64, 16, 16), 64, False),
                    ((128, 256, 16, 16), 32, False), ((128, 128, 32, 32), 32, False)]
    # Each HAS_* / ACT branch both ways; the full run also mixes them.
    flag_sets = [(True, True, True), (False, False, False)] + ([] if quick else [(False, False, True), (True, False, False)])
    for shape, groups, shrink in configs:
        for dtype in dtypes:
            for layout in layouts if len(shape) == 4 else ["nchw"]:
                for affine, with_add, act in flag_sets:
                    name = (f"group_norm_silu {'x'.join(map(str, shape))} g{groups}{' shrunk tiles' if shrink else ''} "
                            f"{dtype} {layout} affine={affine} add={with_add} act={act}")

                    def call(shape=shape, groups=groups, shrink=shrink, dtype=dtype, layout=layout, affine=affine,
                             with_add=with_add, act=act):
                        with shrunk_tiles(gn, shrink):
                            x = data(shape, dtype, layout).requires_grad_()
                            c = shape[1]
                            w = torch.randn(c, dtype=dtype).requires_grad_() if affine else None
                            b = torch.randn(c, dtype=dtype).requires_grad_() if affine else None
                            add = torch.randn(shape[0], c, dtype=dtype).requires_grad_() if with_add else None
                            y = ops.group_norm_silu(x, groups, w, b, add=add, act=act, backend="triton")
                            y.backward(torch.randn_like(y))

                    yield name, call


@contextlib.contextmanager
def shrunk_tiles(gn, shrink: bool) -> Iterator[None]:
    """With ``shrink``, tiles too small for any group: every case takes the split path."""
    names = ("MAX_TILE", "MAX_TILE_BACKWARD", "SPLIT_TILE")
    saved = {n: getattr(gn, n) for n in names}
    if shrink:
        gn.MAX_TILE, gn.MAX_TILE_BACKWARD, gn.SPLIT_TILE = 8, 8, 16
    try:
        yield
    finally:
        for n, v in saved.items():
            setattr(gn, n, v)


def ptxas_usage(kernel, arch: int) -> str:
    """Registers per thread and spilled bytes, from ptxas -v on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptx = kernel.asm["ptx"]
    gpu = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        info = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", str(path), "-o", os.devnull],
                              capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", info).group(1)
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", info))
    return f"regs {registers:>3s} spill {spills:5d} B"


def kernels() -> dict[str, JITFunction]:
    """Every kernel (a JITFunction named *_kernel) in our Triton modules, by name."""
    import ddpm_fast.kernels as package

    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        found.update({k: v for k, v in vars(module).items() if isinstance(v, JITFunction) and k.endswith("_kernel")})
    return found


def specialize_like_inductor(kernel: JITFunction) -> None:
    """Drop ``kernel``'s do_not_specialize (before its first launch, which
    builds the argument binder from these flags): an int argument equal to 1
    then compiles as a constant, as inductor compiles it."""
    for param in kernel.params:
        param.do_not_specialize = False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    parser.add_argument("--quick", action="store_true", help="fewer dtypes and shapes")
    parser.add_argument("--ptxas-info", action="store_true", help="also print registers and spills (ptxas -v)")
    parser.add_argument("--as-inductor", action="store_true",
                        help="int arguments equal to 1 become constants despite do_not_specialize, as under inductor")
    args = parser.parse_args()

    driver.set_active(CompileOnlyDriver(args.arch))
    from ddpm_fast.ops import _backend

    # Import the kernels while they compile, then let the ops accept CPU tensors
    # for the Triton backend (what TRITON_INTERPRET=1 does for the tests).
    found = kernels()
    if not found:
        raise SystemExit("no compilable Triton kernels found (is TRITON_INTERPRET set?)")
    if args.as_inductor:
        for kernel in found.values():
            specialize_like_inductor(kernel)
    expected = list(found)
    _backend.triton_interpreting = lambda: True

    recorder = Recorder()
    failures = []
    with recorder.installed():
        for name, call in cases(args.quick):
            recorder.current_case = name
            try:
                call()
            except Exception:  # noqa: BLE001 (reported below)
                failures.append((name, traceback.format_exc()))

    launched = {name for name, _ in recorder.kernels}
    for name in sorted(set(expected) - launched):
        failures.append((name, "no case launched this kernel: add one"))
    limit = SHARED_LIMIT.get(args.arch, 48 * 1024)
    mode = ", as inductor specializes" if args.as_inductor else ""
    print(f"triton {triton.__version__}, sm_{args.arch}{mode}: {len(recorder.kernels)} kernel specializations compiled")
    for (kernel_name, _), (case, kernel) in sorted(recorder.kernels.items(), key=lambda kv: kv[0][0]):
        meta = kernel.metadata
        shared = getattr(meta, "shared", 0)
        usage = f" {ptxas_usage(kernel, args.arch):24s}" if args.ptxas_info else ""
        print(f"  {kernel_name:26s} warps {meta.num_warps:2d} shared {shared:6d} B{usage}  first from: {case}")
        if shared > limit:
            failures.append((case, f"{kernel_name} asks for {shared} B of shared memory; sm_{args.arch} allows {limit}"))
    for name, error in failures:
        print(f"FAILED {name}\n{error}")
    print(f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
