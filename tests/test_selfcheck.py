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
def test_an_absolute_error_of_1_5e_5_is_a_mismatch(monkeypatch):
    # The tolerance is 1e-5 absolute for the non-summed ops: a looser or relative check passed broken kernels.
    _perturbed(monkeypatch, "q_sample", lambda v: torch.full_like(v, 1.5e-5))
    verdicts = _verdicts("q_sample")
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
