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
}


def _init_arguments(cls):
    return [name for name in _arguments(cls.__init__) if name != "self"]


CTOR_CASES = [(cls, arg) for cls in CONSTRUCTORS for arg in _init_arguments(cls)]


@pytest.mark.parametrize("cls,arg", CTOR_CASES,
                         ids=[f"{c.__name__}-{a}" for c, a in CTOR_CASES])
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
