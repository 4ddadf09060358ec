"""Shared Hypothesis strategies and closed forms for the foundation tests (processes, fields).

Every closed form here is written out independently of difsolve (numpy / plain torch linear
algebra), so the tests compare the library with the formulas of ``shared/REFERENCE.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import strategies as st

import difsolve as ds

KINDS = ("VE", "VP", "SubVP", "EDM")


@dataclass
class Case:
    """A process together with the parameters it was built from."""

    kind: str
    process: ds.Process
    params: dict

    def times(self, fractions) -> np.ndarray:
        """Times inside ``[t_min, t_max]``: linear in t (VE/VP/SubVP), geometric in sigma (EDM)."""
        u = np.asarray(fractions, dtype=np.float64)
        p = self.process
        if self.kind == "EDM":
            return p.t_min * (p.t_max / p.t_min) ** u
        return p.t_min + u * (p.t_max - p.t_min)

    def closed_form(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(a(t), b(t))`` from REFERENCE.md section 1, in float64."""
        t = np.asarray(t, dtype=np.float64)
        if self.kind == "VE":
            smin, smax = self.params["sigma_min"], self.params["sigma_max"]
            return np.ones_like(t), smin * (smax / smin) ** t
        if self.kind == "EDM":
            return np.ones_like(t), t.copy()
        b0, b1 = self.params["beta_min"], self.params["beta_max"]
        log_a = -(t**2) * (b1 - b0) / 4 - t * b0 / 2
        one_minus_a2 = -np.expm1(2 * log_a)  # 1 - a^2 without cancellation at small t
        if self.kind == "VP":
            return np.exp(log_a), np.sqrt(one_minus_a2)
        return np.exp(log_a), one_minus_a2

    def g2(self, t: np.ndarray) -> np.ndarray:
        """Closed-form squared diffusion ``g(t)^2``."""
        t = np.asarray(t, dtype=np.float64)
        if self.kind == "VE":
            smin, smax = self.params["sigma_min"], self.params["sigma_max"]
            return 2 * (smin * (smax / smin) ** t) ** 2 * math.log(smax / smin)
        if self.kind == "EDM":
            return 2 * t
        b0, b1 = self.params["beta_min"], self.params["beta_max"]
        beta = b0 + t * (b1 - b0)
        if self.kind == "VP":
            return beta
        return beta * -np.expm1(-2 * (t**2 * (b1 - b0) / 2 + t * b0))

    def f(self, t: np.ndarray) -> np.ndarray:
        """Closed-form drift coefficient ``f(t)``."""
        t = np.asarray(t, dtype=np.float64)
        if self.kind in ("VE", "EDM"):
            return np.zeros_like(t)
        b0, b1 = self.params["beta_min"], self.params["beta_max"]
        return -0.5 * (b0 + t * (b1 - b0))


@st.composite
def cases(draw, kinds=KINDS) -> Case:
    """A random process of one of ``kinds`` with random (valid) parameters."""
    kind = draw(st.sampled_from(kinds))
    if kind == "VE":
        smin = draw(st.floats(1e-3, 1.0))
        smax = smin * draw(st.floats(2.0, 1e4))
        t_min = draw(st.floats(1e-6, 1e-2))
        params = {"sigma_min": smin, "sigma_max": smax, "t_min": t_min}
        return Case(kind, ds.VE(**params), params)
    if kind in ("VP", "SubVP"):
        b0 = draw(st.floats(0.01, 1.0))
        b1 = b0 + draw(st.floats(0.0, 30.0))
        t_min = draw(st.floats(1e-5, 1e-2))
        params = {"beta_min": b0, "beta_max": b1, "t_min": t_min}
        cls = ds.VP if kind == "VP" else ds.SubVP
        return Case(kind, cls(**params), params)
    smin = draw(st.floats(1e-3, 0.1))
    smax = smin * draw(st.floats(10.0, 1e5))
    params = {"sigma_min": smin, "sigma_max": smax}
    return Case(kind, ds.EDM(**params), params)


fractions = st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6)


# ----- Gaussian mixtures ------------------------------------------------------------------
@dataclass
class Mixture:
    weights: np.ndarray  # (K,)
    means: np.ndarray  # (K, d)
    covs: np.ndarray  # (K, d, d)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def build(self) -> ds.GaussianMixture:
        return ds.GaussianMixture(self.weights, self.means, self.covs)

    def marginal_covs(self, a: float, b: float) -> np.ndarray:
        return a**2 * self.covs + b**2 * np.eye(self.dim)

    def log_prob(self, x: np.ndarray, a: float = 1.0, b: float = 0.0) -> np.ndarray:
        """Exact ``log p_t(x)`` (rows of x) via scipy, for one ``(a, b)``."""
        from scipy.special import logsumexp
        from scipy.stats import multivariate_normal

        covs = self.marginal_covs(a, b)
        terms = np.stack([
            np.log(w) + multivariate_normal(a * m, c).logpdf(x).reshape(-1)
            for w, m, c in zip(self.weights, self.means, covs)
        ], axis=1)
        return logsumexp(terms, axis=1)

    def posterior_mean(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Exact ``E[x0 | x_t = x]`` per row (``a``, ``b`` of shape (B,)), float64 linear algebra.

        Component k: ``mu_k + a S_k C_k^{-1} (x - a mu_k)``; weighted by the responsibilities.
        """
        x64, a64, b64 = (v.detach().to(torch.float64).cpu() for v in (x, a, b))
        w = torch.as_tensor(self.weights)
        mu = torch.as_tensor(self.means)
        s = torch.as_tensor(self.covs)
        eye = torch.eye(self.dim, dtype=torch.float64)
        c = a64[:, None, None, None] ** 2 * s[None] + b64[:, None, None, None] ** 2 * eye
        diff = x64[:, None, :] - a64[:, None, None] * mu[None]  # (B, K, d)
        sol = torch.linalg.solve(c, diff[..., None])[..., 0]  # C^{-1}(x - a mu)
        logdet = torch.linalg.slogdet(c)[1]
        log_n = -0.5 * ((diff * sol).sum(-1) + logdet)
        resp = torch.softmax(w.log()[None] + log_n, dim=1)  # (B, K)
        comp = mu[None] + a64[:, None, None] * torch.einsum("kde,bke->bkd", s, sol)
        return (resp[..., None] * comp).sum(1).to(device=x.device, dtype=x.dtype)


def random_mixture(seed: int, d: int, k: int, min_var: float = 0.05,
                   max_var: float = 2.0) -> Mixture:
    """Random mixture: Dirichlet weights, N(0, 2^2) means, rotated SPD covariances."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(k, 2.0))
    means = 2.0 * rng.standard_normal((k, d))
    covs = np.empty((k, d, d))
    for i in range(k):
        q, r = np.linalg.qr(rng.standard_normal((d, d)))
        q = q * np.sign(np.diag(r))
        lam = np.exp(rng.uniform(math.log(min_var), math.log(max_var), d))
        covs[i] = (q * lam) @ q.T
    return Mixture(weights, means, covs)


mixture_args = st.tuples(st.integers(0, 2**31 - 1), st.integers(1, 8), st.integers(1, 5))


# ----- processes defined by a table or a formula: SDE coefficients and PF-ODE endpoints ------
def assert_sde_reproduces_marginals(p: ds.Process, t: torch.Tensor, h: float,
                                    rtol: float = 1e-6) -> None:
    """Central differences (step ``h``, float64) of ``a``, ``b^2`` and ``sigma`` at ``t``:
    ``da/dt = f a``, ``d b^2/dt = 2 f b^2 + g^2``, ``d sigma/dt`` as the process says."""
    t = t.to(torch.float64)
    (a_hi, b_hi), (a_lo, b_lo) = p.marginal(t + h), p.marginal(t - h)
    a, b = p.marginal(t)
    f, g2 = p.drift_coef(t), p.g2(t)
    torch.testing.assert_close((a_hi - a_lo) / (2 * h), f * a, rtol=rtol, atol=0.0)
    # differences of b^2 ~ 1 cancel: allow a few roundings of b^2 divided by the step
    torch.testing.assert_close((b_hi.square() - b_lo.square()) / (2 * h),
                               2 * f * b.square() + g2, rtol=rtol,
                               atol=16 * 2.0**-52 * float(b.square().max()) / h)
    torch.testing.assert_close((p.sigma(t + h) - p.sigma(t - h)) / (2 * h), p.dsigma_dt(t),
                               rtol=rtol, atol=0.0)
    assert bool((g2 > 0).all()) and bool((p.dsigma_dt(t) > 0).all())


GAUSS_MEAN = (0.7, -1.2, 0.3)
GAUSS_COV = ((1.0, 0.6, 0.1), (0.6, 0.8, -0.2), (0.1, -0.2, 0.25))


def edm_reference_endpoint(process: ds.Process, x: torch.Tensor, t0: float, t1: float):
    """The closed-form PF-ODE endpoint at ``t1`` of Gaussian data (``GAUSS_MEAN``, ``GAUSS_COV``)
    under ``process``, computed independently of it: the EDM flow of ``y = x / a`` from
    ``sigma(t0)`` to ``sigma(t1)`` (``sigma = b / a`` of the process), mapped back by ``a(t1)``."""
    from difsolve.analytic import GaussianFlow

    flow = GaussianFlow(torch.tensor(GAUSS_MEAN), torch.tensor(GAUSS_COV), ds.EDM())
    a0, b0 = (v.item() for v in process.marginal(torch.tensor(t0, dtype=torch.float64)))
    a1, b1 = (v.item() for v in process.marginal(torch.tensor(t1, dtype=torch.float64)))
    y1 = flow.flow(x / a0, b0 / a0, b1 / a1)
    return a1 * y1
