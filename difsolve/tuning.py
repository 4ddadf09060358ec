r"""Tuned time grids: the fixed grid that minimises a solver's error on pilot trajectories.

:func:`tune_schedule` draws ``pilots`` prior samples, integrates the probability-flow ODE from
them with a tight adaptive reference solve (Dopri5 in data-prediction coordinates, tolerance
``1e-8``), and minimises the mean squared endpoint error of ``solver`` on a grid of the step count
that spends exactly ``nfe`` field evaluations. The grid is parametrised by its ``log sigma``
increments (``u_i = u_0 + (u_N - u_0) cumsum(softmax(theta))_i``, so it stays monotone and keeps
its end points); the search starts from the best named schedule on the pilots and runs L-BFGS
with gradients taken through the solver (the objective is the one the solver will be used with,
so multistep histories are accounted for exactly, unlike a dynamic programme over local errors).
This is the "direct optimisation of the grid against reference trajectories" of Optimal Stepsize
Distillation (Pei et al. 2025) and of Xue et al. (2024), with a global-error objective.

The pilots (:class:`Pilots`: prior draws and their reference endpoints, from :func:`draw_pilots`)
can be drawn once per field and reused for every solver and budget. On mixtures whose modes are
far apart the mean squared error is dominated by the few draws near a boundary between modes that
a coarse grid sends to the wrong mode; the tuned grid minimises exactly that (it is the square of
the RMS error it will be judged by), so it needs enough pilots to contain such draws (thousands,
not 64: with few, the grid is fitted to the handful it has and does not transfer).

:func:`tune_method` tunes a grid for each of several solvers on the same pilots and keeps the one
with the lowest error on pilots held back from the fitting (:func:`tune_candidates` returns them
all).

The grid is returned in the field's time variable, from ``t_max`` to ``t_min``, in float64; as a
plain list it reloads exactly (``torch.tensor(grid.tolist(), dtype=torch.float64)``). With
``ds.sample(field, shape, solver=solver, steps=grid, denoise=False)`` the evaluations spent equal
``nfe``; ``denoise=True`` adds its one Tweedie evaluation at ``t_min``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import field as dc_field

import torch

from ._errors import ArgumentTypeError, IncompatibleError, check, check_int
from ._tensor import as_time
from .control import PIController, make_grid
from .dynamics import ProbabilityFlowODE
from .fields.base import check_field
from .integrate import solve
from .solvers.base import Solver, StepContext
from .solvers.exponential import DEIS, IPNDM, UniPC
from .solvers.runge_kutta import Dopri5

__all__ = ["Pilots", "TuningInfo", "default_candidates", "draw_pilots", "fixed_grid_nfe",
           "recommended", "steps_for_nfe", "tune_candidates", "tune_method",
           "tune_schedule"]

#: named schedules (of :data:`~difsolve.control.SCHEDULES`, defined in sigma) tried as starts
START_SCHEDULES = ("karras", "logsnr", "polyexponential", "time_uniform")


@dataclass
class TuningInfo:
    """What tuning cost and achieved (errors: RMS endpoint error over the pilots)."""

    steps: int
    nfe_reference: int  # batched field calls of the reference solves
    nfe_search: int  # batched forward field calls of the search (start schedules included)
    gradients: int  # backward passes through the solver (each about one search solve)
    start_schedule: str
    start_error: float
    error: float
    errors_by_schedule: dict[str, float] = dc_field(default_factory=dict)
    errors_by_solver: dict[str, float] = dc_field(default_factory=dict)  # tune_method

    @property
    def nfe(self) -> int:
        """Total batched forward field calls spent tuning."""
        return self.nfe_reference + self.nfe_search


def fixed_grid_nfe(solver: Solver, steps: int) -> int:
    """Field evaluations ``solver`` spends on a fixed grid of ``steps`` steps."""
    own = getattr(solver, "nfe", None)
    if callable(own):
        return own(steps)
    tableau = getattr(solver, "tableau", None)
    if tableau is not None and getattr(tableau, "fsal", False):
        return 1 + (solver.stages - 1) * steps
    return solver.stages * steps


def steps_for_nfe(solver: Solver, nfe: int) -> int:
    """The step count whose fixed grid spends exactly ``nfe`` evaluations (error if none)."""
    check_int(nfe, "nfe")
    for steps in range(1, nfe + 1):
        spent = fixed_grid_nfe(solver, steps)
        if spent == nfe:
            return steps
        if spent > nfe:
            break
    raise IncompatibleError(
        f"argument `nfe`: {solver!r} cannot spend exactly {nfe} evaluations on a fixed grid "
        f"(it spends {fixed_grid_nfe(solver, 1)} for one step, then "
        f"{fixed_grid_nfe(solver, 2) - fixed_grid_nfe(solver, 1)} per step)")


def _integrate(ode, solver, x, grid):
    """The fixed-grid loop of :func:`~difsolve.solve` (time variable ``t``), differentiable in
    ``grid`` (``(n + 1,)``); returns the endpoint and the evaluations spent."""
    n = grid.shape[0] - 1
    ctx = StepContext(n_steps=n)
    ctx.plan = solver.prepare(ode, grid)
    t = grid[:, None].expand(-1, x.shape[0])
    state, nfe = solver.init(ode, x, t[0], ctx)
    for i in range(n):
        ctx.index = i
        step = solver.step(ode, x, t[i], t[i + 1] - t[i], state, None, ctx)
        x, state, nfe = step.x, step.state, nfe + step.nfe
    return x, nfe


def _grid_from(theta, u0, u1, process):
    frac = torch.cumsum(torch.softmax(theta, 0), 0)
    u = torch.cat([u0.reshape(1), u0 + (u1 - u0) * frac[:-1], u1.reshape(1)])
    return process.t_of_sigma(torch.exp(u))


def _theta_of(grid, process):
    u = torch.log(process.sigma(grid))
    inc = (u[1:] - u[:-1]) / (u[-1] - u[0])
    return torch.log(inc.clamp(min=1e-12))


@dataclass
class Pilots:
    """Prior draws ``x`` (at ``t_max``) of a field and the tight reference endpoints ``target``
    (at ``t_min``) of its probability-flow ODE from them: what :func:`tune_schedule` fits a grid
    to. Draw them once per field with :func:`draw_pilots` and reuse them for every solver and
    budget (the reference solves are most of the tuning cost)."""

    x: torch.Tensor
    target: torch.Tensor
    nfe_reference: int  # batched field calls of the reference solves

    def __len__(self) -> int:
        return self.x.shape[0]


def _as_generator(generator):
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ArgumentTypeError(
            f"argument `generator` must be a torch.Generator or an int, got {generator!r}")
    return generator


def _data_shape(field, shape):
    if shape is None:
        means = getattr(getattr(field, "mixture", None), "means", None)
        if means is None:
            raise IncompatibleError(
                "argument `shape`: give the per-sample data shape (it is inferred only for "
                "Gaussian-mixture fields)")
        shape = tuple(means.shape[1:])
    return tuple(int(s) for s in shape)


def draw_pilots(field, n: int, *, generator: torch.Generator | int | None = None, shape=None,
                rtol: float = 1e-8, batch: int = 8192) -> Pilots:
    """``n`` prior draws of ``field`` and their reference endpoints: Dopri5 in data-prediction
    (log-SNR) time with ``rtol = atol = rtol``, float64, in batches of ``batch`` draws.

    Use a ``generator`` independent of the draws the tuned grid is evaluated on."""
    check_field(field)
    n = check_int(n, "pilots")
    generator = _as_generator(generator)
    shape = _data_shape(field, shape)
    process = field.process
    ode = ProbabilityFlowODE(field)
    x = process.prior_sample((n, *shape), generator=generator, dtype=torch.float64)
    targets, nfe = [], 0
    with torch.no_grad():
        for chunk in x.split(batch):
            ref = solve(ode, chunk, process.t_max, process.t_min, solver=Dopri5(),
                        controller=PIController(rtol=rtol, atol=rtol), time_variable="snr")
            targets.append(ref.x)
            nfe += int(ref.stats.nfe)
    return Pilots(x, torch.cat(targets), nfe)


def _focus(worst: torch.Tensor, size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and weights of a stratified estimate of the mean of a per-pilot error over all ``n``
    pilots from ``size`` of them: the ``size // 2`` pilots with the largest ``worst`` (their error
    under the start schedules) each stand for themselves (weight ``1/n``), and the first
    ``size - size // 2`` of the others (a uniform sample: the pilots are i.i.d. draws) for all the
    others (weight ``(n - size // 2) / ((size - size // 2) n)``). Where mode flips dominate the
    error, they come from the few pilots near a boundary between modes; this keeps every such
    pilot a coarse grid flips, and a sample of the rest, in case the tuned grid flips others."""
    n = worst.shape[0]
    if size is None or size >= n:
        return torch.arange(n), torch.full((n,), 1.0 / n, dtype=worst.dtype)
    hard_n = size // 2
    order = torch.argsort(worst, descending=True, stable=True)
    hard, rest = order[:hard_n], torch.sort(order[hard_n:]).values[:size - hard_n]
    weights = torch.cat([torch.full((hard_n,), 1.0 / n, dtype=worst.dtype),
                         torch.full((rest.numel(),), (n - hard_n) / (rest.numel() * n),
                                    dtype=worst.dtype)])
    return torch.cat([hard, rest]), weights


def tune_schedule(field, solver: Solver, nfe: int, *, pilots: int | Pilots = 64,
                  generator: torch.Generator | int | None = None, shape=None,
                  iterations: int = 60, focus: int | None = None, return_info: bool = False):
    """Time grid (``t_max`` to ``t_min``) on which ``solver`` spends exactly ``nfe`` evaluations,
    optimised on ``pilots`` reference trajectories of ``field``'s probability-flow ODE.

    Args:
        field: a score field (its process must define ``sigma`` and ``t_of_sigma``).
        solver: an ODE solver (any fixed-grid solver: DPMSolver, UniPC, DEIS, IPNDM, Heun, ...).
        nfe: the evaluation budget (the initial evaluation included; ``denoise`` excluded).
        pilots: number of prior draws the grid is optimised on, or a :class:`Pilots` from
            :func:`draw_pilots` (then ``generator`` and ``shape`` are not used).
        generator: a ``torch.Generator`` or an int seed for the pilot draws.
        shape: per-sample shape ``(...)`` of the data; inferred for Gaussian-mixture fields.
        iterations: L-BFGS iterations.
        focus: optimise on this many of the pilots (default all): every pilot among the
            ``focus // 2`` worst under the named start schedules, and a uniform sample of the
            others weighted up to stand for all of them (:func:`_focus`), an unbiased estimate
            of the mean squared error over all the pilots at a fraction of the cost.
        return_info: also return a :class:`TuningInfo` (cost in evaluations, pilot errors).

    Returns:
        a float64 ``(steps + 1,)`` tensor of times, or ``(grid, info)``.
    """
    check_field(field)
    if not isinstance(solver, Solver):
        raise ArgumentTypeError(f"argument `solver` must be a difsolve Solver, got {solver!r}")
    if solver.sde or solver.stochastic:
        raise IncompatibleError("argument `solver`: tune_schedule tunes ODE solvers")
    steps = steps_for_nfe(solver, nfe)
    iterations = check_int(iterations, "iterations", minimum=0)
    if focus is not None:
        focus = check_int(focus, "focus", minimum=2)
    if not isinstance(pilots, Pilots):
        pilots = draw_pilots(field, check_int(pilots, "pilots"), generator=generator,
                             shape=shape)
    process = field.process
    ode = ProbabilityFlowODE(field)
    solver.check_dynamics(ode)
    dtype = torch.float64
    x_T, target, n = pilots.x, pilots.target, len(pilots)

    def per_pilot(grid, x0, ref):
        x, spent = _integrate(ode, solver, x0, grid)
        return (x - ref).reshape(x0.shape[0], -1).square().sum(1), spent

    t0 = as_time(process.t_max, x_T[:1, ..., 0].reshape(1), "t_max")
    t1 = as_time(process.t_min, x_T[:1, ..., 0].reshape(1), "t_min")
    nfe_search = 0
    by_schedule, worst = {}, torch.zeros(n, dtype=dtype)
    with torch.no_grad():
        for name in START_SCHEDULES:
            grid = make_grid(name, steps, t0, t1, process)[:, 0]
            errors, spent = per_pilot(grid, x_T, target)
            nfe_search += spent
            by_schedule[name] = math.sqrt(float(errors.mean()))
            worst = torch.maximum(worst, torch.nan_to_num(errors, nan=math.inf))
    rows, weights = _focus(worst, focus)

    def loss_of(grid):
        errors, spent = per_pilot(grid, x_T[rows], target[rows])
        return (errors * weights).sum(), spent

    start = min(by_schedule, key=by_schedule.get)
    start_grid = make_grid(start, steps, t0, t1, process)[:, 0]
    u0, u1 = torch.log(process.sigma(t0[0])), torch.log(process.sigma(t1[0]))
    theta = _theta_of(start_grid, process).clone().requires_grad_(True)
    with torch.no_grad():
        start_loss, spent = loss_of(start_grid)
    nfe_search += spent
    best = [float(start_loss), start_grid.detach().clone()]
    counts = [0, 0]
    if steps > 1 and iterations > 0:
        opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=iterations, history_size=20,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-12,
                                tolerance_change=1e-14)

        def closure():
            opt.zero_grad()
            with torch.enable_grad():
                grid = _grid_from(theta, u0, u1, process)
                loss, spent = loss_of(grid)
                objective = torch.log(loss)
                objective.backward()
            counts[0] += spent
            counts[1] += 1
            if bool(torch.isfinite(loss)) and float(loss.detach()) < best[0]:
                best[0], best[1] = float(loss.detach()), grid.detach().clone()
            if not bool(torch.isfinite(objective)):
                theta.grad = torch.zeros_like(theta)
                return torch.tensor(math.inf, dtype=dtype)
            return objective.detach()

        opt.step(closure)
    grid = best[1].to(dtype)
    grid[0], grid[-1] = process.t_max, process.t_min
    info = TuningInfo(steps=steps, nfe_reference=pilots.nfe_reference,
                      nfe_search=nfe_search + counts[0], gradients=counts[1], start_schedule=start,
                      start_error=by_schedule[start], error=math.sqrt(best[0]),
                      errors_by_schedule=by_schedule)
    return (grid, info) if return_info else grid


def default_candidates() -> tuple[Solver, ...]:
    """The solvers :func:`tune_method` chooses among by default (one evaluation per step each):
    the ones whose tuned grids were best somewhere in docs/low-nfe.md's development problems."""
    return (UniPC(2, "bh2"), UniPC(3, "bh2"), IPNDM(4))


def tune_method(field, nfe: int, *, candidates=None, pilots: int | Pilots = 16384,
                generator: torch.Generator | int | None = None, shape=None,
                iterations: int = 40, holdout: float = 0.25, focus: int | None = 4096
                ) -> tuple[Solver, torch.Tensor, TuningInfo]:
    """The solver of ``candidates`` (default :func:`default_candidates`) and its tuned grid with
    the lowest pilot error at a budget of ``nfe`` evaluations, chosen on the pilots alone (never
    on evaluation draws).

    Each candidate's grid is tuned (:func:`tune_schedule`) on the first ``1 - holdout`` of the
    pilots and the candidates are compared on the other ``holdout``: a grid fitted to a few
    pilots near a boundary between modes can look better on its own pilots than it is, and more
    so for some solvers than others. ``holdout=0`` compares them on the pilots they were tuned on.
    The defaults (16384 pilots, a focus of 4096, 40 L-BFGS iterations) are the recipe measured in
    docs/low-nfe.md; for an expensive network field, fewer pilots (the reference solves cost
    several hundred evaluations of each) and ``focus=None``.

    Returns ``(solver, grid, info)``; ``info.errors_by_solver`` holds every candidate's RMS error
    on the held-back pilots and ``info.nfe``/``info.gradients`` the cost of all the searches.
    """
    tried = tune_candidates(field, nfe, candidates=candidates, pilots=pilots,
                            generator=generator, shape=shape, iterations=iterations,
                            holdout=holdout, focus=focus)
    _, solver, grid, info = min(tried, key=lambda r: r[0])  # first of equals
    info.errors_by_solver = {repr(r[1]): r[0] for r in tried}
    info.nfe_search = sum(r[3].nfe_search for r in tried)
    info.gradients = sum(r[3].gradients for r in tried)
    return solver, grid, info


def tune_candidates(field, nfe: int, *, candidates=None, pilots: int | Pilots = 16384,
                    generator: torch.Generator | int | None = None, shape=None,
                    iterations: int = 40, holdout: float = 0.25, focus: int | None = 4096
                    ) -> list[tuple[float, Solver, torch.Tensor, TuningInfo]]:
    """What :func:`tune_method` chooses from: ``(held-back pilot RMS error, solver, grid, info)``
    for each candidate, in order (same arguments)."""
    candidates = tuple(default_candidates() if candidates is None else candidates)
    check(len(candidates) > 0, "candidates", "at least one solver", candidates)
    check(isinstance(holdout, (int, float)) and 0 <= holdout < 1, "holdout", "in [0, 1)",
          holdout)
    if not isinstance(pilots, Pilots):
        pilots = draw_pilots(field, check_int(pilots, "pilots"), generator=generator,
                             shape=shape)
    cut = round(holdout * len(pilots))
    fit = Pilots(pilots.x[cut:], pilots.target[cut:], pilots.nfe_reference) if cut else pilots
    judge = Pilots(pilots.x[:cut], pilots.target[:cut], 0) if cut else pilots
    ode = ProbabilityFlowODE(field)
    tried = []
    for solver in candidates:
        grid, info = tune_schedule(field, solver, nfe, pilots=fit, iterations=iterations,
                                   focus=focus, return_info=True)
        with torch.no_grad():
            x, spent = _integrate(ode, solver, judge.x, grid)
        info.nfe_search += spent
        error = math.sqrt(float((x - judge.target).reshape(len(judge), -1).square().sum(1)
                                .mean()))
        tried.append((error if math.isfinite(error) else math.inf, solver, grid, info))
    return tried


#: the best solver and named schedule per budget, measured on the named schedules only (no
#: tuning) by ``benchmarks/bench_lownfe.py`` on the EDM ring and 16-D mixture (see
#: docs/low-nfe.md): (largest budget, solver factory, schedule)
_RECOMMENDED = (
    (12, lambda: DEIS(3), "karras"),  # best at 10 on both problems (= the best peer)
    (math.inf, lambda: IPNDM(4), "time_uniform"),  # best at 15, 20, 30 on both
)


def recommended(nfe: int) -> tuple[Solver, str]:
    """``(solver, schedule)`` to spend a budget of ``nfe`` evaluations on a fixed grid without
    tuning: the measured best of the multistep family on the named schedules (docs/low-nfe.md).
    Use ``steps_for_nfe(solver, nfe)`` steps (one evaluation per step for these solvers)."""
    check_int(nfe, "nfe")
    return next((make(), schedule) for bound, make, schedule in _RECOMMENDED if nfe <= bound)
