"""The README quickstart and CI stay in sync (issue 2): two commands, CI runs the test one."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Quickstart holds one fenced code block"
    return [line for line in blocks[0].splitlines() if line.strip()]


def test_quickstart_has_the_demo_and_the_test_command():
    demo, tests = _quickstart_commands()
    assert "difsolve demo" in demo and "pip install" in demo
    assert "pytest" in tests and ".[test]" in tests


def test_ci_runs_the_quickstart_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    _, tests = _quickstart_commands()
    assert tests in ci.splitlines()
    assert "torch==2.13.0" in ci.split(tests)[0]  # the CPU build comes first
    assert "set -e" in ci
