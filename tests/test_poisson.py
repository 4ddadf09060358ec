"""PFGM / PFGM++ (``ds.Poisson``, ``ds.PoissonField``) against closed forms.

Ground truth (``shared/REFERENCE.md`` section 4), written out here independently of the library:
the multivariate Student-t kernel (scipy.stats.multivariate_t), the Beta-prime law of the prior
radius (scipy.stats.betaprime), the plain non-streamed t-kernel posterior mean, the
Gaussian-smoothed empirical score, the Coulomb field in ``N + D`` dimensions as minus the gradient
of its potential, and the exact mixture-of-t density of the marginals.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

import difsolve as ds
from difsolve.poisson import RTimeODE, _lgamma_shift, denoiser_from_field, log_t_kernel

F64 = torch.float64
INF = math.inf


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests use tiny tensors: intra-op threads only add synchronisation (on a loaded
    2-core machine the module took 250 s with the default threads against 21 s with one).
    Restores the caller's setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# a weighted, non-symmetric 2-D point set (weighted mean subtracted below)
POINTS = torch.tensor([[1.0, 0.0], [-1.0, 0.2], [0.1, 1.5], [0.3, -1.1]], dtype=F64)
WEIGHTS = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
POINTS = POINTS - (WEIGHTS[:, None] * POINTS).sum(0)


def t_kernel_direct(x: torch.Tensor, y: torch.Tensor, D: float, sigma: torch.Tensor) -> torch.Tensor:
    """``p_r(x|y) = Gamma((N+D)/2) / (pi^(N/2) Gamma(D/2)) r^D / (|x-y|^2 + r^2)^((N+D)/2)``
    for rows ``x (B, N)`` against points ``y (K, N)``: ``(B, K)`` (plain formula, float64)."""
    n = x.shape[1]
    sq = (x[:, None, :] - y[None]).square().sum(-1)
    s2 = sigma.square()[:, None]
    if math.isinf(D):
        return torch.exp(-0.5 * sq / s2) / (2 * math.pi * s2) ** (n / 2)
    r2 = D * s2
    const = math.exp(math.lgamma((n + D) / 2) - math.lgamma(D / 2)) / math.pi ** (n / 2)
    return const * r2 ** (D / 2) / (sq + r2) ** ((n + D) / 2)


def posterior_mean_direct(x, y, w, D, sigma):
    k = w[None] * t_kernel_direct(x, y, D, sigma)
    return (k @ y) / k.sum(1, keepdim=True)


def gaussian_smoothed_score(x, y, w, sigma):
    """Score of ``sum_i w_i N(y_i, sigma^2 I)`` (softmax of ``-|x - y_i|^2 / 2 sigma^2``)."""
    logits = w.log()[None] - 0.5 * (x[:, None, :] - y[None]).square().sum(-1) / sigma[:, None] ** 2
    g = torch.softmax(logits, dim=1)
    return (g @ y - x) / sigma[:, None] ** 2


# ----- the process ------------------------------------------------------------------------------
@pytest.mark.parametrize("D", [1, 8, 128, INF])
def test_process_schedule_is_edm(D):
    p, e = ds.Poisson(D, 0.01, 50.0), ds.EDM(0.01, 50.0)
    t = torch.tensor([0.01, 0.3, 7.0, 50.0], dtype=F64)
    for name in ("sigma", "t_of_sigma", "dsigma_dt", "drift_coef", "g2", "log_snr"):
        assert torch.equal(getattr(p, name)(t), getattr(e, name)(t)), name
    assert torch.equal(p.marginal(t)[1], e.marginal(t)[1])
    assert (p.t_min, p.t_max, p.unit_scale) == (0.01, 50.0, True)
    assert p.has_sde is math.isinf(D)
    x = torch.zeros(4, 2, dtype=F64)
    if math.isinf(D):
        assert torch.equal(p.drift(x, t), e.drift(x, t))
        assert torch.equal(p.diffusion(t), e.diffusion(t))
    else:
        with pytest.raises(ds.IncompatibleError, match="no forward or reverse SDE"):
            p.drift(x, t)
        with pytest.raises(ds.DifsolveError):
            p.diffusion(t)
        assert torch.allclose(p.r_of_sigma(t), t * math.sqrt(D))
        assert torch.allclose(p.sigma_of_r(p.r_of_sigma(t)), t)


@pytest.mark.parametrize("bad", [0, -3, 2.5, 8.0, "8", True, math.nan, -INF, None])
def test_invalid_D(bad):
    with pytest.raises(ds.DifsolveError, match="`D`"):
        ds.Poisson(bad)
    with pytest.raises(ds.DifsolveError, match="`D`"):
        ds.PoissonField.from_data(POINTS, bad)


def test_D_accepts_integers_and_inf():
    assert ds.Poisson(np.int64(8)).D == 8 and isinstance(ds.Poisson(np.int64(8)).D, int)
    assert ds.Poisson(math.inf).D == math.inf and ds.Poisson(float("inf")).exact


def test_invalid_arguments():
    with pytest.raises(ds.DifsolveError, match="sigma_max"):
        ds.Poisson(8, sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ds.DifsolveError, match="sigma_min"):
        ds.Poisson(8, sigma_min=-1.0)
    with pytest.raises(ds.ArgumentTypeError, match="denoiser"):
        ds.PoissonField("not callable", 8)
    with pytest.raises(ds.DifsolveError, match="points"):
        ds.PoissonField.from_data(torch.zeros(3), 8)
    with pytest.raises(ds.DifsolveError, match="points"):
        ds.PoissonField.from_data(torch.tensor([[0.0, math.nan]]), 8)
    with pytest.raises(ds.DifsolveError, match="weights"):
        ds.PoissonField.from_data(POINTS, 8, weights=[0.5, 0.5])
    with pytest.raises(ds.DifsolveError, match="weights"):
        ds.PoissonField.from_data(POINTS, 8, weights=[0.5, 0.5, 0.5, -0.5])
    with pytest.raises(ds.DifsolveError, match="chunk_size"):
        ds.PoissonField.from_data(POINTS, 8, chunk_size=0)
    f = ds.PoissonField.from_data(POINTS, 8)
    with pytest.raises(ds.DifsolveError, match="`x`"):
        f(torch.zeros(3, 3, dtype=F64), 1.0)
    with pytest.raises(ds.IncompatibleError):
        ds.PoissonField(lambda x, s: x, 8).log_prob(torch.zeros(2, 2), 1.0)
    with pytest.raises(ds.IncompatibleError):
        RTimeODE(ds.PoissonField.from_data(POINTS, INF))
    with pytest.raises(ds.DifsolveError, match="shape"):
        ds.Poisson(8).prior_sample((0, 2))


# ----- the t-kernel and the prior -----------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("D", [1, 3, 8, 128, 4096])
def test_log_t_kernel_is_student_t(n, D):
    """``log_t_kernel`` = scipy's multivariate t (df D, shape sigma^2 I) and the plain formula."""
    gen = torch.Generator().manual_seed(n * 1000 + D)
    x = 3.0 * torch.randn(16, n, generator=gen, dtype=F64)
    sigma = torch.full((16,), 1.7, dtype=F64)
    ours = log_t_kernel(x.square().sum(1), n, D, sigma)
    ref = stats.multivariate_t(loc=np.zeros(n), shape=1.7**2 * np.eye(n), df=D).logpdf(x.numpy())
    np.testing.assert_allclose(ours.numpy(), np.atleast_1d(ref), rtol=0, atol=1e-10)
    if D <= 128:  # the plain formula overflows (r^D) beyond
        direct = t_kernel_direct(x, torch.zeros(1, n, dtype=F64), D, sigma)[:, 0].log()
        np.testing.assert_allclose(ours.numpy(), direct.numpy(), rtol=0, atol=1e-10)


def test_lgamma_shift_large_D():
    """``log Gamma(a + b) - log Gamma(a) - b log a`` against 50-digit mpmath, up to a = 1e15."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    for a in [0.5, 4.0, 31.9, 32.0, 64.0, 1e3, 1e6, 1e10, 1e15]:
        for b in [0.5, 1.0, 7.5, 1536.0]:
            exact = float(mpmath.loggamma(mpmath.mpf(a) + b) - mpmath.loggamma(a)
                          - b * mpmath.log(a))
            assert abs(_lgamma_shift(a, b) - exact) <= 1e-12 * max(1.0, abs(exact)) + 1e-13 * b, (
                a, b)


def test_prior_log_prob_large_D_tends_to_gaussian():
    """Stable for huge D: the t prior approaches N(0, sigma_max^2 I) with a gap of order 1/D."""
    x = torch.randn(8, 3, 4, generator=torch.Generator().manual_seed(0), dtype=F64) * 80.0
    gauss = ds.EDM().prior_log_prob(x)
    gaps = []
    for D in [2**20, 2**30, 2**40]:
        lp = ds.Poisson(D).prior_log_prob(x)
        assert torch.isfinite(lp).all()
        gaps.append((lp - gauss).abs().max().item())
    # O(1/D) gap: each factor 2^10 in D shrinks it ~2^10 until round-off (~1e-12 of |log p|)
    assert gaps[0] < 1e-3
    assert gaps[1] < max(2e-3 * gaps[0], 1e-10)
    assert gaps[2] < 1e-10
    torch.testing.assert_close(ds.Poisson(INF).prior_log_prob(x), gauss, rtol=1e-14, atol=0)


@pytest.mark.parametrize("shape", [(4000, 2), (4000, 2, 3)])
@pytest.mark.parametrize("D", [1, 8, 128, 4096])
def test_prior_radius_is_beta_prime(shape, D):
    """R^2 / r_max^2 ~ BetaPrime(N/2, D/2) (KS test), directions uniform, torch generator only."""
    p = ds.Poisson(D)
    n_dim = math.prod(shape[1:])
    np.random.seed(123)  # noqa: NPY002  (the global numpy RNG must not matter)
    x = p.prior_sample(shape, generator=torch.Generator().manual_seed(D), dtype=F64)
    np.random.seed(456)  # noqa: NPY002
    torch.manual_seed(789)  # nor the global torch generator
    again = p.prior_sample(shape, generator=torch.Generator().manual_seed(D), dtype=F64)
    assert torch.equal(x, again)
    assert x.shape == shape and x.dtype == F64
    flat = x.reshape(shape[0], -1)
    rho2 = flat.square().sum(1) / (p.t_max**2 * D)
    ks = stats.kstest(rho2.numpy(), stats.betaprime(n_dim / 2, D / 2).cdf)
    assert ks.pvalue > 1e-3, ks
    u = flat / flat.norm(dim=1, keepdim=True)
    # E[u] = 0 with Var(u_j) = 1/N per coordinate
    assert (u.mean(0).abs() < 4.5 / math.sqrt(shape[0] * n_dim)).all()


def test_prior_dtype_device_and_inf():
    p = ds.Poisson(8)
    x = p.prior_sample((5, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    assert x.dtype == torch.float32 and x.device.type == "cpu"
    # D = inf draws exactly EDM's prior
    a = ds.Poisson(INF).prior_sample((6, 2), generator=torch.Generator().manual_seed(3))
    b = ds.EDM().prior_sample((6, 2), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # huge D: chi2_D / D = 1 + O(D^-1/2), the draw is then within ~1e-3 of the Gaussian one
    big = ds.Poisson(2**24).prior_sample((2000, 1), generator=torch.Generator().manual_seed(1),
                                         dtype=F64)
    assert torch.isfinite(big).all()
    assert abs(big.square().mean().item() / 80.0**2 - 1.0) < 0.15


@pytest.mark.parametrize("D", [1, 8, 128])
def test_prior_log_prob_integrates_to_one(D):
    """1-D: adaptive quadrature on the real line; 2-D: Gauss-Legendre on x = s tan(pi u / 2)."""
    p = ds.Poisson(D)

    def dens1(v):
        return math.exp(p.prior_log_prob(torch.tensor([[v]], dtype=F64)).item())

    total, err = integrate.quad(dens1, -math.inf, math.inf, epsabs=1e-12, epsrel=1e-12, limit=200)
    assert abs(total - 1.0) < 1e-8, (total, err)

    def gauss_legendre_2d(n: int) -> float:
        nodes, wts = special.roots_legendre(n)
        u, wu = torch.tensor(nodes, dtype=F64), torch.tensor(wts, dtype=F64)
        ang = 0.5 * math.pi * u
        xs, jac = p.t_max * torch.tan(ang), p.t_max * 0.5 * math.pi / torch.cos(ang).square()
        gx, gy = torch.meshgrid(xs, xs, indexing="ij")
        dens = p.prior_log_prob(torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)).exp()
        return (dens.reshape(n, n) * (wu * jac)[:, None] * (wu * jac)[None, :]).sum().item()

    # the Cauchy-like tails of D = 1 make the mapped rule converge like n^-2 (error 1e-5 at
    # n = 400): Richardson-extrapolate n = 400, 800 (exact to round-off for the lighter tails)
    i400, i800 = gauss_legendre_2d(400), gauss_legendre_2d(800)
    total2 = (4.0 * i800 - i400) / 3.0
    assert abs(total2 - 1.0) < 1e-8, (i400, i800, total2)


# ----- the empirical field --------------------------------------------------------------------------
@pytest.mark.parametrize("D", [1, 2, 8, 128, INF])
def test_empirical_field_matches_t_kernel_formula(D):
    gen = torch.Generator().manual_seed(7)
    y = torch.randn(7, 3, generator=gen, dtype=F64)
    w = torch.rand(7, generator=gen, dtype=F64) + 0.1
    x = 1.5 * torch.randn(5, 3, generator=gen, dtype=F64)
    sigma = torch.tensor([0.3, 0.7, 1.0, 2.0, 3.0], dtype=F64)
    direct = posterior_mean_direct(x, y, w / w.sum(), D, sigma)
    for chunk in (None, 1, 2, 3):
        f = ds.PoissonField.from_data(y, D, weights=w, chunk_size=chunk)
        torch.testing.assert_close(f.denoise(x, sigma), direct, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(f(x, sigma), (direct - x) / sigma[:, None] ** 2,
                                   rtol=1e-12, atol=1e-12)
        mix = (w / w.sum() * t_kernel_direct(x, y, D, sigma)).sum(1).log()
        torch.testing.assert_close(f.log_prob(x, sigma), mix, rtol=1e-12, atol=1e-12)
    assert f.exact_score is math.isinf(D) and f.process.D == D
    # float32 input: same answer to float32 accuracy; image-shaped points
    f32 = f.denoise(x.float(), sigma.float())
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), direct, rtol=1e-5, atol=1e-5)
    fi = ds.PoissonField.from_data(y.reshape(7, 1, 3), D, weights=w)
    torch.testing.assert_close(fi.denoise(x.reshape(5, 1, 3), sigma).reshape(5, 3), direct)


def test_empirical_field_thousands_of_points_chunked():
    """20k points streamed in chunks of 1000 give the one-chunk answer; far points underflow safely."""
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(20000, 4, generator=gen, dtype=F64)
    x = 2.0 * torch.randn(6, 4, generator=gen, dtype=F64)
    x[0] = 1e4  # every logit far below 0: logsumexp must not underflow
    sigma = torch.tensor([1e-3, 1e-2, 0.1, 1.0, 10.0, 0.05], dtype=F64)
    for D in (8, INF):
        whole = ds.PoissonField.from_data(y, D, chunk_size=20000)
        parts = ds.PoissonField.from_data(y, D, chunk_size=1000)
        a, b = whole.denoise(x, sigma), parts.denoise(x, sigma)
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(whole.log_prob(x, sigma), parts.log_prob(x, sigma))


@pytest.mark.parametrize("D", [1, 8, INF])
def test_divergence_is_exact(D):
    f = ds.PoissonField.from_data(POINTS, D, weights=WEIGHTS, chunk_size=3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, generator=gen, dtype=F64)
    sigma = torch.tensor([0.05, 0.2, 0.5, 1.0, 3.0, 20.0], dtype=F64)

    def one(xi, si):
        return f(xi[None], si[None])[0]

    jac = torch.func.vmap(torch.func.jacrev(one))(x, sigma)
    torch.testing.assert_close(f.divergence(x, sigma), torch.diagonal(jac, dim1=1, dim2=2).sum(-1),
                               rtol=1e-10, atol=1e-10)


def test_infinite_D_is_the_gaussian_mixture_score():
    """D = inf: exact score of sum_i w_i N(y_i, sigma^2 I) (ds.GaussianMixture, vanishing covs)."""
    f = ds.PoissonField.from_data(POINTS, INF, weights=WEIGHTS)
    gm = ds.GaussianMixture(WEIGHTS, POINTS, torch.full((4,), 1e-30, dtype=F64))
    x = torch.randn(9, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    t = torch.linspace(0.05, 5.0, 9, dtype=F64)
    edm = ds.EDM()
    torch.testing.assert_close(f(x, t), gm.marginal_score(x, t, edm), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f.log_prob(x, t), gm.marginal_log_prob(x, t, edm))
    torch.testing.assert_close(f.divergence(x, t), gm.marginal_score_divergence(x, t, edm))


def test_D_to_infinity_rate_one_over_D():
    """|s_D - s_inf| (pseudo-score vs Gaussian-smoothed empirical score) shrinks like 1/D."""
    gen = torch.Generator().manual_seed(11)
    x = 1.2 * torch.randn(32, 2, generator=gen, dtype=F64)
    sigma = torch.full((32,), 0.6, dtype=F64)
    target = gaussian_smoothed_score(x, POINTS, WEIGHTS, sigma)
    Ds = [2**k for k in range(6, 13)]
    errs = []
    for D in Ds:
        f = ds.PoissonField.from_data(POINTS, D, weights=WEIGHTS)
        errs.append((f(x, sigma) - target).norm(dim=1).mean().item())
    slope = np.polyfit(np.log(Ds), np.log(errs), 1)[0]
    assert abs(slope + 1.0) < 0.15, (slope, errs)


# ----- sampling -------------------------------------------------------------------------------------
def _radius_cdf(rho: float, n: int, D: float, sigma: float) -> float:
    """P(|x - y| < rho) under the t-kernel (Gaussian for D = inf)."""
    if math.isinf(D):
        return stats.chi2(n).cdf(rho**2 / sigma**2)
    return stats.betaprime(n / 2, D / 2).cdf(rho**2 / (D * sigma**2))


def _check_lands_on_points(x, D, sigma_min, rho=0.05, slack=0.0):
    """Nearest-point frequencies = the weights; the fraction within ``rho`` of a point = the
    exact mixture-of-t value (heavy-tailed for D = 1: 4 % of the mass lies beyond 0.05 at
    sigma_min = 0.002), up to binomial noise and ``slack``."""
    n = x.shape[0]
    dist = torch.cdist(x, POINTS)
    nearest, dmin = dist.argmin(1), dist.min(1).values
    freq = torch.bincount(nearest, minlength=4).double() / n
    sd = (WEIGHTS * (1 - WEIGHTS) / n).sqrt()
    assert ((freq - WEIGHTS).abs() < 4.5 * sd + 0.005).all(), (D, freq)
    inside = (dmin < rho).double().mean().item()
    expect = _radius_cdf(rho, 2, D, sigma_min)
    tol = 4.5 * math.sqrt(max(expect * (1 - expect), 1e-3) / n) + 0.005
    assert expect - tol - slack < inside < expect + tol, (D, inside, expect)


@pytest.mark.parametrize("time_variable", ["t", "log_sigma"])
@pytest.mark.parametrize("D", [1, 8, 128, INF])
def test_heun_18_karras_steps_lands_on_weighted_points(D, time_variable):
    """Heun on 18 Karras steps samples the PFGM++ marginal at sigma_min.

    NFE 36: the grid ends at sigma_min, not at EDM's sigma = 0 (whose last step is Euler: 35).
    In sigma (EDM's time, ``time_variable="t"``) Heun is exact where the denoiser is locally
    constant (x - y grows linearly in sigma), and the samples follow the exact law. In log sigma
    (ds.sample's default) the same 18 steps under-contract the last step (Karras ratio 3.8: Heun's
    factor 0.55 against e^-1.33 = 0.26), which leaves samples too far from the points: measured
    fraction within 0.05 is 0.76 instead of 0.96 for D = 1 and 0.991 instead of 1 for D = 8; the
    weights are right either way."""
    f = ds.PoissonField.from_data(POINTS, D, weights=WEIGHTS)
    gen = torch.Generator().manual_seed(2024)
    sol = ds.sample(f, (2000, 2), solver=ds.Heun(), steps=18, generator=gen, dtype=F64,
                    denoise=False, time_variable=time_variable)
    assert sol.success and sol.stats.nfe == 36
    slack = 0.0 if time_variable == "t" else (0.25 if D == 1 else 0.015)
    _check_lands_on_points(sol.x, D, f.process.t_min, slack=slack)
    # the default final denoising step puts the samples on the points themselves (D = 1: up to
    # the far tail, where the other points keep a weight ~ distance^3)
    gen = torch.Generator().manual_seed(2024)
    den = ds.sample(f, (2000, 2), solver=ds.Heun(), steps=18, generator=gen, dtype=F64,
                    time_variable=time_variable)
    dmin = torch.cdist(den.x, POINTS).min(1).values
    if D == 1:
        assert (dmin < 0.05).double().mean().item() > 0.97
    else:
        assert (dmin < 1e-6).double().mean().item() > 0.999


@pytest.mark.parametrize("solver", ["dopri5", "dpm2", "dpm3"])
def test_other_ode_solvers_sample_unchanged(solver):
    f = ds.PoissonField.from_data(POINTS, 8, weights=WEIGHTS)
    gen = torch.Generator().manual_seed(5)
    kwargs = ({"solver": ds.Dopri5(), "controller": ds.PIController(rtol=1e-4, atol=1e-4)}
              if solver == "dopri5" else
              {"solver": ds.DPMSolver(order=int(solver[-1])), "steps": 18})
    sol = ds.sample(f, (1500, 2), generator=gen, dtype=F64, denoise=False, **kwargs)
    assert sol.success
    _check_lands_on_points(sol.x, 8, f.process.t_min)


def test_sde_solvers_and_langevin_refuse_pseudo_scores():
    f = ds.PoissonField.from_data(POINTS, 8)
    with pytest.raises(ds.IncompatibleError, match="exact_score"):
        ds.ReverseSDE(f)
    with pytest.raises(ds.IncompatibleError):
        ds.sample(f, (4, 2), solver=ds.EulerMaruyama(), steps=10)
    with pytest.raises(ds.IncompatibleError):
        ds.sample(f, (4, 2), solver=ds.EDMStochasticHeun(churn=10.0), steps=10)
    with pytest.raises(ds.IncompatibleError, match="exact_score"):
        ds.sample(f, (4, 2), solver=ds.Heun(), steps=10, corrector=ds.Langevin())
    # D = inf is EDM: the reverse SDE is allowed
    finf = ds.PoissonField.from_data(POINTS, INF)
    ds.ReverseSDE(finf)
    sol = ds.sample(finf, (8, 2), solver=ds.EulerMaruyama(), steps=20,
                    generator=torch.Generator().manual_seed(0), dtype=F64)
    assert torch.isfinite(sol.x).all()


def test_learned_field_wraps_a_denoiser():
    emp = ds.PoissonField.from_data(POINTS, 8, weights=WEIGHTS)
    calls = []

    def net(x, sigma):
        calls.append(sigma)
        return emp.denoise(x, sigma)

    f = ds.PoissonField(net, 8)
    x = torch.randn(5, 2, dtype=F64)
    torch.testing.assert_close(f(x, 0.7), emp(x, 0.7))
    assert calls[-1].shape == (5,) and not f.exact_score
    # D = inf with an EDM denoiser is ds.Denoiser under EDM
    g = ds.PoissonField(net, INF)
    torch.testing.assert_close(g(x, 0.7), ds.Denoiser(net, ds.EDM())(x, 0.7))
    assert g.exact_score
    a = ds.sample(f, (64, 2), generator=torch.Generator().manual_seed(1), dtype=F64)
    b = ds.sample(emp, (64, 2), generator=torch.Generator().manual_seed(1), dtype=F64)
    torch.testing.assert_close(a.x, b.x)


# ----- PFGM conversions -----------------------------------------------------------------------------
@pytest.mark.parametrize("D", [1, 8])
def test_r_time_ode_matches_sigma_time(D):
    """dx/dr = (x - D)/r on the grid r = sqrt(D) sigma: the same Heun iterates as in sigma."""
    f = ds.PoissonField.from_data(POINTS, D, weights=WEIGHTS)
    x0 = f.process.prior_sample((64, 2), generator=torch.Generator().manual_seed(9), dtype=F64)
    sig = torch.exp(torch.linspace(math.log(80.0), math.log(0.002), 41, dtype=F64))
    a = ds.solve(ds.ProbabilityFlowODE(f), x0, 80.0, 0.002, solver=ds.Heun(), steps=sig)
    rode = f.r_ode()
    assert rode.r_max == pytest.approx(80.0 * math.sqrt(D))
    b = ds.solve(rode, x0, rode.r_max, rode.r_min, solver=ds.Heun(), steps=sig * math.sqrt(D))
    torch.testing.assert_close(a.x, b.x, rtol=1e-10, atol=1e-10)


def _coulomb_field(x: torch.Tensor, aug: torch.Tensor, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-grad phi in N + D dims, phi = sum_i w_i |x~ - y~_i|^(2-n) / ((n-2) S_{n-1}); returns
    (E_x, radial E component)."""
    n = x.shape[1] + D
    area = 2 * math.pi ** (n / 2) / math.gamma(n / 2)
    xt = torch.cat([x, aug], 1).requires_grad_(True)
    yt = torch.cat([POINTS, torch.zeros(4, D, dtype=F64)], 1)
    dist = (xt[:, None, :] - yt[None]).norm(dim=-1)
    if n == 2:
        phi = -(WEIGHTS * dist.log()).sum(1) / area
    else:
        phi = (WEIGHTS * dist ** (2 - n)).sum(1) / ((n - 2) * area)
    (grad,) = torch.autograd.grad(phi.sum(), xt)
    e = -grad
    r = aug.norm(dim=1)
    return e[:, :2], (e[:, 2:] * aug).sum(1) / r


@pytest.mark.parametrize("D", [1, 3])
def test_poisson_field_is_the_coulomb_field(D):
    """PFGM's z-anchored field (D = 1) and PFGM++'s (E_x, E_r): physics and the conversion back."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 2, generator=gen, dtype=F64)
    aug = torch.rand(6, D, generator=gen, dtype=F64) + 0.2
    r = aug.norm(dim=1)
    f = ds.PoissonField.from_data(POINTS, D, weights=WEIGHTS, chunk_size=3)
    e_x, e_r = f.poisson_field(x, r)
    ref_x, ref_r = _coulomb_field(x, aug, D)
    torch.testing.assert_close(e_x, ref_x, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(e_r, ref_r, rtol=1e-12, atol=1e-14)
    # D = x - r E_x / E_r, for any common (even negative) scale of the field
    sigma = r / math.sqrt(D)
    torch.testing.assert_close(denoiser_from_field(-3.0 * ref_x, -3.0 * ref_r, x, r),
                               f.denoise(x, sigma), rtol=1e-12, atol=1e-12)
    # a network predicting the (normalised) field is a PoissonField through from_pfgm
    def net(xx, rr):
        ex, er = f.poisson_field(xx, rr)
        norm = torch.sqrt(ex.square().sum(1) + er.square())
        return -ex / norm[:, None], -er / norm

    g = ds.PoissonField.from_pfgm(net, D)
    torch.testing.assert_close(g(x, sigma), f(x, sigma), rtol=1e-10, atol=1e-10)


# ----- likelihood ---------------------------------------------------------------------------------
def _mixture_of_t_log_prob(x, D, sigma):
    sig = torch.full((x.shape[0],), sigma, dtype=F64)
    return (WEIGHTS * t_kernel_direct(x, POINTS, D, sig)).sum(1).log()


@pytest.mark.parametrize("D", [1, 8, INF])
def test_ode_log_likelihood_is_the_mixture_of_t_density(D):
    """log p_{sigma_min}(x) from the PF-ODE = log sum_i w_i t_kernel(x - y_i) at sigma_min.

    Exact divergence both ways: ds.log_likelihood(ExactTrace()) (autograd), and an augmented
    solve with the field's analytic divergence. The unknown p_T is replaced by the prior, which
    costs ``log prior(x_T) - log p_T(x_T)``; that gap is computed exactly and must be small."""
    sigma_min = 0.05
    f = ds.PoissonField.from_data(POINTS, D, weights=WEIGHTS, sigma_min=sigma_min)
    gen = torch.Generator().manual_seed(8)
    x = torch.cat([POINTS[:2] + 0.03 * torch.randn(2, 2, generator=gen, dtype=F64),
                   0.8 * torch.randn(4, 2, generator=gen, dtype=F64)])
    exact = _mixture_of_t_log_prob(x, D, sigma_min)
    ll = ds.log_likelihood(f, x, trace=ds.ExactTrace(),
                           controller=ds.PIController(rtol=1e-8, atol=1e-8))
    assert (ll.status == 0).all()
    gap = ll.prior_log_prob - f.log_prob(ll.latent, f.process.t_max)  # prior vs exact p_T
    assert gap.abs().max() < 2e-2  # a property of the problem: p_T vs the prior at sigma_max
    torch.testing.assert_close(ll.log_prob - gap, exact, rtol=0, atol=1e-5)
    torch.testing.assert_close(ll.log_prob, exact, rtol=0, atol=2e-2)

    class Augmented:
        process = f.process

        def drift(self, z, t):
            xx = z[:, :2]
            v = (xx - f.denoise(xx, t)) / t[:, None]
            return torch.cat([v, (-t * f.divergence(xx, t))[:, None]], 1)

    z0 = torch.cat([x, torch.zeros(6, 1, dtype=F64)], 1)
    sol = ds.solve(Augmented(), z0, sigma_min, 80.0, solver=ds.Dopri5(),
                   controller=ds.PIController(rtol=1e-9, atol=1e-9), time_variable="log_sigma")
    mine = f.log_prob(sol.x[:, :2], 80.0) + sol.x[:, 2]
    torch.testing.assert_close(mine, exact, rtol=0, atol=1e-6)


def test_field_and_prior_on_device(device, dtype):
    """Everything stays on the device and dtype of the input (CUDA when present)."""
    f = ds.PoissonField.from_data(POINTS, 8, weights=WEIGHTS, chunk_size=2)
    gen = torch.Generator(device=device).manual_seed(0)
    x = f.process.prior_sample((16, 2), generator=gen, device=device, dtype=dtype)
    assert x.device.type == device.type and x.dtype == dtype
    t = torch.full((16,), 0.5, device=device, dtype=dtype)
    for out in (f(x, t), f.denoise(x, t), f.divergence(x, t), f.log_prob(x, t),
                f.process.prior_log_prob(x)):
        assert out.device.type == device.type and out.dtype == dtype
        assert torch.isfinite(out).all()
    ref = f.denoise(x.cpu().double(), t.cpu().double())
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(f.denoise(x, t).cpu().double(), ref, rtol=tol, atol=tol)
