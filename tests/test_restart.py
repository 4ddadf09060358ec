"""Restart sampling: the main pass is ds.solve on the main grid, the forward jump is the exact
noising transition, and the work is accounted segment by segment."""

from __future__ import annotations

import math

import pytest
import torch
from test_ode_solvers import gaussian_flow

import difsolve as ds
from difsolve.control import make_grid


def ring():
    ang = torch.arange(4, dtype=torch.float64) * (math.pi / 2)
    means = 2.0 * torch.stack([ang.cos(), ang.sin()], 1)
    return ds.GaussianMixture(torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), means,
                              torch.full((4,), 0.04, dtype=torch.float64))


@pytest.mark.parametrize("proc_name", ["EDM", "VP"])
def test_no_restart_is_the_plain_ode_solve(proc_name):
    proc = ds.EDM() if proc_name == "EDM" else ds.VP()
    field = ring().score_field(proc)
    x_T = proc.prior_sample((32, 2), generator=torch.Generator().manual_seed(0),
                            dtype=torch.float64)
    got = ds.restart_sample(field, (32, 2), solver=ds.DPMSolver(2), steps=12, restarts=(),
                            x_T=x_T)
    ref = ds.sample(field, (32, 2), solver=ds.DPMSolver(2), steps=12, schedule="karras",
                    generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(got.x, ref.x, rtol=0, atol=0)
    assert got.stats.nfe == ref.stats.nfe


def test_work_accounting_and_segments():
    proc = ds.EDM()
    field = ring().score_field(proc)
    # Heun: 2 NFE per step; main 10 steps, two intervals
    sol = ds.restart_sample(field, (8, 2), solver=ds.Heun(), steps=10,
                            restarts=(ds.Restart(0.1, 1.0, 2, 3), ds.Restart(2.0, 5.0, 1, 2)),
                            generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert sol.stats.nfe == 2 * (10 + 2 * 3 + 1 * 2) + 1
    assert int(sol.stats.steps[0]) == 10 + 2 * 3 + 2
    assert sol.success and float(sol.t[0]) == pytest.approx(proc.t_min)


def test_restart_keeps_the_exact_law_with_an_accurate_ode():
    """Gaussian data, VP: with an accurate ODE (RK4, fine steps) every segment transports the
    exact marginal and the forward jump ``y_hi = y_lo + sqrt(s_hi^2 - s_lo^2) z`` is the exact
    noising transition, so the output has the exact law (Monte Carlo, 4 standard errors)."""
    proc = ds.VP()
    gf = gaussian_flow(proc)
    n = 20000
    x_T = gf.sample(n, proc.t_max, torch.Generator().manual_seed(1))
    sol = ds.restart_sample(gf.field, (n, 2), solver=ds.RK4(), steps=40,
                            restarts=(ds.Restart(0.3, 3.0, 3, 20),),
                            generator=torch.Generator().manual_seed(2), x_T=x_T, denoise=False)
    me, Pe = gf.marginal(proc.t_min)
    x = sol.x
    se_mean = (torch.diagonal(Pe) / n).sqrt()
    assert bool(((x.mean(0) - me).abs() <= 4 * se_mean).all()), (x.mean(0), me)
    cov = torch.cov(x.T)
    se_cov = ((Pe.square() + torch.outer(torch.diagonal(Pe), torch.diagonal(Pe))) / n).sqrt()
    assert bool(((cov - Pe).abs() <= 4 * se_cov).all()), (cov, Pe)
    # the restarts did re-randomise the samples (the law check is not passed by a no-op)
    plain = ds.restart_sample(gf.field, (n, 2), solver=ds.RK4(), steps=40, restarts=(),
                              x_T=x_T, denoise=False)
    assert float((plain.x - x).square().sum(1).mean().sqrt()) > 0.1


def test_restart_snaps_to_the_main_grid():
    proc = ds.EDM()
    field = ring().score_field(proc)
    seen = []

    class Spy(ds.Heun):
        def init(self, dynamics, x, t, ctx):
            seen.append(float(t[0]))
            return super().init(dynamics, x, t, ctx)

    ds.restart_sample(field, (4, 2), solver=Spy(), steps=8, restarts=(ds.Restart(0.5, 3.0, 1, 2),),
                      generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    one = torch.ones(1, dtype=torch.float64)
    grid = make_grid("karras", 8, one * proc.t_max, one * proc.t_min, proc)[:, 0]
    j = int((grid[1:-1] - 0.5).abs().argmin()) + 1
    # segments start at t_max, at sigma_hi (restart pass) and at the snapped grid point
    assert seen[0] == pytest.approx(80.0)
    assert seen[1] == pytest.approx(3.0)
    assert seen[2] == pytest.approx(float(grid[j]))


def test_errors():
    field = ring().score_field(ds.EDM())
    with pytest.raises(ds.IncompatibleError, match="ODE solver"):
        ds.restart_sample(field, (2, 2), solver=ds.EulerMaruyama())
    with pytest.raises(ds.InvalidArgumentError, match="sigma_hi"):
        ds.Restart(1.0, 0.5)
    with pytest.raises(ds.InvalidArgumentError, match="sigma_lo"):
        ds.Restart(-1.0, 0.5)
    with pytest.raises(ds.ArgumentTypeError, match="repeats"):
        ds.Restart(0.1, 1.0, repeats=1.5)
    with pytest.raises(ds.ArgumentTypeError, match="restarts"):
        ds.restart_sample(field, (2, 2), restarts=[(0.1, 1.0)])
    with pytest.raises(ds.ArgumentTypeError, match="solver"):
        ds.restart_sample(field, (2, 2), solver="heun")


def test_per_row_seeds_make_rows_batch_independent():
    field = ring().score_field(ds.VP())
    kw = dict(solver=ds.DPMSolver(2), steps=10, restarts=(ds.Restart(0.1, 1.0, 2, 2),),
              dtype=torch.float64)
    full = ds.restart_sample(field, (4, 2), seeds=[5, 6, 7, 8], **kw)
    part = ds.restart_sample(field, (2, 2), seeds=[6, 7], **kw)
    torch.testing.assert_close(part.x, full.x[1:3], rtol=0, atol=0)
    other = ds.restart_sample(field, (2, 2), seeds=[6, 9], **kw)
    assert not torch.equal(other.x[1], full.x[2])
