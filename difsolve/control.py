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

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ._errors import (
    ArgumentTypeError,
    IncompatibleError,
    _short,
    check,
    check_int,
    check_positive,
)
from ._tensor import bcast, host_reads_free, rms
from .processes import VP
from .solution import Status

__all__ = ["SCHEDULES", "Controller", "Decision", "PIController", "Proposal", "make_grid"]

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
        if schedule != "karras" and steps > 1 and bool(((s0 == 0) | (s1 == 0)).any()):
            # log-spaced schedules cannot reach sigma = 0: space the other steps down to the
            # process's smallest positive level (or 1e-3 of the other end) and take one last
            # step to 0, as k-diffusion appends a zero to its log-spaced sigmas
            return _ending_at_zero(schedule, steps, t0, t1, s0, s1, process)
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


@runtime_checkable
class Controller(Protocol):
    """Per-sample step-size control, as a strategy the adaptive loop of :func:`~difsolve.solve`
    calls (in the spirit of diffrax's ``AbstractStepSizeController``).

    Every tensor is per row (``(B,)``, batch first) and the state is a tuple of batch-first
    tensors, which the loop selects with its working set. No method may synchronise with the host.

    * ``init(dynamics, solver, x, t, span, direction, solver_state) -> (h, state, nfe)``: the
      signed first step, the controller's state and the field evaluations that cost.
    * ``adapt(state, proposal) -> Decision``: accept or reject each row's attempted step and
      propose the next signed step; report faults (step-size underflow, repeated non-finite
      proposals) as :class:`~difsolve.Status` codes.
    * ``max_steps``: most attempted steps per sample (None: the ``solve`` argument).
    * ``error_order_of(solver)`` is not required: the loop passes ``solver.error_order`` in the
      proposal.
    """

    max_steps: int | None

    def init(self, dynamics, solver, x: torch.Tensor, t: torch.Tensor, span: torch.Tensor,
             direction: torch.Tensor, solver_state: tuple) -> tuple[torch.Tensor, tuple, int]: ...

    def adapt(self, state: tuple, proposal: Proposal) -> Decision: ...


@dataclass
class Proposal:
    """What the loop tells a controller about one attempted step (rows of the working set).

    ``h_tried`` is the signed step attempted (the controller's proposal ``h_proposed`` shortened
    to land on a save point or the end); ``left`` the distance still to go after an accepted step.
    ``every_finite`` is True where the loop knows, without a host synchronisation, that every row
    of ``finite`` is true (on the CPU): a controller may then skip its non-finite handling.
    """

    x: torch.Tensor
    x_new: torch.Tensor
    error: torch.Tensor | None
    h_proposed: torch.Tensor
    h_tried: torch.Tensor
    t_new: torch.Tensor
    left: torch.Tensor
    finite: torch.Tensor
    error_order: float
    every_finite: bool = False


@dataclass
class Decision:
    """A controller's verdict: per-row ``accept``, next signed step ``h``, new ``state`` and
    ``fault`` (a :class:`~difsolve.Status` code, or -1 where the row may go on; None where no
    row faulted)."""

    accept: torch.Tensor
    h: torch.Tensor
    state: tuple
    fault: torch.Tensor | None


#: consecutive non-finite proposals after which a sample stops with NONFINITE
NONFINITE_RETRIES = 5
_NO_FAULT = -1


def _ending_at_zero(schedule, steps, t0, t1, s0, s1, process) -> torch.Tensor:
    """A log-spaced schedule with an end at sigma = 0: ``steps - 1`` steps to a positive level,
    then one step to the zero end."""
    floor = process.sigma_min if process.sigma_min > 0 else 0.0
    if s1.eq(0).all():
        inner_end = torch.where(torch.full_like(s0, floor) > 0, torch.full_like(s0, floor),
                                1e-3 * s0)
        head = make_grid(schedule, steps - 1, t0, process.t_of_sigma(inner_end), process)
        return torch.cat([head, t1[None]])
    if s0.eq(0).all():
        inner_start = torch.where(torch.full_like(s1, floor) > 0, torch.full_like(s1, floor),
                                  1e-3 * s1)
        tail = make_grid(schedule, steps - 1, process.t_of_sigma(inner_start), t1, process)
        return torch.cat([t0[None], tail])
    raise IncompatibleError(
        f"argument `schedule`: {schedule!r} is log-spaced in sigma; a grid ending at sigma = 0 "
        "must have the zero end in every sample")


class PIController:
    r"""Per-sample proportional-integral step-size controller (a :class:`Controller`).

    The error ratio of each sample is ``r = norm(err / (atol + rtol max(|y0|, |y1|)))``, by
    default the RMS over its non-batch dimensions (``norm=`` takes any function of the scaled
    error ``(B, ...) -> (B,)``); a step is accepted where ``r <= 1``. The next step is
    ``h * clip(safety r^(-(pcoeff + icoeff)/k) r_prev^(pcoeff/k), factor_min, factor_max)``
    (at most 1 after a rejection), with ``k`` the solver's error order (ODE: order; SDE: strong
    order + 0.5). ``pcoeff=0, icoeff=1`` is the classical I controller. After an accepted step
    that was shortened to land on a save point, the step before the shortening is resumed.

    The first step is ``dt0`` if given, else the solver's own choice where it has one
    (``Solver.first_step``: DPMSolver in log-sigma time), else Hairer's automatic choice for ODEs
    (2 extra drift evaluations) and 1% of the interval for SDEs (the choice of
    Jolicoeur-Martineau et al.).
    Faults: a sample whose step falls below ``dt_min`` (or below 8 machine epsilons of its time)
    before reaching the end stops with ``DT_UNDERFLOW``, and so does one whose step is rejected
    while its tolerance is finer than one rounding unit of its state (``rtol`` below the dtype's
    epsilon, or ``atol`` below the state's spacing: e.g. ``1e-300``, or ``rtol=1e-3`` for a
    bfloat16 state), which no step size can meet; ``NONFINITE`` instead where the latest rejection
    was caused by non-finite values (the row is creeping up to where the dynamics break down);
    after ``NONFINITE_RETRIES`` consecutive
    non-finite proposals with ``NONFINITE``. ``dt_max`` caps ``|h|``; ``max_steps`` (accepted +
    rejected per sample) overrides ``solve``'s.
    """

    def __init__(self, rtol: float = 1e-3, atol: float = 1e-6, pcoeff: float = 0.0,
                 icoeff: float = 1.0, safety: float = 0.9, factor_min: float = 0.2,
                 factor_max: float = 10.0, dt_min: float | None = None,
                 dt_max: float | None = None, max_steps: int | None = None,
                 dt0: float | None = None, norm: Callable[[torch.Tensor], torch.Tensor] | None = None):
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
        if norm is not None and not callable(norm):
            raise ArgumentTypeError(f"argument `norm` must be callable, got {norm!r}")
        self.norm = norm if norm is not None else rms

    def with_norm(self, norm: Callable[[torch.Tensor], torch.Tensor]) -> PIController:
        """A copy of this controller with another error norm."""
        other = copy.copy(self)
        other.norm = norm
        return other

    # ----- the Controller protocol -------------------------------------------------------------
    def init(self, dynamics, solver, x, t, span, direction, solver_state):
        h, nfe = self.initial_step(dynamics, solver, x, t, direction, span,
                                   solver.initial_drift(solver_state))
        prev_log_ratio = torch.zeros_like(span)  # log 1
        streak = torch.zeros(span.shape, dtype=torch.long, device=span.device)
        return h, (prev_log_ratio, streak, torch.zeros_like(streak, dtype=torch.bool)), nfe

    def adapt(self, state, proposal: Proposal) -> Decision:
        prev_log_ratio, streak, last_bad = state
        p = proposal
        ratio = self.error_ratio(p.error, p.x, p.x_new)
        if not p.every_finite:
            ratio = torch.where(p.finite, ratio, math.inf)
        accept = ratio <= 1.0
        # a tolerance below one rounding unit of the state cannot be met by shrinking the step
        # (the error estimate is then rounding noise, now and then exactly 0): fail on rejection
        unresolvable = self.unresolvable(p.x, p.x_new)
        log_ratio = self.log_ratio(ratio)
        fac = self.factor(log_ratio, prev_log_ratio, accept, p.error_order)
        # resume the size before a shortened landing step (both steps point the same way)
        cut = accept & (p.h_proposed.abs() > p.h_tried.abs())
        h_next = self.clip(torch.where(cut, p.h_proposed, p.h_tried * fac))
        # was the latest rejection caused by non-finite values? (then a collapsing step is a
        # NONFINITE fault: the row is creeping up to where the dynamics break down)
        if p.every_finite:
            streak, last_bad = torch.zeros_like(streak), last_bad & accept
        else:
            streak = torch.where(p.finite, 0, streak + 1)
            last_bad = torch.where(accept, last_bad, ~p.finite)
        tiny = 8 * torch.finfo(p.t_new.dtype).eps
        h_abs = h_next.abs()
        floor = tiny * p.t_new.abs().clamp(min=1.0)
        if self.dt_min is not None:
            floor = floor.clamp(min=self.dt_min)
        too_small = (h_abs < floor) & (h_abs < p.left)
        if unresolvable is not False:
            too_small = too_small | (unresolvable & ~accept)
        retries_out = None if p.every_finite else streak >= NONFINITE_RETRIES
        out = too_small if retries_out is None else too_small | retries_out
        if host_reads_free(too_small) and not bool(out.any()):
            fault = None  # (on the CPU, the common case at once)
        else:
            fault = torch.where(too_small, torch.where(last_bad, Status.NONFINITE.value,
                                                       Status.DT_UNDERFLOW.value), _NO_FAULT)
            if retries_out is not None:
                fault = torch.where(retries_out, Status.NONFINITE.value, fault)
        memory = torch.where(accept, log_ratio, prev_log_ratio)
        return Decision(accept=accept, h=h_next, state=(memory, streak, last_bad), fault=fault)

    # ----- pieces ------------------------------------------------------------------------------
    def error_ratio(self, error: torch.Tensor, y0: torch.Tensor,
                    y1: torch.Tensor) -> torch.Tensor:
        """Per-sample scaled error norm ``(B,)``; ``inf`` where the proposal is not finite."""
        scale = self.atol + self.rtol * torch.maximum(y0.abs(), y1.abs())
        ratio = self.scaled_norm(error / scale)
        return torch.nan_to_num(ratio, nan=math.inf, posinf=math.inf)

    def scaled_norm(self, scaled: torch.Tensor) -> torch.Tensor:
        """``norm(scaled)``, checked to be a floating-point ``(B,)`` tensor."""
        out = self.norm(scaled)
        if not (isinstance(out, torch.Tensor) and out.shape == scaled.shape[:1]
                and out.is_floating_point()):
            raise ArgumentTypeError(
                f"argument `norm` must return a floating-point tensor of shape "
                f"({scaled.shape[0]},) (one norm per row), got {_short(out)}")
        return out

    def unresolvable(self, y0: torch.Tensor, y1: torch.Tensor) -> torch.Tensor | bool:
        """Per sample: is one rounding unit of the state above the tolerance? (False without
        computing it where ``rtol`` is at least the dtype's epsilon and the norm is the RMS:
        each scaled rounding unit ``eps |y| / (atol + rtol |y|)`` is then at most 1.)"""
        if self.norm is rms and self.rtol >= torch.finfo(y1.dtype).eps:
            return False
        return self.rounding_ratio(y0, y1) > 1.0

    def rounding_ratio(self, y0: torch.Tensor, y1: torch.Tensor) -> torch.Tensor:
        """Per-sample norm of one rounding unit of the state in units of the tolerance
        ``(B,)``: above 1, the tolerance is finer than the state's dtype resolves."""
        ymax = torch.maximum(y0.abs(), y1.abs())
        scale = self.atol + self.rtol * ymax
        return self.scaled_norm(torch.finfo(y1.dtype).eps * ymax / scale)

    @staticmethod
    def log_ratio(ratio: torch.Tensor) -> torch.Tensor:
        """``log r``, with ``r`` clamped to the smallest normal number (``r = 0`` is finite)."""
        return torch.log(ratio.clamp(min=torch.finfo(ratio.dtype).tiny))

    def factor(self, log_ratio: torch.Tensor, prev_log_ratio: torch.Tensor,
               accept: torch.Tensor, error_order: float) -> torch.Tensor:
        """Step multiplier from the logs of the current and previous error ratios
        (:meth:`log_ratio`)."""
        k = error_order
        # safety r^(-(p + i)/k) r_prev^(p/k) as one exp of a sum of logs (elementwise kernels
        # whose result does not depend on a row's position, see _power); r = inf gives 0 and
        # r -> 0 gives inf, both clipped below; inf - inf (extreme coefficients) the minimum
        log_fac = torch.add(log_ratio * (-(self.pcoeff + self.icoeff) / k), math.log(self.safety))
        if self.pcoeff != 0.0:
            log_fac = log_fac + prev_log_ratio * (self.pcoeff / k)  # (any float coefficient)
        fac = torch.nan_to_num(torch.exp(log_fac), nan=self.factor_min)
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
        d0, d1 = self.scaled_norm(x / scale), self.scaled_norm(f0 / scale)
        small = (d0 < 1e-5) | (d1 < 1e-5)
        h0 = torch.where(small, torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp(min=1e-30))
        h0 = torch.minimum(torch.nan_to_num(h0, nan=1e-6), span)  # nan: zero tolerance scale
        x1 = x + bcast(direction * h0, x) * f0
        f1 = dynamics.drift(x1, t + direction * h0)
        nfe += 1
        d2 = self.scaled_norm((f1 - f0) / scale) / h0
        dmax = torch.maximum(d1, d2)
        h1 = torch.where(dmax <= 1e-15, torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3),
                         _power(0.01 / dmax.clamp(min=1e-30), 1.0 / (solver.order + 1)))
        h = torch.minimum(torch.minimum(100 * h0, torch.nan_to_num(h1, nan=1e-6)), span)
        return self.clip(direction * h), nfe

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items()
                           if v is not None and not (k == "norm" and v is rms))
        return f"PIController({params})"


def _power(r: torch.Tensor, exponent: float) -> torch.Tensor:
    """``r ** exponent`` for ``r > 0`` as ``exp(exponent log r)``: elementwise kernels whose result
    does not depend on a row's position in the batch (the vectorised CPU ``pow`` with a fractional
    exponent rounds differently from its scalar tail, which made a row's steps batch-dependent)."""
    return torch.exp(exponent * torch.log(r))


def _real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ArgumentTypeError(f"argument `{name}` must be a finite real number, got {value!r}")
    return float(value)
