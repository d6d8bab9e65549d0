"""The memory probe (ddpm_fast/_memory.py) and the schedules it guards: a
schedule whose tables cannot fit is refused with the sizes, not built until
the kernel's OOM killer ends the process (10^8 timesteps did, on a 24 GiB VM)."""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from ddpm_fast import NoiseSchedule, _memory

GiB = 1 << 30


@pytest.fixture
def fake_machine(tmp_path, monkeypatch):
    """Point the probe at files of ours: write(meminfo=..., cgroup=(max, current))."""
    monkeypatch.setattr(_memory, "_CGROUP", tmp_path / "cgroup")
    monkeypatch.setattr(_memory, "_MEMINFO", tmp_path / "meminfo")
    if resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY:
        pytest.skip("this test process has an address-space limit of its own")

    def write(available_kib: int | None = None, swap_kib: int = 0, cgroup: tuple[str, str] | None = None,
              version: int = 2, inactive_file: int | None = None) -> None:
        if available_kib is not None:
            (tmp_path / "meminfo").write_text(
                f"MemTotal:       99999999 kB\nMemFree:          1000 kB\nMemAvailable:   {available_kib} kB\n"
                f"SwapTotal:     0 kB\nSwapFree:       {swap_kib} kB\n")
        if cgroup is not None:
            folder, limit, usage = ((tmp_path / "cgroup", "memory.max", "memory.current") if version == 2 else
                                    (tmp_path / "cgroup" / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"))
            folder.mkdir(parents=True)
            (folder / limit).write_text(cgroup[0] + "\n")
            (folder / usage).write_text(cgroup[1] + "\n")
            if inactive_file is not None:
                name = "inactive_file" if version == 2 else "total_inactive_file"
                (folder / "memory.stat").write_text(f"anon 1000\nactive_file 7\n{name} {inactive_file}\nshmem 0\n")
    return write


def test_available_memory_is_memavailable_plus_free_swap(fake_machine):
    fake_machine(available_kib=1 << 20, swap_kib=1 << 19)
    assert _memory.available_memory() == GiB + GiB // 2


@pytest.mark.parametrize("version", [2, 1])
def test_a_cgroup_limit_below_the_machines_memory_bounds_it(fake_machine, version):
    fake_machine(available_kib=8 << 20, cgroup=(str(3 * GiB), str(GiB)), version=version)
    assert _memory.available_memory() == 2 * GiB


@pytest.mark.parametrize("version", [2, 1])
def test_a_cgroups_reclaimable_page_cache_counts_as_available(fake_machine, version):
    """A cgroup's usage counts the page cache of files read (a dataset), which
    the kernel drops on demand: limit 16 GiB, usage 15 GiB of which 12 GiB
    inactive cache was "1 GiB available", and a 3 GiB image folder refused."""
    fake_machine(available_kib=64 << 20, cgroup=(str(16 * GiB), str(15 * GiB)), version=version,
                 inactive_file=12 * GiB)
    assert _memory.available_memory() == 13 * GiB


@pytest.mark.parametrize("version, unlimited", [(2, "max"), (1, "9223372036854771712")])
def test_an_unlimited_cgroup_and_unknown_files_bound_nothing(fake_machine, version, unlimited):
    fake_machine(cgroup=(unlimited, str(GiB)), version=version)
    assert _memory.available_memory() is None


def test_sizes_below_a_gib_are_not_looked_at(fake_machine):
    fake_machine(available_kib=0)
    _memory.check_fits_in_memory(GiB - 1, "anything")
    with pytest.raises(ValueError, match="anything needs about 1.0 GiB of memory; this process has 0.0 GiB available"):
        _memory.check_fits_in_memory(GiB, "anything")


def test_a_schedule_that_cannot_fit_is_refused_before_it_is_built(fake_machine):
    fake_machine(available_kib=1 << 20)
    with pytest.raises(ValueError, match="a noise schedule of 10000000 timesteps needs about 1.9 GiB of memory; "
                                         "this process has 1.0 GiB available"):
        NoiseSchedule("cosine", timesteps=10**7)
    with pytest.raises(ValueError, match="a noise schedule of 10000000 timesteps needs about 1.9 GiB"):
        NoiseSchedule(betas=np.full(10**7, 0.01))
    NoiseSchedule("linear", timesteps=1000)  # small ones are built without a look


def test_under_an_address_space_limit():
    """``ulimit -v`` as well: torch's own "can't allocate memory" from deep in
    the tables came before, naming no argument."""
    script = textwrap.dedent("""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
        from ddpm_fast import NoiseSchedule
        try:
            NoiseSchedule("linear", timesteps=10**8)
        except ValueError as error:
            print(error)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith(
        "a noise schedule of 100000000 timesteps needs about 18.6 GiB of memory; this process has "), out


def test_more_samples_than_memory_holds_are_refused_before_the_first_batch(fake_machine):
    """``ddpm-fast sample -n`` keeps every sample: a count that cannot fit ran
    the whole chain first, for hours, and lost it all at the end."""
    import torch

    from ddpm_fast import Sampler
    from ddpm_fast.distributed import sample_sharded

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise AssertionError("sampling began")

    fake_machine(available_kib=1 << 20)
    sampler = Sampler(model, NoiseSchedule("linear", timesteps=10), sample_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="holding 20000000 samples of 1x8x8 needs about 1.2 GiB of memory; "
                                         "this process has 1.0 GiB available"):
        sample_sharded(sampler, 2 * 10**7, seed=0, batch_size=256, progress=False)


def test_one_process_holds_its_samples_once():
    """The batches were kept, then joined: the peak grew by 4.7x the samples'
    size here; one array filled batch by batch holds them once."""
    script = textwrap.dedent("""
        import resource, torch
        from ddpm_fast import NoiseSchedule, Sampler
        from ddpm_fast.distributed import sample_sharded
        sampler = Sampler(lambda x, t: torch.zeros_like(x), NoiseSchedule("linear", timesteps=2),
                          sample_shape=(3, 128, 128), channels_last=False)
        sample_sharded(sampler, 20, seed=0, batch_size=10, progress=False)  # warm: the allocator's pools, the tables
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        images = sample_sharded(sampler, 2000, seed=0, batch_size=10, progress=False)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print((after - before) / images.nbytes)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 1.4, f"the peak grew by {float(out.stdout):.2f}x the samples' size"


def _grey_pngs(folder, count: int = 3) -> None:
    from PIL import Image

    folder.mkdir()
    for i in range(count):
        Image.fromarray(np.full((16, 16), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")


def test_an_image_size_whose_images_cannot_fit_is_refused_before_reading(fake_machine, tmp_path, monkeypatch):
    """``--image-size 20000`` of a folder: every image resized (7.2 GB here)
    until the OOM killer came; refused before the first file is read."""
    from ddpm_fast import data

    _grey_pngs(tmp_path / "images")
    fake_machine(available_kib=1 << 20)
    monkeypatch.setattr(data, "_read_image", lambda *a: pytest.fail("reading began"))
    with pytest.raises(ValueError, match=r"holding 3 images of 3x20000x20000 from .*images needs about 3\.4 GiB"):
        data.load_image_folder(tmp_path / "images", image_size=20000)


def test_a_folder_of_more_images_than_memory_holds_is_refused_after_the_first(fake_machine, tmp_path, monkeypatch):
    from ddpm_fast import data

    _grey_pngs(tmp_path / "images", count=1)
    (file,) = (tmp_path / "images").iterdir()
    monkeypatch.setattr(data, "_image_files", lambda folder: [file] * 2 * 10**6)
    read = data._read_image
    calls = []
    monkeypatch.setattr(data, "_read_image", lambda *a: read(*a) if not calls.append(1) and len(calls) == 1
                        else pytest.fail("a second image was read"))
    fake_machine(available_kib=1 << 20)
    with pytest.raises(ValueError, match=r"holding 2000000 images of 3x16x16 from .*images needs about 1\.4 GiB"):
        data.load_image_folder(tmp_path / "images")


def test_a_folder_is_held_once_while_it_is_read(tmp_path):
    """Its images were kept in a list, then stacked: the peak grew by twice
    their size; one tensor filled image by image holds them once."""
    script = textwrap.dedent("""
        import pathlib, resource, sys
        import numpy as np
        from PIL import Image
        from ddpm_fast.data import load_image_folder
        folder, small = pathlib.Path(sys.argv[1]) / "folder", pathlib.Path(sys.argv[1]) / "small"
        folder.mkdir(), small.mkdir()
        rng = np.random.default_rng(0)
        for i in range(160):
            Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(small / f"{i}.png")
        load_image_folder(small)  # warm: the decoder's buffers
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        images = load_image_folder(folder).images
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print((after - before) / images.numel())
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 1.4, f"the peak grew by {float(out.stdout):.2f}x the images' size"


def test_an_array_resized_beyond_memory_is_refused_before_resizing(fake_machine, tmp_path, monkeypatch):
    from ddpm_fast import data

    np.save(tmp_path / "a.npy", np.zeros((4, 8, 8), dtype=np.uint8))
    fake_machine(available_kib=1 << 20)
    monkeypatch.setattr(data, "_resize", lambda *a: pytest.fail("resizing began"))
    with pytest.raises(ValueError, match=r"holding 4 images of 1x20000x20000 from a needs about 1\.5 GiB"):
        data.load_array(tmp_path / "a.npy", image_size=20000)


def _npy_header(shape: tuple[int, ...], descr: str) -> bytes:
    import io

    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape})
    return f.getvalue()  # the magic string, version 1.0, the header


def test_an_array_file_too_large_for_memory_is_refused_from_its_header(fake_machine, tmp_path):
    """A .npy of 3 GiB of images on a machine with 1 GiB left: numpy allocated
    it whole before reading (here the file is cut short: "Failed to read all data")."""
    from ddpm_fast import data

    (tmp_path / "big.npy").write_bytes(_npy_header((3, 1, 1 << 15, 1 << 15), "|u1") + bytes(64))
    fake_machine(available_kib=1 << 20)
    with pytest.raises(ValueError, match=r"^reading .*big\.npy \(3x1x32768x32768 uint8\) needs about 6\.0 GiB of "
                                         r"memory; this process has 1\.0 GiB available"):
        data.load_array(tmp_path / "big.npy")


def test_a_compressed_npz_member_larger_than_memory_is_refused_from_its_header(fake_machine, tmp_path):
    """A compressed .npz can hold far more than its own size: numpy allocated the
    member's whole array before inflating it (here the data is cut short)."""
    import zipfile

    from ddpm_fast import data

    with zipfile.ZipFile(tmp_path / "small.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("images.npy", _npy_header((100, 3, 1024, 1024), "<f4") + bytes(1 << 16))
    assert (tmp_path / "small.npz").stat().st_size < 4096
    fake_machine(available_kib=1 << 20)
    with pytest.raises(ValueError, match=r"^reading .*small\.npz's array 'images' \(100x3x1024x1024 float32\) needs "
                                         r"about 2\.6 GiB"):
        data.load_array(tmp_path / "small.npz")


def test_float_images_are_converted_with_one_working_copy(tmp_path):
    """(a + 1) / 2 * 255, rounded: each step a temporary, three float copies
    held at once beside the array (3.0x its size); now one, changed in place."""
    import tracemalloc

    from ddpm_fast import data

    array = np.linspace(-1, 1, 4 * 3 * 512 * 512, dtype=np.float32).reshape(4, 3, 512, 512)
    tracemalloc.start()
    try:
        images = data._array_to_nchw(array, "a")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert images.dtype == torch.uint8 and images[0, 0, 0, 0] == 0 and images[-1, -1, -1, -1] == 255
    assert peak < 1.5 * array.nbytes, f"peak {peak / array.nbytes:.2f}x the array"


def _claim_gigabytes(path, member_suffix: str = "data/0") -> None:
    """Make a torch.save archive's central directory say that a member unpacks
    to 3 GiB, as a compressed member of a few kilobytes can."""
    blob = bytearray(path.read_bytes())
    at = blob.find(b"PK\x01\x02")
    while at >= 0:
        name_length = int.from_bytes(blob[at + 28 : at + 30], "little")
        if bytes(blob[at + 46 : at + 46 + name_length]).decode().endswith(member_suffix):
            blob[at + 24 : at + 28] = (3 << 30).to_bytes(4, "little")  # the uncompressed size
            path.write_bytes(bytes(blob))
            return
        at = blob.find(b"PK\x01\x02", at + 4)
    raise AssertionError(f"no member ending in {member_suffix} in {path}")


UNPACKS_BEYOND_MEMORY = r"^loading .*{} \(\d+ bytes unpacked\) needs about 3\.0 GiB of memory; this process has 1\.0 GiB"


def test_a_trainer_state_that_unpacks_beyond_memory_is_refused_before_loading(fake_machine, tmp_path):
    """Not called damaged, nor passed over for an older checkpoint, which is no smaller."""
    from train_helpers import make_trainer

    make_trainer(tmp_path, steps=4, keep_checkpoints=2).train(final_samples=False)
    _claim_gigabytes(tmp_path / "checkpoint-00000004" / "trainer.pt")
    fake_machine(available_kib=1 << 20)
    with pytest.raises(_memory.MemoryLimitError, match=UNPACKS_BEYOND_MEMORY.format(r"trainer\.pt")):
        make_trainer(tmp_path, steps=4).train(final_samples=False)


def test_inception_weights_that_unpack_beyond_memory_are_refused_before_loading(fake_machine, tmp_path):
    from ddpm_fast.fid import load_inception

    torch.save({"conv.weight": torch.zeros(4, 4)}, tmp_path / "weights.pth")
    _claim_gigabytes(tmp_path / "weights.pth")
    fake_machine(available_kib=1 << 20)
    with pytest.raises(ValueError, match=UNPACKS_BEYOND_MEMORY.format(r"weights\.pth")):
        load_inception(tmp_path / "weights.pth")


def test_diffusers_bin_weights_that_unpack_beyond_memory_are_refused_before_loading(fake_machine, tmp_path):
    import json

    from ddpm_fast.models import UNet

    config = dict(_class_name="UNet2DModel", sample_size=8, in_channels=1, out_channels=1, block_out_channels=[8, 16],
                  layers_per_block=1, down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                  up_block_types=["AttnUpBlock2D", "UpBlock2D"], norm_num_groups=4, attention_head_dim=None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save({"conv_in.weight": torch.zeros(8, 1, 3, 3)}, tmp_path / "diffusion_pytorch_model.bin")
    _claim_gigabytes(tmp_path / "diffusion_pytorch_model.bin")
    fake_machine(available_kib=1 << 20)
    with pytest.raises(ValueError, match=UNPACKS_BEYOND_MEMORY.format(r"diffusion_pytorch_model\.bin")):
        UNet.from_diffusers(tmp_path)


def test_statistics_too_large_for_memory_are_refused_from_their_headers(fake_machine, tmp_path):
    import zipfile

    from ddpm_fast.fid import load_statistics

    with zipfile.ZipFile(tmp_path / "stats.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("mu.npy", _npy_header((20000,), "<f4") + bytes(80000))
        archive.writestr("sigma.npy", _npy_header((20000, 20000), "<f4") + bytes(1 << 16))
    fake_machine(available_kib=1 << 20)
    with pytest.raises(_memory.MemoryLimitError, match=r"^reading FID statistics .*stats\.npz needs about 4\.5 GiB"):
        load_statistics(tmp_path / "stats.npz")
