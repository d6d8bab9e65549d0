"""A Ctrl-C while weights load, or while a model is built on a default device:
it reaches the caller as a KeyboardInterrupt once the load or build ends, with
torch's default device as it was (ddpm_fast/_interrupts.py's default_device)."""

from __future__ import annotations

import signal

import pytest
import torch

from ddpm_fast._interrupts import default_device
from ddpm_fast.models import UNet
from ddpm_fast.models.serialization import load_safetensors


def test_a_ctrl_c_while_safetensors_builds_a_tensor_is_a_keyboard_interrupt(tmp_path, sigint_inside_safetensors_read):
    """It came out of torch.asarray's C++ as a ValueError, which load_safetensors
    reported as "not a readable safetensors file": `ddpm-fast sample` called an
    intact checkpoint damaged (exit 2) instead of stopping (exit 130)."""
    UNet.tiny(image_size=8, in_channels=1).save_pretrained(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        load_safetensors(next(tmp_path.glob("*.safetensors")))
    assert len(sigint_inside_safetensors_read) >= 3, "safetensors no longer builds tensors with torch.asarray here: move the SIGINT"


def test_a_ctrl_c_inside_default_device_lands_after_it_with_the_device_put_back():
    """One that landed while torch pushed or popped the device mode lost it
    ("trying to pop from empty mode stack"), leaving later tensors on meta."""
    with pytest.raises(KeyboardInterrupt):
        with default_device("meta"):
            signal.raise_signal(signal.SIGINT)
            built = torch.zeros(2)  # still runs: the Ctrl-C waits for the block's end
    assert built.device.type == "meta"
    assert torch.zeros(1).device.type == "cpu"


def test_a_ctrl_c_held_through_a_failing_block_still_lands():
    """It was dropped when the block raised: a Ctrl-C during a read that then
    failed came out as the read's error alone, and a resume went on from an
    older checkpoint."""
    with pytest.raises(KeyboardInterrupt) as stopped:
        with default_device("cpu"):
            signal.raise_signal(signal.SIGINT)
            raise ValueError("the file is damaged")
    assert isinstance(stopped.value.__context__, ValueError)
