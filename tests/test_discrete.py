"""DiscreteVP: DDPM tables as a process whose time is the timestep index (issue 12).

Ground truth: the tables written out from their definitions (REFERENCE.md, "Discrete DDPM
table") in numpy, log sigma linear between integers, finite differences of the marginals, and the
closed-form EDM flow of Gaussian data in ``y = x / a``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _foundation import GAUSS_COV, GAUSS_MEAN, assert_sde_reproduces_marginals, edm_reference_endpoint

import difsolve as ds


def _numpy_tables(n: int = 1000) -> dict[str, np.ndarray]:
    """``alphas_cumprod`` of the three published schedules, from their definitions."""
    lin = np.linspace(1e-4, 0.02, n)
    scaled = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), n) ** 2
    s = 0.008

    def abar(u):
        return np.cos((u + s) / (1 + s) * np.pi / 2) ** 2 / np.cos(s / (1 + s) * np.pi / 2) ** 2

    i = np.arange(n)
    cos = np.minimum(1 - abar((i + 1) / n) / abar(i / n), 0.999)
    return {name: np.cumprod(1 - b) for name, b in
            (("linear", lin), ("scaled_linear", scaled), ("cosine", cos))}


TABLES = _numpy_tables()
KINDS = tuple(TABLES)


def _process(kind: str) -> ds.DiscreteVP:
    return getattr(ds.DiscreteVP, kind)()


@pytest.mark.parametrize("kind", KINDS)
def test_table_reproduced_at_integer_times(kind):
    p = _process(kind)
    acp = torch.as_tensor(TABLES[kind])
    assert p.n == 1000 and p.t_min == 0.0 and p.t_max == 999.0
    torch.testing.assert_close(p.alphas_cumprod, acp, rtol=1e-12, atol=0.0)
    # the process reproduces its own table to round-off (1 - acp is exact for acp >= 1/2)
    acp = p.alphas_cumprod
    t = torch.arange(1000, dtype=torch.float64)
    a, b = p.marginal(t)
    torch.testing.assert_close(a, acp.sqrt(), rtol=1e-14, atol=0.0)
    torch.testing.assert_close(b, (1 - acp).sqrt(), rtol=1e-14, atol=0.0)
    torch.testing.assert_close(p.sigma(t), ((1 - acp) / acp).sqrt(), rtol=1e-14, atol=0.0)
    assert p.sigma_min > 0 and math.isclose(p.sigma_min, math.sqrt((1 - acp[0]) / acp[0]))


@pytest.mark.parametrize("kind", KINDS)
def test_log_sigma_is_linear_between_integers(kind):
    p = _process(kind)
    ls = 0.5 * np.log((1 - TABLES[kind]) / TABLES[kind])
    t = np.random.default_rng(0).uniform(0, 999, 500)
    i = np.minimum(np.floor(t).astype(int), 998)
    w = t - i
    ref = (1 - w) * ls[i] + w * ls[i + 1]
    got = torch.log(p.sigma(torch.as_tensor(t))).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    a, b = p.marginal(torch.as_tensor(t))
    np.testing.assert_allclose((a.square() + b.square()).numpy(), 1.0, rtol=1e-14)


@pytest.mark.parametrize("kind", KINDS)
def test_sigma_and_t_of_sigma_round_trip(kind, device, dtype):
    p = _process(kind)
    t64 = torch.cat([torch.arange(1000, dtype=torch.float64),
                     torch.rand(2000, generator=torch.Generator().manual_seed(1),
                                dtype=torch.float64) * 999,
                     torch.tensor([-0.3, 999.4], dtype=torch.float64)])  # end pieces extended
    t = t64.to(device, dtype)
    back = p.t_of_sigma(p.sigma(t))
    assert back.dtype == dtype and back.device.type == device.type
    tol = 1e-9 if dtype == torch.float64 else 2e-2  # float32: ulp(log sigma) / slope
    torch.testing.assert_close(back, t, rtol=0.0, atol=tol)
    sig = torch.logspace(math.log10(p.sigma_min), math.log10(p.sigma_max), 301,
                         dtype=torch.float64).to(device, dtype)
    # float32: a time near 999 has ulp 6e-5, i.e. a relative sigma resolution of slope * ulp
    ls = torch.log(p.sigma(torch.arange(1000, dtype=torch.float64)))
    res = float((ls[1:] - ls[:-1]).max()) * 999 * 2.0**-23
    torch.testing.assert_close(p.sigma(p.t_of_sigma(sig)), sig,
                               rtol=1e-12 if dtype == torch.float64 else 2 * res + 1e-6, atol=0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_drift_and_diffusion_reproduce_marginals(kind):
    """Inside every piece (``t = i + w``): ``da/dt = f a``, ``db^2/dt = 2 f b^2 + g^2``."""
    p = _process(kind)
    w = torch.rand(999, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.arange(999, dtype=torch.float64) + 0.05 + 0.9 * w
    assert_sde_reproduces_marginals(p, t, h=1e-5)
    # the REFERENCE.md forms: f = -(sigma^2/(1+sigma^2)) dlog sigma/dt, g^2 = -2 f
    s = p.sigma(t)
    dls = p.dsigma_dt(t) / s
    torch.testing.assert_close(p.drift_coef(t), -(s**2 / (1 + s**2)) * dls, rtol=1e-12, atol=0)
    torch.testing.assert_close(p.g2(t), -2 * p.drift_coef(t), rtol=1e-14, atol=0)
    x = torch.randn(999, 3, dtype=torch.float64)
    torch.testing.assert_close(p.drift(x, t), p.drift_coef(t)[:, None] * x)
    torch.testing.assert_close(p.diffusion(t), p.g2(t).sqrt())


def test_an_integer_time_belongs_to_the_piece_on_its_right():
    p = ds.DiscreteVP.linear()
    ls = torch.log(p.sigma(torch.arange(1000, dtype=torch.float64)))
    t = torch.tensor([0.0, 10.0, 998.0, 999.0], dtype=torch.float64)
    i = torch.tensor([0, 10, 998, 998])
    torch.testing.assert_close(p.dsigma_dt(t) / p.sigma(t), ls[i + 1] - ls[i], rtol=1e-12, atol=0)


def test_from_betas_and_constructors():
    betas = np.linspace(1e-4, 0.02, 1000)
    p = ds.DiscreteVP.from_betas(betas)
    torch.testing.assert_close(p.alphas_cumprod, torch.as_tensor(TABLES["linear"]),
                               rtol=1e-13, atol=0)
    short = ds.DiscreteVP.linear(n=10, beta_start=0.01, beta_end=0.2)
    assert short.n == 10 and short.t_max == 9.0
    assert "n=1000" in repr(p)


@pytest.mark.parametrize("bad, match", [
    ([0.9, 0.95], "strictly decreasing"),
    ([0.9, 0.0], r"\(0, 1\)"),
    ([1.0, 0.5], r"\(0, 1\)"),
    ([0.5], "at least 2"),
    ([[0.9, 0.5]], "1-D"),
    ([0.9, float("nan")], "finite"),
])
def test_bad_tables_are_refused(bad, match):
    with pytest.raises(ds.DifsolveError, match="alphas_cumprod") as info:
        ds.DiscreteVP(bad)
    assert info.match(match)


def test_bad_betas_and_schedulers_are_refused():
    with pytest.raises(ds.DifsolveError, match="betas"):
        ds.DiscreteVP.from_betas([0.1, 1.5])
    with pytest.raises(ds.DifsolveError, match="beta_start"):
        ds.DiscreteVP.linear(beta_start=-1.0)
    with pytest.raises(ds.DifsolveError, match="scheduler"):
        ds.DiscreteVP.from_diffusers(object())


# ----- every solver, schedule, controller and time variable works on it ---------------------
SOLVES = [
    # (id, solver, keyword arguments of solve, bound on the endpoint error relative to its scale)
    ("heun-karras-t", ds.Heun(), dict(steps=64, schedule="karras"), 4e-3),
    ("rk4-logsnr-log_sigma", ds.RK4(), dict(steps=64, schedule="logsnr",
                                           time_variable="log_sigma"), 1e-5),
    ("rk4-logsnr-snr", ds.RK4(), dict(steps=64, schedule="logsnr", time_variable="snr"), 1e-4),
    ("dpm3-logsnr", ds.DPMSolver(3), dict(steps=64, schedule="logsnr"), 2e-4),
    # in t the drift jumps at each of the 999 integers (log sigma is piecewise linear), and each
    # jump costs up to the local tolerance: the global error is ~1e3 rtol; log_sigma and snr
    # times (where the drift is continuous) are the ones ds.sample uses under a controller
    ("dopri5-controller-t", ds.Dopri5(), dict(controller=ds.PIController(rtol=1e-7, atol=1e-7)),
     1e-3),
    ("dopri5-controller-log_sigma", ds.Dopri5(),
     dict(controller=ds.PIController(rtol=1e-7, atol=1e-7), time_variable="log_sigma"), 1e-6),
    ("dopri5-controller-snr", ds.Dopri5(),
     dict(controller=ds.PIController(rtol=1e-7, atol=1e-7), time_variable="snr"), 1e-6),
    ("dpm2c-controller-log_sigma", ds.DPMSolver(2, corrector=True),
     dict(controller=ds.PIController(rtol=1e-6, atol=1e-6), time_variable="log_sigma"), 2e-5),
]


def gaussian_field(process):
    gm = ds.GaussianMixture([1.0], torch.tensor([GAUSS_MEAN], dtype=torch.float64),
                            torch.tensor([GAUSS_COV], dtype=torch.float64))
    return gm.score_field(process)


def pf_endpoint_errors(process, solver, kwargs, n=64):
    """Relative endpoint error of the PF-ODE from t_max to t_min against the EDM closed form."""
    field = gaussian_field(process)
    x = process.prior_sample((n, 3), generator=torch.Generator().manual_seed(3),
                             dtype=torch.float64)
    sol = ds.solve(ds.ProbabilityFlowODE(field), x, process.t_max, process.t_min, solver=solver,
                   **kwargs)
    assert bool((sol.status == ds.Status.SUCCESS).all())
    ref = edm_reference_endpoint(process, x, process.t_max, process.t_min)
    return float((sol.x - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name, solver, kwargs, tol", SOLVES, ids=[s[0] for s in SOLVES])
def test_probability_flow_matches_the_closed_form_edm_flow(kind, name, solver, kwargs, tol):
    err = pf_endpoint_errors(_process(kind), solver, kwargs)
    assert err < tol, err


@pytest.mark.parametrize("kind", KINDS)
def test_dpm_solver_on_the_table_equals_dpm_solver_on_edm(kind):
    """DPM-Solver++ sees only lambda and the data prediction: on the same sigma grid, DiscreteVP
    in timestep time and EDM in sigma time give the same ``y = x / a`` to round-off."""
    p = _process(kind)
    edm = ds.EDM(p.sigma_min, p.sigma_max)
    sig = torch.logspace(math.log10(p.sigma_max), math.log10(p.sigma_min), 21, dtype=torch.float64)
    x = p.prior_sample((32, 3), generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    vp = ds.solve(ds.ProbabilityFlowODE(gaussian_field(p)), x, p.t_max, p.t_min,
                  solver=ds.DPMSolver(3), steps=p.t_of_sigma(sig))
    a0, a1 = (p.marginal(torch.tensor(v, dtype=torch.float64))[0] for v in (p.t_max, p.t_min))
    ed = ds.solve(ds.ProbabilityFlowODE(gaussian_field(edm)), x / a0, edm.t_max, edm.t_min,
                  solver=ds.DPMSolver(3), steps=sig)
    torch.testing.assert_close(vp.x / a1, ed.x, rtol=1e-9, atol=1e-9)


def test_sample_runs_on_the_table_and_reverse_sde_has_the_data_moments():
    """``ds.sample`` with the reverse SDE from timestep 999 to 0: moments of N(mean, cov)."""
    p = ds.DiscreteVP.linear()
    field = gaussian_field(p)
    sol = ds.sample(field, (4000, 3), solver=ds.EulerMaruyama(), steps=250,
                    generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = sol.x
    mean, cov = torch.tensor(GAUSS_MEAN, dtype=torch.float64), torch.tensor(GAUSS_COV,
                                                                           dtype=torch.float64)
    # Monte-Carlo standard error of the mean ~ 0.016 per coordinate; EM bias at 250 steps small
    assert float((x.mean(0) - mean).abs().max()) < 0.06
    assert float((torch.cov(x.T) - cov).abs().max()) < 0.08


def test_likelihood_on_the_table_matches_the_exact_marginal():
    """The likelihood identity with the exact ``p_T``: ``log p_0(x) = log p_T(x_T) + int div``
    (with the prior N(0, I) instead of p_T the per-sample bias is O(a_T |mu| |x_T|) ~ 1e-2)."""
    p = ds.DiscreteVP.linear()
    field = gaussian_field(p)
    x = field.mixture.sample(8, torch.Generator().manual_seed(5), dtype=torch.float64)
    # log_likelihood's default time, log sigma, where the drift is continuous (in t it jumps
    # at the integers, see SOLVES: measured 2.8e-3 nats at rtol 1e-7)
    ll = ds.log_likelihood(field, x, trace=ds.ExactTrace(),
                           controller=ds.PIController(rtol=1e-7, atol=1e-7))
    t_max = torch.full((8,), p.t_max, dtype=torch.float64)
    got = field.log_prob(ll.latent, t_max) + ll.delta_log_prob[:, 0]
    exact = field.log_prob(x, torch.zeros(8, dtype=torch.float64))
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-6)
    assert float((ll.log_prob - exact).abs().max()) < 0.05  # the prior-mismatch bias
