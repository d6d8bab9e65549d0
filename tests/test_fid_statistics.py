"""FID statistics files: ``ddpm-fast fid --save-stats`` writes a dataset's
Inception mean and covariance, and ``--data`` takes such a file (or
pytorch-fid's) in place of the images, whose features took the Inception
network minutes on a GPU, hours on a CPU, at every evaluation."""

from __future__ import annotations

import re

import numpy as np
import pytest

from ddpm_fast.cli import main
from ddpm_fast.fid import is_statistics_file, load_statistics, save_statistics
from test_fid import images, state, weights  # noqa: F401 (module fixtures: a random Inception's weights file)


def _fid(capsys, *argv: str) -> float:
    assert main(["fid", *argv, "--device", "cpu", "--batch-size", "3", "--method", "eigh"]) == 0, \
        capsys.readouterr().err
    out = capsys.readouterr().out
    return float(re.match(r"FID (\S+) ", out).group(1)), out


def test_saved_statistics_give_the_same_fid_as_the_images(tmp_path, weights, capsys):  # noqa: F811
    np.savez(tmp_path / "samples.npz", images=images(3, size=8, seed=1))
    np.savez(tmp_path / "data.npz", images=images(4, size=8, seed=2))
    common = ["--samples", str(tmp_path / "samples.npz"), "--inception-weights", str(weights)]
    from_images, _ = _fid(capsys, *common, "--data", str(tmp_path / "data.npz"), "--save-stats",
                          str(tmp_path / "stats" / "data-stats.npz"))
    assert is_statistics_file(tmp_path / "stats" / "data-stats.npz")
    mu, sigma = load_statistics(tmp_path / "stats" / "data-stats.npz")
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    from_stats, out = _fid(capsys, *common, "--data", str(tmp_path / "stats" / "data-stats.npz"))
    assert from_stats == from_images and "vs the statistics in " in out
    # a guided-diffusion reference batch: its images beside their statistics; the statistics are used
    np.savez(tmp_path / "batch.npz", images(2, size=8, seed=5), mu=mu, sigma=sigma)
    assert _fid(capsys, *common, "--data", str(tmp_path / "batch.npz"))[0] == from_images


def test_statistics_files_are_checked(tmp_path, weights, capsys):  # noqa: F811
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3), sigma=np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"bad.npz: FID statistics are a mean mu \(D,\) and a covariance sigma "
                                         r"\(D, D\) of one D, got mu \(3,\) and sigma \(3, 2\)"):
        load_statistics(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="non-finite"):
        save_statistics(np.array([0.0, np.nan]), np.eye(2), tmp_path / "nan.npz")
    assert not (tmp_path / "nan.npz").exists()
    assert not is_statistics_file(tmp_path / "missing.npz") and not is_statistics_file(tmp_path)
    np.savez(tmp_path / "samples.npz", images=images(3, size=8, seed=1))
    save_statistics(np.zeros(4), np.eye(4), tmp_path / "small.npz")
    save_statistics(np.zeros(2048), np.eye(2048), tmp_path / "zero.npz")
    for extra, message in [(["--data", str(tmp_path / "bad.npz")], "bad.npz: FID statistics are a mean mu"),
                           (["--data", str(tmp_path / "small.npz"), "--save-stats", str(tmp_path / "s.npz")],
                            "--save-stats saves --data's images, and "),
                           (["--data", str(tmp_path / "zero.npz"), "--image-size", "8"], "zero.npz holds their statistics"),
                           (["--data", str(tmp_path / "samples.npz"), "--save-stats", str(tmp_path / "s.txt")],
                            "must end in .npz"),
                           (["--data", str(tmp_path / "zero.npz"), "-n", "4"], "-n 4 exceeds the 3 samples"),
                           (["--data", str(tmp_path / "small.npz")], "small.npz holds statistics of 4 features; the "
                                                                     "FID Inception's have 2048")]:
        assert main(["fid", "--samples", str(tmp_path / "samples.npz"), "--inception-weights", str(weights),
                     "--device", "cpu", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ddpm-fast fid: error:") and message in err and "\n" not in err, err
    assert not (tmp_path / "s.npz").exists()


@pytest.mark.parametrize("input_", ["--samples", "--data"])
@pytest.mark.parametrize("how", ["same path", "symbolic link"])
def test_save_stats_refuses_to_replace_an_input(tmp_path, weights, capsys, input_, how):  # noqa: F811
    """--save-stats naming the --samples or --data file replaced those images
    with --data's statistics, after reading them, without a word."""
    np.savez(tmp_path / "samples.npz", images=images(3, size=8, seed=1))
    np.savez(tmp_path / "data.npz", images=images(4, size=8, seed=2))
    source = tmp_path / f"{input_[2:]}.npz"
    target = source
    if how == "symbolic link":
        target = tmp_path / "link.npz"
        target.symlink_to(source)
    before = source.read_bytes()
    assert main(["fid", "--samples", str(tmp_path / "samples.npz"), "--data", str(tmp_path / "data.npz"),
                 "--save-stats", str(target), "--inception-weights", str(weights), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpm-fast fid: error: --save-stats ") and f"is the {input_} file" in err, err
    assert source.read_bytes() == before


def test_a_damaged_npz_as_data_is_one_line(tmp_path, weights, capsys):  # noqa: F811
    """A zip that is not one (or whose member is damaged): zipfile.BadZipFile,
    no OSError or ValueError, escaped the statistics check as a traceback."""
    np.savez(tmp_path / "samples.npz", images=images(3, size=8, seed=1))
    save_statistics(np.zeros(2048), np.eye(2048), tmp_path / "stats.npz")
    damaged = bytearray((tmp_path / "stats.npz").read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # inside sigma's data: its CRC fails
    (tmp_path / "crc.npz").write_bytes(bytes(damaged))
    (tmp_path / "truncated.npz").write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    for name, message in [("truncated.npz", "cannot read"), ("crc.npz", "cannot read FID statistics from")]:
        assert main(["fid", "--samples", str(tmp_path / "samples.npz"), "--data", str(tmp_path / name),
                     "--inception-weights", str(weights), "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ddpm-fast fid: error:") and message in err and "\n" not in err, err


def test_sqrtm_without_scipy_is_refused_before_the_inception_passes(tmp_path, weights, capsys, monkeypatch):  # noqa: F811
    """scipy is no dependency of the package (pip install -e . alone lacks it):
    the default --method sqrtm raised ImportError after the Inception passes."""
    import sys

    from ddpm_fast import fid

    for name in ("scipy", "scipy.linalg"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    monkeypatch.setattr(fid, "activation_statistics", lambda *a, **k: pytest.fail("the Inception passes began"))
    np.savez(tmp_path / "samples.npz", images=images(3, size=8, seed=1))
    assert main(["fid", "--samples", str(tmp_path / "samples.npz"), "--data", str(tmp_path / "samples.npz"),
                 "--inception-weights", str(weights), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == ("ddpm-fast fid: error: --method sqrtm needs scipy (pip install scipy); "
                                               "--method eigh does not")


@pytest.mark.parametrize("reader", ["is_statistics_file", "load_statistics", "load_array"])
def test_a_damaged_npz_leaves_no_file_open(tmp_path, reader):
    """numpy's np.load(path) of a zip that is not one opens the file and leaves
    it to the garbage collector (an "unclosed file" ResourceWarning, a file
    descriptor held meanwhile); the readers now open and close it themselves."""
    import gc
    import warnings

    from ddpm_fast.data import load_array

    path = tmp_path / "truncated.npz"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    read = {"is_statistics_file": is_statistics_file, "load_statistics": load_statistics, "load_array": load_array}[reader]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            read(path)
        except ValueError as error:
            assert "cannot read" in str(error)
        else:
            assert reader == "is_statistics_file"
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]
