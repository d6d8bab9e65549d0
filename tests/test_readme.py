"""The README's promises that a test can hold to: CI runs its test command,
and its CLI commands exist."""

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
