"""The README's promises that a test can hold to: CI runs its test command,
its CLI commands exist, its command table is complete and its Python
examples run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_command = [c for c in readme_commands() if "pytest tests" in c]
    assert len(test_command) == 1, "the README shows one test command"
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command[0].strip() in ci_lines


def test_cli_info_runs_and_checks_backends():
    result = subprocess.run([sys.executable, "-m", "ddpm_fast", "info"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "auto backend on cpu" in result.stdout
    assert "MISMATCH" not in result.stdout


def test_cli_rejects_unknown_command():
    result = subprocess.run([sys.executable, "-m", "ddpm_fast", "fly"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_the_command_table_names_every_option():
    """Each command's row of the README's command-line table names every option
    its parser takes (the issue asks for every option in --help and the README)."""
    from ddpm_fast.cli import build_parser

    rows = {m[1]: m[0] for m in re.finditer(r"^\| `ddpm-fast (\w+)[^|]*\|.*$", (ROOT / "README.md").read_text(), flags=re.M)}
    commands = build_parser()._subparsers._group_actions[0].choices
    assert set(rows) == set(commands), "one row per command"
    missing = [
        f"{name} {action.option_strings[-1]}"
        for name, parser in commands.items()
        for action in parser._actions
        if action.option_strings and "--help" not in action.option_strings
        and not any(re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", rows[name]) for o in action.option_strings)
    ]
    assert not missing, f"options the README's table does not name: {missing}"


def test_python_examples_run(tmp_path, monkeypatch):
    """The README's Python examples run as printed; the training example's 2000
    steps are cut to 2, its final samples to 5 steps (and its run folder is a
    temporary one)."""
    blocks = re.findall(r"```python\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    for k, block in enumerate(blocks):
        if "Trainer(" in block:
            assert "TrainConfig(steps=2000," in block
            block = block.replace("TrainConfig(steps=2000,", "TrainConfig(steps=2, checkpoint_every=2, sample_count=4, sample_steps=5,")
        exec(compile(block, f"README.md python block {k + 1}", "exec"), {"__name__": "readme"})
    assert (tmp_path / "runs" / "digits" / "log.jsonl").exists()
