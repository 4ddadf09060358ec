"""Observed convergence orders of the ODE solvers on closed-form Gaussian probability-flow ODEs.

Ground truth: data ``N(mu, S)`` with a rotated anisotropic ``S`` and a non-zero mean, whose
probability-flow ODE has the exact solution :meth:`difsolve.problems.GaussianFlow.flow`. Each study
draws start points from the exact ``p_T``, integrates ``t_max -> t_min`` with ``N`` fixed steps
and fits the least-squares slope of ``log(RMS endpoint error)`` against ``log N`` over step counts
chosen in the asymptotic range (float64). Grids: VP uniform in ``t``; VE and EDM uniform in
``log sigma`` (schedule ``"logsnr"``; for VE that is also uniform in ``t``).

Measured slopes (VP / VE / EDM): Euler 0.98 / 0.96 / 0.99, Heun 1.95 / 2.08 / 2.04, Midpoint
2.08 / 2.04 / 2.05 (EDM in log-sigma time), Bosh3 2.90 / 3.04 / 2.99, RK4 4.18 / 4.08 / 4.01,
Dopri5 6.11 / 5.53 / 6.28 (its 5th-order weights nearly satisfy the 6th-order quadrature
condition), DPM-Solver++(2) 2.02 on all three, (3) 3.96 / 4.16 / 4.06 (3.26 on a mixture).
"""

from __future__ import annotations

import math

import pytest
import torch

import difsolve as ds
from difsolve.problems import GaussianFlow

TOL = 0.25


def gaussian_flow(process: ds.Process) -> GaussianFlow:
    """Rotated anisotropic Gaussian data with a non-zero mean (never single-point data)."""
    th = 0.6
    rot = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]],
                       dtype=torch.float64)
    cov = rot @ torch.diag(torch.tensor([0.5, 0.05], dtype=torch.float64)) @ rot.T
    return GaussianFlow(torch.tensor([0.7, -0.4], dtype=torch.float64), cov, process)


def fit_slope(steps, errors) -> float:
    """Least-squares slope of ``-log error`` against ``log steps``."""
    ls = torch.log(torch.tensor(steps, dtype=torch.float64))
    le = torch.log(torch.tensor(errors, dtype=torch.float64))
    design = torch.stack([ls, torch.ones_like(ls)], 1)
    return -float(torch.linalg.lstsq(design, le[:, None]).solution[0, 0])


def ode_errors(process, solver, steps, schedule, time_variable="t", reverse=False, n=8):
    gf = gaussian_flow(process)
    t0, t1 = process.t_max, process.t_min
    if reverse:
        t0, t1 = t1, t0
    x0 = gf.sample(n, t0, torch.Generator().manual_seed(0))
    exact = gf.flow(x0, t0, t1)
    ode = ds.ProbabilityFlowODE(gf.field)
    errors = []
    for n_steps in steps:
        sol = ds.solve(ode, x0, t0, t1, solver=solver, steps=n_steps, schedule=schedule,
                       time_variable=time_variable)
        assert sol.success
        errors.append(float((sol.x - exact).square().sum(-1).mean().sqrt()))
    return errors


PROCESSES = {
    "VP": (ds.VP, "uniform"),
    "VE": (ds.VE, "logsnr"),
    "EDM": (ds.EDM, "logsnr"),
}

# (solver, theoretical order, step counts in the asymptotic range)
RK_CASES = [
    (ds.Euler, 1, (64, 128, 256, 512)),
    (ds.Heun, 2, (32, 64, 128, 256)),
    (ds.Midpoint, 2, (64, 128, 256, 512)),
    (ds.Bosh3, 3, (64, 128, 256, 512)),
    (ds.RK4, 4, (32, 64, 128, 256)),
]


@pytest.mark.parametrize("proc_name", list(PROCESSES))
@pytest.mark.parametrize("solver_cls,order,steps", RK_CASES,
                         ids=[c[0].__name__ for c in RK_CASES])
def test_runge_kutta_order(proc_name, solver_cls, order, steps):
    process_cls, schedule = PROCESSES[proc_name]
    # On the EDM ODE in sigma-time the Midpoint rule's leading error term vanishes identically
    # (see test_midpoint_superconvergence_in_sigma); its order 2 shows in log-sigma time.
    tv = "log_sigma" if (proc_name == "EDM" and solver_cls is ds.Midpoint) else "t"
    errors = ode_errors(process_cls(), solver_cls(), steps, schedule, tv)
    slope = fit_slope(steps, errors)
    assert solver_cls.order == order
    assert abs(slope - order) <= TOL, (slope, errors)


@pytest.mark.parametrize("proc_name", list(PROCESSES))
def test_dopri5_order_at_least_5(proc_name):
    process_cls, schedule = PROCESSES[proc_name]
    steps = (8, 16, 32, 64)
    errors = ode_errors(process_cls(), ds.Dopri5(), steps, schedule)
    slope = fit_slope(steps, errors)
    # 5th-order weights nearly satisfy the 6th-order quadrature condition: about 6 here
    assert slope >= 5 - TOL, (slope, errors)
    assert slope <= 7, (slope, errors)


def test_midpoint_superconvergence_in_sigma():
    """For Gaussian data the EDM ODE in sigma is ``y' = a(sigma) y`` with ``a = s/(l + s^2)``
    per eigen-direction; Midpoint's local error ``h^3 (a''/24 + a a'/4 + a^3/6) y`` vanishes
    identically for this ``a``, so it converges with order 3 there (a property, not a bug)."""
    steps = (32, 64, 128, 256)
    errors = ode_errors(ds.EDM(), ds.Midpoint(), steps, "logsnr")
    assert abs(fit_slope(steps, errors) - 3) <= TOL, errors


@pytest.mark.parametrize("proc_cls", [ds.VP, ds.VE, ds.EDM], ids=["VP", "VE", "EDM"])
@pytest.mark.parametrize("order", [2, 3])
def test_dpm_solver_order_logsnr(proc_cls, order):
    """DPM-Solver++(2M) shows order 2. The (3M) variant shows order 4 here: its global h^3 error
    coefficient is proportional to ``int u u''' d lambda`` (``u`` the data prediction along a
    Gaussian trajectory), which integrates to boundary terms that vanish where the trajectory is
    flat at both ends; so only ``>= 3`` is required. On VP with a uniform-in-t grid the studies are
    pre-asymptotic, hence the log-SNR grid."""
    steps = (16, 32, 64, 128)
    errors = ode_errors(proc_cls(), ds.DPMSolver(order), steps, "logsnr")
    slope = fit_slope(steps, errors)
    if order == 2:
        assert abs(slope - 2) <= TOL, (slope, errors)
    else:
        assert slope >= 3 - TOL, (slope, errors)
        assert slope <= 4 + 2 * TOL, (slope, errors)


def test_dpm_solver_3_order_on_mixture():
    """On a non-Gaussian (mixture) flow the (3M) variant shows its nominal order 3, against a
    tight Dopri5 reference of the same start points."""
    mix = ds.GaussianMixture([0.3, 0.7], [[-1.0, 0.5], [1.0, -0.2]], [0.05, 0.2])
    proc = ds.EDM()
    ode = ds.ProbabilityFlowODE(mix.score_field(proc))
    x0 = proc.prior_sample((8, 2), generator=torch.Generator().manual_seed(3),
                           dtype=torch.float64)
    ref = ds.solve(ode, x0, proc.t_max, proc.t_min, solver=ds.Dopri5(), steps=1024,
                   schedule="logsnr").x
    steps = (32, 64, 128, 256)
    errors = []
    for n in steps:
        x = ds.solve(ode, x0, proc.t_max, proc.t_min, solver=ds.DPMSolver(3), steps=n,
                     schedule="logsnr").x
        errors.append(float((x - ref).square().sum(-1).mean().sqrt()))
    slope = fit_slope(steps, errors)
    assert abs(slope - 3) <= TOL + 0.25, (slope, errors)


def test_either_direction_matches_flow():
    """Integrating the PF-ODE forwards (data -> noise) also converges to the exact flow."""
    steps = (32, 64, 128, 256)
    errors = ode_errors(ds.VP(), ds.RK4(), steps, "uniform", reverse=True)
    assert abs(fit_slope(steps, errors) - 4) <= TOL, errors
    assert errors[-1] < 1e-6


# ----- tableaux ----------------------------------------------------------------------------

def _order_conditions(c, a, b) -> dict[int, list[float]]:
    """Residuals of the Runge-Kutta order conditions up to order 4 (Butcher trees)."""
    s = len(c)
    A = torch.zeros(s, s, dtype=torch.float64)
    for i, row in enumerate(a):
        for j, v in enumerate(row):
            A[i, j] = v
    b = torch.tensor(b, dtype=torch.float64)
    c = torch.tensor(c, dtype=torch.float64)
    Ac = A @ c
    return {
        1: [float(b.sum() - 1)],
        2: [float(b @ c - 1 / 2)],
        3: [float(b @ c**2 - 1 / 3), float(b @ Ac - 1 / 6)],
        4: [float(b @ c**3 - 1 / 4), float(b @ (c * Ac) - 1 / 8), float(b @ (A @ c**2) - 1 / 12),
            float(b @ (A @ Ac) - 1 / 24)],
    }


@pytest.mark.parametrize("solver_cls", [ds.Euler, ds.Heun, ds.Midpoint, ds.Bosh3, ds.RK4,
                                        ds.Dopri5])
def test_tableau_order_conditions(solver_cls):
    tab = solver_cls.tableau
    res = _order_conditions(tab.c, tab.a, tab.b)
    for k in range(1, min(int(solver_cls.order), 4) + 1):
        assert max(abs(r) for r in res[k]) < 1e-14, (k, res[k])
    if solver_cls.order < 4:  # the next order is NOT satisfied: the declared order is exact
        assert max(abs(r) for r in res[int(solver_cls.order) + 1]) > 1e-3
    if tab.e is not None:  # embedded weights b_hat = b - e: order one less
        b_hat = [bi - ei for bi, ei in zip(tab.b, tab.e)]
        res_hat = _order_conditions(tab.c, tab.a, b_hat)
        for k in range(1, int(solver_cls.order)):
            assert max(abs(r) for r in res_hat[k]) < 1e-14, (k, res_hat[k])
    assert solver_cls.stages == len(tab.c)
    assert solver_cls.adaptive == (tab.e is not None)


def test_fsal_nfe():
    """FSAL tableaux reuse the last stage: Dopri5 costs 1 + 6N, Bosh3 1 + 3N on a fixed grid."""
    gf = gaussian_flow(ds.VP())
    ode = ds.ProbabilityFlowODE(gf.field)
    x0 = gf.sample(4, 1.0, torch.Generator().manual_seed(0))
    for solver, per_step in ((ds.Dopri5(), 6), (ds.Bosh3(), 3), (ds.RK4(), 4), (ds.Heun(), 2)):
        sol = ds.solve(ode, x0, 1.0, 1e-3, solver=solver, steps=10)
        fsal = solver.tableau.fsal
        assert sol.stats.nfe == per_step * 10 + (1 if fsal else 0), type(solver).__name__
