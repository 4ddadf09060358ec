"""Every example takes ``--quick`` and ``--out DIR`` (CI runs each with ``--quick``: .ci/run);
under ``-m slow`` each quick run is executed and must write its output (PNGs; the distributed
example writes tensors) under ``--out``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_"))


def _run(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def test_there_are_at_least_eight_examples():
    assert len(EXAMPLES) >= 8


COMMON = (ROOT / "examples" / "_common.py").read_text()


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_takes_quick_and_out(script):
    """Read, not run (importing torch per script would cost seconds each): the script builds
    its command line with ``_common.parse_args`` (which defines both options) or defines them."""
    source = script.read_text()
    uses_common = "from _common import" in source and "parse_args(" in source
    options = source if not uses_common else source + COMMON
    assert '"--quick"' in options and '"--out"' in options
    assert 'if __name__ == "__main__":' in source


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_quick_run_writes_its_output(script, tmp_path):
    pytest.importorskip("matplotlib")
    done = _run(script, "--quick", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file()], done.stdout
