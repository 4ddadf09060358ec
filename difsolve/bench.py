"""``difsolve bench``: run the benchmark scripts of a source checkout (``benchmarks/``).

The benchmarks compare difsolve with peer libraries (torchdiffeq, torchsde, k-diffusion and
score_sde's recipes) in the same run; they live beside the package, not inside it.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def _bench_dir() -> Path | None:
    here = Path(__file__).resolve().parent.parent / "benchmarks"
    return here if here.is_dir() else None


def run_bench(names: list[str] | None = None, extra: list[str] | None = None) -> int:
    """Run ``benchmarks/bench_<name>.py`` for each name (all when empty) with the command-line
    arguments ``extra`` (e.g. ``["--quick"]``); returns an exit code."""
    folder = _bench_dir()
    if folder is None:
        print("difsolve bench: the benchmarks/ folder of a source checkout was not found; clone "
              "the repository and run from there", file=sys.stderr)
        return 2
    available = {p.stem.removeprefix("bench_"): p for p in sorted(folder.glob("bench_*.py"))}
    chosen = names or sorted(available)
    unknown = [n for n in chosen if n not in available]
    if unknown:
        print(f"difsolve bench: unknown benchmark(s) {unknown}; available: {sorted(available)}",
              file=sys.stderr)
        return 2
    for name in chosen:
        print(f"\n===== benchmarks/bench_{name}.py =====", flush=True)
        argv = sys.argv
        try:
            sys.argv = [str(available[name]), *(extra or [])]
            runpy.run_path(str(available[name]), run_name="__main__")
        finally:
            sys.argv = argv
    return 0
