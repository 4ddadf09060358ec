"""Fuzz cases for files owned by other helpers (kept out of the commit while they fail)."""
import pytest
import torch
from hypothesis import given
from test_fuzz import (
    ANYTHING,
    FIELD_EDM,
    FIELD_VP,
    MAX_STEPS,
    X,
    _arguments,
    _Model,
    _use_field,
    _use_process,
    _use_solver,
    check_result,
    outcome,
)

import difsolve as ds

OWNED = {
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

def _args(fn):
    target = fn.__init__ if isinstance(fn, type) else fn
    return [a for a in _arguments(target) if a not in ("self", "cls")]

CASES = [(fn, a) for fn in OWNED for a in _args(fn)]

@pytest.mark.parametrize("fn,arg", CASES, ids=[f"{getattr(f, '__qualname__', f)}-{a}" for f, a in CASES])
@given(value=ANYTHING)
def test_owned_constructor(fn, arg, value):
    valid, use = OWNED[fn]
    obj = outcome(lambda: fn(**{**valid, arg: value}))
    if not isinstance(obj, ds.DifsolveError):
        use(obj)

DIST = {
    "dist_sample": (ds.distributed.sample, lambda: dict(field=FIELD_EDM, n=5, batch_size=2,
                                                        steps=3, solver=ds.Euler())),
    "restart_sample": (ds.restart_sample, lambda: dict(field=FIELD_EDM, shape=(3, 2), steps=4,
                                                      generator=0)),
    "dist_ll": (ds.distributed.log_likelihood, lambda: dict(
        field=FIELD_VP, data=X.clone(), batch_size=2, controller=ds.PIController(1e-2, 1e-2),
        max_steps=MAX_STEPS)),
}
DCASES = [(e, a) for e, (fn, _) in DIST.items() for a in _arguments(fn)]

@pytest.mark.parametrize("entry,arg", DCASES, ids=[f"{e}-{a}" for e, a in DCASES])
@given(value=ANYTHING)
def test_owned_entry_point(entry, arg, value):
    fn, base = DIST[entry]
    kwargs = base()
    kwargs[arg] = value
    check_result(outcome(lambda: fn(**kwargs)))
