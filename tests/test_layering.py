"""DESIGN.md's layers: schedules -> diffusion math -> ops (-> csrc / kernels)
-> nn -> models -> sampler / trainer -> CLI, and "lower layers never import
upper ones". Checked on every import statement of the package and of
kernels/ (inside functions too), by module path: kernels/checks.py imported
the ops' argument checks until a design review found it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Layer of each module (dotted, under ddpm_fast; kernels is installed as
# ddpm_fast.kernels), by its first matching prefix. Shared leaves (argument
# checks, progress bars, warnings, the extension's loader, the memory probe, Ctrl-C
# holding, atomic file writes) sit below all.
LAYERS = [
    ("_checks", 0), ("_progress", 0), ("_extension", 0), ("_warn", 0), ("_memory", 0), ("_interrupts", 0),
    ("checkpoint", 0),
    ("schedules", 1), ("diffusion", 2), ("kernels", 3), ("ops", 4), ("nn", 5), ("models", 6),
    ("cli", 8), ("__main__", 8),
]
UPPER = 7  # everything else: sampler, train*, data, evaluate, fid, pretrained, distributed, demo, selfcheck, ...


def layer(module: str) -> int:
    return next((level for prefix, level in LAYERS if module == prefix or module.startswith(prefix + ".")), UPPER)


def package_modules() -> list[tuple[str, Path]]:
    """(dotted name under ddpm_fast, file) of every module; kernels/ from the
    repository's folder (ddpm_fast/kernels is its link in a working tree)."""
    found = [(p.relative_to(ROOT), p) for p in (ROOT / "ddpm_fast").rglob("*.py")
             if not p.relative_to(ROOT).parts[1:2] == ("kernels",)]
    found += [(Path("ddpm_fast") / p.relative_to(ROOT), p) for p in (ROOT / "kernels").rglob("*.py")]
    return [(".".join(rel.with_suffix("").parts[1:]).removesuffix(".__init__").removesuffix("__init__"), path)
            for rel, path in found]


def imported(module: str, path: Path) -> list[str]:
    """The ddpm_fast modules ``module``'s import statements name (dotted, under ddpm_fast)."""
    parts = module.split(".") if module else []  # "": the package's own __init__
    package = parts if path.name == "__init__.py" else parts[:-1]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            if node.module:
                names.append(".".join(base + [node.module]))
            else:
                names += [".".join(base + [alias.name]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ddpm_fast"):
            names.append(node.module.removeprefix("ddpm_fast").lstrip("."))
        elif isinstance(node, ast.Import):
            names += [a.name.removeprefix("ddpm_fast").lstrip(".") for a in node.names if a.name.startswith("ddpm_fast.")]
    return [name for name in names if name]


MODULES = package_modules()


def test_every_module_is_seen():
    names = {name for name, _ in MODULES}
    assert {"schedules", "diffusion", "ops.q_sample", "kernels.checks", "nn.group_norm_silu", "models.unet",
            "sampler", "cli"} <= names


@pytest.mark.parametrize("module,path", MODULES, ids=[name or "ddpm_fast" for name, _ in MODULES])
def test_no_module_imports_a_higher_layer(module, path):
    upward = [name for name in imported(module, path) if layer(name) > layer(module)]
    assert not upward, f"{module} (layer {layer(module)}) imports {upward}"
