"""Observed convergence orders on a non-Gaussian problem, and what they look like.

The probability-flow ODE of an 8-mode ring mixture under VP (t from 1 to 0.05, no closed form: the
reference is each solver at 16x its finest step count) for Euler, Heun, Midpoint, Bosh3, RK4 on a
uniform grid and DPM-Solver++ 2M / 3M on the log-SNR grid; and the strong order of Euler-Maruyama
and stochastic Heun on the VP reverse SDE of the same mixture, every step count along the same
Brownian path (``ds.BrownianPath``). Each panel is a ``ds.convergence`` study: log-log error
against steps with the least-squares slope (the observed order) and its 95% interval in the
legend. Measured (full run): Euler 1.00, DPM-Solver++ 2M 2.01 and 3M 3.23 reach their orders;
Heun 1.73, Midpoint 1.65, Bosh3 2.51 and RK4 3.42 are still pre-asymptotic at 16-128 uniform
steps (the local slopes rise towards 2, 2, 3, 4: the ring's flow is stiff near t1 on a uniform
grid in t), and so are the strong orders (0.83, 0.76 against 1) of the SDE solvers with 256 paths.
Then the closed-form set of every solver (``ds.convergence.default_studies()``, the
``difsolve converge`` table) drawn as ``convergence_ode.png`` and ``convergence_sde.png`` (the
figures of docs/convergence.md; ``--quick`` divides its step counts by 8).

Run:  python examples/convergence_study.py [--quick] [--out DIR]
"""

from __future__ import annotations

import torch
from _common import parse_args, ring, save

import difsolve as ds


def main() -> None:
    args = parse_args(__doc__)
    quick = args.quick
    process = ds.VP()
    field = ring(std=0.2, unequal=True).score_field(process)
    gen = torch.Generator().manual_seed(args.seed)
    x0 = process.prior_sample((16 if quick else 64, 2), generator=gen, dtype=torch.float64)
    ode = ds.ProbabilityFlowODE(field)
    fine = (8, 16, 32) if quick else (16, 32, 64, 128)
    studies = []
    for solver, schedule in [(ds.Euler(), "uniform"), (ds.Heun(), "uniform"),
                             (ds.Midpoint(), "uniform"), (ds.Bosh3(), "uniform"),
                             (ds.RK4(), "uniform"), (ds.DPMSolver(2), "logsnr"),
                             (ds.DPMSolver(3), "logsnr")]:
        study = ds.convergence.ode_order(ode, x0, 1.0, 0.05, solver=solver, steps=fine,
                                         schedule=schedule, label=f"VP ring PF-ODE, {schedule}")
        print(study.table(), "\n")
        studies.append(study)
    sde = ds.ReverseSDE(field)
    paths = process.prior_sample((32 if quick else 256, 2), generator=gen, dtype=torch.float64)
    for solver in (ds.EulerMaruyama(), ds.StochasticHeun()):
        study = ds.convergence.strong_order(sde, paths, 1.0, 0.05, solver=solver,
                                            steps=(8, 16, 32) if quick else (16, 32, 64, 128),
                                            generator=torch.Generator().manual_seed(args.seed),
                                            label="VP ring reverse SDE (strong)")
        print(study.table(), "\n")
        studies.append(study)
    fig = ds.convergence.plot_studies(studies, ncols=3,
                                      title="Observed orders on an 8-mode ring mixture (VP)")
    save(fig, args, "convergence_study.png")

    closed_form = ds.convergence.default_studies(shrink=8 if quick else 1)
    for kind, name, title in [
            (("ode",), "convergence_ode.png", "ODE solvers on the exact VP Gaussian flow"),
            (("strong", "weak"), "convergence_sde.png",
             "SDE solvers: strong and weak orders along shared Brownian paths")]:
        chosen = [st for st in closed_form if st.kind in kind]
        save(ds.convergence.plot_studies(chosen, ncols=4, title=title), args, name)


if __name__ == "__main__":
    main()
