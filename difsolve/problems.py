r"""Closed-form problems shared by the demo, the convergence studies, the benchmarks and the tests.

* :class:`GaussianFlow`: Gaussian data ``N(mu, S)`` under any process. With
  ``S = U diag(l) U^T`` the marginal at ``t`` is ``N(a mu, U diag(a^2 l + b^2) U^T)`` and the
  probability-flow ODE is linear: along each eigenvector ``x(t) = a_t mu + (s_t / s_tau) (x(tau) -
  a_tau mu)`` with ``s_t = sqrt(a_t^2 l + b_t^2)``, and the integrated divergence is
  ``sum log(s_t / s_tau)`` (never single-point data: its flow is linear in ``t`` and Euler is exact
  there). :func:`gaussian_problem` builds a rotated anisotropic one.
* :func:`ring_mixture`: ``k`` Gaussian modes on a circle (the demo's ring with
  ``anisotropic=True``: weights ``1..k`` and radially growing variances).
* :func:`rotated_mixture`: a ``d``-dimensional mixture with random rotated covariances.
* :class:`GeometricBrownianMotion`: ``dX = mu X dt + s X dW`` with its exact pathwise solution.
"""

from __future__ import annotations

import math

import torch

from ._tensor import TimeLike, as_time
from .brownian import BrownianPath
from .fields.gaussian_mixture import GaussianMixture
from .processes import VP, Process

__all__ = ["GaussianFlow", "GeometricBrownianMotion", "gaussian_problem", "ring_mixture",
           "rotated_covs", "rotated_mixture"]

F64 = torch.float64


class GaussianFlow:
    """Exact marginals and probability-flow map of Gaussian data ``N(mean, cov)`` under
    ``process``."""

    def __init__(self, mean, cov, process: Process):
        self.mixture = GaussianMixture([1.0], torch.as_tensor(mean, dtype=torch.float64)[None],
                                       torch.as_tensor(cov, dtype=torch.float64)[None])
        self.process = process
        self.field = self.mixture.score_field(process)
        self.dim = self.mixture.dim

    def _parts(self, x):
        _, mu, evals, evecs, _ = self.mixture._on(x.device, x.dtype)
        return mu[0], evals[0], evecs[0]

    def _std(self, t, evals):
        a, b = self.process.marginal(t)
        return a, (a[:, None].square() * evals[None] + b[:, None].square()).sqrt()

    def flow(self, x: torch.Tensor, t_from: TimeLike, t_to: TimeLike) -> torch.Tensor:
        """Exact solution at ``t_to`` of the probability-flow ODE through ``(t_from, x)``."""
        mu, evals, evecs = self._parts(x)
        a0, s0 = self._std(as_time(t_from, x), evals)
        a1, s1 = self._std(as_time(t_to, x), evals)
        y = (x - a0[:, None] * mu) @ evecs  # eigen-coordinates
        return a1[:, None] * mu + (y * (s1 / s0)) @ evecs.T

    def log_det(self, x: torch.Tensor, t_from: TimeLike, t_to: TimeLike) -> torch.Tensor:
        """``log |det d x(t_to) / d x(t_from)|`` = integral of the flow's divergence, ``(B,)``."""
        _, evals, _ = self._parts(x)
        _, s0 = self._std(as_time(t_from, x), evals)
        _, s1 = self._std(as_time(t_to, x), evals)
        return (s1 / s0).log().sum(-1)

    def marginal(self, t: float, *, device=None, dtype=torch.float64):
        """Mean ``(d,)`` and covariance ``(d, d)`` of ``x_t``."""
        ref = torch.zeros(1, self.dim, device=device, dtype=dtype)
        mu, evals, evecs = self._parts(ref)
        a, s = self._std(as_time(t, ref), evals)
        return a[0] * mu, evecs @ torch.diag(s[0].square()) @ evecs.T

    def sample(self, n: int, t: float, generator=None, *, device=None, dtype=torch.float64):
        """Exact samples of ``x_t``, ``(n, d)``."""
        mean, cov = self.marginal(t, device=device, dtype=dtype)
        z = torch.randn(n, self.dim, generator=generator, device=device, dtype=dtype)
        return mean + z @ torch.linalg.cholesky(cov).T


def gaussian_problem(process: Process | None = None, *, dim: int = 2, seed: int = 0
                     ) -> GaussianFlow:
    """A rotated anisotropic Gaussian ``N(mu, U diag(l) U^T)`` and its exact flow under
    ``process`` (default VP): the closed-form problem of the command-line study."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(dim, generator=g, dtype=F64)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=F64))
    evals = torch.linspace(0.05, 1.5, dim, dtype=F64)
    cov = q @ torch.diag(evals) @ q.T
    return GaussianFlow(mean, cov, process if process is not None else VP())


def ring_mixture(k: int = 8, radius: float = 2.0, std: float = 0.1, weights=None, *,
                 anisotropic: bool = False) -> GaussianMixture:
    """``k`` Gaussian modes on a circle of ``radius``.

    Isotropic modes of standard deviation ``std`` (equal weights unless ``weights`` is given); or,
    with ``anisotropic=True``, the demo's ring: weights proportional to ``1, ..., k``, tangential
    variance 0.02 and radial variance ``0.01 + 0.004 i`` for mode ``i``.
    """
    ang = torch.arange(k, dtype=F64) * (2 * math.pi / k)
    means = radius * torch.stack([ang.cos(), ang.sin()], 1)
    if anisotropic:
        covs = []
        for i in range(k):
            c, s = math.cos(ang[i]), math.sin(ang[i])
            rot = torch.tensor([[c, -s], [s, c]], dtype=F64)
            covs.append(rot @ torch.diag(torch.tensor([0.01 + 0.004 * i, 0.02], dtype=F64))
                        @ rot.T)
        w = torch.arange(1, k + 1, dtype=F64)
        return GaussianMixture(w / w.sum(), means, torch.stack(covs))
    w = torch.full((k,), 1.0 / k, dtype=F64) if weights is None else torch.as_tensor(
        weights, dtype=F64)
    return GaussianMixture(w / w.sum(), means, torch.full((k,), std**2, dtype=F64))


def rotated_covs(d: int, k: int, gen: torch.Generator, lo: float = 0.05, hi: float = 2.0
                 ) -> torch.Tensor:
    """``k`` random ``d x d`` covariances ``Q diag(l) Q^T``, eigenvalues log-uniform in
    ``[lo, hi]``."""
    covs = []
    for _ in range(k):
        q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
        q = q * torch.sign(torch.diagonal(r))
        ev = torch.exp(math.log(lo) + math.log(hi / lo) * torch.rand(d, generator=gen,
                                                                      dtype=F64))
        covs.append(q @ torch.diag(ev) @ q.T)
    return torch.stack(covs)


def rotated_mixture(d: int, k: int, seed: int, spread: float = 2.0) -> GaussianMixture:
    """A ``k``-component mixture in ``d`` dimensions: random weights, means ``spread * N(0, I)``
    and random rotated covariances (:func:`rotated_covs`)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(k, generator=gen, dtype=F64) + 0.3
    means = spread * torch.randn(k, d, generator=gen, dtype=F64)
    return GaussianMixture(w / w.sum(), means, rotated_covs(d, k, gen))


class GeometricBrownianMotion:
    """``dX = mu X dt + s X dW`` (diagonal noise): the textbook multiplicative-noise SDE with
    ``X_t = X_0 exp((mu - s^2/2) t + s W_t)`` and ``E X_t = X_0 e^{mu t}``."""

    noise = "diagonal"

    def __init__(self, mu: float = 1.0, s: float = 0.8):
        self.mu, self.s = float(mu), float(s)

    def drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.mu * x

    def diffusion(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.s * x

    def exact(self, x0: torch.Tensor, path: BrownianPath, t0: float, t1: float) -> torch.Tensor:
        w = path(t0, t1).to(device=x0.device, dtype=x0.dtype)
        return x0 * torch.exp((self.mu - 0.5 * self.s**2) * (t1 - t0) + self.s * w)
