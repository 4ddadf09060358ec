r"""Step control: fixed-step time grids (schedules) and the per-sample PI step-size controller.

Schedules for ``steps=N`` (``N + 1`` times from ``t0`` to ``t1``, per sample):

* ``"uniform"``: uniform in ``t``;
* ``"karras"``: ``sigma_i = (s_0^(1/rho) + i/N (s_1^(1/rho) - s_0^(1/rho)))^rho``, ``rho = 7``
  (Karras et al. 2022, eq. 5), mapped back to ``t``;
* ``"logsnr"``: uniform in ``log sigma`` (= uniform in the log-SNR ``lambda``);
* ``"quadratic"``: quadratic in ``t``, dense at the data end (smaller ``t``), as in DDIM;
* ``"time_uniform"``: uniform in the time of the score_sde VP process (``beta`` 0.1 to 20) with the
  same sigma end points (DPM-Solver's ``"time_uniform"``, for any process);
* ``"polyexponential"``: ``log sigma`` a power ``rho = 2`` of the uniform ramp (k-diffusion's
  ``get_sigmas_polyexponential``; ``rho = 1`` is ``"logsnr"``), denser at the data end.

Tuned grids (optimised for a solver and a budget on pilot trajectories) are
:func:`difsolve.tune_schedule`.

:class:`PIController` adapts a per-sample step from an embedded error estimate (Hairer, Norsett &
Wanner I, II.4; Soderlind, *Digital filters in adaptive time-stepping*, 2003).
"""

from __future__ import annotations

import math

import torch

from ._errors import ArgumentTypeError, IncompatibleError, check, check_int, check_positive
from ._tensor import bcast, rms
from .processes import VP

__all__ = ["SCHEDULES", "PIController", "make_grid"]

SCHEDULES = ("uniform", "karras", "logsnr", "quadratic", "time_uniform", "polyexponential")
KARRAS_RHO = 7.0
POLYEXPONENTIAL_RHO = 2.0


def make_grid(schedule: str, steps: int, t0: torch.Tensor, t1: torch.Tensor,
              process=None) -> torch.Tensor:
    """Return the ``(steps + 1, B)`` grid of a named schedule between per-sample ``t0`` and ``t1``."""
    check(schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}", schedule)
    check_int(steps, "steps")
    frac = torch.linspace(0.0, 1.0, steps + 1, device=t0.device, dtype=t0.dtype)[:, None]
    if schedule == "uniform":
        grid = t0 + (t1 - t0) * frac
    elif schedule == "quadratic":
        dense_at_t1 = t1 < t0
        to_t1 = t1 + (t0 - t1) * (1.0 - frac).square()
        from_t0 = t0 + (t1 - t0) * frac.square()
        grid = torch.where(dense_at_t1, to_t1, from_t0)
    else:
        if process is None:
            raise IncompatibleError(
                f"argument `schedule`: {schedule!r} is defined in sigma and needs dynamics with a "
                "`process` (use schedule='uniform' or pass an explicit grid)")
        s0, s1 = process.sigma(t0), process.sigma(t1)
        if schedule == "karras":
            r = 1.0 / KARRAS_RHO
            sig = (s0**r + frac * (s1**r - s0**r)) ** KARRAS_RHO
        elif schedule == "time_uniform":
            vp = VP()
            u0, u1 = vp.t_of_sigma(s0), vp.t_of_sigma(s1)
            sig = vp.sigma(u0 + frac * (u1 - u0))
        else:
            ramp = frac if schedule == "logsnr" else 1.0 - (1.0 - frac) ** POLYEXPONENTIAL_RHO
            sig = torch.exp(torch.log(s0) + ramp * (torch.log(s1) - torch.log(s0)))
        grid = process.t_of_sigma(sig)
    grid[0], grid[-1] = t0, t1  # exact end points
    return grid


class PIController:
    r"""Per-sample proportional-integral step-size controller.

    The error ratio of each sample is ``r = RMS(err / (atol + rtol max(|y0|, |y1|)))`` over its
    non-batch dimensions; a step is accepted where ``r <= 1``. The next step is
    ``h * clip(safety r^(-(pcoeff + icoeff)/k) r_prev^(pcoeff/k), factor_min, factor_max)``
    (at most 1 after a rejection), with ``k`` the solver's error order (ODE: order; SDE: strong
    order + 0.5). ``pcoeff=0, icoeff=1`` is the classical I controller.

    The first step is ``dt0`` if given, else the solver's own choice where it has one
    (``Solver.first_step``: DPMSolver in log-sigma time), else Hairer's automatic choice for ODEs
    (2 extra drift evaluations) and 1% of the interval for SDEs (the choice of
    Jolicoeur-Martineau et al.).
    ``dt_min``: a sample whose step would fall below it stops with status ``DT_UNDERFLOW``;
    ``dt_max`` caps ``|h|``; ``max_steps`` (accepted + rejected per sample) overrides ``solve``'s.
    """

    def __init__(self, rtol: float = 1e-3, atol: float = 1e-6, pcoeff: float = 0.0,
                 icoeff: float = 1.0, safety: float = 0.9, factor_min: float = 0.2,
                 factor_max: float = 10.0, dt_min: float | None = None,
                 dt_max: float | None = None, max_steps: int | None = None,
                 dt0: float | None = None):
        self.rtol = check_positive(rtol, "rtol", allow_zero=True)
        self.atol = check_positive(atol, "atol", allow_zero=True)
        check(self.rtol > 0 or self.atol > 0, "atol", "positive when rtol is 0", atol)
        self.pcoeff = _real(pcoeff, "pcoeff")
        self.icoeff = check_positive(icoeff, "icoeff")
        self.safety = check_positive(safety, "safety")
        check(self.safety <= 1.0, "safety", "in (0, 1]", safety)
        self.factor_min = check_positive(factor_min, "factor_min")
        check(self.factor_min < 1.0, "factor_min", "in (0, 1)", factor_min)
        self.factor_max = check_positive(factor_max, "factor_max")
        check(self.factor_max > 1.0, "factor_max", "greater than 1", factor_max)
        self.dt_min = None if dt_min is None else check_positive(dt_min, "dt_min")
        self.dt_max = None if dt_max is None else check_positive(dt_max, "dt_max")
        if self.dt_min is not None and self.dt_max is not None:
            check(self.dt_max >= self.dt_min, "dt_max", f">= dt_min={dt_min}", dt_max)
        self.max_steps = None if max_steps is None else check_int(max_steps, "max_steps")
        self.dt0 = None if dt0 is None else check_positive(dt0, "dt0")

    def error_ratio(self, error: torch.Tensor, y0: torch.Tensor,
                    y1: torch.Tensor) -> torch.Tensor:
        """Per-sample scaled RMS error ``(B,)``; ``inf`` where the proposal is not finite."""
        scale = self.atol + self.rtol * torch.maximum(y0.abs(), y1.abs())
        ratio = rms(error / scale)
        return torch.nan_to_num(ratio, nan=math.inf, posinf=math.inf)

    def factor(self, ratio: torch.Tensor, prev_ratio: torch.Tensor, accept: torch.Tensor,
               error_order: float) -> torch.Tensor:
        """Step multiplier from the current and previous error ratios."""
        k = error_order
        tiny = torch.finfo(ratio.dtype).tiny
        r = ratio.clamp(min=tiny)
        fac = self.safety * r.pow(-(self.pcoeff + self.icoeff) / k)
        if self.pcoeff != 0.0:
            fac = fac * prev_ratio.clamp(min=tiny).pow(self.pcoeff / k)
        fac = torch.nan_to_num(fac, nan=self.factor_min, posinf=self.factor_max)
        fac = fac.clamp(self.factor_min, self.factor_max)
        return torch.where(accept, fac, fac.clamp(max=1.0))

    def clip(self, h: torch.Tensor) -> torch.Tensor:
        if self.dt_max is not None:
            h = h.sign() * h.abs().clamp(max=self.dt_max)
        return h

    def initial_step(self, dynamics, solver, x: torch.Tensor, t: torch.Tensor,
                     direction: torch.Tensor, span: torch.Tensor, f0: torch.Tensor | None
                     ) -> tuple[torch.Tensor, int]:
        """Signed first step ``(B,)`` and the NFE it cost (``f0``: ``f(x0, t0)`` if already
        known, e.g. an FSAL solver's first stage, so that it is not evaluated again).

        ODEs: Hairer, Norsett & Wanner I, II.4 ("starting step size"); SDEs: ``dt0`` or 1% of the
        interval.
        """
        if self.dt0 is not None:
            return self.clip(direction * torch.minimum(span, torch.full_like(span, self.dt0))), 0
        if solver.sde:
            return self.clip(direction * 0.01 * span), 0
        own = solver.first_step(dynamics, t, span)
        if own is not None:
            return self.clip(direction * own), 0
        nfe = 0
        if f0 is None:
            f0 = dynamics.drift(x, t)
            nfe += 1
        scale = self.atol + self.rtol * x.abs()
        d0, d1 = rms(x / scale), rms(f0 / scale)
        small = (d0 < 1e-5) | (d1 < 1e-5)
        h0 = torch.where(small, torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp(min=1e-30))
        h0 = torch.minimum(h0, span)
        x1 = x + bcast(direction * h0, x) * f0
        f1 = dynamics.drift(x1, t + direction * h0)
        nfe += 1
        d2 = rms((f1 - f0) / scale) / h0
        dmax = torch.maximum(d1, d2)
        h1 = torch.where(dmax <= 1e-15, torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3),
                         (0.01 / dmax.clamp(min=1e-30)).pow(1.0 / (solver.order + 1)))
        h = torch.minimum(torch.minimum(100 * h0, h1), span)
        return self.clip(direction * h), nfe

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if v is not None)
        return f"PIController({params})"


def _real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ArgumentTypeError(f"argument `{name}` must be a finite real number, got {value!r}")
    return float(value)
