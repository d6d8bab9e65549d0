"""``ddpm-fast info``'s self-check: a backend that disagrees with the reference
is reported as a MISMATCH and makes the command fail (exit status 1)."""

from __future__ import annotations

import pytest
import torch

from conftest import requires_extension
from ddpm_fast import selfcheck


def _perturbed(monkeypatch, op: str, amount):
    """_run_ops with ``amount(want)`` added to ``op``'s output of every backend but the reference."""
    real = selfcheck._run_ops

    def run_ops(x, t, schedule, backend):
        out = real(x, t, schedule, backend)
        if backend != "reference":
            out[op] = out[op] + amount(out[op])
        return out

    monkeypatch.setattr(selfcheck, "_run_ops", run_ops)


def _verdicts(op: str) -> dict[str, str]:
    return {backend: verdict for name, backend, verdict in selfcheck._self_check(torch.device("cpu")) if name == op}


@requires_extension
@pytest.mark.parametrize("op, error", [("q_sample", 1.5e-5), ("q_sample", -1.5e-5), ("gn_silu dx", 1.5e-5)])
def test_an_absolute_error_of_1_5e_5_is_a_mismatch(monkeypatch, op, error):
    # The tolerance is 1e-5 absolute for the non-summed ops: a looser or relative check passed broken kernels.
    # An error below the reference counts as one above; dx is per position, not a sum, so its error is not
    # scaled by its size (about 2.3 here) as the summed gradients' are.
    _perturbed(monkeypatch, op, lambda v: torch.full_like(v, error))
    verdicts = _verdicts(op)
    assert verdicts["cpu"].startswith("MISMATCH"), verdicts


@requires_extension
def test_summed_gradients_are_compared_relative_to_their_largest_value(monkeypatch):
    # dw sums over every position: its error is measured relative to its size, so rounding there is no mismatch.
    scale = {}

    def amount(v):
        scale["dw"] = max(1.0, v.abs().max().item())
        return torch.full_like(v, 0.5e-5 * scale["dw"])

    _perturbed(monkeypatch, "gn_silu dw", amount)
    verdicts = _verdicts("gn_silu dw")
    assert scale["dw"] > 2  # else absolute and relative are alike here
    assert verdicts["cpu"].startswith("ok"), verdicts


@pytest.mark.parametrize("verdict, code", [("ok (max error 0.0e+00)", 0), ("MISMATCH (max error 1.0e-03)", 1)])
def test_info_exits_1_on_a_mismatch(monkeypatch, capsys, verdict, code):
    # A MISMATCH row must fail `ddpm-fast info`, not only be printed.
    monkeypatch.setattr(selfcheck, "_self_check", lambda device: [("q_sample", "cpu", verdict)])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert selfcheck.report() == code
    assert verdict in capsys.readouterr().out


def test_a_backend_that_cannot_run_is_reported(monkeypatch):
    real = selfcheck.ops.resolve_backend

    def resolve_backend(backend, device, what):
        if backend == "triton":
            raise RuntimeError("no triton here")
        return real(backend, device, what)

    monkeypatch.setattr(selfcheck.ops, "resolve_backend", resolve_backend)
    rows = selfcheck._self_check(torch.device("cpu"))
    assert ("*", "triton", "unavailable: no triton here") in rows
