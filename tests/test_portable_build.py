"""The CPU kernels build where there is no x86 (aarch64, ...).

This machine is x86, so the non-x86 build is checked by compiling the CPU
sources with DDPM_FAST_PORTABLE_CPU (what csrc/cpu/simd.h selects by itself
elsewhere): they must compile, and their preprocessed code must hold no x86
intrinsic or target attribute. The portable loops' results are tested at run
time with DDPM_FAST_CPU_SIMD=none (test_randn.py, test_group_norm_silu_cpu.py).
"""

from __future__ import annotations

import glob
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(glob.glob(str(ROOT / "csrc" / "cpu" / "*.cpp")))
X86_ONLY = re.compile(r"_mm512_|_mm256_|_mm_|__m512|__m256|__m128|__mmask|target\(\"avx|GCC target|target_clones|"
                      r"__builtin_cpu_supports")


def _compile(source: str, *extra: str) -> subprocess.CompletedProcess:
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    cmd = [compiler, "-std=c++20", "-fopenmp", "-Wall", "-Werror", "-DDDPM_FAST_PORTABLE_CPU", *includes, *extra, source]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("source", SOURCES, ids=lambda s: Path(s).name)
def test_portable_sources_hold_no_x86_code(source: str) -> None:
    result = _compile(source, "-E")
    assert result.returncode == 0, result.stderr[-3000:]
    ours, leftovers = False, []
    for line in result.stdout.splitlines():
        if line.startswith("# "):  # line marker: which file the following lines come from
            ours = "/csrc/" in line
        elif ours and X86_ONLY.search(line):
            leftovers.append(line.strip())
    assert not leftovers, leftovers[:5]


VECTORIZED = [s for s in SOURCES if re.search(r'#include "(simd|simd_vec|group_norm_silu_rows)\.h"', Path(s).read_text())]


@pytest.mark.parametrize("source", VECTORIZED, ids=lambda s: Path(s).name)
def test_portable_sources_compile(source: str) -> None:
    result = _compile(source, "-fsyntax-only")
    assert result.returncode == 0, result.stderr[-3000:]
