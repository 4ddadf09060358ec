"""The seed-0 selections of the windowed rows of bench_stochastic (docs/stochastic.md).

The settings:

- ``w{lo}_{grid}_e{eta}``: DPM-Solver++(2M) SDE (reference) with noise only on the steps that
  start at sigma >= ``lo``, on four grids, at eta 0.5 / 0.7 / 1 (the width row);
- ``sa{tau}_w{hi}_{grid}``: SA-Solver(3, 3) with noise only on the steps that start at
  sigma <= ``hi``, and ``sa1.0_from{lo}_{grid}``: tau 1 on the steps that start at
  sigma >= ``lo``, on the exponential grid and the tuned UniPC(3) grid (the 50-NFE weight row);
  ``df_sa_tau0[_karras]``: diffusers' SA-Solver at tau 0 (its ODE), for the comparison with the
  ODE below.

For each it prints the distribution errors of bench_stochastic, the number of samples with a
squared Mahalanobis distance above 40 to their nearest mode (stranded; exact draws: about 2 per
million) and, with ``--reference STEPS``, a common-random-number view of the mode weights: the
fraction of samples whose nearest mode differs from that of the probability-flow ODE solved
from the same prior draws by UniPC(3) in ``STEPS`` exponential steps, and the largest change of a
mode's fraction between the two. An exact sampler changes each fraction only by zero-mean noise,
so a change well below the Monte-Carlo floor bounds the sampler's mode-weight bias much more
tightly than the floor allows. The reference line also weights the prior draws to the exact
marginal at sigma_max (importance weights ``p_T / q``): the difference is the mode-weight bias
that the start ``N(0, sigma_max^2 I)`` leaves in the ODE.

Run: ``python benchmarks/_stochastic_selection.py SAMPLES NFE SEED "pattern;pattern"
[--reference STEPS]``, the patterns matched (fnmatch) against the setting names, e.g.
``python benchmarks/_stochastic_selection.py 1000000 20 0 "w0.0[3-7]_exponential_e1.0"``.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_stochastic as bench

import difsolve as ds
from difsolve.demo import nearest_mode


def settings(field) -> dict:
    grids = dict(bench.GRIDS)
    grids["polyexp 1.15"] = bench.poly(1.15)
    grids["tuned"] = bench.tuned("UniPC(3)", lambda: ds.UniPC(3, "bh2"), field)
    out = {"kd2m_p16": bench.kd_sampler("sample_dpmpp_2m_sde", grids["polyexp 1.6"], eta=1.0),
           "kd2m_p16_e.7": bench.kd_sampler("sample_dpmpp_2m_sde", grids["polyexp 1.6"],
                                            eta=0.7)}
    for lo in (0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.1):
        for grid in ("exponential", "polyexp 1.15", "polyexp 1.3", "polyexp 1.6"):
            for eta in (0.5, 0.7, 1.0):
                out[f"w{lo}_{grid}_e{eta}"] = bench.ds_sde(
                    ds.DPMSolverSDE(2, eta=eta, eta_range=(lo, bench.SIGMA_MAX)), grids[grid])
    for grid in ("exponential", "tuned"):
        for tau in (0.0, 0.2, 0.3, 0.5, 0.7, 1.0):  # tau 0: SA-Solver's ODE
            for hi in (0.2, 0.3, 0.5, 1.0, bench.SIGMA_MAX):
                out[f"sa{tau}_w{hi:g}_{grid}"] = bench.ds_sde(
                    ds.SASolver(3, 3, tau, tau_range=(bench.SIGMA_MIN, hi)), grids[grid])
        for lo in (1.0, 2.0, 5.0, 10.0, 20.0):
            out[f"sa1.0_from{lo:g}_{grid}"] = bench.ds_sde(
                ds.SASolver(3, 3, 1.0, tau_range=(lo, bench.SIGMA_MAX)), grids[grid])
    for label, karras_sigmas in (("", False), ("_karras", True)):  # diffusers' SA-Solver ODE
        out[f"df_sa_tau0{label}"] = bench.df_scheduler(
            "SASolverScheduler", True, use_karras_sigmas=karras_sigmas, tau_func=lambda t: 0.0)
    return out


def ode_reference(p: bench.Problem, steps: int) -> torch.Tensor:
    """Nearest mode of each sample of UniPC(3) on the probability-flow ODE from ``p``'s prior
    draws in ``steps`` exponential steps (and the final denoise)."""
    sol = ds.solve(ds.ProbabilityFlowODE(p.field), p.y_T.clone(), bench.SIGMA_MAX,
                   bench.SIGMA_MIN, solver=ds.UniPC(3, "bh2"), steps=bench.exponential(steps))
    return nearest_mode(p.denoise(sol.x, sol.t), p.mixture)


def selected(table: dict, patterns: str):
    """The ``(name, run)`` items of ``table`` whose name matches one of the ';'-separated
    fnmatch ``patterns``."""
    return [(name, run) for name, run in table.items()
            if any(fnmatch.fnmatch(name, pat) for pat in patterns.split(";"))]


def chunked(args) -> int:
    """The errors of the matching settings over chunks of ``args.chunk`` samples."""
    field = bench.mixture_field()
    problems = [bench.Problem(size, seed, field)
                for size, seed in bench.chunks(args.samples, args.chunk, args.seed)]
    for name, run in selected(settings(field), args.patterns):
        started = time.perf_counter()
        spent, weight, width = bench.evaluate(run, problems, args.nfe)
        print(f"{name:<32} NFE {spent:>3} weight {weight:.5f} width {width:.5f} "
              f"({len(problems)} chunks) {time.perf_counter() - started:.1f} s", flush=True)
    return 0


def prior_weights(p: bench.Problem) -> torch.Tensor:
    """Self-normalised importance weights ``p_T / q`` of ``p``'s prior draws: ``q = N(0,
    sigma_max^2 I)`` is where every sampler starts, ``p_T`` the exact marginal at sigma_max (the
    mixture convolved with ``N(0, sigma_max^2 I)``)."""
    y, var = p.y_T, p.field.vars + bench.SIGMA_MAX**2
    w = p.mixture.weights
    log_p = torch.logsumexp(w.log() - 0.5 * ((y[:, None] - p.mixture.means) ** 2 / var).sum(-1)
                            - 0.5 * var.log().sum(-1), dim=1)
    log_q = -0.5 * y.square().sum(1) / bench.SIGMA_MAX**2 - y.shape[1] * math.log(bench.SIGMA_MAX)
    r = (log_p - log_q).exp()
    return r / r.mean()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples", type=int)
    parser.add_argument("nfe", type=int)
    parser.add_argument("seed", type=int)
    parser.add_argument("patterns", help="';'-separated fnmatch patterns of setting names")
    parser.add_argument("--reference", type=int, default=None, metavar="STEPS",
                        help="compare nearest modes with the ODE solved in STEPS steps")
    parser.add_argument("--chunk", type=int, default=1_000_000,
                        help="larger runs are evaluated in chunks as in bench_stochastic "
                             "(errors only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.samples > args.chunk:
        return chunked(args)
    p = bench.Problem(args.samples, args.seed)
    modes = p.mixture.n_components
    reference = None
    if args.reference:
        started = time.perf_counter()
        reference = ode_reference(p, args.reference)
        f_ref = torch.bincount(reference, minlength=modes).double() / p.n
        r = prior_weights(p)
        f_exact_prior = torch.bincount(reference, weights=r, minlength=modes) / r.sum()
        print(f"ODE reference, UniPC(3) in {args.reference} exponential steps: largest "
              f"|f_k - w_k| {float((f_ref - p.mixture.weights).abs().max()):.5f}; with the "
              f"prior draws weighted to the exact marginal at sigma_max "
              f"{float((f_exact_prior - p.mixture.weights).abs().max()):.5f}; the start's "
              f"mismatch moves a mode's weight by up to "
              f"{float((f_ref - f_exact_prior).abs().max()):.5f} "
              f"{time.perf_counter() - started:.1f} s", flush=True)
    for name, run in selected(settings(p.field), args.patterns):
        started = time.perf_counter()
        x, spent = run(p, args.nfe)
        weight, width = p.errors(p.moments(x))
        assign = nearest_mode(x, p.mixture)
        m2 = ((x - p.mixture.means[assign]).square() / p.field.vars[assign]).sum(1)
        crn = ""
        if reference is not None:
            change = torch.bincount(assign, minlength=modes).double() / p.n - f_ref
            crn = (f" other mode than the ODE {float((assign != reference).double().mean()):.5f}"
                   f" largest change of a fraction {float(change.abs().max()):.5f}")
        print(f"{name:<32} NFE {spent:>3} weight {weight:.5f} width {width:.5f} "
              f"stranded {int((m2 > 40).sum()):>5}{crn} {time.perf_counter() - started:.1f} s",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
