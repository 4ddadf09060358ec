r"""Closed-form ground truth: Gaussian data under any process.

For data ``N(mu, S)`` with ``S = U diag(l) U^T`` the marginal at ``t`` is
``N(a mu, U diag(a^2 l + b^2) U^T)`` and the probability-flow ODE is linear: along each eigenvector
``x(t) = a_t mu + (s_t / s_tau) (x(tau) - a_tau mu)`` with ``s_t = sqrt(a_t^2 l + b_t^2)``, and the
integrated divergence is ``sum log(s_t / s_tau)``. These are the references of the convergence
tests (never single-point data: its flow is linear in ``t`` and Euler is exact there).
"""

from __future__ import annotations

import torch

from ._tensor import TimeLike, as_time
from .fields.gaussian_mixture import GaussianMixture
from .processes import Process

__all__ = ["GaussianFlow"]


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
