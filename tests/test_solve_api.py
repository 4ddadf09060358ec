"""``ds.solve``: capability checks before any work, explicit grids, save_at, both time
directions, per-sample start times, per-sample NONFINITE status, NFE accounting, seeds."""

from __future__ import annotations

import pytest
import torch
from test_ode_solvers import gaussian_flow

import difsolve as ds

F64 = torch.float64


class CountingField:
    def __init__(self, field, poison_above=None):
        self.inner, self.process = field, field.process
        self.poison_above = poison_above
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        s = self.inner(x, t)
        if self.poison_above is not None:
            bad = x.abs().amax(dim=1) > self.poison_above
            s = torch.where(bad[:, None], torch.full_like(s, float("nan")), s)
        return s


@pytest.fixture
def vp():
    gf = gaussian_flow(ds.VP())
    field = CountingField(gf.field)
    x0 = gf.sample(6, 1.0, torch.Generator().manual_seed(0))
    return gf, field, x0


# ----- capability checks: a DifsolveError before any field evaluation -------------------------

def _bad_calls(field, ode, sde):
    grid = torch.linspace(1.0, 1e-3, 11, dtype=F64)
    return [
        (dict(dyn=ode, solver=ds.EulerMaruyama(), steps=10), "SDE solver"),
        (dict(dyn=sde, solver=ds.Heun(), steps=10), "ODE solver"),
        (dict(dyn=ode, solver=ds.Euler(), controller=ds.PIController()), "error estimate"),
        (dict(dyn=ode, solver=ds.RK4(), controller=ds.PIController()), "error estimate"),
        (dict(dyn=ode, solver=ds.Heun(), steps=10, schedule="cosine"), "schedule"),
        (dict(dyn=ode, solver=ds.Heun()), "steps"),
        (dict(dyn=ode, solver=ds.Heun(), steps=10, controller=ds.PIController()), "steps"),
        (dict(dyn=ode, solver=ds.Heun(), steps=grid[None]), "1-D"),
        (dict(dyn=ode, solver=ds.Heun(), steps=grid[:1]), "1-D"),
        (dict(dyn=ode, solver=ds.Heun(), steps=grid.flip(0)), "starting at t0"),
        (dict(dyn=ode, solver=ds.Heun(), steps=grid[:-1]), "ending at t1"),
        (dict(dyn=ode, solver=ds.Heun(), steps=torch.cat([grid[:3], grid[2:]])), "monotone"),
        (dict(dyn=ode, solver=ds.Heun(), steps=grid[[0, 2, 1, 10]]), "monotone"),
        (dict(dyn=ode, solver=ds.Heun(), steps=0), "steps"),
        (dict(dyn=ode, solver=ds.Heun(), steps=2.5), "steps"),
        (dict(dyn=ode, solver=ds.Heun, steps=10), "solver"),
        (dict(dyn=ode, solver=ds.Heun(), steps=10, controller="pi"), "steps"),
    ]


def test_capability_checks_before_any_work(vp):
    _gf, field, x0 = vp
    ode, sde = ds.ProbabilityFlowODE(field), ds.ReverseSDE(field)
    for kw, match in _bad_calls(field, ode, sde):
        dyn = kw.pop("dyn")
        with pytest.raises(ds.DifsolveError, match=match):
            ds.solve(dyn, x0, 1.0, 1e-3, **kw)
        assert field.calls == 0, (kw, match)


def test_unknown_schedule_names_the_argument(vp):
    _, field, x0 = vp
    with pytest.raises(ds.InvalidArgumentError, match="`schedule`"):
        ds.solve(ds.ProbabilityFlowODE(field), x0, 1.0, 1e-3, solver=ds.Heun(), steps=4,
                 schedule="Karras")


# ----- grids, directions, save_at, per-sample times ----------------------------------------

def test_explicit_grid_equals_named_schedule(vp):
    gf, field, x0 = vp
    ode = ds.ProbabilityFlowODE(field)
    proc = gf.process
    for schedule in ds.SCHEDULES:
        one = torch.ones(1, dtype=F64)
        grid = ds.control.make_grid(schedule, 12, one, one * 1e-3, proc)[:, 0]
        a = ds.solve(ode, x0, 1.0, 1e-3, solver=ds.Heun(), steps=12, schedule=schedule)
        b = ds.solve(ode, x0, 1.0, 1e-3, solver=ds.Heun(), steps=grid)
        torch.testing.assert_close(a.x, b.x, rtol=1e-14, atol=1e-14)
        # the schedule ignores `schedule=` when the grid is explicit
        c = ds.solve(ode, x0, 1.0, 1e-3, solver=ds.Heun(), steps=grid, schedule="uniform")
        assert torch.equal(b.x, c.x)


@pytest.mark.parametrize("direction", ["backward", "forward"])
def test_either_direction_and_save_at(vp, direction):
    gf, field, x0 = vp
    ode = ds.ProbabilityFlowODE(field)
    t0, t1 = (1.0, 1e-3) if direction == "backward" else (1e-3, 1.0)
    x0 = gf.sample(6, t0, torch.Generator().manual_seed(1))
    save = torch.tensor([0.7, 0.33, 0.05, 0.5], dtype=F64)
    sol = ds.solve(ode, x0, t0, t1, solver=ds.RK4(), steps=200, save_at=save)
    assert sol.success
    order = save.sort(descending=direction == "backward").values
    torch.testing.assert_close(sol.ts, order)
    assert sol.xs.shape == (4, 6, 2)
    for j, tj in enumerate(order.tolist()):
        torch.testing.assert_close(sol.xs[j], gf.flow(x0, t0, tj), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sol.x, gf.flow(x0, t0, t1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sol.t, torch.full((6,), t1, dtype=F64))
    # the save points are grid points: the final state matches a solve without them only
    # approximately (different grid), and exactly the end point times
    assert bool((sol.stats.steps == 200 + 4).all())


def test_save_at_under_controller(vp):
    gf, field, x0 = vp
    ode = ds.ProbabilityFlowODE(field)
    save = torch.tensor([0.5, 0.1], dtype=F64)
    sol = ds.solve(ode, x0, 1.0, 1e-3, solver=ds.Dopri5(),
                   controller=ds.PIController(rtol=1e-8, atol=1e-8), save_at=save)
    for j, tj in enumerate([0.5, 0.1]):
        torch.testing.assert_close(sol.xs[j], gf.flow(x0, 1.0, tj), rtol=1e-5, atol=1e-6)


def test_round_trip(vp):
    _gf, field, x0 = vp
    ode = ds.ProbabilityFlowODE(field)
    there = ds.solve(ode, x0, 1.0, 1e-3, solver=ds.Dopri5(), steps=100, schedule="logsnr")
    back = ds.solve(ode, there.x, 1e-3, 1.0, solver=ds.Dopri5(), steps=100, schedule="logsnr")
    torch.testing.assert_close(back.x, x0, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
def test_per_sample_t0(vp, mode):
    """A (B,) tensor of start times: each row equals the solve of that row alone."""
    gf, field, _ = vp
    ode = ds.ProbabilityFlowODE(field)
    t0 = torch.tensor([1.0, 0.8, 0.5, 0.3], dtype=F64)
    x0 = torch.stack([gf.sample(1, float(t), torch.Generator().manual_seed(i))[0]
                      for i, t in enumerate(t0)])
    kw = (dict(solver=ds.RK4(), steps=60) if mode == "fixed" else
          dict(solver=ds.Dopri5(), controller=ds.PIController(rtol=1e-7, atol=1e-7)))
    sol = ds.solve(ode, x0, t0, 1e-3, **kw)
    assert sol.success
    exact = torch.cat([gf.flow(x0[i:i + 1], float(t0[i]), 1e-3) for i in range(4)])
    torch.testing.assert_close(sol.x, exact, rtol=1e-5, atol=1e-5)
    for i in range(4):
        alone = ds.solve(ode, x0[i:i + 1], float(t0[i]), 1e-3, **kw)
        torch.testing.assert_close(sol.x[i:i + 1], alone.x, rtol=1e-12, atol=1e-12)


# ----- faults ------------------------------------------------------------------------------

@pytest.mark.parametrize("solver", [ds.Heun(), ds.RK4(), ds.Dopri5(), ds.DPMSolver(2)])
def test_nonfinite_row_on_fixed_grid(vp, solver):
    gf, _, x0 = vp
    field = CountingField(gf.field, poison_above=20.0)
    x0 = x0.clone()
    x0[2] = torch.tensor([50.0, -50.0], dtype=F64)
    ode = ds.ProbabilityFlowODE(field)
    sol = ds.solve(ode, x0, 1.0, 1e-3, solver=solver, steps=20)
    expect = torch.full((6,), ds.Status.SUCCESS.value)
    expect[2] = ds.Status.NONFINITE.value
    assert torch.equal(sol.status, expect)
    assert not sol.success
    keep = [0, 1, 3, 4, 5]
    clean = ds.solve(ds.ProbabilityFlowODE(gf.field), x0[keep], 1.0, 1e-3, solver=solver,
                     steps=20)
    torch.testing.assert_close(sol.x[keep], clean.x, rtol=1e-13, atol=1e-13)
    # the failed row holds NaN; its last finite state and time are kept
    assert bool(torch.isnan(sol.x[2]).all())
    assert bool(torch.isfinite(sol.last_x).all())
    torch.testing.assert_close(sol.last_x[keep], clean.x, rtol=0, atol=0)
    assert 1e-3 < float(sol.last_t[2]) <= 1.0
    assert int(sol.stats.steps[2]) == 0 and bool((sol.stats.steps[keep] == 20).all())


# ----- NFE accounting, EDM stochastic Heun -------------------------------------------------

def test_nfe_counts(vp):
    _gf, field, x0 = vp
    ode = ds.ProbabilityFlowODE(field)
    for solver, per_step in ((ds.Euler(), 1), (ds.Heun(), 2), (ds.Midpoint(), 2), (ds.RK4(), 4),
                             (ds.DPMSolver(3), 1)):
        field.calls = 0
        sol = ds.solve(ode, x0, 1.0, 1e-3, solver=solver, steps=13)
        assert sol.stats.nfe == per_step * 13 == field.calls, type(solver).__name__
        assert bool((sol.stats.nfe_per_sample == sol.stats.nfe).all())
        assert bool((sol.stats.steps == 13).all() & (sol.stats.rejected == 0).all())


def test_edm_stochastic_heun_churn0_equals_heun_and_nfe():
    mix = ds.GaussianMixture([0.4, 0.6], [[-1.0, 0.0], [1.0, 0.5]], [0.1, 0.05])
    proc = ds.EDM()
    field = CountingField(mix.score_field(proc))
    ode = ds.ProbabilityFlowODE(field)
    x0 = proc.prior_sample((8, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
    a = ds.solve(ode, x0, 80.0, 0.002, solver=ds.EDMStochasticHeun(churn=0.0), steps=16,
                 schedule="karras")
    b = ds.solve(ode, x0, 80.0, 0.002, solver=ds.Heun(), steps=16, schedule="karras")
    torch.testing.assert_close(a.x, b.x, rtol=1e-14, atol=1e-14)
    assert a.stats.nfe == b.stats.nfe == 32
    # to sigma = 0 the last step is an Euler step: NFE 2N - 1
    grid = torch.cat([ds.control.make_grid("karras", 15, torch.full((1,), 80.0, dtype=F64),
                                           torch.full((1,), 0.002, dtype=F64), proc)[:, 0],
                      torch.zeros(1, dtype=F64)])
    field.calls = 0
    c = ds.solve(ode, x0, 80.0, 0.0, solver=ds.EDMStochasticHeun(), steps=grid)
    assert c.stats.nfe == 2 * 16 - 1 == field.calls
    assert bool(torch.isfinite(c.x).all())


@pytest.mark.parametrize("solver", [ds.EulerMaruyama(), ds.StochasticHeun()])
def test_sde_same_seed_same_path(vp, solver):
    _gf, field, x0 = vp
    sde = ds.ReverseSDE(field)

    def run(seed):
        return ds.solve(sde, x0, 1.0, 1e-3, solver=solver, steps=50,
                        generator=torch.Generator().manual_seed(seed)).x

    assert torch.equal(run(3), run(3))
    assert not torch.allclose(run(3), run(4))


def test_time_is_per_sample_and_float_accepted(vp):
    _gf, field, x0 = vp
    ode = ds.ProbabilityFlowODE(field)
    a = ds.solve(ode, x0, 1.0, 1e-3, solver=ds.Heun(), steps=5)
    b = ds.solve(ode, x0, torch.tensor(1.0, dtype=F64), torch.full((6,), 1e-3, dtype=F64),
                 solver=ds.Heun(), steps=5)
    assert torch.equal(a.x, b.x)
    assert a.t.shape == (6,)
    with pytest.raises(ds.DifsolveError, match="t0"):
        ds.solve(ode, x0, torch.ones(5, dtype=F64), 1e-3, solver=ds.Heun(), steps=5)


@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
def test_progress_bar(vp, mode, capsys):
    _, field, x0 = vp
    ode = ds.ProbabilityFlowODE(field)
    kw = (dict(solver=ds.Heun(), steps=7) if mode == "fixed" else
          dict(solver=ds.Dopri5(), controller=ds.PIController(rtol=1e-4, atol=1e-4)))
    quiet = ds.solve(ode, x0, 1.0, 1e-3, **kw)
    sol = ds.solve(ode, x0, 1.0, 1e-3, progress=True, **kw)
    assert "solve" in capsys.readouterr().err
    assert torch.equal(sol.x, quiet.x)
