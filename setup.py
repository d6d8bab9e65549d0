"""Builds ddpm_fast and its C++/CUDA extension ``ddpm_fast._C``.

The extension is compiled against the torch of the environment it is installed
into, found even under pip's build isolation (see ``_import_target_torch``).
Environment variables:

* ``DDPM_FAST_CUDA``: ``1`` forces the CUDA kernels (an error without nvcc or a
  CUDA build of torch, or when they fail to build), ``0`` skips them (also
  ``true``/``false``, ``yes``/``no``, ``on``/``off``; another value is an
  error); unset builds them whenever torch is a CUDA build and nvcc is found,
  GPU or not, and if they fail to build (outside strict mode) builds the CPU
  kernels alone.
* ``TORCH_CUDA_ARCH_LIST``: the GPU architectures; default (also when empty)
  ``8.0;9.0+PTX``.
* ``DDPM_FAST_STRICT``: ``1`` (the default when ``CI=true``) makes a failed
  build an error; otherwise a build whose CPU kernels fail installs the package
  without the extension, and ``import ddpm_fast`` warns once and runs on the
  reference backend.
* ``DDPM_FAST_PORTABLE_CPU``: ``1`` builds the CPU kernels without their x86
  AVX2 loops, as on machines that are not x86 (where that happens by itself).
* ``DDPM_FAST_DEBUG``: ``1`` keeps the debug information (``-g``) that Python's
  compiler flags ask for; by default the C++ files build without it, which
  takes a third less time (the object files of torch's headers' debug
  information are most of the build's output).
* ``MAX_JOBS``: parallel compile jobs (ninja).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import warnings

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value in (None, "") else value.strip().lower()


_ON, _OFF = ("1", "true", "yes", "y", "on"), ("0", "false", "no", "n", "off")


def _switch(name: str) -> bool | None:
    """An on/off environment variable: True, False, or None when unset; any
    other value is an error (a misspelt 'of' must not mean 'auto')."""
    value = _flag(name)
    if value is None:
        return None
    if value not in _ON + _OFF:
        raise ValueError(f"{name}={os.environ[name]!r}: expected one of {', '.join(_ON + _OFF)}")
    return value in _ON


# Every switch is read once, before anything is built, so a misspelt one stops the
# build at once (DDPM_FAST_DEBUG=of had quietly meant "off", DDPM_FAST_STRICT=on too).
WANT_CUDA = _switch("DDPM_FAST_CUDA")  # None: build the CUDA kernels when torch and nvcc allow
STRICT = _switch("DDPM_FAST_STRICT")
STRICT = _flag("CI") == "true" if STRICT is None else STRICT  # every failure an error
DEBUG = bool(_switch("DDPM_FAST_DEBUG"))  # keep the C++ debug info
PORTABLE_CPU = bool(_switch("DDPM_FAST_PORTABLE_CPU"))  # leave the AVX2/NEON kernels out


def _import_target_torch():
    """Import the torch the package will run with.

    Under pip's build isolation the build runs in a temporary environment that
    hides the target's site-packages; building against a torch installed there
    would produce an extension for the wrong torch. So ask the target
    interpreter (pip runs the build with it) where its torch lives, and import
    that one.
    """
    try:
        import torch

        return torch
    except ImportError:
        pass
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    probe = "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))"
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        return None
    sys.path.append(result.stdout.strip().splitlines()[-1])
    import torch

    return torch


def _nvidia_include_dirs() -> list[str]:
    """CUDA headers that torch's CUDA build ships as pip wheels (cusparse.h, ...).

    A toolkit with nvcc alone lacks them; torch's headers include them.
    """
    dirs = []
    for entry in sys.path:
        dirs += glob.glob(os.path.join(entry, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def _set_cuda_home() -> None:
    """Point torch at the CUDA toolkit behind ``nvcc`` when CUDA_HOME is unset.

    torch guesses the toolkit as the parent of nvcc's folder, which is wrong
    when nvcc on PATH is a wrapper script (/usr/local/bin/nvcc): the link then
    misses libcudart.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


def _extensions():
    torch = _import_target_torch()
    if torch is None:
        message = (
            "ddpm_fast: torch is not installed in the target environment, so the C++/CUDA "
            "extension is not built and the package runs on its reference backend. Install "
            "torch first (pip install -r requirements.txt), then pip install -e . again. To "
            "build a wheel, do so in an environment that has torch, without build isolation "
            "(python -m build --no-isolation, or pip wheel --no-build-isolation .): an "
            "isolated build's environment has no torch to build against."
        )
        if STRICT:
            raise RuntimeError(message)
        warnings.warn(message)
        return [], None, None

    _set_cuda_home()
    # The environment's own tools first: torch looks for ninja on PATH only, and the
    # README's commands run the venv's pip without activating it (else a serial build).
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    from torch.utils import cpp_extension

    # torch compiles with CUDA_HOME/bin/nvcc, and takes /usr/local/cuda for CUDA_HOME
    # whenever that folder exists: a CUDA runtime image has one without nvcc.
    home = cpp_extension.CUDA_HOME
    has_nvcc = home is not None and os.path.isfile(os.path.join(home, "bin", "nvcc"))
    cuda_torch = torch.version.cuda is not None
    if WANT_CUDA is True:
        if not (has_nvcc and cuda_torch):
            raise RuntimeError(
                f"DDPM_FAST_CUDA=1 but nvcc found={has_nvcc}, torch CUDA build={cuda_torch}"
            )
        with_cuda = True
    elif WANT_CUDA is False:
        with_cuda = False
    else:
        with_cuda = has_nvcc and cuda_torch

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is inline OpenMP in torch's headers (serial without it);
    # at load time the libgomp.so.1 that torch already loaded serves us too.
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
    if not DEBUG:
        # After Python's own flags (which hold -g): group_norm_silu_autograd.cpp took
        # 48 -> 31 s, its object 12 MB -> 0.4 MB (2026-12-03, 2-core VM).
        cxx_flags.append("-g0")

    def cpu_kwargs() -> dict:  # a fresh copy each time: the build appends flags to these lists
        kwargs = dict(extra_compile_args={"cxx": list(cxx_flags)}, extra_link_args=["-fopenmp"], define_macros=[],
                      py_limited_api=True)
        if PORTABLE_CPU:
            kwargs["define_macros"].append(("DDPM_FAST_PORTABLE_CPU", None))
        return kwargs

    cpu_only = cpp_extension.CppExtension("ddpm_fast._C", list(sources), **cpu_kwargs())
    fallback = None
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():  # empty: torch would ask the GPUs, none here
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        kwargs = cpu_kwargs()
        # The ops' CUDA entry points (host compiler) and their launches (nvcc; csrc/cuda/launch.h).
        cuda_sources = sources + sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        kwargs["define_macros"].append(("DDPM_FAST_WITH_CUDA", None))
        kwargs["include_dirs"] = _nvidia_include_dirs()
        ext = cpp_extension.CUDAExtension("ddpm_fast._C", cuda_sources, **kwargs)
        # Chosen by itself (not DDPM_FAST_CUDA=1): a CUDA part that fails to build (an
        # nvcc that does not match torch's CUDA, ...) must not cost the CPU kernels too.
        fallback = cpu_only if WANT_CUDA is None else None
    else:
        ext = cpu_only
    print(f"ddpm_fast: building against torch {torch.__version__} from {torch.__file__}; "
          f"CUDA kernels: {'yes' if with_cuda else 'no'}; sources: {' '.join(ext.sources)}")
    return [ext], cpp_extension.BuildExtension, fallback


def _build_ext_class(torch_build_ext, cpu_fallback):
    base = torch_build_ext.with_options(use_ninja=True) if torch_build_ext else build_ext

    class BuildExtension(base):
        """Builds the extension. Outside strict mode a failed CUDA part (when it was
        not forced) is retried without it, and a failed CPU build leaves the package
        pure Python; in strict mode every failure is an error."""

        def run(self) -> None:
            # run() changes the command (compiler object for the option, inplace off
            # while it builds): a retry starts from the state the first try did.
            start = dict(vars(self))
            try:
                super().run()
                return
            except Exception as error:  # compiler missing or failing
                if STRICT or (cpu_fallback is None and WANT_CUDA):
                    raise
                failure = error
            if cpu_fallback is not None:
                warnings.warn(
                    f"ddpm_fast: the CUDA kernels failed to build ({failure}); building the CPU "
                    "kernels only (CUDA tensors run on the Triton or reference backend). "
                    "`DDPM_FAST_CUDA=1 pip install -v -e .` shows the CUDA build's error."
                )
                # What finalize_options recorded on the extension (setuptools' file name,
                # stub flags) holds for its CPU-only twin: same name, same place.
                for key, value in vars(self.extensions[0]).items():
                    if key.startswith("_"):
                        setattr(cpu_fallback, key, value)
                vars(self).update(start, extensions=[cpu_fallback])
                try:
                    super().run()
                    return
                except Exception as error:
                    failure = error
            warnings.warn(
                f"ddpm_fast: the C++/CUDA extension failed to build ({failure}); installing "
                "the pure-Python package, which runs on the reference backend."
            )

    return BuildExtension


ext_modules, torch_build_ext, cpu_fallback = _extensions()
setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": _build_ext_class(torch_build_ext, cpu_fallback)},
    # One wheel for every CPython from requires-python's 3.10 on: the stable ABI that
    # torch's build compiles against (Py_LIMITED_API, 3.10 in torch 2.14) and no older.
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
