"""Command line: ``difsolve demo | converge | bench`` (also ``python -m difsolve``)."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    from .bench import describe

    parser = argparse.ArgumentParser(prog="difsolve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="sample a 2-D Gaussian-mixture ring with several solvers",
        description="Sample an exact 8-mode ring mixture under EDM with every kind of solver from "
                    "the same prior draws; print NFE, endpoint error, mode-weight and width "
                    "errors and seconds per solver; write a PNG of work against error, per-sample "
                    "errors and trajectories. About 30 s with the defaults.")
    demo.add_argument("--samples", type=int, default=4000, metavar="N",
                      help="samples per solver (default 4000; the error columns' Monte-Carlo "
                           "noise shrinks as 1/sqrt(N))")
    demo.add_argument("--seed", type=int, default=0,
                      help="seed of the prior draws and of the stochastic samplers (default 0)")
    demo.add_argument("--png", default="difsolve_demo.png", metavar="FILE",
                      help="where to write the figure (default difsolve_demo.png; needs "
                           "matplotlib)")
    conv = sub.add_parser(
        "converge", help="observed-order table of every solver",
        description="Observed convergence orders of every solver on closed-form problems (about "
                    "45 s).")
    conv.add_argument("--plot", default=None, metavar="FILE",
                      help="also write the log-log figure here")
    bench = sub.add_parser(
        "bench", help="run the benchmarks against peer libraries (source checkout)",
        description="Run benchmarks/bench_<NAME>.py of a source checkout against the peer "
                    "libraries, one progress line per benchmark.",
        epilog="benchmarks:\n" + describe(), formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("names", nargs="*", metavar="NAME",
                       help="benchmarks to run (default: all)")
    bench.add_argument("--quick", action="store_true",
                       help="a few settings and small batches: a smoke run of every benchmark")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(samples=args.samples, seed=args.seed, png=args.png)
    if args.command == "converge":
        from .convergence import run_converge

        return run_converge(plot=args.plot)
    from .bench import run_bench

    return run_bench(args.names, quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
