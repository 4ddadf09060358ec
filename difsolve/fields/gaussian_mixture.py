r"""Gaussian mixtures: exact data distributions with closed-form scores at every noise level.

For data ``p_0 = sum_k w_k N(mu_k, S_k)`` and a process ``x_t = a x_0 + b z``,
``p_t = sum_k w_k N(a mu_k, C_k)`` with ``C_k = a^2 S_k + b^2 I``. Each ``S_k = U_k diag(l_k) U_k^T``
is diagonalised once, so ``C_k = U_k diag(a^2 l_k + b^2) U_k^T`` is diagonal in a fixed basis at
every ``t``: log-densities, scores ``s = sum_k g_k C_k^{-1} (a mu_k - x)`` (``g_k`` the
responsibilities) and the score divergence ``tr H = sum_k g_k (||s_k||^2 - tr C_k^{-1}) - ||s||^2``
are evaluated in log space (logsumexp) without any per-sample factorisation.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .._errors import IncompatibleError, InvalidArgumentError, check, check_int, check_tensor
from .._tensor import TimeLike, as_time, time_dtype
from ..processes import Process

__all__ = ["GaussianMixture", "GaussianMixtureField"]


def _as_float64(value, name: str) -> torch.Tensor:
    try:
        if isinstance(value, (list, tuple)) and not any(isinstance(v, torch.Tensor)
                                                        for v in value):
            value = np.asarray(value, dtype=np.float64)  # fast path for lists of arrays
        t = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidArgumentError(
            f"argument `{name}` must be a real tensor or nested sequence, got {value!r}") from exc
    check(bool(torch.isfinite(t).all()), name, "finite", value)
    return t


class GaussianMixture:
    """A mixture of Gaussians ``sum_k w_k N(mu_k, S_k)`` in ``d`` dimensions.

    Args:
        weights: ``(K,)`` non-negative, summing to 1.
        means: ``(K, d)``.
        covs: ``(K, d, d)`` symmetric positive definite; ``(K, d)`` diagonal variances or ``(K,)``
            isotropic variances are accepted too.
    """

    def __init__(self, weights, means, covs):
        w = _as_float64(weights, "weights")
        mu = _as_float64(means, "means")
        check(w.ndim == 1 and w.numel() >= 1, "weights", "a 1-D tensor of shape (K,)",
              tuple(w.shape))
        check(bool((w >= 0).all()), "weights", "non-negative", w)
        check(abs(float(w.sum()) - 1.0) < 1e-6, "weights", "summing to 1", float(w.sum()))
        k = w.numel()
        check(mu.ndim == 2 and mu.shape[0] == k, "means", f"of shape (K={k}, d)", tuple(mu.shape))
        d = mu.shape[1]
        cov = _as_float64(covs, "covs")
        if cov.ndim == 1:
            check(cov.shape == (k,), "covs", f"of shape ({k},), ({k}, {d}) or ({k}, {d}, {d})",
                  tuple(cov.shape))
            cov = cov[:, None, None] * torch.eye(d, dtype=torch.float64)
        elif cov.ndim == 2:
            check(cov.shape == (k, d), "covs", f"of shape ({k}, {d}) or ({k}, {d}, {d})",
                  tuple(cov.shape))
            cov = torch.diag_embed(cov)
        check(cov.shape == (k, d, d), "covs", f"of shape ({k}, {d}, {d})", tuple(cov.shape))
        # relative tolerance: covariances built in float32 (e.g. ``A @ A.T``) are symmetric only
        # to rounding; they are then symmetrised exactly
        scale = cov.abs().amax(dim=(-2, -1), keepdim=True)
        asym = (cov - cov.mT).abs()
        check(bool((asym <= 1e-5 * scale).all()), "covs", "symmetric",
              f"max |S - S^T| = {float(asym.max()):.3g}")
        cov = 0.5 * (cov + cov.mT)
        evals, evecs = torch.linalg.eigh(cov)
        # a singular matrix has rounding-level eigenvalues of either sign: demand a condition
        # number below ~1e13 (relative to each component's largest eigenvalue)
        floor = 64 * d * torch.finfo(torch.float64).eps * evals.amax(dim=-1, keepdim=True)
        check(bool((evals > floor).all()), "covs",
              "positive definite (all eigenvalues > 0, condition number < 1e13)",
              f"smallest eigenvalue {float(evals.min()):.3g}")
        w = w / w.sum()  # exact normalisation (the sum was checked to 1e-6)
        self.weights, self.means, self.covs = w, mu, cov
        self.dim, self.n_components = d, k
        self._evals, self._evecs = evals, evecs
        self._cache: dict = {}

    def _on(self, device, dtype):
        key = (torch.device(device), dtype)
        if key not in self._cache:
            self._cache[key] = tuple(
                v.to(device=device, dtype=dtype)
                for v in (self.weights.log(), self.means, self._evals, self._evecs,
                          self._evecs * self._evals.sqrt()[:, None, :])
            )
        return self._cache[key]

    def _flat(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        check_tensor(x, name)
        check(math.prod(x.shape[1:]) == self.dim, name, f"of shape (B, {self.dim})", tuple(x.shape))
        return x.reshape(x.shape[0], self.dim)

    # ----- sampling and density of the data ----------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, *, device=None,
               dtype=None) -> torch.Tensor:
        """Draw ``n`` samples, shape ``(n, d)``."""
        check_int(n, "n")
        dtype = dtype or torch.get_default_dtype()
        device = device or (generator.device if generator is not None else "cpu")
        logw, mu, _, _, chol = self._on(device, dtype)
        comp = torch.multinomial(logw.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, device=device, dtype=dtype)
        return mu[comp] + torch.einsum("nde,ne->nd", chol[comp], z)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log-density of the data distribution ``p_0``, shape ``(B,)``."""
        self._flat(x)
        one = torch.ones(x.shape[0], device=x.device, dtype=x.dtype)
        return self._terms(x, one, torch.zeros_like(one))[0]

    def component(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the most responsible component of each row (data distribution)."""
        self._flat(x)
        one = torch.ones(x.shape[0], device=x.device, dtype=x.dtype)
        return self._terms(x, one, torch.zeros_like(one))[1].argmax(dim=1)

    # ----- marginals under a process -----------------------------------------------------
    def _terms(self, x, a, b):
        """Log-density, log responsibilities, whitened residuals ``y`` and variances ``v``."""
        x = self._flat(x)
        logw, mu, evals, evecs, _ = self._on(x.device, x.dtype)
        a, b = a[:, None, None], b[:, None, None]
        var = a.square() * evals[None] + b.square()  # (B, K, d)
        diff = x[:, None, :] - a * mu[None]  # (B, K, d)
        y = torch.einsum("bkd,kde->bke", diff, evecs)
        log_n = -0.5 * (y.square() / var + var.log()).sum(-1) - 0.5 * self.dim * math.log(
            2 * math.pi)
        joint = logw[None] + log_n
        log_p = torch.logsumexp(joint, dim=1)
        return log_p, joint - log_p[:, None], y, var

    def _marginal(self, x, t, process):
        check(isinstance(process, Process), "process", "a difsolve Process", process)
        self._flat(x)
        t = as_time(t, x)
        a, b = process.marginal(t)
        return a, b

    def marginal_log_prob(self, x: torch.Tensor, t: TimeLike, process: Process) -> torch.Tensor:
        """Exact ``log p_t(x)`` under ``process``, shape ``(B,)``."""
        return self._terms(x, *self._marginal(x, t, process))[0]

    def marginal_score(self, x: torch.Tensor, t: TimeLike, process: Process) -> torch.Tensor:
        """Exact score ``grad_x log p_t(x)`` (same shape and dtype as ``x``; computed in at least
        float32, as squares of half-precision states overflow)."""
        check_tensor(x, "x")
        work = x.to(time_dtype(x.dtype))
        return self._score_and_div(work, t, process, divergence=False)[0].to(x.dtype)

    def marginal_score_divergence(self, x: torch.Tensor, t: TimeLike,
                                  process: Process) -> torch.Tensor:
        """Exact ``tr grad_x s(x, t)`` (the Laplacian of ``log p_t``), shape ``(B,)``."""
        return self._score_and_div(x, t, process, divergence=True)[1]

    def _score_and_div(self, x, t, process, divergence):
        a, b = self._marginal(x, t, process)
        _, log_gamma, y, var = self._terms(x, a, b)
        _, _, _, evecs, _ = self._on(x.device, x.dtype)
        gamma = log_gamma.exp()
        s_k = -torch.einsum("bke,kde->bkd", y / var, evecs)  # (B, K, d)
        s = (gamma[..., None] * s_k).sum(1)
        div = None
        if divergence:
            inner = s_k.square().sum(-1) - (1.0 / var).sum(-1)
            div = (gamma * inner).sum(1) - s.square().sum(-1)
        return s.reshape(x.shape), div

    def score_field(self, process: Process) -> GaussianMixtureField:
        """The exact :class:`~difsolve.ScoreField` of this mixture under ``process``."""
        return GaussianMixtureField(self, process)

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.n_components}, d={self.dim})"


class GaussianMixtureField:
    """Exact score field of a :class:`GaussianMixture` under a process (``exact_score=True``)."""

    exact_score = True

    def __init__(self, mixture: GaussianMixture, process: Process):
        check(isinstance(mixture, GaussianMixture), "mixture", "a GaussianMixture", mixture)
        check(isinstance(process, Process), "process", "a difsolve Process", process)
        self.mixture, self.process = mixture, process

    def __call__(self, x: torch.Tensor, t: TimeLike, **cond) -> torch.Tensor:
        if cond:
            raise IncompatibleError(
                f"argument `cond`: a GaussianMixtureField is unconditional, got condition keys "
                f"{sorted(cond)}")
        return self.mixture.marginal_score(x, t, self.process)

    def log_prob(self, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """Exact marginal ``log p_t(x)``."""
        return self.mixture.marginal_log_prob(x, t, self.process)

    def divergence(self, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """Exact divergence of the score, ``(B,)``."""
        return self.mixture.marginal_score_divergence(x, t, self.process)

    def __repr__(self) -> str:
        return f"GaussianMixtureField({self.mixture!r}, {self.process!r})"
