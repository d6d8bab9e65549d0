"""Configs that ask for more memory than their files justify.

A folder whose config.json asks for a far larger model than its weights
file holds is refused before that model is built: before the fix, a few bytes
of config (``"ch": 4096``) made the loaders allocate and initialise every
parameter (146 GB for the CIFAR-10 layout) only to find the weights did not fit.

Each load runs in a fresh interpreter whose peak memory is read afterwards:
the configs here ask for a 1.6 GB model, which is well above that peak when the
model is never built and far below the VM's memory when it is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import save_tiny_diffusers_pipeline
from ddpm_fast.data import ImageDataset
from ddpm_fast.models import UNet
from ddpm_fast.schedules import NoiseSchedule
from ddpm_fast.train import TrainConfig, Trainer

WIDE = 768  # UNet.tiny at ch=768: 407M parameters, 1.6 GB in float32
LIMIT_MB = 1000  # peak memory of an interpreter that imported torch and refused the load (about 510 MB here)


def _peak_mb_of_refused_load(call: str) -> float:
    """Run ``call`` in a fresh interpreter; it must raise the mismatch error. Its peak RSS in MB."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("reads the peak memory from /proc (Linux)")
    script = textwrap.dedent(f"""
        import sys
        from ddpm_fast.models import UNet
        from ddpm_fast.pretrained import load_model
        try:
            {call}
        except Exception as error:
            print(type(error).__name__, error)
        else:
            sys.exit("loaded")
        # VmHWM, not ru_maxrss: Linux carries the latter over exec, from this test's own process
        hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
        print("peak", int(hwm.split()[1]) / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "does not match the model" in out.stdout and "shape mismatch" in out.stdout, out.stdout
    return float(out.stdout.split("peak")[-1])


def _widen(config_path, key: str = "") -> None:
    """Set ``ch`` of the config (of its ``key`` section) to WIDE."""
    config = json.loads(config_path.read_text())
    (config[key] if key else config)["ch"] = WIDE
    config_path.write_text(json.dumps(config))


def test_a_save_pretrained_folder_with_a_widened_config(tmp_path):
    UNet.tiny().save_pretrained(tmp_path)
    _widen(tmp_path / "config.json")
    assert _peak_mb_of_refused_load(f"UNet.from_pretrained({str(tmp_path)!r})") < LIMIT_MB


def test_a_training_checkpoint_with_a_widened_config(tmp_path):
    data = ImageDataset(torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8))
    Trainer(UNet.tiny(), data, NoiseSchedule("linear", timesteps=10),
            TrainConfig(steps=1, batch_size=4, warmup=0, checkpoint_every=1), tmp_path / "run", device="cpu",
            progress=False).train(final_samples=False)
    (checkpoint,) = (tmp_path / "run").glob("checkpoint-*")
    _widen(checkpoint / "config.json", "model")
    assert _peak_mb_of_refused_load(f"load_model({str(tmp_path / 'run')!r})") < LIMIT_MB


def test_a_diffusers_folder_with_a_widened_config(tmp_path):
    pytest.importorskip("diffusers")
    save_tiny_diffusers_pipeline(tmp_path, timesteps=10)
    config_path = tmp_path / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["block_out_channels"] = [WIDE, 2 * WIDE]
    config_path.write_text(json.dumps(config))
    assert _peak_mb_of_refused_load(f"UNet.from_diffusers({str(tmp_path)!r})") < LIMIT_MB


def _sample_in_6_gb(checkpoint, probe: bool) -> str:
    """``ddpm-fast sample`` of ``checkpoint`` in an interpreter allowed 6 GB of
    address space (with the memory probe, or without: a platform where it
    knows nothing); its stderr."""
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
        from ddpm_fast import _memory
        from ddpm_fast.cli import main
        if not {probe}:
            _memory.available_memory = lambda: None
        sys.exit(main(["sample", "--checkpoint", {str(checkpoint)!r}, "--out", {str(checkpoint.parent / "out")!r},
                       "-n", "2"]))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stdout + out.stderr
    return out.stderr


@pytest.mark.parametrize("probe", [True, False], ids=["probed", "unprobed"])
@pytest.mark.parametrize("kind", ["ours", "diffusers"])
def test_a_schedule_too_long_for_memory_is_the_files_fault_not_the_batch_sizes(tmp_path, kind, probe):
    """A schedule of 10^9 timesteps (tables of 8 GB each) in a model's files:
    out of memory with the advice "lower --batch-size", which cannot help (or,
    without a limit, the process killed by the OOM killer). Refused before it
    is built where the memory left is known, named as the file's fault where
    the allocation fails."""
    if kind == "diffusers":
        pytest.importorskip("diffusers")
        save_tiny_diffusers_pipeline(tmp_path / "model", timesteps=10**9)
        source = tmp_path / "model" / "scheduler" / "scheduler_config.json"
    else:
        UNet.tiny().save_pretrained(tmp_path / "model")
        checkpoint = tmp_path / "model" / "config.json"
        config = {"model": json.loads(checkpoint.read_text()), "train": {},
                  "schedule": NoiseSchedule("linear", timesteps=10).config}
        config["schedule"]["timesteps"] = 10**9
        (tmp_path / "model" / "model.safetensors").rename(tmp_path / "model" / "ema.safetensors")
        checkpoint.write_text(json.dumps(config))
        source = checkpoint
    err = _sample_in_6_gb(tmp_path / "model", probe)
    assert "--batch-size" not in err and err.count("\n") == 1, err
    assert err.startswith(f"ddpm-fast sample: error: {source} "), err
    if probe:
        assert "a noise schedule of 1000000000 timesteps needs about 186.3 GiB of memory; this process has " in err
    else:
        assert " describes a noise schedule too long to fit in memory (" in err, err


@pytest.mark.parametrize("loader", ["from_pretrained", "load_model", "from_diffusers"])
def test_a_config_deeper_than_its_weights_is_refused_at_once(tmp_path, loader):
    """``"num_res_blocks": 10**6``: building even the meta-device copy took
    hours and more memory than the VM has (7.5 ms and ~100 KB a block); it
    stops once it has made more tensors than the weights hold."""
    if loader == "from_diffusers":
        pytest.importorskip("diffusers")
        save_tiny_diffusers_pipeline(tmp_path, timesteps=10)
        config_path, key, call = tmp_path / "unet" / "config.json", "layers_per_block", "UNet.from_diffusers"
    else:
        UNet.tiny().save_pretrained(tmp_path)
        config_path, key, call = tmp_path / "config.json", "num_res_blocks", "UNet.from_pretrained"
        if loader == "load_model":
            config = {"model": json.loads(config_path.read_text()), "train": {},
                      "schedule": NoiseSchedule("linear", timesteps=10).config}
            config_path.write_text(json.dumps(config))
            (tmp_path / "model.safetensors").rename(tmp_path / "ema.safetensors")
            call = "load_model"
    config = json.loads(config_path.read_text())
    (config["model"] if loader == "load_model" else config)[key] = 10**6
    config_path.write_text(json.dumps(config))
    script = textwrap.dedent(f"""
        from ddpm_fast.models import UNet
        from ddpm_fast.pretrained import load_model
        try:
            {call}({str(tmp_path)!r})
        except Exception as error:
            print(type(error).__name__, error)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "the config asks for far more tensors (over " in out.stdout, out.stdout + out.stderr
