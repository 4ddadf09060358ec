"""PFGM++ fields: a learned field from a denoiser network and the exact empirical field of a
weighted point set (the process is :class:`difsolve.processes.poisson.Poisson`, whose module
docstring has the mathematics and references)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .._errors import (
    ArgumentTypeError,
    IncompatibleError,
    InvalidArgumentError,
    check,
    check_int,
    check_tensor,
)
from .._tensor import TimeLike, as_time, bcast
from ..processes.poisson import CHUNK_ELEMENTS, Poisson, _log_unit_sphere_area, log_t_kernel
from .base import check_model_output

__all__ = ["PoissonField", "RTimeODE", "denoiser_from_field"]


class _Empirical:
    """The exact empirical PFGM++ posterior of a weighted point set, streamed over chunks."""

    def __init__(self, points: torch.Tensor, weights: torch.Tensor, D: float,
                 chunk_size: int | None):
        keep = weights > 0
        self.points = points[keep]
        self.log_weights = weights[keep].log()
        self.shape = tuple(points.shape[1:])
        self.N = self.points[0].numel()
        self.D = D
        self.chunk_size = chunk_size
        self._cache: dict = {}

    def _on(self, device, dtype):
        key = (torch.device(device), dtype)
        if key not in self._cache:
            self._cache[key] = (self.points.reshape(-1, self.N).to(device=device, dtype=dtype),
                                self.log_weights.to(device=device, dtype=dtype))
        return self._cache[key]

    def _flat(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        check_tensor(x, name)
        check(x[0].numel() == self.N, name, f"of shape (B, {', '.join(map(str, self.shape))})",
              tuple(x.shape))
        return x.reshape(x.shape[0], self.N)

    def _chunks(self, batch: int):
        k = self.points.shape[0]
        size = self.chunk_size or max(1, CHUNK_ELEMENTS // max(1, batch * self.N))
        return [(i, min(k, i + size)) for i in range(0, k, size)]

    def _logits(self, xf, y, logw, sigma):
        """Unnormalised log posterior weights ``log pi_i + log kernel`` (up to a per-row constant)
        and ``c_i = d logit / d (-||x - y||^2 / 2) * 2``, i.e. ``grad logit = c_i (y_i - x)``."""
        sq = (xf[:, None, :] - y[None]).square().sum(-1)  # (B, C), no cancellation
        s2 = sigma.square()[:, None]
        if math.isinf(self.D):
            return logw[None] - 0.5 * sq / s2, None, sq
        r2 = self.D * s2
        c = 0.5 * (self.N + self.D)
        return logw[None] - c * torch.log1p(sq / r2), (self.N + self.D) / (sq + r2), sq

    def stats(self, x: torch.Tensor, sigma: torch.Tensor):
        """One streaming pass: ``(log Z, D(x))`` with ``Z = sum_i pi_i (1 + u_i/r^2)^(-(N+D)/2)``
        (``exp(-u_i / 2 sigma^2)`` for ``D = inf``) and ``D(x)`` the posterior mean, flat."""
        xf = self._flat(x)
        y_all, logw_all = self._on(xf.device, xf.dtype)
        m = s = acc = None
        for lo, hi in self._chunks(xf.shape[0]):
            y = y_all[lo:hi]
            logits = self._logits(xf, y, logw_all[lo:hi], sigma)[0]
            m_c = logits.max(dim=1).values
            if m is None:
                m = m_c
                p = torch.exp(logits - m[:, None])
                s, acc = p.sum(1), p @ y
            else:
                m_new = torch.maximum(m, m_c)
                scale = torch.exp(m - m_new)
                p = torch.exp(logits - m_new[:, None])
                s = s * scale + p.sum(1)
                acc = acc * scale[:, None] + p @ y
                m = m_new
        return m + torch.log(s), acc / s[:, None]

    def div_denoiser(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        r"""``div_x D(x)`` = ``sum_i w_i c_i (y_i - D) . (y_i - x)`` (second pass, exact)."""
        xf = self._flat(x)
        lse, dn = self.stats(x, sigma)
        y_all, logw_all = self._on(xf.device, xf.dtype)
        total = torch.zeros_like(lse)
        for lo, hi in self._chunks(xf.shape[0]):
            y = y_all[lo:hi]
            logits, c, _ = self._logits(xf, y, logw_all[lo:hi], sigma)
            w = torch.exp(logits - lse[:, None])
            if c is None:
                c = sigma.square().reciprocal()[:, None]
            inner = ((y[None] - dn[:, None, :]) * (y[None] - xf[:, None, :])).sum(-1)
            total = total + (w * c * inner).sum(1)
        return total


def denoiser_from_field(e_x: torch.Tensor, e_r: torch.Tensor, x: torch.Tensor,
                        r: TimeLike) -> torch.Tensor:
    r"""Denoiser ``D = x - r E_x / E_r`` from a Poisson field ``(E_x, E_r)`` at ``(x, r)``.

    The PFGM/PFGM++ backward ODE is ``dx/dr = E_x / E_r``; with ``dx/dr = (x - D) / r`` this gives
    ``D``. Any common rescaling of ``(E_x, E_r)`` (PFGM normalises the field, and its networks
    predict ``-E`` up to a scale) leaves ``D`` unchanged. ``e_r`` and ``r`` are per-sample ``(B,)``
    (for PFGM, ``D = 1``: ``E_z`` and ``z``).
    """
    r = as_time(r, x, "r")
    return x - bcast(r / e_r, x) * e_x


class PoissonField:
    r"""A PFGM++ field: the denoiser ``D(x, sigma)`` and pseudo-score ``(D - x) / sigma^2``.

    ``PoissonField(denoiser, D)`` wraps a network ``denoiser(x, sigma) -> x0`` trained with the
    PFGM++ perturbation kernel; :meth:`from_data` builds the exact empirical field of a point set;
    :meth:`from_pfgm` wraps a network predicting the Poisson field ``(E_x, E_r)``. The process is
    :class:`Poisson` ``(D, sigma_min, sigma_max)`` and the time argument is sigma. With
    :class:`~difsolve.ProbabilityFlowODE` the drift is ``-sigma s = (x - D) / sigma``, so every ODE
    solver (Heun, Dopri5, DPM-Solver++, which uses :meth:`denoise`) samples it unchanged.
    ``exact_score`` is False for finite ``D`` (reverse SDEs and Langevin correctors refuse it) and
    True for ``D = inf``.
    """

    def __init__(self, denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], D,
                 sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not callable(denoiser):
            raise ArgumentTypeError(
                f"argument `denoiser` must be callable (x, sigma) -> x0, got "
                f"{type(denoiser).__name__}")
        self.process = Poisson(D, sigma_min, sigma_max)
        self.D = self.process.D
        self.exact_score = self.process.exact
        self._denoiser = denoiser
        self._empirical: _Empirical | None = None

    # ----- constructors ------------------------------------------------------------------
    @classmethod
    def from_data(cls, points, D, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  weights=None, chunk_size: int | None = None) -> PoissonField:
        r"""Exact empirical PFGM++ field of points ``y_i`` (shape ``(K, ...)``) with weights ``pi_i``.

        ``D(x, sigma) = sum_i w_i y_i`` with ``log w_i = log pi_i - ((N+D)/2) log1p(||x - y_i||^2 /
        r^2)`` (``- ||x - y_i||^2 / (2 sigma^2)`` for ``D = inf``), normalised by a streaming
        logsumexp over chunks of ``chunk_size`` points (default: about 4M elements of
        ``(B, chunk, N)`` per chunk), so memory is ``O(B chunk N)`` whatever ``K``. Distances are
        formed as differences (no ``||x||^2 + ||y||^2 - 2 x.y`` cancellation). Weights default to
        uniform and are normalised; zero-weight points are dropped.
        """
        try:
            pts = torch.as_tensor(points).detach()
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InvalidArgumentError(
                f"argument `points` must be a real tensor of shape (K, ...), got {points!r}") from exc
        check(pts.ndim >= 2 and pts.shape[0] >= 1 and pts[0].numel() >= 1, "points",
              "a tensor of shape (K, ...) with K >= 1", tuple(pts.shape))
        check(not pts.is_complex(), "points", "real", pts.dtype)
        pts = pts.to(torch.float64)
        check(bool(torch.isfinite(pts).all()), "points", "finite")
        k = pts.shape[0]
        if weights is None:
            w = torch.full((k,), 1.0 / k, dtype=torch.float64, device=pts.device)
        else:
            try:
                w = torch.as_tensor(weights, dtype=torch.float64).detach().to(pts.device)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise InvalidArgumentError(
                    f"argument `weights` must be a real tensor of shape ({k},), got "
                    f"{weights!r}") from exc
            check(w.shape == (k,), "weights", f"of shape ({k},)", tuple(w.shape))
            check(bool(torch.isfinite(w).all() & (w >= 0).all()), "weights",
                  "finite and non-negative")
            check(float(w.sum()) > 0, "weights", "not all zero")
            w = w / w.sum()
        if chunk_size is not None:
            check_int(chunk_size, "chunk_size")
        field = cls(_unset_denoiser, D, sigma_min, sigma_max)
        field._empirical = _Empirical(pts, w, field.D, chunk_size)
        field._denoiser = field._empirical_denoise
        return field

    @classmethod
    def from_pfgm(cls, model: Callable, D=1, sigma_min: float = 0.002,
                  sigma_max: float = 80.0) -> PoissonField:
        r"""Wrap a PFGM-style network ``model(x, r) -> (e_x, e_r)`` predicting the Poisson field.

        ``e_x`` has the shape of ``x`` and ``e_r`` is ``(B,)``; any per-sample common scale (PFGM
        normalises its targets) is allowed. For PFGM (``D = 1``) ``r`` is the anchor ``z`` and
        ``e_r = E_z``. The denoiser is :func:`denoiser_from_field` at ``r = sigma sqrt(D)``.
        """
        if not callable(model):
            raise ArgumentTypeError(f"argument `model` must be callable, got {type(model).__name__}")
        if isinstance(D, float) and math.isinf(D):
            raise IncompatibleError("argument `D`: a Poisson field needs a finite D")

        def denoiser(x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
            r = sigma * math.sqrt(D)
            e_x, e_r = model(x, r, **cond)
            return denoiser_from_field(e_x, e_r, x, r)

        return cls(denoiser, D, sigma_min, sigma_max)

    # ----- the field ---------------------------------------------------------------------
    def _empirical_denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        if cond:
            raise IncompatibleError(
                f"argument `cond`: the empirical field of PoissonField.from_data takes no "
                f"conditioning, got keys {sorted(cond)}")
        return self._empirical.stats(x, sigma)[1].reshape(x.shape)

    def denoise(self, x: torch.Tensor, t: TimeLike, **cond) -> torch.Tensor:
        """The data prediction ``D(x, sigma)`` (posterior mean under the t-kernel), ``sigma = t``;
        a network denoiser is called as ``denoiser(x, sigma, **cond)``."""
        check_tensor(x, "x")
        out = self._denoiser(x, as_time(t, x), **cond)
        return out if self._empirical is not None else check_model_output(out, x, "denoiser")

    def __call__(self, x: torch.Tensor, t: TimeLike, **cond) -> torch.Tensor:
        """The pseudo-score ``(D(x, sigma) - x) / sigma^2`` (the score when ``D = inf``)."""
        t = as_time(t, check_tensor(x, "x"))
        return (self.denoise(x, t, **cond) - x) / bcast(t, x).square()

    def _need_data(self, what: str) -> _Empirical:
        if self._empirical is None:
            raise IncompatibleError(
                f"{what} is available for empirical fields only (PoissonField.from_data)")
        return self._empirical

    def log_prob(self, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        r"""Exact marginal ``log p_sigma(x) = log sum_i pi_i p_sigma(x | y_i)`` (mixture of t-kernels;
        Gaussians for ``D = inf``), ``(B,)``. Empirical fields only."""
        emp = self._need_data("log_prob")
        t = as_time(t, x)
        lse, _ = emp.stats(x, t)
        # lse carries the exponent terms; add the normalising constant of the kernel
        return lse + log_t_kernel(torch.zeros_like(t), emp.N, self.D, t)

    def divergence(self, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        r"""Exact divergence of the pseudo-score, ``(div_x D - N) / sigma^2``, ``(B,)``.

        ``div_x D = sum_i w_i c_i (y_i - D) . (y_i - x)`` with ``c_i = (N + D) / (||x - y_i||^2 +
        r^2)`` (``1 / sigma^2`` for ``D = inf``). The PF-ODE drift has divergence ``-sigma`` times
        this. Empirical fields only.
        """
        emp = self._need_data("divergence")
        t = as_time(t, x)
        return (emp.div_denoiser(x, t) - emp.N) / t.square()

    def poisson_field(self, x: torch.Tensor, r: TimeLike) -> tuple[torch.Tensor, torch.Tensor]:
        r"""The physical field ``(E_x, E_r)`` of the data at ``(x, r)`` in ``N + D`` dimensions.

        ``E(x~) = S^-1 sum_i pi_i (x~ - y~_i) / ||x~ - y~_i||^(N+D)``, ``S`` the area of the unit
        sphere in ``R^(N+D)`` (``E = -grad phi`` with ``laplacian phi = -rho``); ``E_r`` is its
        component along the augmented radius. For ``D = 1`` this is PFGM's field at ``z = r``.
        Equal to ``A (x - D(x), r)`` with ``A = S^-1 sum_i pi_i ||x~ - y~_i||^-(N+D)``: the
        direction is the PF-ODE's (:func:`denoiser_from_field` inverts it). Magnitudes may
        under/overflow for large ``N + D``. Empirical fields, finite ``D`` only.
        """
        emp = self._need_data("poisson_field")
        self.process._need_finite("poisson_field")
        check_tensor(x, "x")
        r = as_time(r, x, "r")
        sigma = r / math.sqrt(self.D)
        lse, dn = emp.stats(x, sigma)
        n = emp.N + self.D
        log_a = lse - n * torch.log(r) - _log_unit_sphere_area(n)
        a = torch.exp(log_a)
        e_x = bcast(a, x) * (x - dn.reshape(x.shape))
        return e_x, a * r

    def r_ode(self) -> RTimeODE:
        """The probability-flow ODE in the augmented radius ``r`` (see :class:`RTimeODE`)."""
        return RTimeODE(self)

    def __repr__(self) -> str:
        kind = "empirical" if self._empirical is not None else "network"
        extra = f", K={self._empirical.points.shape[0]}" if self._empirical is not None else ""
        return f"PoissonField({kind}{extra}, process={self.process!r})"


def _unset_denoiser(x, sigma):  # placeholder replaced in from_data
    raise RuntimeError("unreachable")


class RTimeODE:
    r"""The PFGM++ backward ODE in the augmented radius: ``dx/dr = (x - D(x, r / sqrt(D))) / r``.

    The same trajectories as the sigma-time ODE (``r = sigma sqrt(D)``, a linear time change, so a
    Runge-Kutta step on the mapped grid gives the same result up to round-off); for PFGM
    (``D = 1``) ``r`` is the anchor ``z`` and ``dx/dz = E_x / E_z``. Integrate it with
    :func:`~difsolve.solve` from ``r_max = sigma_max sqrt(D)`` with ``time_variable="t"`` and a
    ``"uniform"`` schedule or an explicit grid (it has no ``process``, so sigma-defined schedules
    do not apply). Finite ``D`` only.
    """

    def __init__(self, field: PoissonField):
        check(isinstance(field, PoissonField), "field", "a PoissonField", field)
        field.process._need_finite("RTimeODE")
        self.field = field
        self.D = field.D
        self.r_min = field.process.t_min * math.sqrt(self.D)
        self.r_max = field.process.t_max * math.sqrt(self.D)

    def drift(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        sigma = r / math.sqrt(self.D)
        return (x - self.field.denoise(x, sigma)) / bcast(r, x)

    def __repr__(self) -> str:
        return f"RTimeODE({self.field!r})"
