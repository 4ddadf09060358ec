"""Command line: ``difsolve demo | converge | bench`` (also ``python -m difsolve``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="difsolve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="sample a 2-D Gaussian-mixture ring with several solvers")
    demo.add_argument("--samples", type=int, default=4000)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--png", default="difsolve_demo.png", help="where to write the figure")
    conv = sub.add_parser("converge", help="observed-order table of every solver")
    conv.add_argument("--plot", default=None, help="write the log-log figure here")
    bench = sub.add_parser("bench", help="run the benchmarks against peer libraries")
    bench.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    bench.add_argument("--quick", action="store_true", help="pass --quick to each benchmark")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(samples=args.samples, seed=args.seed, png=args.png)
    if args.command == "converge":
        from .convergence import run_converge

        return run_converge(plot=args.plot)
    from .bench import run_bench

    return run_bench(args.names, extra=["--quick"] if args.quick else [])


if __name__ == "__main__":
    sys.exit(main())
