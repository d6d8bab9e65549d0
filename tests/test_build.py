"""What CI's build holds: the README's test command builds the extension with
the CUDA kernels wherever torch is a CUDA build and nvcc is found, GPU or not
(issue 2), so that CI compiles and links every .cu file. A build that quietly
left them out would otherwise pass every CPU test."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from ddpm_fast import _extension

OPS = ("q_sample", "q_sample_randn", "ddpm_step_", "fill_randn_", "group_norm_silu", "group_norm_silu_backward")


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="CI's build; a local one may leave the CUDA kernels out (DDPM_FAST_CUDA=0)")
def test_ci_builds_the_cuda_kernels():
    if torch.version.cuda is None or shutil.which("nvcc") is None or os.environ.get("DDPM_FAST_CUDA") == "0":
        pytest.skip("no CUDA build of torch, or no nvcc: the CPU-only build is the right one")
    assert _extension.AVAILABLE, _extension.LOAD_ERROR
    assert _extension.WITH_CUDA, "torch is a CUDA build and nvcc is on PATH, yet the extension has no CUDA kernels"
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ddpm_fast::{op}", "CUDA"), f"{op} has no CUDA kernel"


@pytest.mark.parametrize("name, value, says", [
    ("DDPM_FAST_CUDA", "off", "CUDA kernels: no"), ("DDPM_FAST_CUDA", "No", "CUDA kernels: no"),
    ("DDPM_FAST_CUDA", "of", "DDPM_FAST_CUDA='of': expected one of"),
    # These three had read 1/true/yes as on and anything else (a misspelt "on" too) as off.
    ("DDPM_FAST_STRICT", "of", "DDPM_FAST_STRICT='of': expected one of"),
    ("DDPM_FAST_DEBUG", "ye", "DDPM_FAST_DEBUG='ye': expected one of"),
    ("DDPM_FAST_PORTABLE_CPU", "onn", "DDPM_FAST_PORTABLE_CPU='onn': expected one of")])
def test_build_switches_are_read_as_switches(name, value, says):
    """DDPM_FAST_CUDA=off (or any spelling but 0/false/no) meant 'auto', which
    builds the CUDA kernels wherever nvcc is found; a misspelling is now an error."""
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "DDPM_FAST_CUDA": "0", name: value}
    run = subprocess.run([sys.executable, "setup.py", "--version"], cwd=Path(__file__).parents[1], env=env,
                         capture_output=True, text=True, timeout=300)
    assert says in run.stdout + run.stderr and (run.returncode == 0) == ("expected" not in says), run.stderr[-1500:]


_MODULE = """#include <Python.h>
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&module);
#ifdef DDPM_FAST_WITH_CUDA
  PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
  return m;
}
"""

# Reports torch's own CUDA release (so torch's version check passes) and fails every compile.
_FAILING_NVCC = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "Cuda compilation tools, release {release}, V{release}.0"; exit 0; fi
echo "fake nvcc: cannot compile $*" >&2; exit 1
"""


@pytest.mark.parametrize("case", ["auto", "strict", "forced", "cpu_fails"])
def test_a_failed_cuda_build_keeps_the_cpu_kernels(tmp_path, case):
    """setup.py on a small project of its layout (one C++ module, one .cu file) with an
    nvcc that fails: the CUDA part that setup.py chose by itself is retried without
    it, so the CPU kernels still install (before, one failing nvcc left the package
    on the reference backend). Strict mode, DDPM_FAST_CUDA=1 and a failing CPU
    part keep their meaning."""
    import subprocess
    import sys
    from pathlib import Path

    if torch.version.cuda is None or shutil.which("c++") is None:
        pytest.skip("needs a CUDA build of torch (setup.py picks the CUDA kernels by itself) and a C++ compiler")
    (tmp_path / "csrc" / "cuda").mkdir(parents=True)
    (tmp_path / "ddpm_fast").mkdir()
    (tmp_path / "csrc" / "module.cpp").write_text(_MODULE + ("#error the CPU part fails too\n" if case == "cpu_fails" else ""))
    (tmp_path / "csrc" / "cuda" / "kernel.cu").write_text("__global__ void kernel() {}\n")
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(_FAILING_NVCC.format(release=torch.version.cuda))
    nvcc.chmod(0o755)
    shutil.copy(Path(__file__).parents[1] / "setup.py", tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "DDPM_FAST_CUDA", "CUDA_PATH")}
    env.update(CUDA_HOME=str(nvcc.parents[1]), DDPM_FAST_STRICT="1" if case == "strict" else "0")
    if case == "forced":
        env["DDPM_FAST_CUDA"] = "1"
    run = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    log = run.stdout + run.stderr
    assert "fake nvcc: cannot compile" in log, log[-3000:]  # the CUDA part was tried, and failed
    built = list((tmp_path / "ddpm_fast").glob("_C*.so"))
    if case in ("strict", "forced"):
        assert run.returncode != 0 and not built, log[-3000:]
        return
    assert run.returncode == 0, log[-3000:]
    if case == "cpu_fails":
        assert not built and "installing the pure-Python package" in log, log[-3000:]
        return
    assert "building the CPU kernels only" in log and len(built) == 1, log[-3000:]
    probe = "import sys, torch; sys.path.insert(0, 'ddpm_fast'); import _C; print(_C.WITH_CUDA)"
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert loaded.stdout.strip() == "0", loaded.stderr[-2000:]
