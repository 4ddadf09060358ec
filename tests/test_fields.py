"""Score fields against exact ground truth: Gaussian mixtures, network adapters, dynamics.

Ground truth (REFERENCE.md section 2): ``p_t = sum_k w_k N(a mu_k, a^2 S_k + b^2 I)`` evaluated with
scipy; scores and divergences by autograd of the exact log-density; the posterior mean
``E[x0 | x_t]`` by plain linear algebra (tests/_foundation.py), independent of difsolve.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch
from _foundation import Case, Mixture, cases, mixture_args, random_mixture
from hypothesis import given, settings
from hypothesis import strategies as st

import difsolve as ds
from difsolve import parametrization as par
from difsolve.fields import GaussianMixtureField, check_field, denoise, is_exact

F64 = torch.float64


def _points(mix: Mixture, case: Case, frac: float, seed: int, n: int = 5):
    """``n`` points: draws of p_t (per-sample times around ``frac``) plus one far outlier."""
    rng = np.random.default_rng(seed)
    u = np.clip(frac + 0.1 * rng.standard_normal(n), 0.0, 1.0)
    t = torch.as_tensor(case.times(u), dtype=F64)
    a, b = (v.numpy() for v in case.process.marginal(t))
    comp = rng.choice(len(mix.weights), size=n, p=mix.weights)
    x0 = np.stack([rng.multivariate_normal(mix.means[c], mix.covs[c]) for c in comp])
    x = a[:, None] * x0 + b[:, None] * rng.standard_normal((n, mix.dim))
    x[-1] = x[-1] + 4 * (1 + b[-1]) * rng.standard_normal(mix.dim)  # an outlier
    return torch.as_tensor(x, dtype=F64), t


# ----- the mixture's densities ------------------------------------------------------------
@given(args=mixture_args, case=cases(), frac=st.floats(0, 1))
def test_marginal_log_prob_matches_scipy(args, case: Case, frac):
    seed, d, k = args
    mix = random_mixture(seed, d, k)
    gm = mix.build()
    x, t = _points(mix, case, frac, seed)
    a, b = case.process.marginal(t)
    got = gm.marginal_log_prob(x, t, case.process)
    ref = [mix.log_prob(x[i:i + 1].numpy(), float(a[i]), float(b[i]))[0] for i in range(len(t))]
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-9)
    # the data density p_0
    np.testing.assert_allclose(gm.log_prob(x).numpy(), mix.log_prob(x.numpy()), rtol=1e-10,
                               atol=1e-9)


@given(args=mixture_args, case=cases(), frac=st.floats(0, 1))
def test_score_is_gradient_of_marginal_log_prob(args, case: Case, frac):
    seed, d, k = args
    mix = random_mixture(seed, d, k)
    gm = mix.build()
    x, t = _points(mix, case, frac, seed)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(gm.marginal_log_prob(xg, t, case.process).sum(), xg)
    score = gm.marginal_score(x, t, case.process)
    # elementwise relative 1e-9, or 1e-10 of the row's largest component
    scale = grad.abs().amax(dim=1, keepdim=True)
    assert bool(((score - grad).abs() <= 1e-9 * grad.abs() + 1e-10 * scale).all())
    # the field object is the same function
    field = gm.score_field(case.process)
    torch.testing.assert_close(field(x, t), score, rtol=0.0, atol=0.0)
    torch.testing.assert_close(field.log_prob(x, t), gm.marginal_log_prob(x, t, case.process))


@given(args=mixture_args, case=cases(), frac=st.floats(0, 1))
def test_divergence_is_trace_of_autograd_hessian(args, case: Case, frac):
    seed, d, k = args
    mix = random_mixture(seed, d, k)
    gm = mix.build()
    x, t = _points(mix, case, frac, seed)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(gm.marginal_log_prob(xg, t, case.process).sum(), xg,
                                  create_graph=True)
    trace = sum(torch.autograd.grad(grad[:, i].sum(), xg, retain_graph=True)[0][:, i]
                for i in range(d))
    div = gm.score_field(case.process).divergence(x, t)
    assert div.shape == (x.shape[0],)
    torch.testing.assert_close(div, trace.detach(), rtol=1e-8, atol=1e-8 * float(trace.abs().max()))


@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 5), case=cases(),
       frac=st.floats(0, 1))
def test_marginal_density_integrates_to_one_1d(seed, k, case: Case, frac):
    mix = random_mixture(seed, 1, k)
    gm = mix.build()
    t = float(case.times([frac])[0])
    a, b = (float(v) for v in case.process.marginal(torch.tensor([t], dtype=F64)))
    std = np.sqrt(mix.marginal_covs(a, b)[:, 0, 0])
    centres = a * mix.means[:, 0]
    lo, hi = float((centres - 12 * std).min()), float((centres + 12 * std).max())

    def dens(v: float) -> float:
        x = torch.tensor([[v]], dtype=F64)
        return float(gm.marginal_log_prob(x, t, case.process).exp())

    total, err = scipy.integrate.quad(dens, lo, hi, points=sorted(centres), limit=400,
                                      epsabs=1e-11, epsrel=1e-10)
    assert err < 1e-8
    assert total == pytest.approx(1.0, abs=1e-8)
    # first moment: a * E[x0]
    mean, _ = scipy.integrate.quad(lambda v: v * dens(v), lo, hi, points=sorted(centres),
                                   limit=400, epsabs=1e-10, epsrel=1e-10)
    assert mean == pytest.approx(a * float(mix.weights @ mix.means[:, 0]),
                                 abs=1e-7 * (1 + float(np.abs(centres).max() + std.max())))


@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 5), case=cases(),
       frac=st.floats(0, 1))
def test_marginal_density_integrates_to_one_2d(seed, k, case: Case, frac):
    mix = random_mixture(seed, 2, k, min_var=0.1)
    gm = mix.build()
    t = float(case.times([frac])[0])
    a, b = (float(v) for v in case.process.marginal(torch.tensor([t], dtype=F64)))
    evals = np.linalg.eigvalsh(mix.marginal_covs(a, b))
    std_min, std_max = math.sqrt(evals.min()), math.sqrt(evals.max())
    half = float(np.abs(a * mix.means).max()) + 10 * std_max
    n = min(int(2 * half / (std_min / 3)) + 1, 1201)
    grid = torch.linspace(-half, half, n, dtype=F64)
    h = float(grid[1] - grid[0])
    assert h < std_min / 2.5  # fine enough for the trapezoid rule to be spectrally accurate
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
    dens = gm.marginal_log_prob(pts, t, case.process).exp().reshape(n, n)
    total = float(torch.trapezoid(torch.trapezoid(dens, dx=h, dim=1), dx=h))
    assert total == pytest.approx(1.0, abs=1e-7)
    # mean of p_t is a E[x0]
    mean = torch.stack([(dens * xx).sum(), (dens * yy).sum()]).numpy() * h * h
    np.testing.assert_allclose(mean, a * mix.weights @ mix.means, atol=1e-6 * (1 + half))


# ----- sampling ---------------------------------------------------------------------------
@given(seed=st.integers(0, 2**31 - 1), d=st.integers(1, 4), k=st.integers(1, 5))
def test_sample_moments_within_monte_carlo_error(seed, d, k):
    mix = random_mixture(seed, d, k)
    gm = mix.build()
    n = 20000
    x = gm.sample(n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    assert x.shape == (n, d) and x.dtype == F64
    mean = mix.weights @ mix.means
    second = np.einsum("k,kij->ij", mix.weights,
                       mix.covs + np.einsum("ki,kj->kij", mix.means, mix.means))
    cov = second - np.outer(mean, mean)
    xn = x.numpy()
    se_mean = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(xn.mean(0) - mean) < 5 * se_mean)
    c = xn - mean
    prods = c[:, :, None] * c[:, None, :]
    se_cov = prods.std(0) / math.sqrt(n)
    assert np.all(np.abs(prods.mean(0) - cov) < 5 * se_cov + 1e-12)
    # the same generator seed gives the same draw
    again = gm.sample(n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    assert torch.equal(x, again)


@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 5))
def test_sample_distribution_1d_kolmogorov_smirnov(seed, k):
    mix = random_mixture(seed, 1, k)
    x = mix.build().sample(4000, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    sd = np.sqrt(mix.covs[:, 0, 0])

    def cdf(v):
        v = np.asarray(v)[..., None]
        return (mix.weights * scipy.stats.norm.cdf((v - mix.means[:, 0]) / sd)).sum(-1)

    assert scipy.stats.kstest(x[:, 0].numpy(), cdf).pvalue > 1e-4


# ----- dtype, device, shapes, rows ----------------------------------------------------------
@pytest.mark.parametrize("process", [ds.VE(), ds.VP(), ds.SubVP(), ds.EDM()],
                         ids=["VE", "VP", "SubVP", "EDM"])
def test_mixture_keeps_dtype_and_device(process, device, dtype):
    mix = random_mixture(3, 3, 4)
    gm = mix.build()
    field = gm.score_field(process)
    x64, t64 = _points(mix, Case("", process, {}), 0.3, 3, n=6)
    x, t = x64.to(device, dtype), t64.to(device, dtype)
    for out in (field(x, t), gm.marginal_score(x, t, process)):
        assert out.dtype == dtype and out.device == x.device and out.shape == x.shape
    for out in (field.log_prob(x, t), field.divergence(x, t), gm.log_prob(x)):
        assert out.dtype == dtype and out.device == x.device and out.shape == (6,)
    samples = gm.sample(5, generator=torch.Generator(device=device).manual_seed(0), dtype=dtype)
    assert samples.dtype == dtype and samples.device.type == device.type
    # float32 agrees with float64 to float32 accuracy
    tol = {torch.float32: 1e-4, torch.float64: 1e-12}[dtype]
    ref = gm.marginal_score(x64, t64, process)
    scale = ref.abs().max()
    assert float((field(x, t).cpu().double() - ref).abs().max()) <= 10 * tol * float(scale)
    ref_lp = gm.marginal_log_prob(x64, t64, process)
    torch.testing.assert_close(field.log_prob(x, t).cpu().double(), ref_lp, rtol=tol, atol=tol)


def test_rows_are_independent_and_any_state_shape():
    mix = random_mixture(5, 4, 3)
    gm = mix.build()
    process = ds.VP()
    x, t = _points(mix, Case("VP", process, {}), 0.5, 5, n=5)
    batched = gm.marginal_score(x, t, process)
    for i in range(5):
        torch.testing.assert_close(gm.marginal_score(x[i:i + 1], t[i:i + 1], process),
                                   batched[i:i + 1], rtol=1e-13, atol=1e-13)
    # a Python float time is broadcast; states of shape (B, 2, 2) are flattened to d = 4
    s = gm.marginal_score(x, 0.4, process)
    torch.testing.assert_close(s, gm.marginal_score(x, torch.full((5,), 0.4, dtype=F64), process))
    s4 = gm.marginal_score(x.reshape(5, 2, 2), t, process)
    assert s4.shape == (5, 2, 2)
    torch.testing.assert_close(s4.reshape(5, 4), batched)


# ----- network adapters ---------------------------------------------------------------------
EPS64 = float(torch.finfo(F64).eps)


def _assert_close_cond(got, ref, x, b, power: int = 2, rtol: float = 1e-6):
    """Compare up to ``rtol`` of the largest entry plus the conditioning of the x0 route.

    Recovering the score from an x0 (or eps, v) prediction computes ``(a x0 - x) / b^2``: a
    rounding of ``x`` becomes an error ``eps |x| / b^2`` in the score (``/ b`` for eps), which is
    large when ``b`` is tiny (sub-VP at t = 1e-5 has b = 5e-6). Allow 16 such roundings per row.
    """
    bb = b.reshape(-1, *([1] * (x.ndim - 1)))
    cond = 16 * EPS64 * x.abs().amax(dim=1, keepdim=True).clamp(min=1.0) / bb**power
    bound = rtol * ref.abs().max() + cond
    assert bool(((got - ref).abs() <= bound).all()), float(((got - ref).abs() / bound).max())


def _exact_predictors(mix: Mixture, gm: ds.GaussianMixture, process: ds.Process):
    """Exact score/eps/x0/v/flow predictors ``model(x, t)`` of the mixture under ``process``."""

    def x0(x, t):
        a, b = process.marginal(t)
        return mix.posterior_mean(x, a, b)

    def ab(x, t):
        a, b = process.marginal(t)
        return a[:, None].to(x.dtype), b[:, None].to(x.dtype)

    def eps(x, t):
        a, b = ab(x, t)
        return (x - a * x0(x, t)) / b

    def v(x, t):
        a, b = ab(x, t)
        return a * eps(x, t) - b * x0(x, t)

    def flow(x, t):  # the flow-matching velocity eps - x0
        return eps(x, t) - x0(x, t)

    def score(x, t):
        return gm.marginal_score(x, t, process)

    return {"score": score, "eps": eps, "x0": x0, "v": v, "flow": flow}


@given(args=mixture_args, case=cases(), frac=st.floats(0, 1))
def test_parametrization_identities(args, case: Case, frac):
    """Tweedie and the eps/v identities, against the independent posterior mean."""
    seed, d, k = args
    mix = random_mixture(seed, d, k)
    gm = mix.build()
    x, t = _points(mix, case, frac, seed)
    a, b = (v[:, None] for v in case.process.marginal(t))
    s = gm.marginal_score(x, t, case.process)
    x0 = mix.posterior_mean(x, a[:, 0], b[:, 0])
    scale = float(x.abs().max() + x0.abs().max())
    torch.testing.assert_close(par.x0_from_score(s, x, a, b), x0, rtol=0, atol=1e-9 * scale)
    eps = (x - a * x0) / b
    _assert_close_cond(par.eps_from_score(s, b), eps, x, b, power=1)
    _assert_close_cond(par.v_from_score(s, x, a, b), a * eps - b * x0, x, b, power=1)
    for kind, out in (("score", s), ("eps", eps), ("x0", x0), ("v", a * eps - b * x0)):
        _assert_close_cond(par.score_from(kind, out, x, a, b), s, x, b)


@pytest.mark.parametrize("time_input", ["t", "999t", "sigma"])
@pytest.mark.parametrize("predicts", par.PREDICTIONS)
@settings(max_examples=max(3, settings().max_examples // 3))
@given(args=mixture_args, case=cases(), frac=st.floats(0, 1))
def test_score_network_recovers_exact_score(args, case: Case, frac, predicts, time_input):
    seed, d, k = args
    mix = random_mixture(seed, d, k)
    gm = mix.build()
    p = case.process
    x, t = _points(mix, case, frac, seed)
    exact = _exact_predictors(mix, gm, p)[predicts]
    seen = []
    if time_input == "t":
        def model(x, tt):
            seen.append(tt)
            return exact(x, tt)
        mapping = None
    elif time_input == "999t":
        def model(x, tt):
            seen.append(tt)
            return exact(x, tt / 999)
        def mapping(tt):
            return 999 * tt
    else:
        def model(x, tt):
            seen.append(tt)
            return exact(x, p.t_of_sigma(tt))
        mapping = p.sigma
    net = ds.ScoreNetwork(model, p, predicts=predicts, time_input=mapping)
    got = net(x, t)
    assert seen and seen[-1].shape == t.shape
    ref = gm.marginal_score(x, t, p)
    _assert_close_cond(got, ref, x, p.marginal(t)[1])


@pytest.mark.parametrize("predicts", par.PREDICTIONS)
def test_score_network_float32(predicts, device):
    mix = random_mixture(11, 2, 3)
    gm = mix.build()
    p = ds.VP()
    x64, t64 = _points(mix, Case("VP", p, {}), 0.4, 11, n=6)
    exact = _exact_predictors(mix, gm, p)[predicts]
    net = ds.ScoreNetwork(exact, p, predicts=predicts)
    x, t = x64.to(device, torch.float32), t64.to(device, torch.float32)
    got = net(x, t)
    assert got.dtype == torch.float32 and got.device == x.device and got.shape == x.shape
    ref = gm.marginal_score(x64, t64, p)
    assert float((got.cpu().double() - ref).abs().max()) < 1e-3 * float(ref.abs().max())


@given(args=mixture_args, case=cases(), frac=st.floats(0, 1))
def test_denoiser_recovers_exact_score(args, case: Case, frac):
    """An exact EDM denoiser ``D(y, sigma) = E[x0 | x0 + sigma z = y]`` under any process."""
    seed, d, k = args
    mix = random_mixture(seed, d, k)
    gm = mix.build()
    p = case.process
    x, t = _points(mix, case, frac, seed)
    sigmas_seen = []

    def edm_denoiser(y, sigma):
        sigmas_seen.append(sigma)
        return mix.posterior_mean(y, torch.ones_like(sigma), sigma)

    den = ds.Denoiser(edm_denoiser, p)
    ref = gm.marginal_score(x, t, p)
    _assert_close_cond(den(x, t), ref, x, p.marginal(t)[1])
    torch.testing.assert_close(sigmas_seen[-1], p.sigma(t), rtol=1e-14, atol=0.0)
    a, b = p.marginal(t)
    torch.testing.assert_close(den.denoise(x, t), mix.posterior_mean(x, a, b), rtol=1e-9,
                               atol=1e-9)
    if p.unit_scale:  # x0 = x + sigma^2 s for a = 1
        torch.testing.assert_close(den.denoise(x, t), x + b[:, None] ** 2 * ref, rtol=1e-8,
                                   atol=1e-8 * float(x.abs().max()))


def test_denoiser_edm_and_vp_explicit():
    """EDM: D = x + sigma^2 s; VP: the denoiser sees x / a and sigma = b / a."""
    mix = random_mixture(21, 2, 3)
    gm = mix.build()
    calls = []

    def model(y, sigma):
        calls.append((y, sigma))
        return mix.posterior_mean(y, torch.ones_like(sigma), sigma)

    edm = ds.EDM()
    x, t = _points(mix, Case("EDM", edm, {}), 0.3, 21)
    s = ds.Denoiser(model, edm)(x, t)
    torch.testing.assert_close(s, (model(x, t) - x) / t[:, None] ** 2)
    torch.testing.assert_close(s, gm.marginal_score(x, t, edm), rtol=1e-6, atol=1e-8)
    vp = ds.VP()
    x, t = _points(mix, Case("VP", vp, {}), 0.3, 21)
    a, b = vp.marginal(t)
    s = ds.Denoiser(model, vp)(x, t)
    y, sigma = calls[-1]
    torch.testing.assert_close(y, x / a[:, None])
    torch.testing.assert_close(sigma, b / a)
    torch.testing.assert_close(s, gm.marginal_score(x, t, vp), rtol=1e-6, atol=1e-8)


# ----- dynamics -------------------------------------------------------------------------------
@given(args=mixture_args, case=cases(), frac=st.floats(0, 1))
def test_probability_flow_and_reverse_sde_drifts(args, case: Case, frac):
    seed, d, k = args
    mix = random_mixture(seed, d, k)
    gm = mix.build()
    p = case.process
    field = gm.score_field(p)
    x, t = _points(mix, case, frac, seed)
    s = gm.marginal_score(x, t, p)
    f = torch.as_tensor(case.f(t.numpy()))[:, None]
    g2 = torch.as_tensor(case.g2(t.numpy()))[:, None]
    ode, sde = ds.ProbabilityFlowODE(field), ds.ReverseSDE(field)
    assert ode.field is field and ode.process is p and sde.process is p
    scale = float((f * x).abs().max() + (g2 * s).abs().max())
    torch.testing.assert_close(ode.drift(x, t), f * x - 0.5 * g2 * s, rtol=0, atol=1e-11 * scale)
    torch.testing.assert_close(sde.drift(x, t), f * x - g2 * s, rtol=0, atol=1e-11 * scale)
    torch.testing.assert_close(sde.diffusion(t), g2[:, 0].sqrt(), rtol=1e-12, atol=0.0)
    assert sde.noise == "additive" and not hasattr(ode, "diffusion")
    a, b = p.marginal(t)
    x0 = mix.posterior_mean(x, a, b)
    torch.testing.assert_close(ode.denoise(x, t), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(denoise(field, x, t), x0, rtol=1e-9, atol=1e-9)
    # divergence of the PF-ODE drift (autograd) = d f - g^2/2 tr H  (VP: -beta/2 (d + tr H))
    xg = x.clone().requires_grad_(True)
    drift = ode.drift(xg, t)
    div = sum(torch.autograd.grad(drift[:, i].sum(), xg, retain_graph=True)[0][:, i]
              for i in range(d))
    expected = d * f[:, 0] - 0.5 * g2[:, 0] * field.divergence(x, t)
    torch.testing.assert_close(div.detach(), expected, rtol=1e-8,
                               atol=1e-9 * float(expected.abs().max()))
    if case.kind == "EDM":  # dx/dsigma = (x - D(x, sigma)) / sigma
        torch.testing.assert_close(ode.drift(x, t), (x - x0) / t[:, None], rtol=1e-7,
                                   atol=1e-9 * scale)


class _PseudoScore:
    exact_score = False

    def __init__(self, process):
        self.process = process

    def __call__(self, x, t):
        return -x


def test_reverse_sde_refuses_pseudo_scores():
    field = _PseudoScore(ds.EDM())
    assert not is_exact(field) and is_exact(random_mixture(0, 2, 2).build().score_field(ds.VP()))
    with pytest.raises(ds.DifsolveError, match="exact_score") as info:
        ds.ReverseSDE(field)
    assert isinstance(info.value, ds.IncompatibleError)
    ode = ds.ProbabilityFlowODE(field)  # ODE solvers may use a pseudo-score
    x = torch.ones(3, 2)
    # EDM: g^2 = 2 sigma, drift = -sigma s = sigma x
    torch.testing.assert_close(ode.drift(x, torch.full((3,), 2.0)), 2.0 * x)


def test_score_field_protocol():
    gm = random_mixture(1, 2, 2).build()
    vp = ds.VP()
    good = [gm.score_field(vp), GaussianMixtureField(gm, ds.EDM()),
            ds.ScoreNetwork(lambda x, t: -x, vp), ds.Denoiser(lambda x, s: 0 * x, ds.EDM()),
            _PseudoScore(vp)]
    for field in good:
        assert isinstance(field, ds.ScoreField)
        check_field(field)
        ds.ProbabilityFlowODE(field)

    class NoProcess:
        def __call__(self, x, t):
            return x

    class NotCallable:
        process = vp

    for bad in (NoProcess(), NotCallable(), lambda x, t: x, gm, vp):
        assert not isinstance(bad, ds.ScoreField)
        with pytest.raises(ds.ArgumentTypeError, match="`field`"):
            ds.ProbabilityFlowODE(bad)
    # a `process` that is not a difsolve Process is refused too
    wrong = _PseudoScore(vp)
    wrong.process = "VP"
    with pytest.raises(ds.DifsolveError, match="`field`"):
        check_field(wrong)
