"""Progress bars: drawn as usual on a terminal, redrawn every 30 s where stderr
is not one (a log), so that long work does not fill its log with redraws."""

from __future__ import annotations

import io
import time

import torch

from ddpm_fast import NoiseSchedule, Sampler
from ddpm_fast._progress import LOG_INTERVAL_S, _draws_a_widget, progress_bar


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
