"""Processes VE, VP, SubVP, EDM against their closed forms (REFERENCE.md section 1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch
from _foundation import Case, cases, fractions
from hypothesis import given
from hypothesis import strategies as st

import difsolve as ds

# float32 relative tolerances of a few ulps of the arguments (exp of up to ~10)
RTOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def _t(case: Case, frac, device, dtype) -> torch.Tensor:
    return torch.as_tensor(case.times(frac), device=device, dtype=dtype)


# ----- defaults (API.md) ------------------------------------------------------------------
def test_defaults_match_api():
    ve, vp, sub, edm = ds.VE(), ds.VP(), ds.SubVP(), ds.EDM()
    assert (ve.t_min, ve.t_max, ve.prior_std) == (1e-5, 1.0, 50.0)
    assert (vp.t_min, vp.t_max, vp.prior_std) == (1e-3, 1.0, 1.0)
    assert (sub.t_min, sub.t_max, sub.prior_std) == (1e-3, 1.0, 1.0)
    assert (edm.t_min, edm.t_max, edm.prior_std) == (0.002, 80.0, 80.0)
    assert ve.unit_scale and edm.unit_scale and not vp.unit_scale and not sub.unit_scale
    assert all(p.has_sde for p in (ve, vp, sub, edm))
    assert math.isclose(edm.sigma_min, 0.002) and math.isclose(edm.sigma_max, 80.0)
    assert math.isclose(ve.sigma_max, 50.0)
    assert math.isclose(ve.sigma_min, 0.01 * 5000**1e-5)
    # the prior is the marginal at t_max of (almost) any data: b(t_max) = prior_std
    for p in (ve, vp, sub, edm):
        a, b = p.marginal(torch.tensor([p.t_max], dtype=torch.float64))
        assert float(a) < 1e-2 or p.unit_scale
        assert float(b) == pytest.approx(p.prior_std, rel=1e-4)


# ----- marginals and sigma ----------------------------------------------------------------
@given(case=cases(), frac=fractions)
def test_marginal_matches_closed_form(case: Case, frac, device, dtype):
    t = _t(case, frac, device, dtype)
    a, b = case.process.marginal(t)
    assert a.shape == t.shape and b.shape == t.shape
    assert a.dtype == dtype and b.dtype == dtype and a.device == t.device
    a_ref, b_ref = case.closed_form(t.cpu().double().numpy())
    np.testing.assert_allclose(a.cpu().double().numpy(), a_ref, rtol=RTOL[dtype])
    np.testing.assert_allclose(b.cpu().double().numpy(), b_ref, rtol=RTOL[dtype])
    sigma = case.process.sigma(t)
    assert sigma.dtype == dtype and sigma.device == t.device
    np.testing.assert_allclose(sigma.cpu().double().numpy(), b_ref / a_ref, rtol=2 * RTOL[dtype])
    np.testing.assert_allclose(case.process.log_snr(t).cpu().double().numpy(),
                               np.log(a_ref / b_ref), rtol=1e-4, atol=RTOL[dtype] * 10)


@given(case=cases(), frac=fractions)
def test_sigma_round_trips(case: Case, frac, device, dtype):
    p = case.process
    t = _t(case, frac, device, dtype)
    t_back = p.t_of_sigma(p.sigma(t))
    assert t_back.dtype == dtype and t_back.device == t.device
    tol = {torch.float32: 2e-5, torch.float64: 1e-11}[dtype]
    torch.testing.assert_close(t_back, t, rtol=tol, atol=tol * p.t_max)
    # sigma -> t -> sigma, sigma log-uniform in [sigma(t_min), sigma(t_max)]
    lo, hi = math.log(p.sigma_min), math.log(p.sigma_max)
    sig = torch.exp(lo + torch.as_tensor(frac, dtype=torch.float64) * (hi - lo)).to(device, dtype)
    torch.testing.assert_close(p.sigma(p.t_of_sigma(sig)), sig, rtol=4 * tol, atol=0.0)


@given(case=cases(), frac=fractions)
def test_dsigma_dt_matches_autograd_and_finite_differences(case: Case, frac):
    p = case.process
    t = torch.as_tensor(case.times(frac), dtype=torch.float64).requires_grad_(True)
    (grad,) = torch.autograd.grad(p.sigma(t).sum(), t)
    torch.testing.assert_close(p.dsigma_dt(t.detach()), grad, rtol=1e-9, atol=0.0)
    # central differences, independent of autograd
    td = t.detach()
    h = 1e-6 * torch.clamp(td, min=1e-3)
    fd = (p.sigma(td + h) - p.sigma(td - h)) / (2 * h)
    torch.testing.assert_close(p.dsigma_dt(td), fd, rtol=1e-5, atol=0.0)
    assert bool((p.dsigma_dt(td) > 0).all())


def test_dsigma_dt_float32(device):
    for p in (ds.VE(), ds.VP(), ds.SubVP(), ds.EDM()):
        t = torch.linspace(p.t_min, p.t_max, 7, dtype=torch.float64)
        ref = p.dsigma_dt(t)
        got = p.dsigma_dt(t.to(device, torch.float32))
        assert got.dtype == torch.float32 and got.device.type == device.type
        torch.testing.assert_close(got.cpu().double(), ref, rtol=1e-5, atol=0.0)


# ----- the SDE reproduces the marginals ---------------------------------------------------
@given(case=cases(), frac=fractions)
def test_drift_and_diffusion_reproduce_marginals(case: Case, frac):
    """``da/dt = f a`` and ``d(b^2)/dt = 2 f b^2 + g^2`` (autograd, float64)."""
    p = case.process
    t = torch.as_tensor(case.times(frac), dtype=torch.float64).requires_grad_(True)
    a, b = p.marginal(t)
    # a(t) = 1 is a constant for VE/EDM (no graph)
    da = (torch.autograd.grad(a.sum(), t, retain_graph=True)[0] if a.requires_grad
          else torch.zeros_like(t))
    (db2,) = torch.autograd.grad(b.square().sum(), t)
    t = t.detach()
    f, g2 = p.drift_coef(t), p.g2(t)
    a, b = a.detach(), b.detach()
    torch.testing.assert_close(da, f * a, rtol=1e-9, atol=1e-300)
    torch.testing.assert_close(db2, 2 * f * b.square() + g2, rtol=1e-9, atol=1e-300)
    # and the coefficients are the closed forms of REFERENCE.md
    torch.testing.assert_close(f, torch.as_tensor(case.f(t.numpy())), rtol=1e-12, atol=0.0)
    torch.testing.assert_close(g2, torch.as_tensor(case.g2(t.numpy())), rtol=1e-11, atol=0.0)


@given(case=cases(), frac=fractions)
def test_drift_and_diffusion_methods(case: Case, frac, device, dtype):
    p = case.process
    t = _t(case, frac, device, dtype)
    x = torch.randn(t.shape[0], 2, 3, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64).to(device, dtype)
    drift = p.drift(x, t)
    assert drift.shape == x.shape and drift.dtype == dtype and drift.device == x.device
    f = torch.as_tensor(case.f(t.cpu().double().numpy()))
    torch.testing.assert_close(drift.cpu().double(), f[:, None, None] * x.cpu().double(),
                               rtol=RTOL[dtype] * 10, atol=0.0)
    g = p.diffusion(t)
    assert g.shape == t.shape and g.dtype == dtype
    torch.testing.assert_close(g.cpu().double(),
                               torch.as_tensor(case.g2(t.cpu().double().numpy())).sqrt(),
                               rtol=RTOL[dtype] * 10, atol=0.0)
    # a Python float time broadcasts; a float64 time tensor does not change the dtype of x
    assert p.drift(x, float(t[0])).shape == x.shape
    assert p.drift(x, t.double()).dtype == dtype


# ----- prior ------------------------------------------------------------------------------
@pytest.mark.parametrize("process", [ds.VE(), ds.VP(), ds.SubVP(), ds.EDM()],
                         ids=["VE", "VP", "SubVP", "EDM"])
def test_prior_sample_moments(process, device, dtype):
    gen = torch.Generator(device=device).manual_seed(1)
    n, d = 20000, 3
    x = process.prior_sample((n, d), generator=gen, dtype=dtype)
    assert x.shape == (n, d) and x.dtype == dtype and x.device.type == device.type
    s = process.prior_std
    xd = x.double() / s
    # 5 standard errors: mean se 1/sqrt(n), variance se sqrt(2/n), kurtosis of N(0,1) is 3
    assert float(xd.mean(0).abs().max()) < 5 / math.sqrt(n)
    assert float((xd.var(0) - 1).abs().max()) < 5 * math.sqrt(2 / n)
    assert float(((xd**4).mean(0) - 3).abs().max()) < 5 * math.sqrt(96 / n)
    # same seed, same draw; other shapes
    again = process.prior_sample((n, d), generator=torch.Generator(device=device).manual_seed(1),
                                 device=device, dtype=dtype)
    assert torch.equal(x, again)
    assert process.prior_sample((2, 3, 4), device=device, dtype=dtype).shape == (2, 3, 4)


@pytest.mark.parametrize("process", [ds.VE(), ds.VP(), ds.SubVP(), ds.EDM(1e-3, 7.0)],
                         ids=["VE", "VP", "SubVP", "EDM"])
def test_prior_log_prob(process, device, dtype):
    gen = torch.Generator().manual_seed(2)
    x = process.prior_sample((5, 2, 3), generator=gen, dtype=torch.float64)
    lp = process.prior_log_prob(x.to(device, dtype))
    assert lp.shape == (5,) and lp.dtype == dtype and lp.device.type == device.type
    ref = scipy.stats.norm(0, process.prior_std).logpdf(x.reshape(5, -1).numpy()).sum(1)
    np.testing.assert_allclose(lp.cpu().double().numpy(), ref, rtol=RTOL[dtype] * 10)
    # in 1-D the density integrates to 1 (adaptive quadrature)
    def dens(v: float) -> float:
        return float(process.prior_log_prob(torch.tensor([[v]], dtype=torch.float64)).exp())
    total, _ = scipy.integrate.quad(dens, -np.inf, np.inf, epsabs=1e-12, epsrel=1e-10)
    assert total == pytest.approx(1.0, abs=1e-8)


@given(st.integers(0, 3), st.integers(1, 8))
def test_prior_log_prob_is_gaussian_in_any_dimension(which, d):
    process = [ds.VE(0.1, 3.0), ds.VP(), ds.SubVP(), ds.EDM(0.01, 2.0)][which]
    x = torch.randn(4, d, generator=torch.Generator().manual_seed(d), dtype=torch.float64) * 2
    s = process.prior_std
    ref = -0.5 * (x**2).sum(1) / s**2 - 0.5 * d * math.log(2 * math.pi * s**2)
    torch.testing.assert_close(process.prior_log_prob(x), ref, rtol=1e-13, atol=1e-13)
