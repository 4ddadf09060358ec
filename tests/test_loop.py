"""The solve loop's strategies: a custom Controller, a custom NoiseSource, the LoopState."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import difsolve as ds
from difsolve.conditioning import RowCondition

F64 = torch.float64


class ConstantController:
    """A toy controller: accept every step, always propose ``span / n``."""

    max_steps = None

    def __init__(self, n: int):
        self.n = n

    def init(self, dynamics, solver, x, t, span, direction, solver_state):
        return direction * span / self.n, (), 0

    def adapt(self, state, proposal):
        accept = torch.ones_like(proposal.finite)
        fault = torch.full(proposal.finite.shape, -1, dtype=torch.long)
        return ds.Decision(accept=accept, h=proposal.h_proposed, state=(), fault=fault)


def test_custom_controller_with_constant_steps_equals_the_fixed_grid():
    mix = ds.GaussianMixture(torch.tensor([0.3, 0.7], dtype=F64),
                             torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=F64),
                             torch.full((2,), 0.1, dtype=F64))
    ode = ds.ProbabilityFlowODE(mix.score_field(ds.VP()))
    x0 = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    adaptive = ds.solve(ode, x0, 1.0, 1e-3, solver=ds.Dopri5(), controller=ConstantController(7))
    fixed = ds.solve(ode, x0, 1.0, 1e-3, solver=ds.Dopri5(), steps=7)
    torch.testing.assert_close(adaptive.x, fixed.x, rtol=1e-12, atol=1e-12)
    assert adaptive.stats.accepted.tolist() == [7] * 5
    assert isinstance(ConstantController(3), ds.Controller)


def test_a_controller_without_the_protocol_is_refused():
    ode = ds.ProbabilityFlowODE(ds.GaussianMixture(torch.ones(1), torch.zeros(1, 2),
                                                   torch.ones(1)).score_field(ds.EDM()))
    with pytest.raises(ds.ArgumentTypeError, match="Controller protocol"):
        ds.solve(ode, torch.zeros(2, 2), 1.0, 0.1, solver=ds.Dopri5(), controller=object())


class Replay:
    """A custom noise source: replays pre-drawn standard normals, scaled to the step."""

    def __init__(self, normals):
        self.normals, self.k = normals, 0

    def init(self, x, rows):
        return ()

    def propose(self, state, x, t, h, rows):
        z = self.normals[self.k]
        self.k += 1
        return h.abs().sqrt()[:, None] * z, None

    def commit(self, state, proposal, accept):
        return state


def test_custom_noise_source_replays_the_fresh_noise_increments():
    mix = ds.GaussianMixture(torch.ones(1, dtype=F64), torch.zeros(1, 2, dtype=F64),
                             torch.ones(1, dtype=F64))
    sde = ds.ReverseSDE(mix.score_field(ds.VP()))
    x0 = torch.randn(4, 2, dtype=F64)
    g = torch.Generator().manual_seed(3)
    normals = [torch.randn(4, 2, dtype=F64, generator=g) for _ in range(10)]
    replayed = ds.solve(sde, x0, 1.0, 1e-3, solver=ds.EulerMaruyama(), steps=10,
                        brownian=Replay(normals))
    fresh = ds.solve(sde, x0, 1.0, 1e-3, solver=ds.EulerMaruyama(), steps=10,
                     generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(replayed.x, fresh.x, rtol=0, atol=0)
    assert isinstance(Replay(normals), ds.NoiseSource)


def _state(n: int) -> ds.LoopState:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    long = lambda: torch.randint(0, 9, (n,), generator=g)  # noqa: E731
    return ds.LoopState(
        rows=torch.arange(n) * 2, x=r(n, 3, 2), t=r(n), h=r(n), end=r(n), direction=r(n).sign(),
        next_stop=long(), solver=(r(n, 3, 2), r(n)), controller=(r(n), long()),
        noise=(r(n, 4), r(n, 4, 3, 2)), cond=RowCondition.of({"label": long(), "w": 2.0}, n),
        steps=long(), accepted=long(), rejected=long(), nfe=long(), status=long(),
        done=r(n) > 0)


def test_loop_state_select_and_write_back_round_trip():
    s = _state(6)
    keep = torch.tensor([True, False, True, True, False, True])
    sub = s.select(keep)
    assert sub.rows.tolist() == [0, 4, 6, 10]
    assert torch.equal(sub.noise[1], s.noise[1][keep]) and torch.equal(sub.solver[0],
                                                                        s.solver[0][keep])
    assert torch.equal(sub.cond.values["label"], s.cond.values["label"][keep])
    assert sub.cond.values["w"] == 2.0
    out = {"x": torch.zeros(12, 3, 2), "t": torch.zeros(12), "status": torch.zeros(12).long()}
    sub.write_to(out)
    for name in out:
        assert torch.equal(out[name][sub.rows], getattr(sub, name))
        others = torch.ones(12, dtype=torch.bool)
        others[sub.rows] = False
        assert not out[name][others].any()
    # selecting by index gives the same as by mask, and every field is selected
    by_index = s.select(keep.nonzero().squeeze(1))
    for f in ("x", "t", "h", "end", "direction", "next_stop", "steps", "accepted", "rejected",
              "nfe", "status", "done"):
        assert torch.equal(getattr(by_index, f), getattr(sub, f)), f


class _Linear:
    noise = "additive"

    def drift(self, x, t):
        return -x * t[:, None]

    def diffusion(self, t):
        return torch.ones_like(t)


class _ODE:
    def drift(self, x, t):
        return -x * t[:, None]


@pytest.mark.parametrize("solver", [ds.Euler(), ds.Heun(), ds.RK4(), ds.Dopri5(),
                                    ds.EulerMaruyama(), ds.StochasticHeun()])
def test_solver_steps_compile_without_graph_breaks(solver):
    """``torch.compile(fullgraph=True)`` of one step: no host synchronisation, no Python branch
    on tensor values (the condition for CUDA graphs and compiled loops)."""
    dyn = _Linear() if solver.sde else _ODE()
    ctx = ds.solvers.StepContext()
    x, t, h = torch.randn(6, 2), torch.full((6,), 0.7), torch.full((6,), -0.05)
    dw = torch.randn(6, 2) * 0.2 if solver.sde else None
    state, _ = solver.init(dyn, x, t, ctx)

    def step(x, t, h, dw):
        return solver.step(dyn, x, t, h, state, dw, ctx).x

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, t, h, dw), step(x, t, h, dw))


# ----- the fast path's pieces --------------------------------------------------------------

class _PoisonedLinear:
    """``dx/dt = -x``, except that row 1 turns NaN once ``t < 0.5``."""

    def drift(self, x, t):
        out = -x
        bad = (t < 0.5) & (torch.arange(x.shape[0]) == 1)
        return torch.where(bad[:, None], torch.nan, out)


@pytest.mark.parametrize("host_check", [True, False])
def test_a_row_failing_late_keeps_its_last_checked_state(monkeypatch, host_check):
    """Rows are checked every CHECK_EVERY steps (on the CPU first by one sum, read on the host;
    on accelerators row by row): a row that fails after several clean checks is attributed
    exactly, keeps the state and time of its last clean check, and the others are untouched.
    Both checking paths give the same solution."""
    from difsolve import integrate

    start = integrate._LastGood.start

    def forced(x, t):
        return dataclasses.replace(start(x, t), host_check=host_check)

    monkeypatch.setattr(integrate._LastGood, "start", staticmethod(forced))
    x0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    n = 40
    sol = ds.solve(_PoisonedLinear(), x0, 1.0, 0.0, solver=ds.Euler(), steps=n)
    grid = torch.linspace(1.0, 0.0, n + 1, dtype=F64)
    first_bad = int((grid < 0.5).nonzero()[0])  # the step evaluated at t < 0.5 breaks row 1
    last_check = (first_bad // integrate.CHECK_EVERY) * integrate.CHECK_EVERY
    expect = torch.zeros(4, dtype=torch.long)
    expect[1] = ds.Status.NONFINITE.value
    assert torch.equal(sol.status, expect)
    assert int(sol.stats.steps[1]) == last_check
    assert float(sol.last_t[1]) == pytest.approx(float(grid[last_check]))
    clean = ds.solve(_PoisonedLinear(), x0[1:2], 1.0, float(grid[last_check]),
                     solver=ds.Euler(), steps=grid[:last_check + 1])
    torch.testing.assert_close(sol.last_x[1:2], clean.x, rtol=0, atol=1e-15)
    exact = x0 * (1.0 + 1.0 / n) ** n  # Euler backwards in time: x_{k+1} = (1 + 1/n) x_k
    torch.testing.assert_close(sol.x[[0, 2, 3]], exact[[0, 2, 3]], rtol=1e-13, atol=1e-13)
    assert bool(torch.isnan(sol.x[1]).all())
    for out in (sol.x, sol.t, sol.last_x, sol.last_t):  # owned tensors, not views of the grid
        out.mul_(1.0)


def test_masked_weights_equal_each_order_alone():
    """One masked Lagrange pass gives, row by row, the weights of that row's own order (the
    unused nodes are nodes at infinity), and the stacked corrector systems equal the
    order-by-order construction."""
    from difsolve.solvers.exponential import (
        kernel_moments,
        lagrange_weights,
        masked_lagrange_weights,
    )

    gen = torch.Generator().manual_seed(3)
    batch, k = 9, 4
    h = 0.1 + 2.5 * torch.rand(batch, generator=gen, dtype=F64)
    nodes = torch.cat([torch.zeros(batch, 1, dtype=F64),
                       -torch.rand(batch, k - 1, generator=gen, dtype=F64).cumsum(1) - 0.05], 1)
    order = torch.randint(1, k + 1, (batch,), generator=gen)
    used = torch.arange(k)[None, :] < order[:, None]
    moments = kernel_moments(h, k).T
    got = masked_lagrange_weights(nodes, used, moments)
    for r in range(batch):
        o = int(order[r])
        alone = lagrange_weights([nodes[r:r + 1, j] for j in range(o)], moments[r:r + 1, :o])
        torch.testing.assert_close(got[r, :o], alone[0], rtol=1e-12, atol=1e-14)
        assert bool((got[r, o:] == 0).all())
    for solver in (ds.DPMSolver(3, corrector=True), ds.UniPC(3, "bh1"), ds.UniPC(2, "bh2"),
                   ds.DPMSolver(3, "midpoint")):
        past = [nodes[:, j] for j in range(1, solver.predictor_order)]
        cap = solver.predictor_order
        now = torch.clamp(order, max=cap)
        full = torch.full_like(order, cap)  # every row at the full order: the pass without masks
        for now in (torch.clamp(order, max=cap), full):
            pred, corr = solver._weights(h, past, now, cap)
            ref_pred, ref_corr = solver._weights_by_order(h, past, now, cap)
            torch.testing.assert_close(pred, ref_pred, rtol=1e-12, atol=1e-13)
            if corr is not None:
                torch.testing.assert_close(corr, ref_corr, rtol=1e-12, atol=1e-13)


def test_row_selection_and_finiteness_shortcuts():
    """On the CPU a uniform mask returns one side without a pass and a finite sum clears every
    row; a mixed mask or a non-finite row (also one hidden by an overflowing sum) goes row by
    row, and an unselected NaN row never leaks."""
    from difsolve._tensor import where_rows
    from difsolve.integrate import _finite_rows

    new = (torch.tensor([[1.0, 2.0], [math.nan, 4.0]]), torch.tensor([1.0, 2.0]))
    old = (torch.zeros(2, 2), torch.zeros(2))
    assert all(a is b for a, b in zip(where_rows(torch.tensor([True, True]), new, old), new))
    assert all(a is b for a, b in zip(where_rows(torch.tensor([False, False]), new, old), old))
    x, t = where_rows(torch.tensor([True, False]), new, old)
    assert torch.equal(x, torch.tensor([[1.0, 2.0], [0.0, 0.0]]))
    assert torch.equal(t, torch.tensor([1.0, 0.0]))
    ok, every = _finite_rows(torch.ones(3, 2), torch.zeros(3, 2))
    assert every and bool(ok.all())
    big = torch.finfo(torch.float32).max
    for bad, expect in ((torch.tensor([[1.0, math.inf], [1.0, 1.0], [2.0, 2.0]]), [0, 1, 1]),
                        (torch.tensor([[big, big], [big, big], [1.0, 1.0]]), [1, 1, 1])):
        ok, every = _finite_rows(bad, None)
        assert not every and ok.tolist() == [bool(e) for e in expect]


def test_shared_values_broadcast_as_scalars():
    """A value shared by the batch and stored once (a stride-0 column of a shared grid) becomes a
    0-d view; a per-row tensor a broadcastable view; both give the same products."""
    from difsolve._tensor import bcast

    x = torch.randn(5, 3, 2)
    shared = torch.tensor(0.25).expand(5)
    rows = torch.full((5,), 0.25)
    assert bcast(shared, x).ndim == 0 and bcast(rows, x).shape == (5, 1, 1)
    assert torch.equal(bcast(shared, x) * x, bcast(rows, x) * x)


@pytest.mark.parametrize("solver", [ds.DPMSolver(3, corrector=True), ds.UniPC(2), ds.DEIS(3),
                                    ds.IPNDM(4)])
def test_multistep_steps_compile_without_graph_breaks(solver):
    """The multistep family's per-row step (weights of every row's order in one pass, in log-sigma
    time under a controller's per-row steps) compiles as one graph, after its warm-up step."""
    proc = ds.EDM()
    mix = ds.GaussianMixture([0.4, 0.6], [[-1.0, 0.0], [1.0, 0.5]], [0.3, 0.2])
    ode = ds.dynamics.LogSigmaTime(ds.ProbabilityFlowODE(mix.score_field(proc)))
    ctx = ds.solvers.StepContext()
    x, u = torch.randn(6, 2, generator=torch.Generator().manual_seed(0)), torch.full((6,), 1.0)
    h = torch.linspace(-0.2, -0.4, 6)
    state, _ = solver.init(ode, x, u, ctx)
    first = solver.step(ode, x, u, h, state, None, ctx)
    x, u, state = first.x, u + h, first.state

    def step(x, u, h):
        return solver.step(ode, x, u, h, state, None, ctx).x

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, u, h), step(x, u, h))


def test_controller_decides_the_same_when_told_every_row_is_finite():
    """``Proposal.every_finite`` only lets the PI controller skip work: with every row finite its
    decision (accept, next step, state, faults) is the same as without the hint."""
    gen = torch.Generator().manual_seed(4)
    ctrl = ds.PIController(rtol=1e-3, atol=1e-3)
    batch = 6
    x = torch.randn(batch, 2, generator=gen, dtype=F64)
    error = 2e-3 * torch.randn(batch, 2, generator=gen, dtype=F64)
    state = (torch.log(torch.rand(batch, generator=gen, dtype=F64)),
             torch.zeros(batch, dtype=torch.long), torch.zeros(batch, dtype=torch.bool))
    h = torch.full((batch,), -0.1, dtype=F64)
    fields = dict(x=x, x_new=x + 0.01, error=error, h_proposed=h, h_tried=h,
                  t_new=torch.full((batch,), 0.5, dtype=F64), left=torch.full((batch,), 0.5,
                                                                                dtype=F64),
                  finite=torch.ones(batch, dtype=torch.bool), error_order=3.0)
    plain = ctrl.adapt(state, ds.Proposal(**fields))
    hinted = ctrl.adapt(state, ds.Proposal(**fields, every_finite=True))
    assert 0 < int(plain.accept.sum()) < batch  # both outcomes occur
    assert plain.fault is None and hinted.fault is None  # no row faulted
    for a, b in zip((plain.accept, plain.h, *plain.state), (hinted.accept, hinted.h, *hinted.state)):
        assert torch.equal(a, b)
