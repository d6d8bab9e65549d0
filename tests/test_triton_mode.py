"""Triton fixes its mode (interpreter or compiled) when it is imported: the
Triton backend follows that mode, and names TRITON_INTERPRET set too late."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

SCRIPT = r"""
import os, sys
import torch
from ddpm_fast.ops import BackendUnavailableError, q_sample
from ddpm_fast.schedules import NoiseSchedule

x = torch.rand(2, 3, 4, 4)


def refused(why):
    try:
        q_sample(x, 5, NoiseSchedule("linear"), seed=1, backend="triton")
    except BackendUnavailableError as error:
        assert why in str(error), error
    else:
        raise AssertionError("the Triton backend ran on CPU tensors with triton in compiled mode")


if sys.argv[1] == "late":
    import triton  # imported in compiled mode: the variable set next comes too late
    os.environ["TRITON_INTERPRET"] = "1"
    refused("TRITON_INTERPRET=1 was set after triton was imported")
elif sys.argv[1] == "refused":  # set before the process starts, in a spelling this triton takes as off
    refused("or on the CPU under TRITON_INTERPRET=1")
else:  # the variable set before the process starts, in a spelling triton takes as on
    got = q_sample(x, 5, NoiseSchedule("linear"), seed=1, backend="triton")
    want = q_sample(x, 5, NoiseSchedule("linear"), seed=1, backend="reference")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
print("ok")
"""


@pytest.mark.parametrize("case, interpret", [("late", None), ("early", "true"), ("early", "On")])
def test_the_backend_follows_the_mode_triton_was_imported_in(case, interpret):
    """Triton before its knobs (3.3 and older) took only "1" as on: under it the
    other spellings leave triton compiled, and CPU tensors are refused, where
    they once crashed in triton's launcher ("0 active drivers")."""
    if case == "early" and interpret != "1" and not hasattr(triton, "knobs"):
        case = "refused"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret is not None:
        env["TRITON_INTERPRET"] = interpret
    result = subprocess.run([sys.executable, "-c", SCRIPT, case], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
