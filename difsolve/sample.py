"""``sample``: draw from a score field's process prior (or start from a given state) and
integrate back to ``t_min``."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ._errors import (
    ArgumentTypeError,
    IncompatibleError,
    check,
    check_device,
    check_int,
    check_real,
    check_shape,
)
from ._tensor import all_finite, bcast, check_output
from .conditioning import ConditionedField, RowCondition
from .control import Controller
from .dynamics import CheckedField, ProbabilityFlowODE, ReverseSDE
from .fields.base import check_field
from .fields.base import denoise as tweedie
from .integrate import solve
from .noise import make_stream
from .solution import Solution, Status
from .solvers.base import Solver
from .solvers.runge_kutta import Heun
from .tuning import recommended, steps_for_nfe

__all__ = ["sample"]

#: fixed-step defaults when neither ``steps`` nor ``controller`` is given
DEFAULT_ODE_STEPS = 17  # Heun on 17 Karras steps + the final denoise: EDM's sampler, 35 NFE
DEFAULT_SDE_STEPS = 1000  # score_sde's choice


def sample(field, shape=None, *, solver: Solver | None = None, steps=None,
           schedule: str | None = None, controller: Controller | None = None, corrector=None,
           generator: torch.Generator | int | None = None, seeds=None, denoise: bool = True,
           device=None, dtype=None, progress: bool = False, time_variable: str | None = None,
           x_T: torch.Tensor | None = None, t_start: float | None = None, save_at=None,
           callback: Callable[[dict], None] | None = None, cond: dict | None = None,
           nfe: int | None = None) -> Solution:
    """Sample ``shape = (B, ...)`` from ``field``: prior at ``t_max``, integrate to ``t_min``.

    An ODE solver integrates the :class:`~difsolve.ProbabilityFlowODE`, an SDE solver the
    :class:`~difsolve.ReverseSDE`. Defaults: ``Heun()``; without ``steps`` or ``controller``,
    17 Karras steps for ODE solvers (with ``denoise`` and Heun: EDM's sampler, 35 NFE) and 1000
    steps for SDE solvers (uniform in ``t``, or in ``log sigma`` for processes with ``a = 1``).
    ``time_variable`` (see :func:`~difsolve.solve`) defaults to ``"t"`` on fixed grids (the grid
    carries the diffusion-aware spacing, and Heun on the Karras grid is then EDM's sampler) and
    to a diffusion-aware time under a controller: ``"snr"`` for Runge-Kutta solvers
    (data-prediction coordinates, :class:`~difsolve.dynamics.SNRTime`), ``"log_sigma"`` for
    DPMSolver and SDE solvers. ``denoise=True`` ends with one Tweedie step
    ``x0 = (x + b^2 s) / a`` (one more field evaluation, counted in ``stats.nfe``; a row whose
    denoised value is not finite is NONFINITE).

    Args:
        field: a :class:`~difsolve.ScoreField`.
        shape: ``(B, ...)``; may be omitted when ``x_T`` is given.
        x_T: the starting state instead of a prior draw (at ``t_max``, or at ``t_start``).
        t_start: start at this time instead of ``t_max`` from the state ``x_T`` (SDEdit,
            img2img, partial solves: ``x_T = process.perturb(x0, t_start)``).
        generator: a ``torch.Generator`` or an int seed for the prior draw and all noise.
        seeds: one int per row instead of ``generator``: row ``i``'s prior draw and noise come
            from its own generator, so its result does not depend on the batch it is in.
        cond: keyword arguments for the field (see :mod:`difsolve.conditioning`).
        steps: a number of steps (with ``schedule``), or an explicit grid of times from the start
            time to where sampling ends (``t_min``, or any later time: the grid's last entry).
        save_at, callback, progress, schedule, controller, corrector, time_variable:
            as in :func:`~difsolve.solve`.
        device, dtype: of the prior draw.
        nfe: a budget of field evaluations on a fixed grid instead of ``steps`` (the final
            denoise included): without a ``solver``, the measured best method for that budget
            (:func:`difsolve.tuning.recommended`, docs/low-nfe.md) on its schedule; with one, the
            step count that spends exactly the budget. ``stats.nfe`` equals it.

    Returns:
        :class:`~difsolve.Solution` (rows that failed hold NaN; see ``status``).
    """
    check_field(field)
    if nfe is not None:
        solver, steps, schedule = _budget(nfe, solver, steps, schedule, controller, denoise)
    solver = Heun() if solver is None else solver
    if not isinstance(solver, Solver):
        raise ArgumentTypeError(
            f"argument `solver` must be a difsolve Solver instance, got {solver!r}")
    if not isinstance(denoise, bool):
        raise ArgumentTypeError(f"argument `denoise` must be a bool, got {denoise!r}")
    process = field.process
    dynamics = ReverseSDE(field) if solver.sde else ProbabilityFlowODE(field)
    solver.check_dynamics(dynamics)
    if steps is None and controller is None:
        steps = DEFAULT_SDE_STEPS if solver.sde else DEFAULT_ODE_STEPS
    if schedule is None:
        # Karras for ODEs (EDM); for SDEs uniform in t (score_sde), except on sigma-time
        # processes, where uniform in t would waste the steps at high noise: uniform in log sigma
        schedule = "karras" if not solver.sde else (
            "logsnr" if process.unit_scale else "uniform")
    if time_variable is None:
        time_variable = _default_time_variable(solver, controller)
    t0 = process.t_max if t_start is None else _check_t_start(t_start, process, x_T)
    x_start, stream = start_state(process, shape, x_T, generator, seeds, device, dtype)
    # an explicit grid may end before t_min (e.g. diffusers' "trailing" spacing): it ends there
    t_end = float(steps[-1]) if isinstance(steps, torch.Tensor) and steps.ndim == 1 and \
        steps.numel() >= 2 else process.t_min
    sol = solve(dynamics, x_start, t0, t_end, solver=solver, steps=steps,
                schedule=schedule, controller=controller, corrector=corrector,
                generator=stream, progress=progress, time_variable=time_variable,
                save_at=save_at, callback=callback, cond=cond)
    if denoise and x_start.shape[0]:
        _denoise_end(field, sol, cond)
    return sol


def _budget(nfe, solver, steps, schedule, controller, denoise):
    """``(solver, steps, schedule)`` spending exactly ``nfe`` evaluations."""
    if steps is not None or controller is not None:
        raise IncompatibleError(
            "argument `nfe`: a budget replaces `steps` and `controller`; give only one of them")
    own = check_int(nfe, "nfe", minimum=2 if denoise else 1) - int(bool(denoise))
    if solver is None:
        solver, default_schedule = recommended(own)
        schedule = default_schedule if schedule is None else schedule
    return solver, steps_for_nfe(solver, own), schedule


def _default_time_variable(solver: Solver, controller) -> str:
    supported = solver.time_variables
    if controller is None:  # fixed grids: the published samplers (EDM's Heun is in sigma)
        preferred = ("t", "log_sigma")
    else:  # adaptive: a diffusion-aware time, where the controller's steps are even
        preferred = ("log_sigma", "t") if solver.sde else ("snr", "log_sigma", "t")
    return next(v for v in preferred if v in supported)


def _check_t_start(t_start, process, x_T) -> float:
    if x_T is None:
        raise IncompatibleError(
            "argument `t_start` needs `x_T`, the state at that time (e.g. "
            "process.perturb(x0, t_start) for SDEdit)")
    t_start = check_real(t_start, "t_start")
    check(process.t_min < t_start <= process.t_max, "t_start",
          f"in (t_min, t_max] = ({process.t_min}, {process.t_max}]", t_start)
    return t_start


def start_state(process, shape, x_T, generator, seeds, device, dtype):
    """The starting state and the random stream the solve continues with."""
    if x_T is not None:
        if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point() or x_T.ndim < 1:
            raise ArgumentTypeError(
                f"argument `x_T` must be a floating-point tensor of shape (B, ...), got "
                f"{type(x_T).__name__}")
        if shape is not None:
            check(tuple(check_shape(shape)) == tuple(x_T.shape), "shape",
                  f"the shape of x_T {tuple(x_T.shape)}", shape)
        stream = make_stream(generator, seeds, x_T.shape[0], x_T.device)
        return x_T, stream
    if shape is None:
        raise ArgumentTypeError("argument `shape` is required unless `x_T` is given")
    shape = check_shape(shape)
    device = check_device(device)
    if dtype is not None:
        check(isinstance(dtype, torch.dtype) and dtype.is_floating_point, "dtype",
              "a floating-point torch.dtype", dtype)
    stream = make_stream(generator, seeds, shape[0], device or "cpu")
    return stream.prior(process, shape, device, dtype), stream


def _denoise_end(field, sol: Solution, cond) -> None:
    """One Tweedie step at the end; rows whose denoised value is not finite fail."""
    bound = field
    rows = RowCondition.of(cond, sol.x.shape[0])
    if rows:
        bound = ConditionedField(field, rows)
    with torch.no_grad():
        x0 = check_output(tweedie(CheckedField(bound), sol.x, sol.t), sol.x, "field")
    ok = all_finite(x0) & (sol.status == Status.SUCCESS.value)
    sol.status = torch.where(ok | (sol.status != Status.SUCCESS.value), sol.status,
                             Status.NONFINITE.value)
    sol.x = torch.where(bcast(ok, x0), x0, math.nan)
    if sol.last_x is not None:  # a row that succeeded ends at its sample
        sol.last_x = torch.where(bcast(ok, x0), x0, sol.last_x)
    sol.stats.nfe += 1
    sol.stats.nfe_per_sample += 1
