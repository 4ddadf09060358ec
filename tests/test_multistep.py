"""The multistep exponential integrators (DPM-Solver++, UniPC, DEIS, iPNDM): agreement with the
peer implementations of the same algorithms given identical inputs, observed orders from pure noise
and from a middle time, robustness (zero-length steps, bfloat16) and argument checks.

Peers: diffusers' multistep schedulers driven on an explicit sigma grid (benchmarks/
_lownfe_peers.py; DPMSolverMultistepScheduler rounds the state to float32 inside its step, so it
is compared at float32 round-off), k-diffusion's ``sample_dpmpp_2m``, and a transcription of the
AMED iPNDM loop written here.
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import pytest
import torch

import difsolve as ds

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from _lownfe_peers import diffusers_sample, kdiffusion_sample
from _peers import load_k_diffusion_sampling

F64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' numpy calls


def _ring() -> ds.GaussianMixture:
    ang = torch.arange(8, dtype=F64) * (2 * math.pi / 8)
    means = 4.0 * torch.stack([ang.cos(), ang.sin()], 1)
    return ds.GaussianMixture(torch.full((8,), 1 / 8, dtype=F64), means,
                              torch.full((8,), 0.09, dtype=F64))


@pytest.fixture(scope="module")
def edm_problem():
    proc = ds.EDM()
    ode = ds.ProbabilityFlowODE(_ring().score_field(proc))
    x = proc.prior_sample((16, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
    return proc, ode, x


def _karras(proc, n):
    t0, t1 = torch.full((1,), proc.t_max, dtype=F64), torch.full((1,), proc.t_min, dtype=F64)
    return ds.control.make_grid("karras", n, t0, t1, proc)[:, 0]


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


DIFFUSERS_CASES = [
    # (scheduler, config, our solver, relative tolerance)
    ("DEISMultistepScheduler", dict(solver_order=1), ds.DEIS(1), 1e-12),
    ("DEISMultistepScheduler", dict(solver_order=2), ds.DEIS(2), 1e-12),
    ("DEISMultistepScheduler", dict(solver_order=3), ds.DEIS(3), 1e-12),
    ("DEISMultistepScheduler", dict(solver_order=3, lower_order_final=True),
     ds.DEIS(3, lower_order_final=True), 1e-12),
    ("UniPCMultistepScheduler", dict(solver_order=1, solver_type="bh2"), ds.UniPC(1), 1e-12),
    ("UniPCMultistepScheduler", dict(solver_order=2, solver_type="bh1"), ds.UniPC(2, "bh1"),
     1e-12),
    ("UniPCMultistepScheduler", dict(solver_order=2, solver_type="bh2"), ds.UniPC(2, "bh2"),
     1e-12),
    ("UniPCMultistepScheduler", dict(solver_order=3, solver_type="bh1"), ds.UniPC(3, "bh1"),
     1e-12),
    ("UniPCMultistepScheduler", dict(solver_order=3, solver_type="bh2", lower_order_final=True),
     ds.UniPC(3, "bh2", lower_order_final=True), 1e-12),
    ("UniPCMultistepScheduler", dict(solver_order=4, solver_type="bh2"), ds.UniPC(4), 1e-12),
    ("DPMSolverMultistepScheduler", dict(solver_order=2, solver_type="midpoint"),
     ds.DPMSolver(2), 1e-6),
    ("DPMSolverMultistepScheduler", dict(solver_order=2, solver_type="heun"),
     ds.DPMSolver(2, "heun"), 1e-6),
    ("DPMSolverMultistepScheduler", dict(solver_order=3), ds.DPMSolver(3, "midpoint"), 1e-6),
]


@pytest.mark.parametrize("name,config,solver,tol", DIFFUSERS_CASES,
                         ids=[f"{c[0][:4]}-{c[2]!r}" for c in DIFFUSERS_CASES])
def test_matches_diffusers_on_the_same_grid(edm_problem, name, config, solver, tol):
    proc, ode, x = edm_problem
    # diffusers lowers the final orders of DEIS and DPM-Solver++ only below 15 steps
    short_only = config.get("lower_order_final") and name != "UniPCMultistepScheduler"
    for n in (7,) if short_only else (7, 20):
        grid = _karras(proc, n)
        ref, nfe = diffusers_sample(name, grid, x, ode.denoise, **config)
        sol = ds.solve(ode, x, proc.t_max, proc.t_min, solver=solver, steps=grid)
        assert _rel(sol.x, ref) < tol, (n, _rel(sol.x, ref))
        assert sol.stats.nfe == nfe == n == solver.nfe(n)


def test_variants_differ_where_they_should(edm_problem):
    """The comparisons above can fail: the two 2M variants and the two 3M forms disagree far
    beyond the tolerances."""
    proc, ode, x = edm_problem
    grid = _karras(proc, 10)
    run = [ds.solve(ode, x, 80.0, 0.002, solver=s, steps=grid).x
           for s in (ds.DPMSolver(2), ds.DPMSolver(2, "heun"), ds.DPMSolver(3),
                     ds.DPMSolver(3, "midpoint"), ds.UniPC(2, "bh1"), ds.UniPC(2, "bh2"))]
    for a, b in ((0, 1), (2, 3), (4, 5)):
        assert _rel(run[a], run[b]) > 1e-4


def test_dpmpp_2m_matches_k_diffusion_float64(edm_problem):
    proc, ode, x = edm_problem
    kd = load_k_diffusion_sampling()
    grid = _karras(proc, 15)
    ref, nfe = kdiffusion_sample(kd.sample_dpmpp_2m, grid, x, ode.denoise)
    sol = ds.solve(ode, x, 80.0, 0.002, solver=ds.DPMSolver(2), steps=grid)
    assert _rel(sol.x, ref) < 1e-12 and sol.stats.nfe == nfe


def _ipndm_reference(denoise, x, sigmas, max_order=4):
    """The iPNDM loop of Zhou et al. (AMED, 2024) on the EDM ODE, transcribed."""
    buffer = []
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - denoise(x, s.expand(x.shape[0]))) / s
        order = min(max_order, i + 1)
        if order == 1:
            x = x + (s_next - s) * d
        elif order == 2:
            x = x + (s_next - s) * (3 * d - buffer[-1]) / 2
        elif order == 3:
            x = x + (s_next - s) * (23 * d - 16 * buffer[-1] + 5 * buffer[-2]) / 12
        else:
            x = x + (s_next - s) * (55 * d - 59 * buffer[-1] + 37 * buffer[-2]
                                    - 9 * buffer[-3]) / 24
        buffer = ([*buffer, d])[-3:]
    return x


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_ipndm_matches_the_published_loop(edm_problem, order):
    proc, ode, x = edm_problem
    grid = _karras(proc, 12)
    ref = _ipndm_reference(ode.denoise, x, grid, order)
    sol = ds.solve(ode, x, 80.0, 0.002, solver=ds.IPNDM(order), steps=grid)
    assert _rel(sol.x, ref) < 1e-12 and sol.stats.nfe == 12


# ----- observed orders ------------------------------------------------------------------------

MIX = ds.GaussianMixture([0.3, 0.7], [[-1.0, 0.5], [1.0, -0.2]], [0.05, 0.2])


@functools.cache
def _start_and_reference(name, t0, t1):
    proc = {"EDM": ds.EDM, "VP": ds.VP}[name]()
    ode = ds.ProbabilityFlowODE(MIX.score_field(proc))
    g = torch.Generator().manual_seed(3)
    if name == "EDM":  # from pure noise
        x0 = proc.prior_sample((16, 2), generator=g, dtype=F64)
    else:  # from the noised data at a middle time
        a, b = proc.marginal(torch.tensor([t0], dtype=F64))
        x0 = a * MIX.sample(16, generator=g).to(F64) + b * torch.randn(16, 2, generator=g,
                                                                         dtype=F64)
    ref = ds.solve(ode, x0, t0, t1, solver=ds.Dopri5(), time_variable="snr",
                   controller=ds.PIController(rtol=1e-12, atol=1e-12)).x
    return ode, x0, ref


def _order(name, t0, t1, solver, steps):
    ode, x0, ref = _start_and_reference(name, t0, t1)
    errs = [float((ds.solve(ode, x0, t0, t1, solver=solver, steps=n, schedule="logsnr").x
                   - ref).square().sum(-1).mean().sqrt()) for n in steps]
    ls = torch.log(torch.tensor(steps, dtype=F64))
    fit = torch.linalg.lstsq(torch.stack([ls, torch.ones_like(ls)], 1),
                             torch.log(torch.tensor(errs, dtype=F64))[:, None]).solution
    return -float(fit[0, 0]), errs


SS = dict(start="singlestep")
ORDER_CASES = [
    # (solver, order from pure noise (EDM 80 -> 0.002), order from VP t = 0.3 -> 0.02)
    (ds.DPMSolver(2), 2, 2),
    (ds.DPMSolver(2, "heun"), 2, 2),
    (ds.DPMSolver(3, **SS), 3, 3),
    (ds.DPMSolver(4, **SS), 3.6, 4),
    (ds.UniPC(1), 2, 2),
    (ds.UniPC(2), 3, 3),
    (ds.UniPC(2, "bh1"), 3, 3),
    (ds.UniPC(3, **SS), 3.8, 4),
    (ds.DEIS(2), 2, 2),
    (ds.DEIS(3, **SS), 2.8, 3),
    (ds.IPNDM(4), 2, 2),
]


@pytest.mark.parametrize("solver,from_noise,from_middle", ORDER_CASES,
                         ids=[repr(c[0]) for c in ORDER_CASES])
def test_observed_orders(solver, from_noise, from_middle):
    """Full order from any start (with the single-step start for orders above the warm-up's
    reach). From pure noise the EDM studies of the higher orders are pre-asymptotic at these step
    counts (measured 3.5-3.8 for the order-4 methods, 2.5-2.9 for DEIS 3); iPNDM's fixed-step
    coefficients make it second order on a non-uniform grid."""
    o1, e1 = _order("EDM", 80.0, 0.002, solver, (32, 64, 128, 256))
    o2, e2 = _order("VP", 0.3, 0.02, solver, (32, 64, 128, 256))
    assert abs(o1 - from_noise) <= 0.35, (o1, e1)
    assert abs(o2 - from_middle) <= 0.3, (o2, e2)


def test_published_warm_up_loses_order_from_a_middle_time():
    """Why ``start="singlestep"`` exists: the lower-order warm-up caps DPM-Solver++(3) at order 2
    from a middle time, and the single-step start restores 3 for one more evaluation."""
    o_ms, _ = _order("VP", 0.3, 0.02, ds.DPMSolver(3), (32, 64, 128, 256))
    o_ss, _ = _order("VP", 0.3, 0.02, ds.DPMSolver(3, start="singlestep"), (32, 64, 128, 256))
    assert abs(o_ms - 2) <= 0.3 and abs(o_ss - 3) <= 0.3


@pytest.mark.parametrize("solver", [ds.DPMSolver(3, start="singlestep"),
                                    ds.UniPC(3, start="singlestep"), ds.DPMSolver(2, corrector=True)])
def test_nfe_formula(edm_problem, solver):
    _proc, ode, x = edm_problem
    sol = ds.solve(ode, x, 80.0, 0.002, solver=solver, steps=9, schedule="karras")
    assert sol.stats.nfe == solver.nfe(9)


# ----- robustness -------------------------------------------------------------------------------

@pytest.mark.parametrize("solver", [ds.DPMSolver(3), ds.UniPC(3), ds.DEIS(3), ds.IPNDM(4),
                                    ds.DPMSolver(3, start="singlestep")])
def test_zero_length_rows_stay_and_others_are_unaffected(edm_problem, solver):
    _proc, ode, x = edm_problem
    t1 = torch.full((16,), 0.002, dtype=F64)
    t1[3] = 80.0  # this row's grid has only zero-length steps
    sol = ds.solve(ode, x, 80.0, t1, solver=solver, steps=12, schedule="karras")
    keep = torch.arange(16) != 3
    alone = ds.solve(ode, x[keep], 80.0, 0.002, solver=solver, steps=12, schedule="karras")
    assert torch.equal(sol.x[3], x[3]) and bool(torch.isfinite(sol.x).all())
    torch.testing.assert_close(sol.x[keep], alone.x, rtol=1e-13, atol=1e-13)


def test_zero_step_in_the_middle_keeps_the_history(edm_problem):
    """A row whose grid repeats a time stays there for that step and continues as if the
    repeated point were not there."""
    proc, ode, x = edm_problem
    solver = ds.DPMSolver(3)
    grid = _karras(proc, 10)
    ctx = ds.solvers.StepContext()
    state, _ = solver.init(ode, x, grid[0].expand(16), ctx)
    xa, sa = x, state
    xb, sb = x, state
    for i in range(10):
        t, h = grid[i].expand(16), (grid[i + 1] - grid[i]).expand(16)
        st = solver.step(ode, xa, t, h, sa, None, ctx)
        xa, sa = st.x, st.state
        if i == 4:  # row-wise zero step for every row of b, then the real one
            st0 = solver.step(ode, xb, t, torch.zeros_like(h), sb, None, ctx)
            assert torch.equal(st0.x, xb)
            sb = st0.state
        st = solver.step(ode, xb, t, h, sb, None, ctx)
        xb, sb = st.x, st.state
    torch.testing.assert_close(xa, xb, rtol=1e-14, atol=1e-14)


class _TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, t):
        return 0.1 * torch.tanh(self.lin(x))


@pytest.mark.parametrize("solver", [ds.DPMSolver(2), ds.UniPC(3), ds.DEIS(3), ds.IPNDM(4)])
def test_bfloat16_network_inputs(solver):
    """A 4-D network in bfloat16: weights are computed in float64 and combined in float32, so the
    result tracks the float32 solve to bfloat16 resolution."""
    proc = ds.VP()
    net = _TinyNet()
    x = proc.prior_sample((4, 3, 8, 8), generator=torch.Generator().manual_seed(1))
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        field = ds.ScoreNetwork(net.to(dtype), proc, predicts="eps")
        with torch.no_grad():
            out[dtype] = ds.solve(ds.ProbabilityFlowODE(field), x.to(dtype), 1.0, 1e-3,
                                  solver=solver, steps=10, schedule="logsnr").x
    assert out[torch.bfloat16].dtype == torch.bfloat16
    assert bool(torch.isfinite(out[torch.bfloat16].float()).all())
    err = (out[torch.bfloat16].float() - out[torch.float32]).abs().max()
    assert float(err) < 0.05 * float(out[torch.float32].abs().max())


def test_unipc_under_a_controller(edm_problem):
    _proc, ode, x = edm_problem
    ref = ds.solve(ode, x, 80.0, 0.002, solver=ds.Dopri5(), time_variable="snr",
                   controller=ds.PIController(rtol=1e-11, atol=1e-11)).x
    sol = ds.solve(ode, x, 80.0, 0.002, solver=ds.UniPC(3), time_variable="log_sigma",
                   controller=ds.PIController(rtol=1e-6, atol=1e-6))
    assert sol.success and torch.equal(sol.stats.nfe_per_sample, 1 + sol.stats.steps)
    assert float((sol.x - ref).abs().max()) < 1e-3


@pytest.mark.parametrize("make,match", [
    (lambda: ds.DPMSolver(2.0), "order"), (lambda: ds.DPMSolver(True), "order"),
    (lambda: ds.DPMSolver(5), "order"), (lambda: ds.DPMSolver(4, "midpoint"), "variant"),
    (lambda: ds.DPMSolver(2, "euler"), "variant"), (lambda: ds.DPMSolver(2, corrector=1),
                                                    "corrector"),
    (lambda: ds.UniPC(2, "bh3"), "bh"), (lambda: ds.UniPC(0), "order"),
    (lambda: ds.DEIS(4), "order"), (lambda: ds.IPNDM(5), "order"),
    (lambda: ds.DEIS(2, start="rk"), "start"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ds.DifsolveError, match=match):
        make()


@pytest.mark.parametrize("solver", [ds.DPMSolver(2), ds.DPMSolver(3, "midpoint"),
                                    ds.DPMSolver(2, corrector=True), ds.UniPC(3, "bh1"),
                                    ds.UniPC(2, lower_order_final=True), ds.DEIS(3), ds.IPNDM(4)])
def test_shared_grid_plan_matches_the_per_row_path(edm_problem, solver):
    """``prepare(grid)`` computes every step's weights at once (the fast path for a grid shared
    by the batch); the steps then give the per-row path's result to round-off."""
    proc, ode, x = edm_problem
    grid = _karras(proc, 11)
    per_row = ds.solve(ode, x, 80.0, 0.002, solver=solver, steps=grid).x
    ctx = ds.solvers.StepContext(n_steps=11)
    ctx.plan = solver.prepare(ode, grid)
    assert ctx.plan is not None
    t = grid[:, None].expand(-1, 16)
    state, _ = solver.init(ode, x, t[0], ctx)
    y = x
    for i in range(11):
        ctx.index = i
        st = solver.step(ode, y, t[i], t[i + 1] - t[i], state, None, ctx)
        y, state = st.x, st.state
    torch.testing.assert_close(y, per_row, rtol=1e-13, atol=1e-13)
    assert solver.prepare(ode, torch.cat([grid[:3], grid[2:]])) is None  # repeated time


def test_kernel_moments_and_lagrange_weights_against_quadrature():
    """``M_m = int_0^h e^{-(h-v)} v^m dv`` (and the noise kernel ``e^{h-v}``) on both sides of the
    series threshold, and the closed-form Lagrange weights against a Vandermonde solve."""
    from scipy.integrate import quad

    from difsolve.solvers.exponential import data_moments, lagrange_weights, noise_moments

    hs = torch.tensor([-3.0, -2.1, -1.9, -0.6, -1e-3, 0.0, 1e-4, 0.51, 1.9, 2.1, 8.0], dtype=F64)
    got_d, got_n = data_moments(hs, 6), noise_moments(hs, 6)
    for i, h in enumerate(hs.tolist()):
        for m in range(6):
            exp_d = quad(lambda v, h=h, m=m: math.exp(-(h - v)) * v**m, 0.0, h, epsabs=0,
                         epsrel=1e-13)[0]
            exp_n = quad(lambda v, h=h, m=m: math.exp(h - v) * v**m, 0.0, h, epsabs=0,
                         epsrel=1e-13)[0]
            assert abs(float(got_d[i, m]) - exp_d) <= 1e-12 * abs(exp_d) + 1e-300, (h, m)
            assert abs(float(got_n[i, m]) - exp_n) <= 1e-12 * abs(exp_n) + 1e-300, (h, m)
    nodes = [torch.tensor([0.0, 0.0], dtype=F64), torch.tensor([-0.7, -0.2], dtype=F64),
             torch.tensor([-1.5, -0.3], dtype=F64), torch.tensor([0.9, 0.4], dtype=F64)]
    moments = data_moments(torch.tensor([0.9, 0.4], dtype=F64), 4)
    w = lagrange_weights(nodes, moments)
    for r in range(2):
        vand = torch.stack([torch.stack([n[r] ** p for n in nodes]) for p in range(4)])
        torch.testing.assert_close(w[r], torch.linalg.solve(vand, moments[r]), rtol=1e-12,
                                   atol=1e-14)
