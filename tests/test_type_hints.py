"""The package ships py.typed, so its type hints are part of the API: every
public function and method is annotated, and the hints a type checker sees for
the README's calls give what the code returns."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import sys
import typing

import pytest
import torch

import ddpm_fast
import ddpm_fast.kernels


def _public_modules() -> list[str]:
    # The Triton kernels' modules import triton, which is optional (Linux)
    packages = (ddpm_fast, ddpm_fast.kernels) if importlib.util.find_spec("triton") else (ddpm_fast,)
    names = {package.__name__ for package in packages}
    for package in packages:
        names |= {m.name for m in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + ".")}
    return sorted(n for n in names if not any(part.startswith("_") for part in n.split(".")[1:]))


def _unannotated(fn: typing.Callable, where: str) -> list[str]:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin
        return []
    missing = [f"{where}: parameter {p.name}" for p in signature.parameters.values()
               if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty]
    if signature.return_annotation is inspect.Signature.empty:
        missing.append(f"{where}: return")
    return missing


# Why: q_mean_variance and q_posterior_mean_variance (documented in the README)
# had no return hint, and kernels.philox.launchable none at all; a checker then
# took their results for Any without a word.
def test_every_public_function_and_method_is_annotated():
    missing, checked = [], set()
    for name in _public_modules():
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", [n for n in vars(module) if not n.startswith("_")]):
            obj = getattr(module, attr)
            if getattr(obj, "__module__", None) != name or id(obj) in checked:
                continue  # imported from elsewhere: checked where it is defined
            checked.add(id(obj))
            if inspect.isfunction(obj):
                missing += _unannotated(obj, f"{name}.{attr}")
            elif inspect.isclass(obj):
                for method_name, member in vars(obj).items():
                    if method_name.startswith("_") and method_name != "__init__":
                        continue
                    fn = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
                    if inspect.isfunction(fn):
                        missing += _unannotated(fn, f"{name}.{attr}.{method_name}")
    assert len(checked) > 100  # the walk found the package, not an empty list
    assert missing == []


# Why: Sampler.sample declared Tensor | tuple[...] alone, so the README's quick
# start (images = sampler.sample(...); images.shape) failed a type check, as did
# the package's own demo and sample_sharded: the plain call must give a Tensor.
@pytest.mark.skipif(sys.version_info < (3, 11), reason="typing.get_overloads is Python 3.11+")
def test_sampler_sample_overloads_give_a_tensor_without_intermediates():
    from ddpm_fast import sampler as module

    overloads = typing.get_overloads(module.Sampler.sample)
    assert len(overloads) == 2
    hints = [typing.get_type_hints(fn, vars(module)) for fn in overloads]
    plain, with_steps = sorted(hints, key=lambda h: h["return_intermediates"] is not type(None))
    assert plain["return_intermediates"] is type(None) and plain["return"] is torch.Tensor
    assert with_steps["return_intermediates"] is int
    assert with_steps["return"] == tuple[torch.Tensor, list[module.Intermediate]]
    # the overloads list every parameter the implementation takes, with its default
    implementation = inspect.signature(module.Sampler.sample)
    for fn in overloads:
        assert list(inspect.signature(fn).parameters) == list(implementation.parameters)
