"""RectifiedFlow and predicts="flow" (issue 12): x_t = (1 - t) x0 + t eps, velocity eps - x0.

Ground truth: REFERENCE.md's formulas, an exact velocity model built from the mixture's
independent posterior mean (``_foundation.Mixture.posterior_mean``), the flow-matching Euler loop
written out by hand, and the closed-form EDM flow of Gaussian data in ``y = x / a``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from _foundation import GAUSS_COV, GAUSS_MEAN, assert_sde_reproduces_marginals, random_mixture
from test_discrete import gaussian_field, pf_endpoint_errors

import difsolve as ds


def test_marginals_and_coefficients_are_the_reference_forms():
    p = ds.RectifiedFlow()
    assert (p.t_min, p.t_max) == (1e-3, 1 - 1e-3)
    t = torch.linspace(0.01, 0.99, 97, dtype=torch.float64)
    a, b = p.marginal(t)
    torch.testing.assert_close(a, 1 - t, rtol=0, atol=0)
    torch.testing.assert_close(b, t, rtol=0, atol=0)
    torch.testing.assert_close(p.sigma(t), t / (1 - t))
    torch.testing.assert_close(p.t_of_sigma(p.sigma(t)), t, rtol=1e-14, atol=0)
    torch.testing.assert_close(p.drift_coef(t), -1 / (1 - t))
    torch.testing.assert_close(p.g2(t), 2 * t / (1 - t))
    assert_sde_reproduces_marginals(p, t, h=1e-6)


@pytest.mark.parametrize("kwargs, name", [
    (dict(t_max=1.0), "t_max"), (dict(t_min=0.0), "t_min"), (dict(t_min=0.6, t_max=0.5), "t_min"),
])
def test_bad_intervals_are_refused(kwargs, name):
    with pytest.raises(ds.DifsolveError, match=name):
        ds.RectifiedFlow(**kwargs)


def _velocity_model(mix, p):
    """The exact flow-matching velocity E[eps - x0 | x_t] of the mixture (independent of difsolve's
    conversions): x0 = posterior mean, eps = (x - a x0) / b."""

    def velocity(x, t):
        a, b = p.marginal(t)
        x0 = mix.posterior_mean(x, a, b)
        return (x - a[:, None] * x0) / b[:, None] - x0

    return velocity


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flow_prediction_equals_the_exact_field_and_the_drift_is_the_velocity(seed):
    mix = random_mixture(seed, d=3, k=3)
    gm = mix.build()
    p = ds.RectifiedFlow()
    velocity = _velocity_model(mix, p)
    net = ds.ScoreNetwork(velocity, p, predicts="flow")
    gen = torch.Generator().manual_seed(seed)
    t = torch.rand(64, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    a, b = p.marginal(t)
    x = a[:, None] * gm.sample(64, gen, dtype=torch.float64) + b[:, None] * torch.randn(
        64, 3, generator=gen, dtype=torch.float64)
    exact = gm.score_field(p)
    torch.testing.assert_close(net(x, t), exact(x, t), rtol=1e-8, atol=1e-8)
    # the probability-flow drift f x - g^2 s / 2 is the velocity (its 1/(1 - t) terms cancel)
    drift = ds.ProbabilityFlowODE(net).drift(x, t)
    scale = (x.abs() / (1 - t[:, None])).amax()
    torch.testing.assert_close(drift, velocity(x, t), rtol=0, atol=64 * 2.0**-52 * float(scale))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_euler_in_t_is_the_flow_matching_euler_sampler(dtype):
    """``x <- x + (t_next - t) v(x, t)`` from t = 1 - 1e-3 to 1e-3, 20 uniform steps."""
    mix = random_mixture(3, d=2, k=4)
    p = ds.RectifiedFlow()
    velocity = _velocity_model(mix, p)
    net = ds.ScoreNetwork(velocity, p, predicts="flow")
    x0 = p.prior_sample((128, 2), generator=torch.Generator().manual_seed(4), dtype=dtype)
    grid = torch.linspace(p.t_max, p.t_min, 21, dtype=torch.float64)
    x = x0.clone()
    for t, t_next in itertools.pairwise(grid.tolist()):
        tt = torch.full((128,), t, dtype=dtype)
        x = x + (t_next - t) * velocity(x, tt)
    sol = ds.solve(ds.ProbabilityFlowODE(net), x0, p.t_max, p.t_min, solver=ds.Euler(), steps=20)
    # float32: the score form's x/(1 - t) terms cancel to the velocity (1e3 |x| ulp at t_max)
    tol = 1e-12 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(sol.x, x, rtol=0, atol=tol * float(x.abs().max()))


SOLVES = [
    ("euler-uniform-t", ds.Euler(), dict(steps=400), 5e-3),
    ("heun-uniform-t", ds.Heun(), dict(steps=64), 2e-4),
    ("rk4-logsnr-log_sigma", ds.RK4(), dict(steps=64, schedule="logsnr",
                                           time_variable="log_sigma"), 1e-5),
    ("dpm3-logsnr", ds.DPMSolver(3), dict(steps=64, schedule="logsnr"), 2e-4),
    ("dopri5-controller-t", ds.Dopri5(), dict(controller=ds.PIController(rtol=1e-7, atol=1e-7)),
     1e-6),
    ("dopri5-controller-snr", ds.Dopri5(),
     dict(controller=ds.PIController(rtol=1e-7, atol=1e-7), time_variable="snr"), 1e-6),
    ("dpm2c-controller-log_sigma", ds.DPMSolver(2, corrector=True),
     dict(controller=ds.PIController(rtol=1e-6, atol=1e-6), time_variable="log_sigma"), 2e-5),
]


@pytest.mark.parametrize("name, solver, kwargs, tol", SOLVES, ids=[s[0] for s in SOLVES])
def test_probability_flow_matches_the_closed_form_edm_flow(name, solver, kwargs, tol):
    err = pf_endpoint_errors(ds.RectifiedFlow(), solver, kwargs)
    assert err < tol, err


def test_euler_converges_at_first_order_on_the_flow():
    errs = [pf_endpoint_errors(ds.RectifiedFlow(), ds.Euler(), dict(steps=n)) for n in (50, 100,
                                                                                       200)]
    slope = math.log(errs[0] / errs[2]) / math.log(4)
    assert 0.8 < slope < 1.2, (errs, slope)


def test_reverse_sde_and_likelihood_on_the_flow():
    p = ds.RectifiedFlow()
    field = gaussian_field(p)
    sol = ds.sample(field, (4000, 3), solver=ds.EulerMaruyama(), steps=250,
                    generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    mean = torch.tensor(GAUSS_MEAN, dtype=torch.float64)
    cov = torch.tensor(GAUSS_COV, dtype=torch.float64)
    assert float((sol.x.mean(0) - mean).abs().max()) < 0.06
    assert float((torch.cov(sol.x.T) - cov).abs().max()) < 0.08
    x = field.mixture.sample(8, torch.Generator().manual_seed(6), dtype=torch.float64)
    ll = ds.log_likelihood(field, x, trace=ds.ExactTrace(),
                           controller=ds.PIController(rtol=1e-7, atol=1e-7))
    got = field.log_prob(ll.latent, torch.full((8,), p.t_max, dtype=torch.float64)) + \
        ll.delta_log_prob[:, 0]
    exact = field.log_prob(x, torch.full((8,), p.t_min, dtype=torch.float64))
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-6)
