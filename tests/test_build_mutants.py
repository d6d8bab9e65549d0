"""What setup.py chooses, and how the extension loads, checked without compiling
(found by mutation testing): setup.py's module code runs in this process as
`python setup.py` would, with setuptools.setup capturing its arguments, and
torch's CUDA build and nvcc made present or absent at will. test_build.py
builds a small project of its layout; these check the choices on every machine:
switches, sources, flags, the architectures, the CUDA headers, CUDA_HOME, the
fallbacks of a failed build, and torch found under pip's build isolation."""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import setuptools
import torch
from setuptools.command.build_ext import build_ext as setuptools_build_ext
from setuptools.dist import Distribution
from torch.utils import cpp_extension

from ddpm_fast import _extension

ROOT = Path(__file__).resolve().parents[1]
# Read by setup.py, or set by it (CUDA_HOME, TORCH_CUDA_ARCH_LIST, PATH).
VARIABLES = ("DDPM_FAST_CUDA", "DDPM_FAST_STRICT", "DDPM_FAST_DEBUG", "DDPM_FAST_PORTABLE_CPU", "CI",
             "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CUDA_PATH")
CPU_SOURCES = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("csrc/**/*.cpp") if "cuda" not in p.parts)
CUDA_SOURCES = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("csrc/cuda/*") if p.suffix in (".cpp", ".cu"))


@pytest.fixture
def run_setup(monkeypatch, tmp_path):
    """run_setup(cuda_torch=, cuda_home=, **environment) -> (setup.py's globals,
    setup()'s keyword arguments), in the environment given alone; torch's CUDA_HOME
    a toolkit with nvcc ("toolkit"), a CUDA runtime without ("runtime") or None, and
    no nvcc on PATH (torch's build runs CUDA_HOME's, so PATH decides nothing once
    CUDA_HOME is set). Every variable setup.py reads or sets is restored afterwards
    (set, then deleted: monkeypatch restores only what it saw)."""
    for name in VARIABLES:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("PATH", os.environ["PATH"])
    monkeypatch.chdir(ROOT)
    which = shutil.which
    homes = {"toolkit": str(_toolkit(tmp_path / "toolkit")), "runtime": str(_runtime(tmp_path / "runtime")), None: None}

    def run(cuda_torch=True, cuda_home="toolkit", **environment):
        for name in VARIABLES:  # what an earlier run of this test set, or setup.py did
            monkeypatch.delenv(name, raising=False)
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(torch.version, "cuda", "12.8" if cuda_torch else None)
        monkeypatch.setattr(cpp_extension, "CUDA_HOME", homes[cuda_home])
        monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: None if cmd == "nvcc" else which(cmd, *a, **k))
        captured = {}
        monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
        namespace = runpy.run_path(str(ROOT / "setup.py"), run_name="setup")
        return namespace, captured

    return run


def the_extension(captured):
    (ext,) = captured["ext_modules"]
    return ext


def has_cuda(ext) -> bool:
    return ("DDPM_FAST_WITH_CUDA", None) in ext.define_macros


@pytest.mark.parametrize("environment, strict", [
    ({}, False), ({"CI": "true"}, True), ({"CI": "true", "DDPM_FAST_STRICT": "0"}, False),
    ({"DDPM_FAST_STRICT": "on"}, True), ({"CI": "false"}, False),
])
def test_a_build_is_strict_under_ci_unless_told_otherwise(run_setup, environment, strict):
    """DDPM_FAST_STRICT defaults to on when CI=true, and only then."""
    namespace, _ = run_setup(DDPM_FAST_CUDA="0", **environment)
    assert namespace["STRICT"] is strict


@pytest.mark.parametrize("cuda", ["0", None])
def test_the_cpp_files_build_without_debug_information_unless_asked(run_setup, cuda):
    """-g0 (after Python's -g) by default; DDPM_FAST_DEBUG=1 leaves Python's -g alone.
    The CPU-only twin of a CUDA build follows the same switch."""
    environment = {} if cuda is None else {"DDPM_FAST_CUDA": cuda}
    namespace, captured = run_setup(**environment)
    for ext in (the_extension(captured), namespace["cpu_fallback"]):
        if ext is not None:
            assert ext.extra_compile_args["cxx"][-1] == "-g0"
    namespace, captured = run_setup(DDPM_FAST_DEBUG="1", **environment)
    for ext in (the_extension(captured), namespace["cpu_fallback"]):
        if ext is not None:
            assert "-g0" not in ext.extra_compile_args["cxx"]


@pytest.mark.parametrize("portable", [None, "1", "0"])
def test_portable_cpu_is_a_build_switch(run_setup, portable):
    """DDPM_FAST_PORTABLE_CPU=1, and only then, defines the macro that leaves the
    AVX2/AVX-512 loops out (a default build keeps them: they are the fast ones)."""
    environment = {} if portable is None else {"DDPM_FAST_PORTABLE_CPU": portable}
    namespace, captured = run_setup(**environment)
    for ext in (the_extension(captured), namespace["cpu_fallback"]):
        assert (("DDPM_FAST_PORTABLE_CPU", None) in ext.define_macros) is (portable == "1")


def test_every_source_is_compiled(run_setup):
    """The CPU build compiles every .cpp of csrc outside csrc/cuda; the CUDA build
    those and every .cpp and .cu of csrc/cuda; the CPU-only retry the CPU ones."""
    assert CPU_SOURCES and any(s.endswith(".cu") for s in CUDA_SOURCES)
    namespace, captured = run_setup(DDPM_FAST_CUDA="0")
    assert sorted(the_extension(captured).sources) == CPU_SOURCES
    assert namespace["cpu_fallback"] is None
    namespace, captured = run_setup()
    assert sorted(the_extension(captured).sources) == sorted(CPU_SOURCES + CUDA_SOURCES)
    assert sorted(namespace["cpu_fallback"].sources) == CPU_SOURCES


def test_the_flags_the_kernels_depend_on(run_setup):
    """OpenMP at compile and link time (at::parallel_for is serial without it), no
    fused multiply-adds contracted by the compiler (the noise is bit for bit the same
    across the vector loops), the limited API (the wheel is tagged cp310-abi3), and
    DDPM_FAST_WITH_CUDA on the CUDA build only (it is what _C.WITH_CUDA reports)."""
    namespace, captured = run_setup()
    cuda, cpu = the_extension(captured), namespace["cpu_fallback"]
    assert captured["options"]["bdist_wheel"]["py_limited_api"] == "cp310"
    for ext in (cuda, cpu):
        assert {"-O3", "-fopenmp", "-ffp-contract=off"} <= set(ext.extra_compile_args["cxx"])
        assert "-fopenmp" in ext.extra_link_args
        assert ext.py_limited_api is True
    assert {"-O3", "--expt-relaxed-constexpr", "-lineinfo"} <= set(cuda.extra_compile_args["nvcc"])
    assert has_cuda(cuda) and not has_cuda(cpu)


@pytest.mark.parametrize("arch_list, want", [(None, "8.0;9.0+PTX"), ("", "8.0;9.0+PTX"), (" ", "8.0;9.0+PTX"),
                                             ("7.5;8.6", "7.5;8.6")])
def test_the_cuda_architectures(run_setup, arch_list, want):
    """sm_80, sm_90 and PTX unless TORCH_CUDA_ARCH_LIST names others."""
    environment = {} if arch_list is None else {"TORCH_CUDA_ARCH_LIST": arch_list}
    run_setup(**environment)
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == want


def test_the_cuda_headers_of_the_nvidia_wheels_are_included(run_setup, tmp_path, monkeypatch):
    """Every nvidia/*/include folder on sys.path (torch's CUDA wheels: cusparse.h, ...)."""
    site = tmp_path / "site-packages"
    wanted = [site / "nvidia" / "cu13" / "include", site / "nvidia" / "cusparse" / "include"]
    for folder in wanted:
        folder.mkdir(parents=True)
    (site / "nvidia" / "nccl" / "lib").mkdir(parents=True)  # a wheel without headers
    monkeypatch.syspath_prepend(str(site))
    _, captured = run_setup()
    include_dirs = the_extension(captured).include_dirs
    assert sorted(d for d in include_dirs if d.startswith(str(site))) == sorted(str(f) for f in wanted)


@pytest.mark.parametrize("environment, cuda_torch, cuda_home, want", [
    ({}, True, "toolkit", True),
    ({}, True, None, False),
    ({}, True, "runtime", False),  # /usr/local/cuda of a runtime image: no nvcc to build with
    ({}, False, "toolkit", False),  # a CPU build of torch
    ({"DDPM_FAST_CUDA": "0"}, True, "toolkit", False),
    ({"DDPM_FAST_CUDA": "1"}, True, "toolkit", True),
    ({"DDPM_FAST_CUDA": "1"}, False, "toolkit", "torch CUDA build=False"),
    ({"DDPM_FAST_CUDA": "1"}, True, None, "nvcc found=False"),
    ({"DDPM_FAST_CUDA": "1"}, True, "runtime", "nvcc found=False"),
])
def test_when_the_cuda_kernels_are_built(run_setup, environment, cuda_torch, cuda_home, want):
    """Whenever torch is a CUDA build and nvcc is found where torch's build runs it
    (CUDA_HOME/bin), unless DDPM_FAST_CUDA=0; DDPM_FAST_CUDA=1 without them is an
    error. A CUDA_HOME without nvcc (torch takes /usr/local/cuda whenever it exists)
    is no nvcc: setup.py had started a CUDA build there, failing (an error under
    CI=true) or falling back with a misleading warning. Only the CUDA part setup.py
    chose by itself has a CPU-only twin to fall back to."""
    if isinstance(want, str):
        with pytest.raises(RuntimeError, match=want):
            run_setup(cuda_torch=cuda_torch, cuda_home=cuda_home, **environment)
        return
    namespace, captured = run_setup(cuda_torch=cuda_torch, cuda_home=cuda_home, **environment)
    ext = the_extension(captured)
    assert has_cuda(ext) is want and any(s.endswith(".cu") for s in ext.sources) is want
    assert (namespace["cpu_fallback"] is not None) is (want and not environment)


def test_the_environments_own_tools_come_first_on_path(run_setup):
    """ninja of the venv is found when its pip runs without the venv activated."""
    run_setup(DDPM_FAST_CUDA="0")
    assert os.environ["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)


def _toolkit(folder: Path) -> Path:
    (folder / "bin").mkdir(parents=True)
    (folder / "include").mkdir()
    (folder / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (folder / "include" / "cuda_runtime.h").write_text("")
    return folder


def _runtime(folder: Path) -> Path:
    """A CUDA runtime's folder: headers and libraries, no nvcc."""
    (folder / "include").mkdir(parents=True)
    (folder / "lib64").mkdir()
    return folder


def test_cuda_home_comes_from_the_toolkit_behind_nvcc(run_setup, tmp_path, monkeypatch):
    """nvcc on PATH a link into a toolkit: CUDA_HOME is that toolkit; a CUDA_HOME
    already set is kept; a wrapper script (not a link) falls back to /usr/local/cuda."""
    namespace, _ = run_setup(DDPM_FAST_CUDA="0")
    set_cuda_home = namespace["_set_cuda_home"]
    toolkit = _toolkit(tmp_path / "cuda-12.8")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: str(tmp_path / "bin" / "nvcc") if cmd == "nvcc" else None)

    monkeypatch.delenv("CUDA_HOME", raising=False)
    set_cuda_home()
    assert os.environ["CUDA_HOME"] == str(toolkit)

    monkeypatch.setenv("CUDA_HOME", "/opt/my-cuda")
    set_cuda_home()
    assert os.environ["CUDA_HOME"] == "/opt/my-cuda"

    monkeypatch.delenv("CUDA_HOME")
    wrapper = _toolkit(tmp_path / "wrapper")  # a bin/nvcc and an include, but not a toolkit's
    (wrapper / "include" / "cuda_runtime.h").unlink()
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: str(wrapper / "bin" / "nvcc") if cmd == "nvcc" else None)
    exists = os.path.exists
    fake = {"/usr/local/cuda/bin/nvcc", "/usr/local/cuda/include/cuda_runtime.h"}
    monkeypatch.setattr(os.path, "exists", lambda p: p in fake or exists(p))
    set_cuda_home()
    assert os.environ["CUDA_HOME"] == "/usr/local/cuda"


def _build_command(captured):
    command = captured["cmdclass"]["build_ext"](Distribution())
    command.extensions = list(captured["ext_modules"])
    return command


@pytest.mark.parametrize("environment, cuda_torch, fails, want", [
    ({}, True, "cuda", "retried"),  # the CUDA part chosen by itself fails: the CPU kernels alone
    ({}, True, "all", "pure"),
    ({}, False, "all", "pure"),  # a CPU-only build that fails (no compiler): pure Python
    ({"DDPM_FAST_CUDA": "0"}, True, "all", "pure"),
    ({"DDPM_FAST_CUDA": "0", "DDPM_FAST_STRICT": "1"}, True, "all", "raises"),
    ({"DDPM_FAST_STRICT": "1"}, True, "cuda", "raises"),
    ({"DDPM_FAST_CUDA": "1"}, True, "cuda", "raises"),
])
def test_what_a_failed_build_installs(run_setup, monkeypatch, environment, cuda_torch, fails, want):
    """Outside strict mode a failed build installs the package (with the CPU kernels
    where only the CUDA part that setup.py chose failed); strict mode and
    DDPM_FAST_CUDA=1 make it an error."""
    _, captured = run_setup(cuda_torch=cuda_torch, **environment)
    tried = []

    def compile_(command):
        (ext,) = command.extensions
        tried.append(has_cuda(ext))
        if fails == "all" or has_cuda(ext):
            raise setuptools.errors.CompileError("the compiler failed")

    monkeypatch.setattr(setuptools_build_ext, "run", compile_)
    command = _build_command(captured)
    if want == "raises":
        with pytest.raises(setuptools.errors.CompileError):
            command.run()
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        command.run()
    said = " ".join(str(w.message) for w in caught)
    if want == "retried":
        assert tried == [True, False] and "building the CPU kernels only" in said and "pure-Python" not in said
    else:
        assert tried[-1] is False and "installing the pure-Python package" in said


@pytest.mark.parametrize("strict", ["0", "1"])
def test_without_torch_the_build_says_so(run_setup, monkeypatch, strict):
    """torch not found by the target interpreter either: an error in strict mode,
    else a warning and a package without the extension."""
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "no torch"))
    if strict == "1":
        with pytest.raises(RuntimeError, match="torch is not installed in the target environment"):
            run_setup(DDPM_FAST_STRICT=strict)
        return
    with pytest.warns(UserWarning, match="torch is not installed in the target environment"):
        _, captured = run_setup(DDPM_FAST_STRICT=strict)
    assert captured["ext_modules"] == []


SITECUSTOMIZE = """
# As pip's build isolation does: the target environment's site-packages hidden,
# the build's own requirements (setuptools) in an overlay.
import site, sys
hidden = set(site.getsitepackages())
sys.path[:] = [p for p in sys.path if p not in hidden] + [{overlay!r}]
"""


def test_under_build_isolation_the_target_torch_is_found(tmp_path):
    """pip's build isolation hides the target's torch (PYTHONPATH names a
    sitecustomize that drops its site-packages): setup.py asks the target
    interpreter where torch lives, without that PYTHONPATH, and builds against it."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    for name in ("setuptools", "pkg_resources", "_distutils_hack"):
        found = Path(setuptools.__file__).parents[1] / name
        if found.exists():
            (overlay / name).symlink_to(found)
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE.format(overlay=str(overlay)))
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "DDPM_FAST_STRICT")}
    env.update(PYTHONPATH=str(tmp_path), PYTHONNOUSERSITE="1", DDPM_FAST_CUDA="0")
    hidden = subprocess.run([sys.executable, "-c", "import setuptools; import torch"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert hidden.returncode != 0 and "No module named 'torch'" in hidden.stderr, "the isolation is not emulated"
    run = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"building against torch {torch.__version__} from {torch.__file__};" in run.stdout, run.stdout + run.stderr


@pytest.mark.skipif(not _extension.AVAILABLE, reason="needs the C++ extension")
def test_with_cuda_says_whether_the_ops_have_cuda_kernels():
    """_extension.WITH_CUDA (which the auto backend trusts) is what the loaded _C
    registered: CUDA kernels for every op, or none."""
    for op in ("q_sample", "ddpm_step_", "fill_randn_", "group_norm_silu"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ddpm_fast::{op}", "CUDA") is _extension.WITH_CUDA, op


def test_a_built_extension_for_this_torch_is_loaded():
    """An extension built for the running torch (major.minor) loads: a wrong version
    check would refuse it, and every test that needs it would skip, not fail."""
    import importlib.util
    import re

    if importlib.util.find_spec("ddpm_fast._C") is None:
        pytest.skip("the extension is not built")
    _C = sys.modules.get("ddpm_fast._C") or importlib.import_module("ddpm_fast._C")
    running = tuple(int(v) for v in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    if (_C.TORCH_MAJOR, _C.TORCH_MINOR) != running:
        assert not _extension.AVAILABLE and "built against torch" in _extension.LOAD_ERROR
        pytest.skip(f"built for torch {_C.TORCH_MAJOR}.{_C.TORCH_MINOR}: rebuild it")
    assert _extension.AVAILABLE, _extension.LOAD_ERROR
