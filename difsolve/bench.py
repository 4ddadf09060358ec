"""``difsolve bench``: run the benchmark scripts of a source checkout (``benchmarks/``).

The benchmarks compare difsolve with peer libraries (torchdiffeq, torchode, torchsde, k-diffusion
and score_sde's recipes) in the same run; they live beside the package, not inside it. Every
script takes ``--quick`` (a smoke run of a few settings) and states its running time in a line
``Expected time: ...`` of its module docstring, which ``difsolve bench --help`` lists.
"""

from __future__ import annotations

import ast
import re
import runpy
import sys
import time
from pathlib import Path

#: the line of a benchmark's module docstring that states its running time
EXPECTED_LINE = re.compile(r"^\s*Expected time:\s*(.+?)\s*$", re.M)


def bench_dir() -> Path | None:
    """``benchmarks/`` of the source checkout this package was imported from (None if absent)."""
    here = Path(__file__).resolve().parent.parent / "benchmarks"
    return here if here.is_dir() else None


def available() -> dict[str, Path]:
    """``{name: path}`` of the ``benchmarks/bench_<name>.py`` scripts."""
    folder = bench_dir()
    if folder is None:
        return {}
    return {p.stem.removeprefix("bench_"): p for p in sorted(folder.glob("bench_*.py"))}


def summary(path: Path) -> tuple[str, str]:
    """``(first line of the script's docstring, its "Expected time:" line)``, read without
    running it."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    first = doc.strip().splitlines()[0] if doc.strip() else "(no description)"
    found = EXPECTED_LINE.search(doc)
    return first, found.group(1) if found else "not stated"


def describe() -> str:
    """One line per benchmark: name, what it measures, expected time."""
    lines = []
    for name, path in available().items():
        what, expected = summary(path)
        lines.append(f"  {name}: {what} Expected time: {expected}")
    return "\n".join(lines) or "  (no benchmarks/ folder: run from a source checkout)"


def run_bench(names: list[str] | None = None, quick: bool = False) -> int:
    """Run ``benchmarks/bench_<name>.py`` for each name (all when empty), with ``--quick`` when
    asked, printing one progress line per benchmark; returns an exit code."""
    scripts = available()
    if not scripts:
        print("difsolve bench: the benchmarks/ folder of a source checkout was not found; clone "
              "the repository and run from there", file=sys.stderr)
        return 2
    chosen = names or sorted(scripts)
    unknown = [n for n in chosen if n not in scripts]
    if unknown:
        print(f"difsolve bench: unknown benchmark(s) {unknown}; available: {sorted(scripts)}",
              file=sys.stderr)
        return 2
    for i, name in enumerate(chosen, 1):
        flag = " --quick" if quick else ""
        print(f"[{i}/{len(chosen)}] benchmarks/bench_{name}.py{flag} (expected time: "
              f"{summary(scripts[name])[1]}) ...", flush=True)
        argv = sys.argv
        started = time.perf_counter()
        try:
            sys.argv = [str(scripts[name]), *(["--quick"] if quick else [])]
            runpy.run_path(str(scripts[name]), run_name="__main__")
        finally:
            sys.argv = argv
        print(f"[{i}/{len(chosen)}] bench_{name} done in {time.perf_counter() - started:.0f} s",
              flush=True)
    return 0
