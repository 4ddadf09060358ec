"""Per-sample adaptive step control (issue 4): batch independence, faults, active rows, the
Brownian bridge for rejected SDE steps, and unbiased adaptive SDE sampling."""

from __future__ import annotations

import math

import pytest
import torch

import difsolve as ds
from difsolve.noise import BridgedNoise
from difsolve.problems import GaussianFlow


class StiffRelaxation:
    """``dx/dt = -k (x - cos t)`` with a per-row rate ``k`` carried in the state (column 1)."""

    def drift(self, y, t):
        x, k = y[:, :1], y[:, 1:]
        return torch.cat([-k * (x - torch.cos(t)[:, None]), torch.zeros_like(k)], dim=1)

    @staticmethod
    def exact(x0, k, t):
        # x(t) = e^{-kt} (x0 - c0) + k (k cos t + sin t) / (k^2 + 1) with c0 = k^2 / (k^2 + 1)
        c0 = k**2 / (k**2 + 1)
        return torch.exp(-k * t) * (x0 - c0) + k * (k * math.cos(t) + math.sin(t)) / (k**2 + 1)


def _state(x0, k):
    return torch.stack([x0, k], dim=1)


@pytest.mark.parametrize("solver, tol", [(ds.Dopri5(), 1e-6), (ds.Bosh3(), 1e-6), (ds.Heun(), 1e-4)],
                         ids=["Dopri5", "Bosh3", "Heun"])
def test_stiff_sample_leaves_easy_samples_alone(device, solver, tol):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(16, generator=gen, dtype=torch.float64).to(device)
    easy = _state(x0, torch.full_like(x0, 1.0))
    ctrl = ds.PIController(rtol=tol, atol=tol)
    alone = ds.solve(StiffRelaxation(), easy, 0.0, 3.0, solver=solver, controller=ctrl)
    mixed_y0 = torch.cat([easy, _state(torch.tensor([0.5], device=device, dtype=torch.float64),
                                       torch.tensor([300.0], device=device,
                                                    dtype=torch.float64))])
    mixed = ds.solve(StiffRelaxation(), mixed_y0, 0.0, 3.0, solver=solver, controller=ctrl)
    assert mixed.success and alone.success
    easy_steps, hard_steps = mixed.stats.steps[:16], mixed.stats.steps[16]
    assert hard_steps > 3 * easy_steps.max()  # the stiff sample really is harder
    rel = (easy_steps.double() - alone.stats.steps.double()).abs() / alone.stats.steps.double()
    assert rel.max() <= 0.10
    # per-sample: the easy samples' results do not change at all
    torch.testing.assert_close(mixed.x[:16], alone.x, rtol=0, atol=1e-12)
    # every sample, the stiff one included, meets its tolerance against the exact solution
    exact = StiffRelaxation.exact(mixed_y0[:, 0], mixed_y0[:, 1], 3.0)
    err = (mixed.x[:, 0] - exact).abs()
    assert err.max() < 200 * tol, err.max()
    # finished samples stop costing field evaluations
    assert mixed.stats.nfe_per_sample[:16].max() < mixed.stats.nfe_per_sample[16]
    assert mixed.stats.nfe == int(mixed.stats.nfe_per_sample.max())


def test_active_rows_only_are_evaluated():
    rows_seen = []

    class Counting(StiffRelaxation):
        def drift(self, y, t):
            rows_seen.append(y.shape[0])
            return super().drift(y, t)

    y0 = torch.cat([_state(torch.zeros(31, dtype=torch.float64), torch.ones(31, dtype=torch.float64)),
                    _state(torch.zeros(1, dtype=torch.float64), torch.full((1,), 500.0,
                                                                             dtype=torch.float64))])
    sol = ds.solve(Counting(), y0, 0.0, 2.0, solver=ds.Dopri5(),
                   controller=ds.PIController(rtol=1e-5, atol=1e-5))
    assert sol.success
    assert min(rows_seen) == 1  # the stiff row finished its steps alone
    # total row-evaluations match the per-sample counters exactly
    assert sum(rows_seen) == int(sol.stats.nfe_per_sample.sum())
    assert sum(rows_seen) < 0.25 * 32 * sol.stats.nfe


def test_accept_reject_counters_add_up(device):
    flow = GaussianFlow([0.3, -0.2], [[0.3, 0.1], [0.1, 0.05]], ds.EDM())
    x = flow.sample(64, 80.0, torch.Generator().manual_seed(1), device=device)
    sol = ds.solve(ds.ProbabilityFlowODE(flow.field), x, 80.0, 0.002, solver=ds.Dopri5(),
                   controller=ds.PIController(rtol=1e-6, atol=1e-6))
    st = sol.stats
    assert torch.equal(st.steps, st.accepted + st.rejected)
    # Dopri5 (FSAL): f(x0) once (shared with Hairer's first-step estimate), Hairer's probe,
    # then 6 per attempted step
    assert torch.equal(st.nfe_per_sample, 2 + 6 * st.steps)
    err = (sol.x - flow.flow(x, 80.0, 0.002)).abs().max()
    assert err < 1e-4


@pytest.mark.parametrize("time_variable", ["t", "log_sigma", "snr"])
def test_adaptive_meets_tolerance_on_closed_form_flow(time_variable):
    rot = torch.tensor([[0.8, -0.6], [0.6, 0.8]], dtype=torch.float64)
    cov = rot @ torch.diag(torch.tensor([0.5, 0.01], dtype=torch.float64)) @ rot.T
    for process in (ds.VP(), ds.VE(), ds.EDM()):
        flow = GaussianFlow([1.0, -0.5], cov, process)
        x = flow.sample(128, process.t_max, torch.Generator().manual_seed(2))
        exact = flow.flow(x, process.t_max, process.t_min)
        errs = []
        for tol in (1e-4, 1e-7):
            sol = ds.solve(ds.ProbabilityFlowODE(flow.field), x, process.t_max, process.t_min,
                           solver=ds.Dopri5(), controller=ds.PIController(rtol=tol, atol=tol),
                           time_variable=time_variable)
            assert sol.success
            torch.testing.assert_close(sol.t, torch.full_like(sol.t, process.t_min))
            errs.append(float((sol.x - exact).abs().max()))
        assert errs[1] < 1e-4 and errs[1] < errs[0] / 30, (process, errs)


def test_save_at_under_controller():
    flow = GaussianFlow([0.5, 0.5], [[0.2, 0.0], [0.0, 0.1]], ds.VP())
    x = flow.sample(8, 1.0, torch.Generator().manual_seed(3))
    ts = torch.tensor([1.0, 0.5, 0.1, 0.001], dtype=torch.float64)
    for tv in ("t", "snr"):
        sol = ds.solve(ds.ProbabilityFlowODE(flow.field), x, 1.0, 1e-3, solver=ds.Dopri5(),
                       controller=ds.PIController(rtol=1e-8, atol=1e-8), save_at=ts,
                       time_variable=tv)
        assert sol.xs.shape == (4, 8, 2)
        for j, t in enumerate(ts.tolist()):
            torch.testing.assert_close(sol.xs[j], flow.flow(x, 1.0, t), rtol=1e-5, atol=1e-6)


# ----- faults --------------------------------------------------------------------------------


class NaNRow:
    """A field that returns NaN for row 2 (a broken sample) and a smooth score elsewhere."""

    exact_score = True

    def __init__(self, process, bad_value):
        self.process, self.bad_value = process, bad_value

    def __call__(self, x, t):
        s = -x / (1.0 + self.process.sigma(t)[:, None] ** 2)
        bad = (x[:, :1] - self.bad_value).abs() < 1e-9
        return torch.where(bad, torch.full_like(s, math.nan), s)


@pytest.mark.parametrize("solver, kw", [
    (ds.Dopri5(), {"controller": ds.PIController(rtol=1e-5, atol=1e-5)}),
    (ds.Heun(), {"steps": 20}),
])
def test_nonfinite_sample_stops_alone(solver, kw):
    x = torch.linspace(-1, 1, 5, dtype=torch.float64)[:, None].repeat(1, 2)
    field = NaNRow(ds.EDM(), bad_value=float(x[2, 0]))
    sol = ds.solve(ds.ProbabilityFlowODE(field), x, 80.0, 0.002, solver=solver, **kw)
    expected = [ds.Status.SUCCESS] * 5
    expected[2] = ds.Status.NONFINITE
    assert sol.status.tolist() == [int(s) for s in expected]
    # the failed row holds NaN, its last finite state and time are kept
    assert bool(torch.isnan(sol.x[2]).all()) and bool(torch.isfinite(sol.x[[0, 1, 3, 4]]).all())
    assert bool(torch.isfinite(sol.last_x).all())
    assert torch.equal(sol.last_x[[0, 1, 3, 4]], sol.x[[0, 1, 3, 4]])
    torch.testing.assert_close(sol.t[[0, 1, 3, 4]], torch.full((4,), 0.002, dtype=torch.float64))


class BlowUp:
    """``dx/dt = x^2``: the solution ``1/(1 - t)`` blows up at ``t = 1``."""

    def drift(self, x, t):
        return x.square()


def test_max_steps_and_dt_underflow_end_the_solve():
    x = torch.ones(3, 1, dtype=torch.float64)
    capped = ds.solve(BlowUp(), x, 0.0, 2.0, solver=ds.Dopri5(),
                      controller=ds.PIController(rtol=1e-6, atol=1e-6), max_steps=25)
    assert capped.status.tolist() == [int(ds.Status.MAX_STEPS)] * 3
    assert int(capped.stats.steps.max()) == 25
    floored = ds.solve(BlowUp(), x, 0.0, 2.0, solver=ds.Dopri5(),
                       controller=ds.PIController(rtol=1e-6, atol=1e-6, dt_min=1e-4))
    assert floored.status.tolist() == [int(ds.Status.DT_UNDERFLOW)] * 3
    assert (floored.t < 1.0).all() and (floored.t > 0.99).all()
    free = ds.solve(BlowUp(), x, 0.0, 2.0, solver=ds.Dopri5(),
                    controller=ds.PIController(rtol=1e-6, atol=1e-6))
    assert set(free.status.tolist()) <= {int(ds.Status.DT_UNDERFLOW), int(ds.Status.NONFINITE),
                                         int(ds.Status.MAX_STEPS)}
    assert not free.success


# ----- the Brownian bridge for rejected steps ------------------------------------------------


def _adversarial_walk(noise: BridgedNoise, n: int, horizon: float, seed: int):
    """Propose steps and reject exactly the ones whose increment is large (the worst case: the
    decision depends on the noise). Returns the accepted path's value at ``horizon``."""
    torch.manual_seed(seed)
    x = torch.zeros(n, 1, dtype=torch.float64)
    state = noise.init(x)
    t = torch.zeros(n, dtype=torch.float64)
    w = torch.zeros_like(x)
    h = torch.full((n,), 0.25, dtype=torch.float64)
    for _ in range(1000):
        h_try = torch.minimum(h, horizon - t)
        dw, proposal = noise.propose(state, x, t, h_try)
        accept = (dw.abs()[:, 0] <= 1.0 * h_try.sqrt()) | (h_try < 0.01)
        accept &= t < horizon
        state = noise.commit(state, proposal, accept)
        w = torch.where(accept[:, None], w + dw, w)
        t = torch.where(accept, t + h_try, t)
        h = torch.where(accept, torch.full_like(h, 0.25), h_try * 0.5)
        if bool((t >= horizon).all()):
            break
    assert bool((t >= horizon).all())
    return w[:, 0]


def test_bridged_noise_keeps_brownian_law_under_adversarial_rejection():
    n, horizon = 20000, 1.0
    w = _adversarial_walk(BridgedNoise(torch.Generator().manual_seed(5)), n, horizon, 0)
    var, se = float(w.var()), math.sqrt(2.0 / n) * horizon
    assert abs(var - horizon) < 4 * se, var
    assert abs(float(w.mean())) < 4 * math.sqrt(horizon / n)
    kurt = float((w**4).mean() / w.var() ** 2)
    assert abs(kurt - 3.0) < 0.15
    # without memory the same rejection rule biases the path (too small increments survive)
    w0 = _adversarial_walk(BridgedNoise(torch.Generator().manual_seed(5), depth=0), n, horizon, 0)
    assert float(w0.var()) < horizon - 10 * se


def test_bridge_increments_add_up():
    noise = BridgedNoise(torch.Generator().manual_seed(0))
    x = torch.zeros(4, 3, dtype=torch.float64)
    state = noise.init(x)
    h = torch.full((4,), 1.0, dtype=torch.float64)
    t = torch.zeros(4, dtype=torch.float64)
    dw, proposal = noise.propose(state, x, t, h)
    state = noise.commit(state, proposal, torch.zeros(4, dtype=torch.bool))
    # retry the same interval in three accepted pieces: they sum to the rejected increment
    total = torch.zeros_like(x)
    for piece in (0.3, 0.5, 0.2):
        d, proposal = noise.propose(state, x, t, torch.full((4,), piece, dtype=torch.float64))
        state = noise.commit(state, proposal, torch.ones(4, dtype=torch.bool))
        total += d
    torch.testing.assert_close(total, dw)
    assert float(state[0].abs().max()) < 1e-12  # nothing left of the known future


# ----- adaptive SDE sampling: unbiased against exact samples --------------------------------


def _ring(weights):
    k = len(weights)
    ang = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    means = 2.0 * torch.stack([ang.cos(), ang.sin()], 1)
    return ds.GaussianMixture(torch.tensor(weights, dtype=torch.float64), means,
                              torch.full((k,), 0.15**2, dtype=torch.float64))


def _mode_stats(gm, x):
    comp = gm.component(x)
    frac = torch.bincount(comp, minlength=gm.n_components).double() / x.shape[0]
    dev = x - gm.means[comp]
    width = torch.stack([dev[comp == k].square().mean().sqrt() for k in range(gm.n_components)])
    return frac, width


def test_adaptive_sde_sampling_is_unbiased():
    weights = [0.4, 0.1, 0.2, 0.3]
    gm = _ring(weights)
    process = ds.VP()
    n = 12000
    gen = torch.Generator().manual_seed(11)
    sol = ds.sample(gm.score_field(process), (n, 2), solver=ds.StochasticHeun(),
                    controller=ds.PIController(rtol=0.02, atol=0.01), generator=gen,
                    denoise=False, dtype=torch.float64)
    assert sol.success
    assert float(sol.stats.rejected.sum()) > 0.05 * float(sol.stats.steps.sum())  # it does reject
    # exact samples of p_{t_min}
    a, b = process.marginal(torch.tensor(process.t_min, dtype=torch.float64))
    exact = a * gm.sample(n, torch.Generator().manual_seed(12)) + b * torch.randn(
        n, 2, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    frac, width = _mode_stats(gm, sol.x)
    frac_e, width_e = _mode_stats(gm, exact)
    se = torch.sqrt(torch.tensor(weights) * (1 - torch.tensor(weights)) / n).double()
    assert ((frac - frac_e).abs() < 4 * math.sqrt(2) * se).all(), (frac, frac_e)
    assert ((width - width_e).abs() / width_e < 0.05).all(), (width, width_e)


# ----- DPM-Solver++ with the free corrector: order + 1, embedded error, 1 NFE per step ---------


def _rotated_flow(process):
    rot = torch.tensor([[0.6, -0.8], [0.8, 0.6]], dtype=torch.float64)
    cov = rot @ torch.diag(torch.tensor([0.3, 0.02], dtype=torch.float64)) @ rot.T
    return GaussianFlow([0.5, -1.0], cov, process)


@pytest.mark.parametrize("order", [1, 2])
def test_dpm_solver_corrector_raises_the_order(order):
    process = ds.EDM()
    flow = _rotated_flow(process)
    x = flow.sample(32, 80.0, torch.Generator().manual_seed(4))
    exact = flow.flow(x, 80.0, 0.002)
    dyn = ds.ProbabilityFlowODE(flow.field)
    steps = (16, 32, 64, 128)
    for corrector, expected in ((False, order), (True, order + 1)):
        errs = []
        for n in steps:
            sol = ds.solve(dyn, x, 80.0, 0.002, solver=ds.DPMSolver(order, corrector=corrector),
                           steps=n, schedule="logsnr")
            assert sol.stats.nfe == n + int(corrector)  # one evaluation per step
            errs.append(float((sol.x - exact).square().mean().sqrt()))
        slope = -torch.linalg.lstsq(
            torch.stack([torch.log(torch.tensor(steps, dtype=torch.float64)),
                         torch.ones(4, dtype=torch.float64)], 1),
            torch.log(torch.tensor(errs, dtype=torch.float64))[:, None]).solution[0, 0]
        assert abs(float(slope) - expected) < 0.25, (corrector, errs)


def test_adaptive_dpm_solver_one_evaluation_per_attempt(device):
    process = ds.VP()
    flow = _rotated_flow(process)
    x = flow.sample(64, 1.0, torch.Generator().manual_seed(5), device=device)
    exact = flow.flow(x, 1.0, 1e-3)
    dyn = ds.ProbabilityFlowODE(flow.field)
    errs = []
    for tol in (1e-3, 1e-6):
        sol = ds.solve(dyn, x, 1.0, 1e-3, solver=ds.DPMSolver(3, corrector=True),
                       controller=ds.PIController(rtol=tol, atol=tol), time_variable="log_sigma")
        assert sol.success
        st = sol.stats
        # the initial evaluation + one per attempted step, rejected ones included (the first
        # step, 1 in log sigma, costs no estimate)
        assert torch.equal(st.nfe_per_sample, 1 + st.steps)
        errs.append(float((sol.x - exact).abs().max()))
    assert errs[1] < 1e-5 and errs[1] < errs[0] / 50, errs


def test_dpm_solver_refuses_snr_coordinates_and_sde():
    field = _rotated_flow(ds.EDM()).field
    x = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ds.IncompatibleError, match="time_variable"):
        ds.solve(ds.ProbabilityFlowODE(field), x, 80.0, 0.002, solver=ds.DPMSolver(2),
                 steps=4, time_variable="snr")
    with pytest.raises(ds.DifsolveError, match="order"):
        ds.DPMSolver(5)
