"""Issue-15 regressions in the multistep, stochastic, restart, PFGM++, DiscreteVP, schedule and
distributed modules (the fuzz harness of test_fuzz.py)."""
import numpy as np
import pytest
import torch
from test_fuzz import FIELD_EDM, FIELD_VP, X, check_solution

import difsolve as ds


def test_dpm_solver_zero_length_row_does_not_kill_the_batch():
    sol = ds.solve(ds.ProbabilityFlowODE(FIELD_VP), X.clone(), torch.tensor([1.0, 0.5, 1.0]),
                   0.5, solver=ds.DPMSolver(2), steps=4)
    check_solution(sol)
    assert sol.success and torch.equal(sol.x[1], X[1])


@pytest.mark.parametrize("order", [2.0, np.array([1.0, 2.0]), "2", True])
def test_dpm_solver_order_must_be_an_int(order):
    with pytest.raises(ds.DifsolveError, match="`order`"):
        ds.DPMSolver(order)


@pytest.mark.parametrize("s_tmax", ["a", torch.tensor([1.0, 2.0]), object()])
def test_edm_stochastic_heun_s_tmax_is_a_number(s_tmax):
    with pytest.raises(ds.DifsolveError, match="`s_tmax`"):
        ds.EDMStochasticHeun(churn=1.0, s_tmax=s_tmax)


def test_logsnr_schedule_to_sigma_zero_keeps_its_steps():
    ts = []
    ds.solve(ds.ProbabilityFlowODE(FIELD_EDM), X.clone(), 80.0, 0.0, solver=ds.Euler(),
             steps=10, schedule="logsnr", callback=lambda info: ts.append(float(info["t"][0])))
    assert len(set(ts)) == 10  # was ten times 0.0


def test_poisson_field_accepts_a_float_D():
    field = ds.PoissonField.from_data(torch.randn(10, 2), D=1e6)
    assert field.process.D == 1e6


def test_discrete_vp_refuses_a_huge_table():
    with pytest.raises(ds.DifsolveError, match="`n`"):
        ds.DiscreteVP.cosine(n=10**12)


@pytest.mark.parametrize("seeds", ["uniform", object()])
def test_distributed_seeds_are_checked(seeds):
    with pytest.raises(ds.DifsolveError, match="`seeds`"):
        ds.distributed.sample(FIELD_EDM, 5, batch_size=2, steps=3, solver=ds.Euler(),
                              seeds=seeds)
    with pytest.raises(ds.DifsolveError, match="`seeds`"):
        ds.distributed.log_likelihood(FIELD_VP, X.clone(), batch_size=2, seeds=seeds)


def test_distributed_gather_is_checked():
    with pytest.raises(ds.DifsolveError, match="`gather`"):
        ds.distributed.log_likelihood(FIELD_VP, X.clone(), batch_size=2,
                                      gather=np.array([1.0, 2.0]))
