"""Without the compiled extension, ddpm_fast still imports, warns once, and
runs every op on the reference backend."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import importlib.abc, sys, warnings

class HideExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "ddpm_fast._C":
            raise HIDDEN
        return None

HIDDEN = ImportError("hidden by the test")

sys.meta_path.insert(0, HideExtension())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, ddpm_fast
    from ddpm_fast import NoiseSchedule, Sampler, ops
ours = [w for w in caught if "ddpm_fast" in str(w.message)]
assert len(ours) == 1 and "reference backend" in str(ours[0].message), [str(w.message) for w in caught]
assert ours[0].category is RuntimeWarning and "hidden by the test" in str(ours[0].message), ours[0]
assert (ours[0].filename, ours[0].lineno) == ("<string>", 15), ours[0]  # the user's `import ddpm_fast`, not ours
from ddpm_fast import _extension
assert (_extension.AVAILABLE, _extension.WITH_CUDA, _extension.LOAD_ERROR) == (False, False, "hidden by the test")
x = torch.rand(2, 3, 4, 4)
assert ops.resolve_backend("auto", x.device, "test") == "reference"
xt, eps = ops.q_sample(x, 5, NoiseSchedule("linear"), seed=1)
step = ops.ddpm_step(xt, eps, 5, NoiseSchedule("linear"), seed=1)
samples = Sampler(lambda x, t: 0 * x, NoiseSchedule("linear", timesteps=10), sample_shape=(1, 2, 2)).sample(2, seed=0, progress=False)
try:
    ops.q_sample(x, 5, NoiseSchedule("linear"), seed=1, backend="cpu")
except RuntimeError as error:
    assert "extension is not loaded (hidden by the test)" in str(error)  # says why
else:
    raise AssertionError("backend='cpu' without the extension must fail clearly")
print("ok")
"""


def test_import_and_ops_without_the_extension():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")


def test_an_extension_not_built_is_said_so():
    """Not found at all (not built), `from . import _C` blamed "a circular
    import" in the warning, in `ddpm-fast info` and in backend errors. A
    DDPM_FAST_CPU_SIMD cap, misspelt or not, means nothing without the CPU
    kernels, so it adds no second warning."""
    script = SCRIPT.replace('HIDDEN = ImportError("hidden by the test")',
                            'HIDDEN = ModuleNotFoundError("hidden by the test", name="ddpm_fast._C")')
    env = {**os.environ, "DDPM_FAST_CPU_SIMD": "avx9"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")


OTHER_TORCH = r"""
import warnings
import torch
torch.__version__ = "2.99.0+fake"  # as if torch had been upgraded since the build
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import ddpm_fast
    from ddpm_fast import NoiseSchedule, _extension, ops
ours = [str(w.message) for w in caught if "ddpm_fast" in str(w.message)]
assert len(ours) == 1 and "built against torch" in ours[0] and "2.99.0+fake is running" in ours[0], ours
assert not _extension.AVAILABLE
assert ops.resolve_backend("auto", torch.device("cpu"), "test") == "reference"
ops.q_sample(torch.rand(2, 3, 4, 4), 5, NoiseSchedule("linear"), seed=1)
print("ok")
"""


def test_an_extension_built_for_another_torch_is_not_used():
    """torch's C++ ABI changes between versions: a _C built for another torch
    (an upgrade since `pip install -e .`) is refused with one warning, not
    loaded to crash or compute wrongly."""
    pytest.importorskip("ddpm_fast._C")
    result = subprocess.run([sys.executable, "-c", OTHER_TORCH], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_a_torch_older_than_the_floor_is_refused_at_import():
    """torch 2.6, which pyproject.toml admitted (torch>=2.6), failed at the first
    op (AttributeError: torch.compiler.is_exporting); torch older than the floor
    is now refused by `import ddpm_fast`, and the floor is pyproject's."""
    from ddpm_fast import _extension

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    floor = re.search(r'"torch>=(\d+)\.(\d+)"', pyproject)
    assert floor and (int(floor[1]), int(floor[2])) == _extension.OLDEST_TORCH
    major, minor = _extension.OLDEST_TORCH
    older = f"{major}.{minor - 1}" if minor else f"{major - 1}.99"
    probe = f"import torch; torch.__version__ = '{older}.0+cpu'; import ddpm_fast"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and f"ImportError: ddpm_fast needs torch {major}.{minor} or newer" in run.stderr, run.stderr[-2000:]
    ok = f"import torch; torch.__version__ = '{major}.{minor}.0a0+git1234'; import ddpm_fast"
    assert subprocess.run([sys.executable, "-c", ok], capture_output=True, timeout=300).returncode == 0
