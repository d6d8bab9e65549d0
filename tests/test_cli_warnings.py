"""Warnings while a command runs: one line each, "ddpm-fast <command>: warning:
...", from that command's own thread; Python's format again once every
command has returned (ddpm_fast/cli_warnings.py)."""

from __future__ import annotations

import threading
import warnings

import pytest

from ddpm_fast import cli


@pytest.mark.parametrize("first_done", ["first started", "second started"])
def test_commands_on_two_threads(monkeypatch, capsys, first_done):
    """Two commands on two threads: the one started first and ended first put
    Python's format back, the other then put back the first one's formatter,
    left installed for good (every later warning of the process read
    "ddpm-fast info: warning: ..."); and each formatted the other's warnings
    with its own prefix."""
    started = {name: threading.Event() for name in ("A", "B")}
    release = {name: threading.Event() for name in ("A", "B")}
    original = warnings.showwarning

    def blocking_info(args) -> int:
        name = threading.current_thread().name
        started[name].set()
        assert release[name].wait(30)
        warnings.warn(f"warned on {name}", UserWarning)
        return 0

    monkeypatch.setattr(cli, "_info", blocking_info)
    threads = {name: threading.Thread(target=cli.main, args=(["info"],), name=name) for name in ("A", "B")}
    order = ("A", "B") if first_done == "first started" else ("B", "A")
    with warnings.catch_warnings():  # (entered before the commands: it puts back what it found)
        warnings.simplefilter("always")
        threads["A"].start()
        assert started["A"].wait(30)
        threads["B"].start()
        assert started["B"].wait(30)
        for name in order:
            release[name].set()
            threads[name].join(30)
        assert warnings.showwarning is original
    err = capsys.readouterr().err.splitlines()
    assert err == [f"ddpm-fast info: warning: warned on {name}" for name in order]


def test_a_thread_that_runs_no_command_keeps_pythons_format(monkeypatch, capsys):
    """(Python's format: whatever warnings.showwarning was before the command, here a recorder.)"""
    inside, done = threading.Event(), threading.Event()
    seen = []

    def blocking_info(args) -> int:
        inside.set()
        assert done.wait(30)
        return 0

    monkeypatch.setattr(cli, "_info", blocking_info)
    monkeypatch.setattr(warnings, "showwarning", lambda message, *rest, **kw: seen.append(str(message)))
    recorder = warnings.showwarning
    command = threading.Thread(target=cli.main, args=(["info"],))
    command.start()
    assert inside.wait(30)
    try:
        assert warnings.showwarning is not recorder  # the command's formatter is in
        warnings.showwarning("not a command's", UserWarning, "elsewhere.py", 7)
    finally:
        done.set()
        command.join(30)
    assert seen == ["not a command's"] and warnings.showwarning is recorder
    assert "ddpm-fast" not in capsys.readouterr().err
