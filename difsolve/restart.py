r"""Restart sampling (Xu et al., *Restart Sampling for Improving Generative Processes*, NeurIPS
2023): deterministic ODE steps, with forward-noise restarts on sub-intervals.

The main pass integrates the probability-flow ODE from ``t_max`` to ``t_min`` on a fixed grid.
When it reaches the lower end ``sigma_lo`` of a restart interval (snapped to the nearest main grid
point), it repeats ``repeats`` times: jump *up* to ``sigma_hi`` by the exact forward transition
of the noising process, ``y_hi = y_lo + sqrt(sigma_hi^2 - sigma_lo^2) z`` in ``y = x/a`` (``x_hi =
a_hi y_hi``), and integrate the ODE back down to ``sigma_lo`` with ``steps`` steps. The forward
jumps contract the accumulated ODE error in law (the paper's Theorem 2: the Wasserstein upper bound
of the ODE error shrinks by a factor per restart) while the ODE steps add little discretisation
error; any difsolve ODE solver does the steps (EDM's Heun in the paper).

Noise law: one ``N(0, I)`` per element and restart, from ``generator`` (or, with ``seeds=``, from
each row's own stream, so a row's result does not depend on its batch). Work: the NFE of the main
pass plus ``repeats`` times the NFE of each backward pass (plus 1 for ``denoise``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._errors import ArgumentTypeError, IncompatibleError, check, check_int, check_positive
from ._tensor import bcast
from .control import make_grid
from .dynamics import ProbabilityFlowODE
from .fields.base import check_field
from .integrate import solve
from .sample import _denoise_end, start_state
from .solution import Solution
from .solvers.base import Solver
from .solvers.runge_kutta import Heun

__all__ = ["Restart", "restart_sample"]


@dataclass(frozen=True)
class Restart:
    """A restart interval ``[sigma_lo, sigma_hi]`` (noise levels ``b/a``), visited ``repeats``
    times, each backward ODE pass taking ``steps`` steps."""

    sigma_lo: float
    sigma_hi: float
    repeats: int = 1
    steps: int = 3

    def __post_init__(self):
        lo = check_positive(self.sigma_lo, "sigma_lo")
        hi = check_positive(self.sigma_hi, "sigma_hi")
        check(hi > lo, "sigma_hi", f"greater than sigma_lo={lo}", hi)
        check_int(self.repeats, "repeats", minimum=0)
        check_int(self.steps, "steps")


def restart_sample(field, shape, *, solver: Solver | None = None, steps: int = 18,
                   schedule: str = "karras", restarts=(Restart(0.3, 2.0, 2, 3),),
                   generator: torch.Generator | int | None = None, seeds=None,
                   denoise: bool = True, device=None, dtype=None,
                   x_T: torch.Tensor | None = None, time_variable: str = "t",
                   cond: dict | None = None, max_steps: int = 10_000) -> Solution:
    """Sample ``shape`` from ``field`` with Restart sampling; returns a :class:`Solution`.

    Args:
        field: a score field.
        shape: ``(B, ...)``.
        solver: an ODE solver (default ``Heun()``).
        steps, schedule: the main pass's fixed grid from ``t_max`` to ``t_min``.
        restarts: :class:`Restart` intervals; each ``sigma_lo`` is snapped to the nearest main
            grid point above ``t_min``.
        generator: the prior draw and the restart noise (a generator or an int seed).
        seeds: one int per row instead of ``generator``: row ``i``'s prior draw and restart
            noise come from its own stream (a row's result does not depend on its batch).
        denoise: end with one Tweedie step (one more evaluation).
        x_T: the state at ``t_max`` instead of a prior draw.
        time_variable: passed to :func:`~difsolve.solve` for every ODE segment.
        cond: conditioning passed to the field (see :func:`~difsolve.sample`).
        max_steps: most steps of the main pass and of each restart segment (as in
            :func:`~difsolve.solve`; checked before any grid is built).

    ``stats.nfe`` counts every segment; ``stats.steps`` the steps of every segment.
    """
    check_field(field)
    solver = Heun() if solver is None else solver
    if not isinstance(solver, Solver):
        raise ArgumentTypeError(f"argument `solver` must be a difsolve Solver, got {solver!r}")
    if solver.sde:
        raise IncompatibleError(
            "argument `solver`: Restart sampling steps the probability-flow ODE; pass an ODE "
            "solver such as Heun() or DPMSolver(2)")
    steps = check_int(steps, "steps")
    max_steps = check_int(max_steps, "max_steps")
    check(steps <= max_steps, "steps", f"at most max_steps={max_steps} steps", steps)
    if not isinstance(denoise, bool):
        raise ArgumentTypeError(f"argument `denoise` must be a bool, got {denoise!r}")
    if isinstance(restarts, Restart):
        restarts = (restarts,)
    if not hasattr(restarts, "__iter__") or isinstance(restarts, torch.Tensor):
        raise ArgumentTypeError(
            f"argument `restarts` must be a sequence of Restart objects, got {restarts!r}")
    restarts = tuple(restarts)
    for r in restarts:
        if not isinstance(r, Restart):
            raise ArgumentTypeError(f"argument `restarts` must hold Restart objects, got {r!r}")
        check(r.steps <= max_steps, "restarts", f"segments of at most max_steps={max_steps} "
              "steps", r.steps)
    process = field.process
    ode = ProbabilityFlowODE(field)
    solver.check_dynamics(ode)
    x, stream = start_state(process, shape, x_T, generator, seeds, device, dtype)
    one = torch.ones(1, device=x.device, dtype=x.dtype)
    grid = make_grid(schedule, steps, one * process.t_max, one * process.t_min, process)[:, 0]
    sig = process.sigma(grid)
    # restart points: main-grid indices (strictly inside the grid), in order of the main pass
    at: dict[int, list[Restart]] = {}
    for r in restarts:
        j = int((sig[1:-1] - r.sigma_lo).abs().argmin()) + 1 if grid.numel() > 2 else 0
        check(j > 0, "restarts", "used with a main grid of at least 2 steps", steps)
        at.setdefault(j, []).append(r)
    nfe, total_steps = 0, torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    sol = None

    def run(x, g):
        nonlocal nfe, total_steps, sol
        sol = solve(ode, x, g[0], g[-1], solver=solver, steps=g, time_variable=time_variable,
                    cond=cond, max_steps=max_steps)
        nfe += sol.stats.nfe
        total_steps = total_steps + sol.stats.steps
        return sol.x

    start = 0
    for j in sorted(at):
        x = run(x, grid[start:j + 1])
        t_lo = grid[j]
        a_lo, b_lo = process.marginal(t_lo)
        for r in at[j]:
            t_hi = process.t_of_sigma(torch.as_tensor(r.sigma_hi, device=x.device,
                                                      dtype=x.dtype)).reshape(1)
            a_hi, b_hi = process.marginal(t_hi)
            jump = math.sqrt(max(float((b_hi / a_hi) ** 2 - (b_lo / a_lo) ** 2), 0.0))
            back = make_grid(schedule, r.steps, t_hi, t_lo.reshape(1), process)[:, 0]
            for _ in range(r.repeats):
                z = stream.randn(x)
                x = bcast(a_hi, x) * (x / bcast(a_lo, x) + jump * z)
                x = run(x, back)
        start = j
    x = run(x, grid[start:])
    sol.stats.nfe = nfe
    sol.stats.nfe_per_sample = torch.full_like(sol.stats.nfe_per_sample, nfe)
    sol.stats.steps = total_steps
    sol.stats.accepted = total_steps.clone()
    if denoise:
        _denoise_end(field, sol, cond)
    return sol
