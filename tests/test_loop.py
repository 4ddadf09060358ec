"""The solve loop's strategies: a custom Controller, a custom NoiseSource, the LoopState."""

from __future__ import annotations

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
