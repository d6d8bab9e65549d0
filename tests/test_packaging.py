"""The source distribution (what `python -m build` makes, and builds its wheel
from) must hold what the build needs. setuptools puts in an extension's listed
sources by itself, but not the headers they include, nor the CUDA sources of a
build that left them out; before MANIFEST.in, an sdist could not compile."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from test_build import _MODULE  # a one-file extension module of setup.py's layout

ROOT = Path(__file__).parents[1]
# Files a source distribution has no use for: CI's own script and git's ignore list.
NOT_SHIPPED = (".ci/", ".gitignore")


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout, to know which files are the project's")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60)
    return [name for name in listed.stdout.decode().split("\0") if name and (ROOT / name).is_file()]


@pytest.mark.slow
def test_the_source_distribution_holds_every_project_file(tmp_path):
    """Built from a copy of the tracked files (a clean clone), with the CUDA
    kernels switched off: the case where setuptools alone would list the fewest."""
    tracked = _tracked_files()
    source = tmp_path / "source"
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    env = {**os.environ, "DDPM_FAST_CUDA": "0"}
    run = subprocess.run([sys.executable, "setup.py", "sdist", "--dist-dir", str(tmp_path / "dist")], cwd=source,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        shipped = {member.name.split("/", 1)[1] for member in tar.getmembers() if member.isfile()}
    missing = sorted(name for name in tracked if not name.startswith(NOT_SHIPPED) and name not in shipped)
    assert not missing, f"the sdist lacks {len(missing)} project files: {missing[:20]}"
    assert not [name for name in shipped if name.endswith((".so", ".pyc"))], "build outputs in the sdist"


def _python_floor(pyproject: str) -> tuple[int, int]:
    line = next(line for line in pyproject.splitlines() if line.startswith("requires-python"))
    major, minor = line.split(">=")[1].strip(' "').split(".")[:2]
    return int(major), int(minor)


@pytest.mark.slow
def test_the_wheel_claims_the_pythons_it_runs_on(tmp_path):
    """The extension is built on the stable ABI (an abi3 wheel) of the Python
    that torch's build sets (Py_LIMITED_API). The wheel was tagged cp39-abi3,
    a claim to run on 3.9, below both that ABI (3.10 with torch 2.14) and the
    package's requires-python. Built here from setup.py and pyproject.toml over a
    one-file module, without the CUDA kernels."""
    from torch.utils import cpp_extension

    if shutil.which("c++") is None:
        pytest.skip("needs a C++ compiler")
    project = tmp_path / "project"
    shutil.copytree(ROOT / "ddpm_fast", project / "ddpm_fast", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copytree(ROOT / "kernels", project / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project)
    (project / "csrc").mkdir()
    (project / "csrc" / "module.cpp").write_text(_MODULE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(DDPM_FAST_CUDA="0", DDPM_FAST_STRICT="1")
    run = subprocess.run([sys.executable, "setup.py", "bdist_wheel", "--dist-dir", str(tmp_path / "dist")], cwd=project,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    python_tag, abi_tag = wheel.name.split("-")[2:4]
    floor = _python_floor((ROOT / "pyproject.toml").read_text())
    assert (python_tag, abi_tag) == (f"cp{floor[0]}{floor[1]}", "abi3"), wheel.name
    limited_api = int(getattr(cpp_extension, "min_supported_cpython", "0x03090000"), 16)
    assert (limited_api >> 24, (limited_api >> 16) & 0xFF) <= floor, "torch builds for a newer stable ABI than the tag"
