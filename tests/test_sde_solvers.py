"""Weak orders of the SDE solvers on reverse SDEs of Gaussian data, against the exact law.

Data ``N(mu, S)`` (rotated anisotropic ``S``, non-zero mean). Started from the exact ``p_T``, the
reverse SDE has the exact law ``N(a mu, a^2 S + b^2 I)`` at ``t_min``
(:meth:`GaussianFlow.marginal`). Two checks:

* noise-free: the reverse SDE is linear with additive noise, so one step of EulerMaruyama or
  StochasticHeun is an affine map ``x' = M x + v + N dw`` and the scheme's mean and covariance
  propagate exactly (``m' = M m + v``, ``P' = M P M^T + |h| N N^T``). ``M, v, N`` are read off the
  solver's own ``step`` at basis points, so this measures the implementation, not a formula.
* Monte Carlo through :func:`difsolve.solve` along a :class:`~difsolve.BrownianPath`: the second
  moment ``E|x|^2`` at ``t_min`` against its exact value, with a control variate to beat the
  Monte-Carlo noise: a fine StochasticHeun solve driven by the same Brownian path, whose own
  expectation is known exactly from the noise-free recursion.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_ode_solvers import TOL, fit_slope, gaussian_flow

import difsolve as ds
from difsolve.control import make_grid
from difsolve.solvers.base import StepContext


def scheme_law(process, solver, grid: torch.Tensor, log_sigma: bool = False):
    """Exact mean and covariance of ``solver`` on the reverse SDE along ``grid`` (1-D times),
    started from the exact law at ``grid[0]``; with ``log_sigma`` the solver steps the SDE
    re-parametrised in ``u = log sigma(t)`` (:class:`difsolve.LogSigmaTime`) on the same times."""
    gf = gaussian_flow(process)
    sde = ds.ReverseSDE(gf.field)
    m, P = gf.marginal(float(grid[0]))
    if log_sigma:
        sde = ds.LogSigmaTime(sde)
        grid = sde.to_u(grid)
    d = m.numel()
    ctx = StepContext(n_steps=grid.numel() - 1)
    X = torch.zeros(2 * d + 1, d, dtype=torch.float64)
    W = torch.zeros_like(X)
    X[1:d + 1] = torch.eye(d)
    W[d + 1:] = torch.eye(d)
    for i in range(grid.numel() - 1):
        t = grid[i].expand(2 * d + 1)
        h = (grid[i + 1] - grid[i]).expand(2 * d + 1)
        ctx.index = i
        out = solver.step(sde, X, t, h, (), W, ctx).x
        v = out[0]
        M, N = (out[1:d + 1] - v).T, (out[d + 1:] - v).T
        m = M @ m + v
        P = M @ P @ M.T + h.abs()[0] * N @ N.T
    return m, P


def _grid(process, schedule, n):
    one = torch.ones(1, dtype=torch.float64)
    return make_grid(schedule, n, one * process.t_max, one * process.t_min, process)[:, 0]


def second_moment(m, P) -> float:
    return float(torch.trace(P) + m @ m)


CASES = [
    # process, schedule, solver, weak order, steps (past the pre-asymptotic range)
    ("VP", "uniform", ds.EulerMaruyama, 1, (64, 128, 256, 512)),
    ("VP", "uniform", ds.StochasticHeun, 2, (64, 128, 256, 512)),
    ("EDM", "logsnr", ds.EulerMaruyama, 1, (64, 128, 256, 512)),
    ("EDM", "logsnr", ds.StochasticHeun, 2, (64, 128, 256, 512)),
]


@pytest.mark.parametrize("proc_name,schedule,solver_cls,order,steps", CASES,
                         ids=[f"{c[0]}-{c[2].__name__}" for c in CASES])
def test_weak_order_exact_recursion(proc_name, schedule, solver_cls, order, steps):
    process = {"VP": ds.VP, "EDM": ds.EDM}[proc_name]()
    gf = gaussian_flow(process)
    me, Pe = gf.marginal(process.t_min)
    cov_err, m2_err = [], []
    for n in steps:
        m, P = scheme_law(process, solver_cls(), _grid(process, schedule, n))
        cov_err.append(float((P - Pe).norm()))
        m2_err.append(abs(second_moment(m, P) - second_moment(me, Pe)))
    assert solver_cls.weak_order == order
    assert abs(fit_slope(steps, cov_err) - order) <= TOL, cov_err
    assert abs(fit_slope(steps, m2_err) - order) <= TOL, m2_err


@pytest.mark.parametrize("solver_cls,order", [(ds.EulerMaruyama, 1), (ds.StochasticHeun, 2)])
def test_weak_order_in_log_sigma_time(solver_cls, order):
    """The reverse SDE in ``u = log sigma`` (``g_u = g / sqrt(|du/dt|)``, sample()'s default for
    SDE solvers) converges in law to the same exact marginal, with the same weak orders."""
    process = ds.VP()
    gf = gaussian_flow(process)
    me, Pe = gf.marginal(process.t_min)
    steps = (64, 128, 256, 512)
    errs = []
    for n in steps:
        m, P = scheme_law(process, solver_cls(), _grid(process, "logsnr", n), log_sigma=True)
        errs.append(float((P - Pe).norm() + (m - me).norm()))
    assert abs(fit_slope(steps, errs) - order) <= TOL, errs
    assert errs[-1] < 0.01


def test_weak_monte_carlo_vp():
    """Monte-Carlo weak errors of E|x|^2 at t_min through ds.solve, against the exact law.

    Estimator (unbiased): ``mean(phi(X_N) - phi(X_ref)) + (E phi(X_ref) - E_exact phi)`` where
    ``X_ref`` is StochasticHeun on 128 steps driven by the same Brownian path and ``E phi(X_ref)``
    comes from the exact recursion (a control variate with known mean: the estimator is unbiased
    whatever the reference's own bias; the coupling only removes most of the variance).
    """
    torch.manual_seed(0)
    process = ds.VP()
    gf = gaussian_flow(process)
    sde = ds.ReverseSDE(gf.field)
    n, n_ref = 24000, 128
    gen = torch.Generator().manual_seed(11)
    x0 = gf.sample(n, process.t_max, gen)
    fine = _grid(process, "uniform", n_ref)
    # one Brownian path, queried at every resolution (the same path at every step count)
    path = ds.BrownianPath(process.t_max, process.t_min, (n, 2), generator=gen,
                           dtype=torch.float64)
    me, Pe = gf.marginal(process.t_min)
    exact = second_moment(me, Pe)
    phi = lambda x: x.square().sum(-1)  # noqa: E731
    ref = ds.solve(sde, x0, process.t_max, process.t_min, solver=ds.StochasticHeun(),
                   steps=fine, brownian=path)
    ref_bias = second_moment(*scheme_law(process, ds.StochasticHeun(), fine)) - exact
    # the reference itself matches the exact law (plain Monte Carlo, 4 standard errors)
    se_plain = float(phi(ref.x).std()) / math.sqrt(n)
    assert abs(float(phi(ref.x).mean()) - exact) <= 4 * se_plain + abs(ref_bias)
    results = {}
    for solver_cls, steps in ((ds.EulerMaruyama, (32, 64, 128)),
                              (ds.StochasticHeun, (16, 32, 64))):
        est, se, pred = [], [], []
        for k in steps:
            sol = ds.solve(sde, x0, process.t_max, process.t_min, solver=solver_cls(),
                           steps=fine[::n_ref // k], brownian=path)
            diff = phi(sol.x) - phi(ref.x)
            est.append(float(diff.mean()) + ref_bias)
            se.append(float(diff.std()) / math.sqrt(n))
            pred.append(second_moment(*scheme_law(process, solver_cls(),
                                                  fine[::n_ref // k])) - exact)
        # Monte Carlo agrees with the exact law of the scheme, and errors are well resolved
        for e, s, p in zip(est, se, pred):
            assert abs(e - p) <= 4 * s, (solver_cls.__name__, est, se, pred)
        results[solver_cls] = (steps, est, se)
        print(solver_cls.__name__, steps, "MC", [f"{e:.2e}" for e in est],
              "se", [f"{v:.1e}" for v in se], "exact law", [f"{v:.2e}" for v in pred])
    steps, est, se = results[ds.EulerMaruyama]
    assert all(abs(e) > 8 * s for e, s in zip(est, se)), (est, se)
    assert abs(fit_slope(steps, [abs(e) for e in est]) - 1) <= TOL, est
    steps, est, se = results[ds.StochasticHeun]
    assert abs(est[-1]) > 3 * se[-1], (est, se)
    assert abs(fit_slope(steps, [abs(e) for e in est]) - 2) <= 2 * TOL, est
    # at equal steps StochasticHeun is far more accurate in law than Euler-Maruyama
    assert abs(est[1]) < 0.3 * abs(results[ds.EulerMaruyama][1][0])


def test_sde_orders_declared():
    assert ds.EulerMaruyama.strong_order == 1.0 and ds.EulerMaruyama.weak_order == 1.0
    assert ds.StochasticHeun.weak_order == 2.0 and ds.StochasticHeun.adaptive
    assert ds.StochasticHeun.stages == 2 and ds.EulerMaruyama.stages == 1
    for cls in (ds.EulerMaruyama, ds.StochasticHeun):
        assert cls.sde and cls.stochastic and cls.order is None


def test_stochastic_heun_evaluates_g_at_both_ends():
    """With ``g`` varying in time the corrector uses ``(g(t) + g(t + h))/2``: on ``dx = g(t) dw``
    one step is exactly ``x + (g(t) + g(t+h))/2 dw``."""

    class Pure:
        noise = "additive"

        def drift(self, x, t):
            return torch.zeros_like(x)

        def diffusion(self, t):
            return 1.0 + t.square()

    x = torch.zeros(3, 2, dtype=torch.float64)
    t = torch.full((3,), 0.5, dtype=torch.float64)
    h = torch.full((3,), -0.25, dtype=torch.float64)
    dw = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    step = ds.StochasticHeun().step(Pure(), x, t, h, (), dw, StepContext())
    expect = 0.5 * ((1 + 0.25) + (1 + 0.0625)) * dw
    torch.testing.assert_close(step.x, expect, rtol=1e-15, atol=1e-15)
    step = ds.EulerMaruyama().step(Pure(), x, t, h, (), dw, StepContext())
    torch.testing.assert_close(step.x, 1.25 * dw, rtol=1e-15, atol=1e-15)
