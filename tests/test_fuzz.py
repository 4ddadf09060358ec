"""Fuzzing every public entry point with malformed inputs (issue 15).

The contract (docs/errors.md): a call either raises a :class:`ds.DifsolveError` whose message
names an argument, or returns a result in which every row has a status, a row that is not
``SUCCESS`` holds NaN (its last finite state in ``last_x``), a ``SUCCESS`` row is finite, and no
row took more than ``max_steps`` steps. Any other exception is a bug.

Each fuzzed argument takes values from :data:`ANYTHING` (wrong types, numpy scalars, negative and
huge sizes, NaN and inf, bad shapes, integer / bool / half dtypes, empty batches, 1e-300...), one
argument at a time on top of a small valid call. User callables are fuzzed separately
(:data:`FAULTS`: wrong shapes, tuples, wrong dtypes, NaN or inf in some rows), and rows that a
fault spares must come out as in a clean run of those rows alone.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import difsolve as ds

MAX_STEPS = 60  # every adaptive call below is bounded by this (or by its own max_steps)


# ----- the problem ------------------------------------------------------------------------
MIX = ds.GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.5]], [0.1, 0.2])
VP, EDM = ds.VP(), ds.EDM()
FIELD_VP, FIELD_EDM = MIX.score_field(VP), MIX.score_field(EDM)
X = torch.tensor([[0.3, -0.2], [1.1, 0.4], [-0.7, 0.9]])


class _Opaque:
    def __repr__(self) -> str:
        return "<opaque>"


def _tensors():
    return st.sampled_from([
        torch.tensor(0.5), torch.tensor([0.5]), torch.tensor([1.0, 0.5, 0.01]),
        torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]), torch.zeros(0, 2),
        torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2, dtype=torch.bool),
        torch.ones(3, 2, dtype=torch.float16), torch.ones(3, 2, dtype=torch.bfloat16),
        torch.full((3, 2), math.nan), torch.full((3, 2), math.inf), torch.randn(3, 2, 1),
        torch.tensor([0, 1, 2]), torch.tensor([1.0, 1.0, 0.5]), torch.ones(3, 2, dtype=torch.cfloat),
        torch.tensor([1.0, math.nan]), torch.randn(4, 2, dtype=torch.float64),
    ])


#: the malformed (and some valid) values every argument is fuzzed with
ANYTHING = st.one_of(
    st.integers(-3, 12),
    st.sampled_from([0, -1, 10**12, 2**63, -(2**63), 2**70]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e-300, 1e300, -0.0, 5e-324, 0.5, 2.0, math.inf, -math.inf, math.nan]),
    st.builds(np.int64, st.integers(-2, 8)),
    st.builds(np.float32, st.floats(-2, 2, width=32)),
    st.sampled_from([np.float64(0.5), np.int32(3), np.bool_(True), np.array([1.0, 2.0])]),
    st.booleans(), st.none(),
    st.sampled_from(["uniform", "karras", "", "x", "log_sigma", "rademacher", "t"]),
    st.sampled_from([[1.0, 2.0], (2,), (3, 2), (0, 2), (-1, 2), (3, 0), [], {}, {"a": 1},
                     {1: 2}, (2.0, 2), (True, 2), 1 + 2j, b"\x00"]),
    st.just(_Opaque()), st.just(torch.float16), st.just(torch.int64), st.just(torch.float64),
    st.just(torch.Generator().manual_seed(0)), st.just(ds.Heun()), st.just(ds.EulerMaruyama()),
    st.just(ds.PIController()), st.just(lambda *a, **k: None),
    _tensors(),
)


def outcome(call):
    """The result of ``call()``, or the :class:`ds.DifsolveError` it raised (any other exception
    fails the test). The error must name an argument."""
    try:
        return call()
    except ds.DifsolveError as exc:
        assert "argument" in str(exc) and "`" in str(exc), f"unnamed argument: {exc}"
        return exc


def check_solution(sol: ds.Solution, max_steps: int | None = None) -> None:
    """Per-row contract of a :class:`ds.Solution`."""
    batch = sol.x.shape[0]
    assert sol.status.shape == (batch,) and sol.t.shape == (batch,)
    ok = sol.status == ds.Status.SUCCESS
    flat = sol.x.reshape(batch, math.prod(sol.x.shape[1:]))
    assert bool(torch.isfinite(flat[ok]).all()), "NaN or inf under SUCCESS"
    assert bool(torch.isnan(flat[~ok]).all()), "a failed row holds a plausible state"
    assert set(sol.status.tolist()) <= {s.value for s in ds.Status}
    if sol.last_x is not None:
        assert sol.last_x.shape == sol.x.shape and sol.last_t.shape == (batch,)
        assert torch.equal(sol.last_x[ok], sol.x[ok])
    if max_steps is not None and batch:
        assert int(sol.stats.steps.max()) <= max_steps
    if sol.xs is not None:
        assert bool(torch.isnan(sol.xs[:, ~ok]).all())


def check_result(result, max_steps: int | None = None) -> None:
    if isinstance(result, ds.DifsolveError):
        return
    if isinstance(result, ds.Solution):
        check_solution(result, max_steps)
    elif isinstance(result, ds.LogLikelihood):
        ok = result.status == ds.Status.SUCCESS
        assert bool(torch.isfinite(result.log_prob[ok]).all())
        assert bool(torch.isnan(result.log_prob[~ok]).all())
        if max_steps is not None and result.status.numel():
            assert int(result.stats.steps.max()) <= max_steps
    elif isinstance(result, ds.convergence.Study):
        assert len(result.errors) == len(result.steps)
    else:
        raise AssertionError(f"unexpected result {type(result).__name__}")


# ----- entry points: a valid call each, then one argument replaced --------------------------
def _ode():
    return ds.ProbabilityFlowODE(FIELD_VP)


ENTRY_POINTS = {
    "solve_fixed": (ds.solve, lambda: dict(dynamics=_ode(), x0=X.clone(), t0=1.0, t1=1e-3,
                                            solver=ds.Heun(), steps=4, max_steps=MAX_STEPS)),
    "solve_adaptive": (ds.solve, lambda: dict(
        dynamics=_ode(), x0=X.clone(), t0=1.0, t1=1e-3, solver=ds.Dopri5(),
        controller=ds.PIController(rtol=1e-3, atol=1e-3), max_steps=MAX_STEPS)),
    "solve_sde": (ds.solve, lambda: dict(
        dynamics=ds.ReverseSDE(FIELD_VP), x0=X.clone(), t0=1.0, t1=1e-3,
        solver=ds.EulerMaruyama(), steps=4, generator=0, max_steps=MAX_STEPS)),
    "sample": (ds.sample, lambda: dict(field=FIELD_EDM, shape=(3, 2), solver=ds.Heun(), steps=3,
                                       generator=0)),
    "sample_sde": (ds.sample, lambda: dict(field=FIELD_VP, shape=(3, 2),
                                           solver=ds.EulerMaruyama(), steps=3, seeds=[1, 2, 3])),
    "log_likelihood": (ds.log_likelihood, lambda: dict(
        field=FIELD_VP, x=X.clone(), controller=ds.PIController(rtol=1e-2, atol=1e-2),
        generator=0, max_steps=MAX_STEPS)),
    "annealed_langevin": (ds.annealed_langevin, lambda: dict(
        field=FIELD_EDM, shape=(3, 2), sigmas=[1.0, 0.1], steps_each=2, eps=1e-3,
        generator=0)),
    "ode_order": (ds.convergence.ode_order, lambda: dict(
        dynamics=_ode(), x0=X.clone(), t0=1.0, t1=0.1, solver=ds.Heun(), steps=(2, 4))),
    "strong_order": (ds.convergence.strong_order, lambda: dict(
        dynamics=ds.ReverseSDE(FIELD_VP), x0=X.clone(), t0=1.0, t1=0.5,
        solver=ds.EulerMaruyama(), steps=(1, 2), generator=torch.Generator().manual_seed(0))),
    "weak_order": (ds.convergence.weak_order, lambda: dict(
        dynamics=ds.ReverseSDE(FIELD_VP), x0=X.clone(), t0=1.0, t1=0.5,
        solver=ds.EulerMaruyama(), steps=(1, 2), generator=torch.Generator().manual_seed(0))),
    "restart_sample": (ds.restart_sample, lambda: dict(field=FIELD_EDM, shape=(3, 2), steps=4,
                                                      generator=0)),
    "dist_sample": (ds.distributed.sample, lambda: dict(field=FIELD_EDM, n=5, batch_size=2,
                                                        steps=3, solver=ds.Euler())),
    "dist_ll": (ds.distributed.log_likelihood, lambda: dict(
        field=FIELD_VP, data=X.clone(), batch_size=2, controller=ds.PIController(1e-2, 1e-2),
        max_steps=MAX_STEPS)),
}


def _arguments(fn):
    return [name for name, p in inspect.signature(fn).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


CASES = [(entry, arg) for entry, (fn, _) in ENTRY_POINTS.items() for arg in _arguments(fn)]


def _bound(kwargs) -> int | None:
    """The step bound of a call: its max_steps (or its controller's)."""
    ctl = kwargs.get("controller")
    bound = getattr(ctl, "max_steps", None) if ctl is not None else None
    if bound is None:
        bound = kwargs.get("max_steps", 10_000)
    return bound if isinstance(bound, int) and not isinstance(bound, bool) else None


@pytest.mark.parametrize("entry,arg", CASES, ids=[f"{e}-{a}" for e, a in CASES])
@given(value=ANYTHING)
def test_fuzz_entry_point_argument(entry, arg, value):
    fn, base = ENTRY_POINTS[entry]
    kwargs = base()
    kwargs[arg] = value
    check_result(outcome(lambda: fn(**kwargs)), _bound(kwargs))


def test_every_entry_point_is_fuzzed():
    """Each public entry point of the issue has a valid base call here."""
    fuzzed = {fn for fn, _ in ENTRY_POINTS.values()}
    assert {ds.solve, ds.sample, ds.log_likelihood, ds.annealed_langevin,
            ds.convergence.ode_order, ds.convergence.strong_order,
            ds.convergence.weak_order} <= fuzzed
    for fn, base in ENTRY_POINTS.values():  # and every base call is clean
        check_result(fn(**base()))


# ----- constructors: refused, or an object that honours the contract where it is used ------
def _use_solver(solver):
    field = FIELD_EDM if not solver.sde else FIELD_VP
    check_result(outcome(lambda: ds.sample(field, (2, 2), solver=solver, steps=3, generator=0)))
    if solver.adaptive:
        dyn = ds.ReverseSDE(field) if solver.sde else ds.ProbabilityFlowODE(field)
        t0, t1 = field.process.t_max, field.process.t_min
        check_result(outcome(lambda: ds.solve(
            dyn, X.clone(), t0, t1, solver=solver, controller=ds.PIController(1e-2, 1e-2),
            max_steps=MAX_STEPS, generator=0)), MAX_STEPS)


def _use_controller(ctl):
    bound = ctl.max_steps if ctl.max_steps is not None else MAX_STEPS
    if bound > 10 * MAX_STEPS:
        return  # a large step budget is legal; do not spend it here
    check_result(outcome(lambda: ds.solve(
        _ode(), X.clone(), 1.0, 1e-3, solver=ds.Heun(), controller=ctl, max_steps=MAX_STEPS)),
        bound)


def _use_corrector(corrector):
    check_result(outcome(lambda: ds.sample(FIELD_EDM, (2, 2), solver=ds.EulerMaruyama(),
                                           steps=2, corrector=corrector, generator=0)))


def _use_annealed(sampler):
    check_result(outcome(lambda: sampler.run(FIELD_EDM, X.clone(), generator=0)))
    _use_corrector(sampler)


def _use_process(process):
    field = MIX.score_field(process)
    check_result(outcome(lambda: ds.sample(field, (2, 2), solver=ds.Heun(), steps=3,
                                           generator=0)))


def _use_field(field):
    check_result(outcome(lambda: ds.sample(field, (2, 2), solver=ds.Euler(), steps=3,
                                           generator=0)))


def _use_mixture(mixture):
    _use_field(mixture.score_field(VP))
    outcome(lambda: mixture.sample(3))


def _use_path(path):
    outcome(lambda: path(0.0, 0.5))
    check_result(outcome(lambda: ds.solve(
        ds.ReverseSDE(FIELD_VP), torch.zeros(path.shape), 1.0, 0.5, solver=ds.EulerMaruyama(),
        steps=2, brownian=path)))


def _use_trace(trace):
    check_result(outcome(lambda: ds.log_likelihood(
        FIELD_VP, X.clone(), trace=trace, controller=ds.PIController(1e-2, 1e-2),
        max_steps=MAX_STEPS, generator=0)), MAX_STEPS)


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)

    def forward(self, x, t, **cond):
        return self.lin(x) * 0.1


def _use_guidance(cfg):
    check_result(outcome(lambda: ds.sample(cfg, (2, 2), solver=ds.Euler(), steps=2,
                                           cond={"label": torch.tensor([1, 0])})))


#: class -> (valid keyword arguments, how an instance is used)
CONSTRUCTORS = {
    ds.Euler: ({}, _use_solver), ds.Heun: ({}, _use_solver), ds.Midpoint: ({}, _use_solver),
    ds.RK4: ({}, _use_solver), ds.Dopri5: ({}, _use_solver), ds.Bosh3: ({}, _use_solver),
    ds.EulerMaruyama: ({}, _use_solver), ds.StochasticHeun: ({}, _use_solver),
    ds.PIController: (dict(rtol=1e-3, atol=1e-3), _use_controller),
    ds.Langevin: (dict(snr=0.16, steps=1), _use_corrector),
    ds.AnnealedLangevin: (dict(sigmas=[1.0, 0.1], steps_each=2, eps=1e-3), _use_annealed),
    ds.VE: ({}, _use_process), ds.VP: ({}, _use_process), ds.SubVP: ({}, _use_process),
    ds.EDM: ({}, _use_process),
    ds.GaussianMixture: (dict(weights=[0.5, 0.5], means=[[0.0, 0.0], [1.0, 1.0]],
                              covs=[0.1, 0.2]), _use_mixture),
    ds.ScoreNetwork: (dict(model=_Model(), process=VP), _use_field),
    ds.Denoiser: (dict(model=_Model(), process=EDM), _use_field),
    ds.ClassifierFreeGuidance: (dict(field=ds.ScoreNetwork(_Model(), EDM), scale=2.0,
                                     uncond={"label": torch.tensor(2)}), _use_guidance),
    ds.BrownianPath: (dict(t0=0.0, t1=1.0, shape=(3, 2)), _use_path),
    ds.Hutchinson: (dict(probes=2), _use_trace), ds.ExactTrace: ({}, _use_trace),
    ds.ButcherTableau: (dict(c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5)), lambda tab: None),
    ds.DPMSolver: ({}, _use_solver),
    ds.EDMStochasticHeun: (dict(churn=1.0), _use_solver),
    ds.Poisson: (dict(D=4), _use_process),
    ds.RectifiedFlow: ({}, _use_process),
    ds.DiscreteVP: (dict(alphas_cumprod=torch.linspace(0.999, 0.01, 50)), _use_process),
    ds.DiscreteVP.linear: (dict(n=50), _use_process),
    ds.DiscreteVP.cosine: (dict(n=50), _use_process),
    ds.PoissonField.from_data: (dict(points=torch.randn(8, 2), D=4), _use_field),
    ds.DiscreteDenoiser: (dict(model=_Model(), schedule=ds.DiscreteVP.linear(50)), _use_field),
    ds.DDIM: ({}, _use_solver), ds.EulerAncestral: ({}, _use_solver),
    ds.DPMSolverSDE: ({}, _use_solver), ds.SASolver: ({}, _use_solver),
    ds.Restart: (dict(sigma_lo=0.3, sigma_hi=2.0), lambda r: check_result(outcome(
        lambda: ds.restart_sample(FIELD_EDM, (2, 2), steps=4, restarts=(r,), generator=0)))),
}


def _init_arguments(fn):
    """The arguments of a class's constructor, or of a constructor function (classmethod)."""
    target = fn.__init__ if isinstance(fn, type) else fn
    return [name for name in _arguments(target) if name not in ("self", "cls")]


CTOR_CASES = [(cls, arg) for cls in CONSTRUCTORS for arg in _init_arguments(cls)]


@pytest.mark.parametrize("cls,arg", CTOR_CASES,
                         ids=[f"{c.__qualname__}-{a}" for c, a in CTOR_CASES])
@given(value=ANYTHING)
def test_fuzz_constructor_argument(cls, arg, value):
    valid, use = CONSTRUCTORS[cls]
    obj = outcome(lambda: cls(**{**valid, arg: value}))
    if not isinstance(obj, ds.DifsolveError):
        use(obj)


@pytest.mark.parametrize("cls", [c for c in CONSTRUCTORS if not _init_arguments(c)],
                         ids=lambda c: c.__name__)
def test_constructor_without_arguments(cls):
    valid, use = CONSTRUCTORS[cls]
    use(cls(**valid))


# ----- user callables that misbehave -------------------------------------------------------
def _bad_rows(x, bad):
    return bad.reshape(-1, *([1] * (x.ndim - 1))).to(torch.bool)


#: how a user's field or drift misbehaves: ``fault(out, x, bad)`` -> what it returns
FAULTS = {
    "shape_b1": lambda out, x, bad: out[:, :1],
    "shape_b3": lambda out, x, bad: torch.cat([out, out[:, :1]], 1),
    "batch_plus_one": lambda out, x, bad: torch.cat([out, out[:1]]),
    "flat": lambda out, x, bad: out.reshape(-1),
    "tuple": lambda out, x, bad: (out,),
    "list": lambda out, x, bad: [out],
    "none": lambda out, x, bad: None,
    "float": lambda out, x, bad: 0.5,
    "int_dtype": lambda out, x, bad: out.long(),
    "bool_dtype": lambda out, x, bad: out > 0,
    "complex": lambda out, x, bad: out.to(torch.cfloat),
    "float64": lambda out, x, bad: out.double(),
    "float16": lambda out, x, bad: out.half(),
    "nan_rows": lambda out, x, bad: torch.where(_bad_rows(x, bad), math.nan, out),
    "inf_rows": lambda out, x, bad: torch.where(_bad_rows(x, bad), math.inf, out),
    "huge_rows": lambda out, x, bad: torch.where(_bad_rows(x, bad), 1e30, out),
}
ROW_FAULTS = ("nan_rows", "inf_rows", "huge_rows", "float64", "float16")
#: faults of the whole output that are accepted (cast to the state's dtype)
DTYPE_FAULTS = ("float64", "float16")


class FaultyField:
    """``FIELD_VP`` (or another field) misbehaving as ``fault`` at times ``t <= t_fault`` in the
    rows whose condition ``bad`` is set (the condition travels with the rows)."""

    def __init__(self, field, fault: str, t_fault: float):
        self.field, self.process, self.fault, self.t_fault = field, field.process, fault, t_fault
        self.fired = False

    def __call__(self, x, t, bad=None):
        out = self.field(x, t)
        if bad is None or not bool(((t <= self.t_fault) & (bad > 0)).any()):
            return out
        hit = (bad > 0) & (t <= self.t_fault)
        self.fired = True
        return FAULTS[self.fault](out, x, hit)


class FaultyDrift:
    """A user's ODE dynamics (not built by difsolve) with the same faults in its drift."""

    def __init__(self, fault: str, t_fault: float):
        self.ode, self.fault, self.t_fault = ds.ProbabilityFlowODE(FIELD_VP), fault, t_fault
        self.fired = False

    def drift(self, x, t, bad=None):
        out = self.ode.drift(x, t)
        if bad is None:
            return out
        hit = (bad > 0) & (t <= self.t_fault)
        if not bool(hit.any()):
            return out
        self.fired = True
        return FAULTS[self.fault](out, x, hit)


B = 4


def _runs(kind, fault, t_fault, bad):
    """``run(rows)``: the call of ``kind`` on the rows ``rows`` (all, or the healthy ones)."""
    x0 = torch.linspace(-1.0, 1.0, 2 * B, dtype=torch.float64).reshape(B, 2)
    seeds = torch.arange(B) + 11

    faulty = []  # the misbehaving callables made, to tell whether a fault fired

    def cond(rows):
        return {"bad": bad[rows]}

    def made(obj):
        faulty.append(obj)
        return obj

    def field_of(base=FIELD_VP):
        return made(FaultyField(base, fault, t_fault))

    def run(rows):
        if kind == "solve_fixed":
            return ds.solve(made(FaultyDrift(fault, t_fault)), x0[rows], 1.0, 1e-3,
                            solver=ds.Heun(), steps=6, cond=cond(rows))
        if kind == "solve_adaptive":
            return ds.solve(made(FaultyDrift(fault, t_fault)), x0[rows], 1.0, 1e-3,
                            solver=ds.Bosh3(), controller=ds.PIController(1e-4, 1e-4),
                            max_steps=MAX_STEPS, cond=cond(rows))
        if kind == "sample_ode":
            return ds.sample(field_of(), x_T=x0[rows], solver=ds.Heun(), steps=5,
                             cond=cond(rows))
        if kind == "sample_dpm":
            return ds.sample(field_of(), x_T=x0[rows], solver=ds.DPMSolver(2), steps=5,
                             cond=cond(rows))
        if kind == "sample_sde":
            return ds.sample(field_of(), x_T=x0[rows], solver=ds.EulerMaruyama(), steps=5,
                             seeds=seeds[rows], cond=cond(rows))
        if kind == "sample_adaptive_sde":
            return ds.sample(field_of(), x_T=x0[rows], solver=ds.StochasticHeun(),
                             controller=ds.PIController(0.1, 0.1, max_steps=20),
                             seeds=seeds[rows], cond=cond(rows))
        if kind == "sample_corrector":
            return ds.sample(field_of(FIELD_EDM), x_T=x0[rows] * 80, solver=ds.EulerMaruyama(),
                             steps=4, corrector=ds.Langevin(), seeds=seeds[rows],
                             cond=cond(rows))
        if kind == "log_likelihood":
            return ds.log_likelihood(field_of(), x0[rows], trace=ds.ExactTrace(),
                                     controller=ds.PIController(1e-3, 1e-3),
                                     max_steps=MAX_STEPS, cond=cond(rows))
        if kind == "annealed_langevin":
            return ds.AnnealedLangevin([1.0, 0.1], steps_each=2, eps=1e-3).run(
                field_of(FIELD_EDM), x0[rows], seeds=seeds[rows], cond=cond(rows))
        raise AssertionError(kind)

    run.fired = lambda: any(f.fired for f in faulty)
    return run


KINDS = ("solve_fixed", "solve_adaptive", "sample_ode", "sample_dpm", "sample_sde",
         "sample_adaptive_sde", "sample_corrector", "log_likelihood", "annealed_langevin")


def _x(result):
    return result.log_prob if isinstance(result, ds.LogLikelihood) else result.x


@pytest.mark.parametrize("kind", KINDS)
@given(fault=st.sampled_from(sorted(FAULTS)), t_fault=st.sampled_from([1e-3, 0.3, 1.0, 80.0]),
       bad=st.lists(st.booleans(), min_size=B, max_size=B))
def test_fuzz_user_outputs(kind, fault, t_fault, bad):
    """A misbehaving field or drift: a DifsolveError naming it, or per-row statuses; rows it
    spares are as in a clean run of those rows alone; no NaN under SUCCESS."""
    bad = torch.tensor(bad, dtype=torch.long)
    run = _runs(kind, fault, t_fault, bad)
    result = outcome(lambda: run(torch.arange(B)))
    if isinstance(result, ds.DifsolveError):
        assert fault not in ROW_FAULTS or "`" in str(result)
        assert any(name in str(result) for name in ("`field`", "`dynamics`")), result
        return
    assert fault in ROW_FAULTS or not run.fired(), f"{fault} was accepted"
    check_result(result, MAX_STEPS)
    healthy = torch.nonzero(bad == 0).reshape(-1)
    if healthy.numel() and fault not in DTYPE_FAULTS:
        clean = run(healthy)
        torch.testing.assert_close(_x(result)[healthy], _x(clean), rtol=1e-7, atol=1e-9,
                                   equal_nan=True)
        assert torch.equal(result.status[healthy], clean.status)


# ----- poisoned rows in the input ------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fixed", "adaptive", "sde", "likelihood"])
@given(bad=st.lists(st.sampled_from([0.0, math.nan, math.inf, -math.inf, 1e30]),
                    min_size=B, max_size=B))
def test_fuzz_poisoned_rows(kind, bad):
    """NaN / inf / huge values in some rows of the state: those rows fail (or are refused as a
    whole for likelihood data); the other rows are unchanged."""
    x0 = torch.linspace(-1.0, 1.0, 2 * B, dtype=torch.float64).reshape(B, 2)
    poison = torch.tensor(bad, dtype=torch.float64)[:, None]
    x_bad = torch.where(poison != 0, poison, x0)
    seeds = torch.arange(B) + 3

    def run(x, rows):
        if kind == "fixed":
            return ds.solve(_ode(), x, 1.0, 1e-3, solver=ds.RK4(), steps=5)
        if kind == "adaptive":
            return ds.solve(_ode(), x, 1.0, 1e-3, solver=ds.Dopri5(),
                            controller=ds.PIController(1e-4, 1e-4), max_steps=MAX_STEPS)
        if kind == "sde":
            return ds.solve(ds.ReverseSDE(FIELD_VP), x, 1.0, 1e-3, solver=ds.EulerMaruyama(),
                            steps=5, seeds=seeds[rows])
        return ds.log_likelihood(FIELD_VP, x, controller=ds.PIController(1e-3, 1e-3),
                                 seeds=seeds[rows], max_steps=MAX_STEPS)

    result = outcome(lambda: run(x_bad, torch.arange(B)))
    if isinstance(result, ds.DifsolveError):
        assert kind == "likelihood" and not bool(torch.isfinite(x_bad).all())
        return
    check_result(result, MAX_STEPS)
    healthy = torch.nonzero(poison[:, 0] == 0).reshape(-1)
    if healthy.numel():
        clean = run(x0[healthy], healthy)
        torch.testing.assert_close(_x(result)[healthy], _x(clean), rtol=1e-7, atol=1e-9)
    nonfinite = ~torch.isfinite(poison[:, 0])
    if kind != "likelihood":
        assert bool((result.status[nonfinite] == ds.Status.NONFINITE).all())


# ----- regressions: the concrete cases of issue 15 -------------------------------------------
class _Blowup:
    """``FIELD_EDM`` that returns ``value`` in ``rows`` (all when None) at ``t <= t_bad``."""

    def __init__(self, value=math.inf, t_bad=EDM.t_min * 1.0001, rows=None):
        self.process, self.value, self.t_bad, self.rows = EDM, value, t_bad, rows

    def __call__(self, x, t, row=None):
        out = FIELD_EDM(x, t)
        hit = t <= self.t_bad
        if self.rows is not None:
            hit = hit & torch.isin(row, torch.tensor(self.rows))
        return torch.where(hit[:, None], self.value, out)


@pytest.mark.parametrize("solver", [ds.Euler(), ds.Heun(), ds.EulerMaruyama()],
                         ids=lambda s: type(s).__name__)
def test_sample_checks_its_final_denoise(solver):
    """A field that blows up only at t_min (which Euler on a fixed grid never evaluates, and the
    final Tweedie step does) is a NONFINITE row holding NaN, not an inf sample under SUCCESS."""
    field = _Blowup(rows=[1])
    sol = ds.sample(field, (3, 2), solver=solver, steps=4, generator=0,
                    cond={"row": torch.arange(3)})
    assert sol.status.tolist() == [0, ds.Status.NONFINITE, 0]
    assert bool(torch.isnan(sol.x[1]).all()) and bool(torch.isfinite(sol.x[[0, 2]]).all())
    assert bool(torch.isfinite(sol.last_x[1]).all())  # where it broke down: before the denoise
    assert torch.equal(sol.last_x[[0, 2]], sol.x[[0, 2]])
    clean = ds.sample(FIELD_EDM, (3, 2), solver=solver, steps=4, generator=0)
    torch.testing.assert_close(sol.x[[0, 2]], clean.x[[0, 2]])


def test_nonfinite_row_is_nan_with_its_last_finite_state():
    sol = ds.sample(_Blowup(math.nan, t_bad=1.0, rows=[0]), (2, 2), solver=ds.Heun(), steps=18,
                    generator=0, cond={"row": torch.arange(2)})
    assert sol.status.tolist() == [ds.Status.NONFINITE, ds.Status.SUCCESS]
    assert bool(torch.isnan(sol.x[0]).all())
    assert bool(torch.isfinite(sol.last_x[0]).all()) and float(sol.last_t[0]) > 1.0


class _NaNBelow:
    """User ODE dynamics ``dx/dt = -x`` whose drift is NaN at ``t < t_bad`` in the rows with
    condition ``bad``."""

    def __init__(self, t_bad=0.5):
        self.t_bad = t_bad

    def drift(self, x, t, bad):
        return torch.where(((t < self.t_bad) & bad)[:, None], math.nan, -x)


@pytest.mark.parametrize("solver", [ds.Bosh3(), ds.Dopri5(), ds.Heun()],
                         ids=lambda s: type(s).__name__)
def test_nan_error_estimate_is_nonfinite_not_underflow(solver):
    """A row creeping up to where its drift is NaN (steps straddling t = 0.5 are rejected,
    steps short of it accepted, until the step size underflows), or whose NaN is only in the
    error estimate (Bosh3's and Dopri5's last FSAL stage has weight 0 in the solution), was
    labelled DT_UNDERFLOW. It is NONFINITE; the other row is unaffected."""
    sol = ds.solve(_NaNBelow(), torch.ones(2, 2, dtype=torch.float64), 1.0, 0.0, solver=solver,
                   controller=ds.PIController(1e-5, 1e-5), max_steps=800,
                   cond={"bad": torch.tensor([True, False])})
    assert sol.status.tolist() == [ds.Status.NONFINITE, ds.Status.SUCCESS]
    assert float(sol.last_t[0]) >= 0.5 and bool(torch.isnan(sol.x[0]).all())
    torch.testing.assert_close(sol.x[1], torch.full((2,), math.e, dtype=torch.float64),
                               rtol=1e-4, atol=1e-4)  # dx/dt = -x backwards from t = 1 to 0


def test_empty_batches_return_empty_results():
    x = torch.zeros(0, 2)
    fixed = ds.solve(_ode(), x, 1.0, 1e-3, solver=ds.Heun(), steps=4, save_at=[0.5])
    adaptive = ds.solve(_ode(), x, 1.0, 1e-3, solver=ds.Dopri5(), controller=ds.PIController())
    sde = ds.solve(ds.ReverseSDE(FIELD_VP), x, 1.0, 1e-3, solver=ds.StochasticHeun(),
                   controller=ds.PIController(), generator=0)
    sampled = ds.sample(FIELD_EDM, (0, 2), generator=0)
    annealed = ds.annealed_langevin(FIELD_EDM, (0, 2), [1.0, 0.1], steps_each=2)
    for sol in (fixed, adaptive, sde, sampled, annealed):
        assert sol.x.shape == (0, 2) and sol.status.shape == (0,)
        check_solution(sol)
    assert fixed.xs.shape == (1, 0, 2)
    ll = ds.log_likelihood(FIELD_VP, x)
    assert ll.log_prob.shape == (0,) and ll.status.shape == (0,)


@pytest.mark.parametrize("dynamics,t0,t1", [
    (ds.ProbabilityFlowODE(FIELD_VP), 1.0, -0.5), (ds.ProbabilityFlowODE(FIELD_EDM), 80.0, -1.0),
    (ds.ReverseSDE(FIELD_VP), -0.1, 0.5)], ids=["vp", "edm", "vp-t0"])
def test_times_outside_the_process_domain_are_refused(dynamics, t0, t1):
    name = "t1" if t1 < 0 else "t0"
    with pytest.raises(ds.InvalidArgumentError, match=rf"`{name}`.*domain"):
        ds.solve(dynamics, X.clone(), t0, t1, solver=ds.Euler() if not ds.dynamics.is_sde(
            dynamics) else ds.EulerMaruyama(), steps=4)


class _Drift:
    def __init__(self, fn):
        self.fn = fn

    def drift(self, x, t):
        return self.fn(x)


@pytest.mark.parametrize("output,error", [
    (lambda x: x[:, :1], ds.InvalidArgumentError), (lambda x: torch.zeros(x.shape[0], 3),
                                                    ds.InvalidArgumentError),
    (lambda x: (x,), ds.ArgumentTypeError), (lambda x: x.long(), ds.ArgumentTypeError),
    (lambda x: None, ds.ArgumentTypeError)], ids=["B1", "B3", "tuple", "int", "none"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
def test_user_drift_outputs_are_checked(output, error, adaptive):
    """A (B, 1) drift was broadcast silently; (B, 3), tuples and integer outputs failed deep
    inside difsolve."""
    step = dict(controller=ds.PIController()) if adaptive else dict(steps=3)
    with pytest.raises(error, match="`dynamics`"):
        ds.solve(_Drift(output), X.clone(), 0.0, 1.0, solver=ds.Heun(), **step)


def test_user_drift_of_another_float_dtype_is_cast():
    sol = ds.solve(_Drift(lambda x: -x.double()), X.clone(), 0.0, 1.0, solver=ds.Heun(), steps=8)
    ref = ds.solve(_Drift(lambda x: -x), X.clone(), 0.0, 1.0, solver=ds.Heun(), steps=8)
    assert sol.x.dtype == torch.float32
    torch.testing.assert_close(sol.x, ref.x)


@pytest.mark.parametrize("call,error,name", [
    (lambda: ds.sample(FIELD_EDM, 4, steps=3), ds.ArgumentTypeError, "shape"),
    (lambda: ds.sample(FIELD_EDM, (-1, 2), steps=3), ds.InvalidArgumentError, "shape"),
    (lambda: ds.sample(FIELD_EDM, (2, 2), dtype=torch.int64), ds.InvalidArgumentError, "dtype"),
    (lambda: ds.annealed_langevin(FIELD_EDM, (2, 2), [1.0], dtype=torch.int32),
     ds.InvalidArgumentError, "dtype"),
    (lambda: ds.solve(_ode(), X.clone(), 1.0, 1e-3, solver=ds.Euler(), steps=10**12),
     ds.InvalidArgumentError, "steps"),
    (lambda: ds.ButcherTableau(c=(0.0, 1.0), a=((),), b=(1.0,)), ds.InvalidArgumentError, "b"),
    (lambda: ds.ButcherTableau(c=(0.0, 0.5), a=((), (0.4,)), b=(0.5, 0.5)),
     ds.InvalidArgumentError, "a"),
    (lambda: ds.ButcherTableau(c=(0.0,), a=((),), b=(1.0,), fsal=True),
     ds.InvalidArgumentError, "fsal"),
    (lambda: ds.sample(FIELD_EDM, (2, 2), steps=3, generator=2**70), ds.InvalidArgumentError,
     "generator"),
    (lambda: ds.sample(FIELD_EDM, (2, 2), steps=3, device=1), ds.InvalidArgumentError,
     "device") if not torch.cuda.is_available() else
    (lambda: ds.sample(FIELD_EDM, (2, 2), steps=3, device=99), ds.InvalidArgumentError,
     "device"),
    (lambda: ds.solve(_ode(), X.clone(), 1.0, 1e-3, solver=ds.Euler(), steps=3,
                      time_variable=np.array(["t"])), ds.ArgumentTypeError, "time_variable"),
    (lambda: ds.sample(FIELD_VP, (2, 2), steps=3, cond={"label": 1}), ds.IncompatibleError,
     "cond"),
    (lambda: ds.solve(_ode(), X.clone(), 1.0, 1e-3, solver=ds.Dopri5(),
                      controller=ds.PIController(norm=lambda e: None)), ds.ArgumentTypeError,
     "norm"),
], ids=["shape-int", "shape-negative", "int-dtype", "int-dtype-annealed", "huge-steps",
        "tableau-b", "tableau-a", "tableau-fsal", "huge-seed", "device", "choice-array",
        "unconditional-field", "norm-output"])
def test_refused_inputs_name_their_argument(call, error, name):
    with pytest.raises(error, match=f"`{name}`"):
        call()


def test_int_seeds_and_numpy_scalars_are_ordinary_inputs():
    a = ds.sample(FIELD_EDM, (2, 2), steps=np.int64(4), generator=3)
    b = ds.sample(FIELD_EDM, (np.int64(2), 2), steps=4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.x, b.x)
    ctl = ds.PIController(rtol=np.float32(1e-3), atol=np.float64(1e-3), max_steps=np.int32(200))
    assert ds.sample(FIELD_EDM, (2, 2), controller=ctl, generator=0).success
    path = ds.BrownianPath(np.float32(0.0), np.float64(1.0), (np.int64(2), 2), generator=5)
    assert path(0.0, 1.0).shape == (2, 2)


def test_brownian_path_refuses_what_it_cannot_be():
    with pytest.raises(ds.ArgumentTypeError, match="`dtype`"):
        ds.BrownianPath(0.0, 1.0, (2, 2), dtype=torch.int64)  # integer increments
    with pytest.raises(ds.InvalidArgumentError, match="`brownian`"):  # covers half the solve
        ds.solve(ds.ReverseSDE(FIELD_VP), X.clone(), 1.0, 1e-3, solver=ds.EulerMaruyama(),
                 steps=4, brownian=ds.BrownianPath(0.5, 1.0, X.shape))


def test_exact_trace_on_one_dimensional_data():
    mix = ds.GaussianMixture([1.0], [[0.3]], [0.5])
    x = torch.linspace(-1.0, 1.5, 5, dtype=torch.float64)[:, None]
    ll = ds.log_likelihood(mix.score_field(VP), x, trace=ds.ExactTrace())
    assert ll.success if hasattr(ll, "success") else bool((ll.status == 0).all())
    exact = mix.marginal_log_prob(x, VP.t_min, VP)  # up to the prior-mismatch bias
    torch.testing.assert_close(ll.log_prob, exact, rtol=0, atol=2e-2)


class _QueriesMemoryFormat:
    """A field that asks its input for its memory format, as convolutional models do."""

    process = VP

    def __call__(self, x, t):
        x.is_contiguous(memory_format=torch.contiguous_format)
        return FIELD_VP(x, t)


@pytest.mark.parametrize("trace", [ds.Hutchinson(probes=3), ds.ExactTrace()], ids=repr)
def test_trace_falls_back_when_vmap_cannot_run_the_model(trace):
    a = ds.log_likelihood(_QueriesMemoryFormat(), X.clone(), trace=trace, generator=0)
    b = ds.log_likelihood(FIELD_VP, X.clone(), trace=trace, generator=0)
    torch.testing.assert_close(a.log_prob, b.log_prob)


# ----- bounded loops: tolerances no step size can meet ----------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("solver", [ds.StochasticHeun(), ds.Dopri5(), ds.Heun(),
                                    ds.DPMSolver(2, corrector=True)],
                         ids=lambda s: type(s).__name__)
def test_tolerances_below_rounding_end_with_dt_underflow(solver, dtype):
    """rtol = atol = 1e-300 ran StochasticHeun and DPMSolver(corrector=True) to the 10 000-step
    limit (the error estimate is rounding noise, now and then exactly 0, so tiny steps were
    accepted); it ends at once with DT_UNDERFLOW."""
    sol = ds.sample(FIELD_VP, (3, 2), solver=solver, dtype=dtype, generator=0,
                    controller=ds.PIController(rtol=1e-300, atol=1e-300))
    assert sol.status.tolist() == [ds.Status.DT_UNDERFLOW] * 3
    assert int(sol.stats.steps.max()) <= 3
    check_solution(sol)


# ----- half precision (docs/errors.md) --------------------------------------------------------
HALF = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "f16"])
@pytest.mark.parametrize("solver,field", [(ds.Euler(), FIELD_EDM), (ds.Heun(), FIELD_EDM),
                                          (ds.EulerMaruyama(), FIELD_VP)],
                         ids=["Euler", "Heun", "EulerMaruyama"])
def test_half_precision_sampling_matches_float32(solver, field, dtype):
    """Half-precision states keep float32 times and step control; the samples are finite and
    within a few half-precision rounding units of the float32 samples from the same start."""
    x_T = torch.randn(32, 2, generator=torch.Generator().manual_seed(0)) * field.process.prior_std
    ref = ds.sample(field, x_T=x_T, solver=solver, steps=20, seeds=range(32))
    sol = ds.sample(field, x_T=x_T.to(dtype), solver=solver, steps=20, seeds=range(32))
    assert sol.x.dtype == dtype and sol.t.dtype == torch.float32 and sol.success
    tol = 0.05 if dtype == torch.bfloat16 else 0.01  # 2^-8 and 2^-11 relative, data of scale 2
    assert float((sol.x.float() - ref.x).abs().max()) < tol


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "f16"])
def test_half_precision_karras_grid_keeps_its_levels(dtype):
    """A bfloat16 grid collapsed neighbouring levels ([1.0, 0.969, 0.934, ...]): the grid is in
    float32, identical to the float32 run's."""
    def times(dt):
        ts = []
        ds.sample(FIELD_EDM, (1, 2), dtype=dt, steps=12, solver=ds.Euler(), generator=0,
                  callback=lambda info: ts.append(info["t"]))
        return torch.cat(ts)

    grid = times(dtype)
    assert grid.dtype == torch.float32 and torch.equal(grid, times(torch.float32))
    assert bool((grid[1:] < grid[:-1]).all())


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "f16"])
def test_half_precision_adaptive_needs_tolerances_it_can_resolve(dtype):
    """Tolerances above the half-precision rounding unit work; finer ones end a row with
    DT_UNDERFLOW at its first rejected step (never a crawl to max_steps)."""
    for tv in ("t", "log_sigma", "snr"):
        ok = ds.sample(FIELD_EDM, (4, 2), dtype=dtype, solver=ds.Heun(), generator=0,
                       controller=ds.PIController(rtol=5e-2, atol=5e-2), time_variable=tv)
        assert ok.success, tv
    fine = ds.sample(FIELD_EDM, (4, 2), dtype=dtype, solver=ds.Heun(), generator=0,
                     controller=ds.PIController(rtol=1e-4, atol=1e-4), time_variable="t")
    assert bool((fine.status == ds.Status.DT_UNDERFLOW).all())
    assert int(fine.stats.steps.max()) < 20 and int(fine.stats.rejected.max()) == 1


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "f16"])
def test_log_likelihood_refuses_half_precision(dtype):
    with pytest.raises(ds.IncompatibleError, match=r"`x`.*float32"):
        ds.log_likelihood(FIELD_VP, X.to(dtype))
