"""Progress bars: drawn as usual on a terminal, redrawn every 30 s where stderr
is not one (a log), so that long work does not fill its log with redraws; work
in several batches names each bar's batch."""

from __future__ import annotations

import io
import time

import re

import numpy as np
import torch

from ddpm_fast import NoiseSchedule, Sampler
from ddpm_fast._progress import LOG_INTERVAL_S, _draws_a_widget, batch_of, progress_bar
from ddpm_fast.data import ImageDataset
from ddpm_fast.distributed import sample_sharded
from ddpm_fast.evaluate import evaluate_bpd
from train_helpers import make_trainer


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_redraw_rarely_where_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert progress_bar(range(3)).mininterval == LOG_INTERVAL_S == 30.0
    assert progress_bar(range(3), mininterval=2.0).mininterval == 2.0  # a caller's choice stands
    monkeypatch.setattr("sys.stderr", None)  # pythonw, or a closed console: no isatty at all
    assert progress_bar(range(3), file=io.StringIO()).mininterval == LOG_INTERVAL_S


def test_bars_redraw_as_usual_on_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", Terminal())
    assert progress_bar(range(3)).mininterval == 0.1  # tqdm's default


def test_notebook_widgets_are_left_alone():
    from tqdm import std
    from tqdm.notebook import tqdm_notebook

    assert _draws_a_widget(tqdm_notebook) and not _draws_a_widget(std.tqdm)


def test_a_sampling_chain_logged_to_a_file_is_a_few_lines(monkeypatch):
    """100 steps of 10 ms: tqdm's default redrew the bar about ten times in
    that second; into a log, the bar's first and last states only."""
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)

    def slow_model(x, t):
        time.sleep(0.01)
        return torch.zeros_like(x)

    sampler = Sampler(slow_model, NoiseSchedule("linear", timesteps=100), sample_shape=(1, 2, 2), device="cpu")
    sampler.sample(1, seed=0, progress=True)
    redraws = log.getvalue().count("\r")
    assert "100/100" in log.getvalue() and redraws <= 3, log.getvalue()


def test_a_training_run_logged_to_a_file_is_a_few_lines(monkeypatch, tmp_path):
    """The loss written into the bar at every log record forced a redraw there
    (tqdm's set_postfix refreshes by default): a log line every --log-every
    steps, whatever the 30 s interval. The loss shows at the bar's next redraw."""
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    trainer = make_trainer(tmp_path, steps=12, log_every=1, checkpoint_every=12)
    trainer.progress = True
    trainer.train(final_samples=False)
    redraws = log.getvalue().count("\r")
    assert "12/12" in log.getvalue() and "loss=" in log.getvalue() and redraws <= 3, log.getvalue()


def test_a_training_run_shows_its_sample_grids_in_bars(capsys, tmp_path):
    """A grid is a whole chain over sample_count samples (minutes on a CPU, as
    long as thousands of training steps): it draws its own bar, not silence
    after the training bar's 100%. Without progress, no bar at all."""
    trainer = make_trainer(tmp_path / "shown", steps=4, checkpoint_every=4, sample_every=2, sample_count=2)
    trainer.progress = True
    trainer.train()  # grids at steps 2 and 4; the final samples.png copies step 4's
    err = capsys.readouterr().err
    assert sorted(bar_names(err)) == ["sampling", "training"] and err.count("sampling: 100%") == 2, err
    make_trainer(tmp_path / "quiet", steps=4, checkpoint_every=4, sample_every=2, sample_count=2).train()
    assert capsys.readouterr().err == ""


def bar_names(log: str) -> list[str]:
    """Each bar's description, once per bar, in order."""
    names = re.findall(r"([a-z/ ,0-9]+): +100%", log)
    return list(dict.fromkeys(name.strip() for name in names))


def test_batches_are_named_in_their_bars(capsys):
    sampler = Sampler(lambda x, t: 0.1 * x, NoiseSchedule("linear", timesteps=4), sample_shape=(1, 2, 2), device="cpu")
    sample_sharded(sampler, 5, seed=0, batch_size=2)
    assert bar_names(capsys.readouterr().err) == ["sampling, batch 1/3", "sampling, batch 2/3", "sampling, batch 3/3"]
    sample_sharded(sampler, 2, seed=0, batch_size=2)  # one batch: named as before
    assert bar_names(capsys.readouterr().err) == ["sampling"]

    images = ImageDataset(np.random.default_rng(0).integers(0, 256, (3, 1, 2, 2), dtype=np.uint8))
    evaluate_bpd(lambda x, t: 0.1 * x, images, NoiseSchedule("linear", timesteps=4), batch_size=2, progress=True)
    assert bar_names(capsys.readouterr().err) == ["bits/dim, batch 1/2", "bits/dim, batch 2/2"]


def test_a_batch_name_lasts_as_long_as_its_batch():
    with batch_of(1, 4):
        assert progress_bar(range(1), desc="work", file=io.StringIO()).desc == "work, batch 2/4"
        assert progress_bar(range(1), file=io.StringIO()).desc == ""  # no description: nothing to add to
    assert progress_bar(range(1), desc="work", file=io.StringIO()).desc == "work"
    try:
        with batch_of(0, 2):
            raise KeyError
    except KeyError:
        pass
    assert progress_bar(range(1), desc="work", file=io.StringIO()).desc == "work"
