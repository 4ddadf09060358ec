"""``difsolve bench``: run the benchmark scripts of a source checkout (``benchmarks/``).

The benchmarks compare difsolve with peer libraries (torchdiffeq, torchode, torchsde, k-diffusion
and score_sde's recipes) in the same run; they live beside the package, not inside it. Every
script takes ``--quick`` (a smoke run of a few settings).
"""

from __future__ import annotations

import runpy
import sys
import time
from pathlib import Path

#: what each benchmark measures and how long it takes on one CPU core (full / ``--quick``)
EXPECTED = {
    "adaptive": ("work-precision of the adaptive ODE solvers against k-diffusion, torchdiffeq and "
                 "torchode; batch independence; adaptive SDE against Euler-Maruyama",
                 "about 10 min", "about 1 min"),
    "likelihood": ("log-likelihood against the closed form, score_sde's recipe and "
                   "k-diffusion", "about 2 min", "about 20 s"),
}


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


def describe() -> str:
    """One line per benchmark: name, what it measures, expected time (full, quick)."""
    lines = []
    for name in available() or EXPECTED:
        what, full, quick = EXPECTED.get(name, ("(no description)", "unknown", "unknown"))
        lines.append(f"  {name}: {what}; full run {full}, --quick {quick}")
    return "\n".join(lines)


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
        expected = EXPECTED.get(name, ("", "unknown", "unknown"))[2 if quick else 1]
        flag = " --quick" if quick else ""
        print(f"[{i}/{len(chosen)}] benchmarks/bench_{name}.py{flag} (expected {expected}) ...",
              flush=True)
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
