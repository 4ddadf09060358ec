r"""PFGM and PFGM++: Poisson flow generative models on the EDM solver stack.

PFGM++ (Xu et al. 2023) augments ``N``-dimensional data with ``D`` extra dimensions and follows the
electric field of the data placed on the ``z = 0`` hyperplane. The field depends on the augmented
part only through its norm ``r``; its normalised kernel is a multivariate Student-t with ``D``
degrees of freedom and scale ``sigma = r / sqrt(D)``::

    p_r(x | y) = Gamma((N+D)/2) / (pi^(N/2) Gamma(D/2)) * r^D / (||x - y||^2 + r^2)^((N+D)/2).

The kernel is a scale family in ``r``, so the backward ODE ``dx/dr = E_x / E_r = (x - D_r(x)) / r``
carries the marginals ``p_r = p * kernel`` exactly; in ``sigma = r / sqrt(D)`` it is EDM's ODE

    ``dx/dsigma = (x - D(x, sigma)) / sigma = -sigma * s(x, sigma)``,

with ``D(x, sigma) = E[y | x]`` the posterior mean under the t-kernel and ``s = (D - x) / sigma^2``
a *pseudo-score* (the gradient of ``log p_sigma`` only when ``D = inf``, where the kernel is the
Gaussian ``N(y, sigma^2 I)`` and PFGM++ is EDM). ``D = 1`` is PFGM (Xu et al. 2022), whose
augmented coordinate ``z`` equals ``r = sigma``.

* :class:`Poisson`: the process. Time *is* sigma (``a = 1``, ``b = sigma``, like EDM) so every
  schedule, the ``log_sigma`` time change and DPM-Solver++ apply unchanged. The prior is the
  ``r_max = sigma_max sqrt(D)`` kernel at ``y = 0``: heavy-tailed (Cauchy-like for ``D = 1``).
  There is no SDE: :meth:`Poisson.drift` and :meth:`Poisson.diffusion` raise.
* :class:`PoissonField`: a learned field from a denoiser network, or the exact empirical field of a
  weighted point set (:meth:`PoissonField.from_data`), with ``exact_score = False`` for finite
  ``D`` so that reverse-SDE solvers and Langevin correctors refuse it.
* Conversions for porting PFGM code: :class:`RTimeODE` (the ODE in ``r``),
  :meth:`PoissonField.poisson_field` (the physical field ``(E_x, E_r)``; PFGM's ``(E_x, E_z)``
  for ``D = 1``), :func:`denoiser_from_field` and :meth:`PoissonField.from_pfgm` (a network that
  predicts the field direction, as PFGM's do).

References: Xu, Liu, Tegmark, Jaakkola, *Poisson Flow Generative Models*, NeurIPS 2022; Xu, Liu,
Tian, Tong, Tegmark, Jaakkola, *PFGM++: Unlocking the Potential of Physics-Inspired Generative
Models*, ICML 2023.
"""

from __future__ import annotations

import math
import numbers

import torch

from .._errors import (
    ArgumentTypeError,
    IncompatibleError,
    check,
    check_int,
    check_positive,
    check_tensor,
)
from .._tensor import TimeLike, as_time, bcast, flat_sum
from .base import SigmaTime, _t

__all__ = ["Poisson", "log_t_kernel"]

#: data points per chunk of the empirical field is chosen so that one chunk holds about this many
#: elements of ``(batch, points, N)`` differences
CHUNK_ELEMENTS = 1 << 22


# ----- the t-kernel ----------------------------------------------------------------------------
#: the largest finite D (beyond it PFGM++ is EDM to double precision: pass math.inf)
MAX_D = 2**53


def _check_D(D) -> float:
    """Validate the number of augmented dimensions: a positive integer (an int, or an
    integer-valued float such as ``1e6``) or ``math.inf``."""
    if isinstance(D, bool):
        raise ArgumentTypeError(f"argument `D` must be a positive int or math.inf, got {D!r}")
    if isinstance(D, numbers.Real) and not isinstance(D, numbers.Integral):
        D = float(D)
        if math.isinf(D) and D > 0:
            return math.inf
        check(math.isfinite(D) and D.is_integer() and 1 <= D <= MAX_D, "D",
              "a positive integer or math.inf", D)
        return int(D)
    if not isinstance(D, numbers.Integral):
        raise ArgumentTypeError(f"argument `D` must be a positive int or math.inf, got {D!r}")
    D = check_int(int(D), "D", minimum=1)
    check(D <= MAX_D, "D", f"at most {MAX_D:.0e} (or math.inf)", D)
    return D


def _lgamma_shift(a: float, b: float) -> float:
    r"""``log Gamma(a + b) - log Gamma(a) - b log a`` without cancellation for large ``a``.

    Stirling's series gives ``(a + b - 1/2) log1p(b/a) - b + S(a + b) - S(a)`` with
    ``S(z) = 1/(12 z) - 1/(360 z^3) + 1/(1260 z^5) - 1/(1680 z^7)`` (truncation error below
    ``1/(1188 z^9)``, under 1e-16 for ``z >= 32``). It tends to ``b (b - 1) / (2a)`` as ``a -> inf``.
    """
    if a < 32.0:
        return math.lgamma(a + b) - math.lgamma(a) - b * math.log(a)

    def s(z: float) -> float:
        z2 = z * z
        return (1.0 / 12.0 - (1.0 / 360.0 - (1.0 / 1260.0 - 1.0 / (1680.0 * z2)) / z2) / z2) / z

    return (a + b - 0.5) * math.log1p(b / a) - b + (s(a + b) - s(a))


def log_t_kernel(sq_dist: torch.Tensor, N: int, D: float, sigma: torch.Tensor) -> torch.Tensor:
    r"""Log of the PFGM++ kernel (multivariate Student-t, ``D`` dof, scale ``sigma``).

    ``log p = G - (N/2) log(2 pi) - N log sigma - ((N+D)/2) log1p(||x - y||^2 / (D sigma^2))``
    with ``G = log Gamma((N+D)/2) - log Gamma(D/2) - (N/2) log(D/2)`` (:func:`_lgamma_shift`),
    which is the exact density written so that nothing cancels for large ``D``; ``D = inf`` is the
    Gaussian ``N(y, sigma^2 I)``. ``sq_dist = ||x - y||^2`` and ``sigma`` broadcast together.
    """
    log_sigma = torch.log(sigma)
    if math.isinf(D):
        return -0.5 * sq_dist / sigma.square() - N * log_sigma - 0.5 * N * math.log(2 * math.pi)
    const = _lgamma_shift(D / 2.0, N / 2.0) - 0.5 * N * math.log(2 * math.pi)
    return const - N * log_sigma - 0.5 * (N + D) * torch.log1p(sq_dist / (D * sigma.square()))


def _log_unit_sphere_area(n: int) -> float:
    """``log`` of the area ``2 pi^(n/2) / Gamma(n/2)`` of the unit sphere in ``R^n``."""
    return math.log(2.0) + 0.5 * n * math.log(math.pi) - math.lgamma(0.5 * n)


def _sample_gamma(alpha: float, n: int, generator, device) -> torch.Tensor:
    r"""``n`` draws of ``Gamma(alpha, 1)`` in float64 from ``generator`` only.

    Marsaglia & Tsang (2000): ``d = alpha - 1/3``, ``c = 1 / sqrt(9 d)``, ``v = (1 + c z)^3``,
    accept ``d v`` if ``log u < z^2/2 + d (1 - v + log v)``; the bracket is evaluated as
    ``3 (log1p(w) - w) - 3 w^2 - w^3`` with ``w = c z`` so that nothing cancels for huge ``alpha``.
    For ``alpha < 1``: ``Gamma(alpha) = Gamma(alpha + 1) U^(1/alpha)``. Acceptance is above 95 %,
    so the loop (one host synchronisation per round) ends in a few rounds.
    """
    boost = alpha < 1.0
    a = alpha + 1.0 if boost else alpha
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    f64 = torch.float64
    out = torch.empty(n, dtype=f64, device=device)
    todo = torch.arange(n, device=device)
    while todo.numel() > 0:
        m = todo.numel()
        z = torch.randn(m, generator=generator, dtype=f64, device=device)
        u = torch.rand(m, generator=generator, dtype=f64, device=device)
        w = c * z
        ok = w > -1.0
        w = torch.where(ok, w, torch.zeros_like(w))
        bracket = 3.0 * (torch.log1p(w) - w) - 3.0 * w.square() - w.pow(3)
        ok = ok & (torch.log(u) < 0.5 * z.square() + d * bracket)
        out[todo[ok]] = d * (1.0 + w[ok]).pow(3)
        todo = todo[~ok]
    if boost:
        u = torch.rand(n, generator=generator, dtype=f64, device=device)
        out = out * u.pow(1.0 / alpha)
    return out


# ----- the process -----------------------------------------------------------------------------
class Poisson(SigmaTime):
    r"""PFGM++ with ``D`` augmented dimensions; time is ``sigma = r / sqrt(D)`` (as for EDM).

    ``a = 1``, ``b = sigma = t``; the probability-flow ODE uses ``f = 0`` and ``g^2 = 2 sigma``
    exactly as :class:`~difsolve.EDM` (``dx/dsigma = -sigma s``), but the marginals are t-kernel
    smoothings of the data, not Gaussian ones, so there is no forward or reverse SDE:
    :meth:`drift` and :meth:`diffusion` raise :class:`~difsolve.IncompatibleError` and
    ``has_sde`` is False. ``D = inf`` is exactly :class:`~difsolve.EDM` (SDE included).

    Prior at ``r_max = sigma_max sqrt(D)``: ``x = R u`` with ``u`` uniform on the sphere and
    ``R = r_max sqrt(B / (1 - B))``, ``B ~ Beta(N/2, D/2)``; drawn as ``sigma_max g / sqrt(chi2_D /
    D)``, ``g ~ N(0, I)``, which is the same law. Its log-density (:meth:`prior_log_prob`) is the
    t-kernel at ``y = 0`` (:func:`log_t_kernel`). ``N`` is the data dimension ``x[0].numel()``.

    Args:
        D: augmented dimensions, a positive int (``1`` is PFGM; PFGM++'s default is 128) or
            ``math.inf`` (then the process is EDM, Gaussian prior included).
        sigma_min, sigma_max: sampling interval in sigma (EDM's defaults).
    """

    unit_scale = True

    def __init__(self, D: int | float, sigma_min: float = 0.002, sigma_max: float = 80.0):
        self.D = _check_D(D)
        #: only ``D = inf`` (EDM) has an SDE with these marginals
        self.has_sde = math.isinf(self.D)
        self.t_min = check_positive(sigma_min, "sigma_min")
        self.t_max = check_positive(sigma_max, "sigma_max")
        check(self.t_max > self.t_min, "sigma_max", f"greater than sigma_min={sigma_min}",
              sigma_max)
        #: per-coordinate standard deviation of the prior (infinite for D <= 2)
        self.prior_std = (self.t_max if math.isinf(self.D) else
                          self.t_max * math.sqrt(self.D / (self.D - 2)) if self.D > 2 else math.inf)

    @property
    def exact(self) -> bool:
        """Whether the marginals are Gaussian (``D = inf``): the field is then a true score."""
        return math.isinf(self.D)

    def drift(self, x, t):
        """Forward drift: raises for finite ``D`` (no SDE); ``0`` for ``D = inf`` (EDM)."""
        self._need_sde()
        return super().drift(x, t)

    def diffusion(self, t):
        """Forward diffusion: raises for finite ``D`` (no SDE); ``sqrt(2 sigma)`` for ``D = inf``."""
        self._need_sde()
        return super().diffusion(t)

    def _need_sde(self) -> None:
        if not self.has_sde:
            raise IncompatibleError(
                f"Poisson(D={self.D}) (PFGM++) has no forward or reverse SDE: its marginals are "
                "t-kernel smoothings of the data; use the probability-flow ODE (an ODE solver)")

    # r <-> sigma
    def r_of_sigma(self, sigma: TimeLike) -> torch.Tensor:
        """Augmented radius ``r = sigma sqrt(D)`` (finite ``D`` only)."""
        self._need_finite("r_of_sigma")
        return _t(sigma) * math.sqrt(self.D)

    def sigma_of_r(self, r: TimeLike) -> torch.Tensor:
        """``sigma = r / sqrt(D)`` (finite ``D`` only)."""
        self._need_finite("sigma_of_r")
        return _t(r) / math.sqrt(self.D)

    def _need_finite(self, what: str) -> None:
        if math.isinf(self.D):
            raise IncompatibleError(f"{what}: the augmented radius r is infinite for D = inf")

    # prior
    def prior_sample(self, shape, *, generator=None, device=None, dtype=None) -> torch.Tensor:
        """Draw ``shape = (B, ...)`` from the ``r_max`` distribution (module docstring)."""
        shape = tuple(int(s) for s in shape)
        check(len(shape) >= 1 and all(s >= 1 for s in shape), "shape",
              "a tuple (B, ...) of positive sizes", shape)
        if device is None and generator is not None:
            device = generator.device
        g = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        if math.isinf(self.D):
            return self.t_max * g
        # chi2_D / D = 2 Gamma(D/2) / D
        chi = _sample_gamma(0.5 * self.D, shape[0], generator, g.device) * (2.0 / self.D)
        return self.t_max * g / bcast(chi.sqrt().to(g.dtype), g)

    def prior_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-density of the prior (the t-kernel at ``y = 0``, scale sigma_max), ``(B,)``."""
        check_tensor(x, "x")
        sq = flat_sum(x.square())
        sigma = torch.as_tensor(self.t_max, device=x.device, dtype=x.dtype)
        return log_t_kernel(sq, x[0].numel(), self.D, sigma)

    def log_kernel(self, x: torch.Tensor, y: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """``log p_sigma(x | y)`` for rows of ``x`` and ``y`` (``(B,)``), ``sigma = t``."""
        check_tensor(x, "x")
        t = as_time(t, x)
        return log_t_kernel(flat_sum((x - y).square()), x[0].numel(), self.D, t)
