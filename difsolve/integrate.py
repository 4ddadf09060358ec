"""``solve``: the one loop that drives every solver, on a fixed grid or under a step controller.

Time is a per-sample ``(B,)`` tensor throughout, kept in at least float32 whatever the state's
dtype. No autograd graph is built unless ``grad=True``.

* **Fixed grids** (the fast path): a grid shared by the batch is stored once; the loop never
  synchronises with the host; finiteness is checked every :data:`CHECK_EVERY` steps and at the
  end (one fused reduction per row), which attributes faults to the right rows.
* **Under a controller** each sample has its own step size and is accepted or rejected on its own
  (``torch.where``) by a :class:`~difsolve.control.Controller`; all per-row values live in one
  :class:`LoopState`, which selects its own rows when finished rows are dropped (once a quarter of
  the working set has finished, so finished samples stop costing evaluations). The loop checks
  "all done?" once per step, its only synchronisation.

Faults are reported per sample in :attr:`Solution.status`; a row that does not succeed holds NaN
in ``Solution.x`` and its last finite state and time in ``last_x`` / ``last_t``. A solve never
hangs (``max_steps``, step-size underflow).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ._errors import (
    ArgumentTypeError,
    IncompatibleError,
    check,
    check_choice,
    check_int,
    check_tensor,
)
from ._tensor import (
    all_finite,
    as_time,
    bcast,
    host_reads_free,
    sum_is_finite,
    time_dtype,
    where_rows,
)
from .brownian import BrownianPath
from .conditioning import Conditioned, RowCondition
from .control import SCHEDULES, Controller, Proposal, make_grid
from .dynamics import TIME_VARIABLES, CheckedDynamics, time_change
from .noise import BridgedNoise, FreshNoise, GeneratorStream, NoiseSource, make_stream
from .solution import Solution, Stats, Status
from .solvers.base import Solver, StepContext

__all__ = ["CHECK_EVERY", "LoopState", "solve"]

#: larger step budgets are this one (no solve takes 2^62 steps; counters stay in int64)
MAX_STEPS_CAP = 2**62
#: on fixed grids, rows are checked for non-finite values every this many steps (and at the end)
CHECK_EVERY = 8
_NO_FAULT = -1  # a controller's fault code for a row that may go on


def solve(dynamics, x0: torch.Tensor, t0, t1, *, solver: Solver, steps=None,
          schedule: str = "uniform", controller: Controller | None = None, corrector=None,
          generator: torch.Generator | int | None = None, seeds=None,
          brownian: NoiseSource | None = None, save_at: torch.Tensor | None = None,
          max_steps: int = 10_000, progress: bool = False, time_variable: str = "t",
          cond: dict | None = None, grad: bool = False,
          callback: Callable[[dict], None] | None = None) -> Solution:
    """Integrate ``dynamics`` from ``t0`` to ``t1`` (either direction) starting at ``x0``.

    Args:
        dynamics: an object with ``drift(x, t)`` (and ``diffusion`` and ``noise`` for SDEs), such
            as :class:`~difsolve.ProbabilityFlowODE` or :class:`~difsolve.ReverseSDE`.
        x0: initial state ``(B, ...)``.
        t0, t1: start and end times, numbers or per-sample ``(B,)`` tensors.
        solver: a :class:`~difsolve.solvers.base.Solver` instance.
        steps: number of fixed steps (with ``schedule``) or a 1-D tensor of times from ``t0`` to
            ``t1``. Exactly one of ``steps`` and ``controller`` is required.
        schedule: a name in :data:`difsolve.SCHEDULES` (see :mod:`difsolve.control`); ignored for
            an explicit grid.
        controller: any :class:`~difsolve.Controller` (e.g. :class:`~difsolve.PIController`) for
            per-sample adaptive steps (needs a solver with an embedded error estimate).
        corrector: a corrector (e.g. :class:`~difsolve.Langevin`) applied before each fixed step.
        generator: a ``torch.Generator`` or an int seed: the source of all randomness.
        seeds: one int per row instead of ``generator``: every row draws from its own generator
            (Brownian increments, corrector noise), so its result does not depend on its batch.
        brownian: a :class:`~difsolve.BrownianPath` covering ``[t0, t1]`` to integrate an SDE
            along a given path, or any :class:`~difsolve.NoiseSource` (increments in the
            integration variable).
        save_at: 1-D tensor of times at which to record the state (added to a fixed grid as
            extra points; steps stop on them under a controller).
        max_steps: most steps per sample (accepted + rejected) before ``Status.MAX_STEPS``.
        progress: show a tqdm progress bar (steps on a fixed grid; the slowest row's fraction of
            the interval under a controller).
        time_variable: ``"t"``; ``"log_sigma"``: integrate in ``u = log sigma(t)`` of the
            dynamics' process (smooth at every noise level); ``"snr"`` (probability-flow ODEs
            only): time ``w = 1/sigma`` and state ``z = x / b``, where ``dz/dw`` is the data
            prediction (see :class:`~difsolve.dynamics.SNRTime`). Times and states in and out stay
            in ``t`` and ``x``; a controller's tolerances apply to the integrated state.
        cond: keyword arguments for the field or drift (see :mod:`difsolve.conditioning`):
            tensors whose first dimension is ``B`` are sliced with the rows evaluated.
        grad: build the autograd graph through the solve (to differentiate the result with
            respect to ``x0`` or the model's parameters). Memory then grows with the number of
            steps (every stage of every step is kept); by default no graph is built and the
            results are detached.
        callback: called after every step with a dict holding ``"step"``, ``"t"`` (``(B,)``),
            ``"x"`` and, where the solver state has it, ``"denoised"``; under a controller also
            ``"rows"`` (the global rows of ``x``) and ``"accepted"``.

    Returns:
        :class:`~difsolve.Solution`.
    """
    problem = _Problem.build(dynamics, x0, t0, t1, solver=solver, steps=steps,
                             schedule=schedule, controller=controller, corrector=corrector,
                             generator=generator, seeds=seeds, brownian=brownian,
                             save_at=save_at, max_steps=max_steps, progress=progress,
                             time_variable=time_variable, cond=cond, grad=grad,
                             callback=callback)
    if problem.batch == 0:
        return problem.empty_solution()
    with torch.set_grad_enabled(grad):
        if controller is None:
            return _solve_fixed(problem, steps, schedule)
        return _solve_adaptive(problem)


# ----- the problem: validated arguments in one place ------------------------------------------
@dataclass
class _Problem:
    dynamics: object
    x0: torch.Tensor
    t0: torch.Tensor
    t1: torch.Tensor
    solver: Solver
    controller: Controller | None
    corrector: object
    stream: object
    brownian: NoiseSource | None
    save_t: torch.Tensor | None
    max_steps: int
    progress: bool
    time_variable: str
    cond: RowCondition
    callback: Callable[[dict], None] | None

    @property
    def batch(self) -> int:
        return self.x0.shape[0]

    @property
    def process(self):
        return getattr(self.dynamics, "process", None)

    def bind(self, cond: RowCondition):
        """``(outer, integrated)`` dynamics for the rows of ``cond``: the condition bound, then
        the time change (None in ``t``)."""
        outer = Conditioned(self.dynamics, cond) if cond else self.dynamics
        if not getattr(self.dynamics, "output_checked", False):  # a user's dynamics
            outer = CheckedDynamics(outer)
        warp = time_change(outer, self.time_variable)
        return outer, warp

    def noise_source(self, adaptive: bool):
        if not self.solver.sde:
            return None
        if self.brownian is not None:
            return self.brownian
        return BridgedNoise(self.stream) if adaptive else FreshNoise(self.stream)

    def context(self, **kwargs) -> StepContext:
        generator = self.stream.generator if isinstance(self.stream, GeneratorStream) else None
        return StepContext(generator=generator, stream=self.stream, **kwargs)

    def empty_solution(self) -> Solution:
        x = self.x0.detach().clone()
        zeros = torch.zeros(0, dtype=torch.long, device=x.device)
        stats = Stats(nfe=0, nfe_per_sample=zeros, steps=zeros.clone(), accepted=zeros.clone(),
                      rejected=zeros.clone())
        xs = None
        if self.save_t is not None:
            xs = x.new_empty((self.save_t.numel(), *x.shape))
        return Solution(x=x, t=self.t1.clone(), stats=stats, status=zeros.clone(),
                        ts=self.save_t, xs=xs, last_x=x.clone(), last_t=self.t1.clone())

    @classmethod
    def build(cls, dynamics, x0, t0, t1, *, solver, steps, schedule, controller, corrector,
              generator, seeds, brownian, save_at, max_steps, progress, time_variable, cond,
              grad, callback) -> _Problem:
        x0 = check_tensor(x0, "x0")
        if not isinstance(solver, Solver):
            raise ArgumentTypeError(
                f"argument `solver` must be a difsolve Solver instance (e.g. ds.Heun()), got "
                f"{solver!r}")
        solver.check_dynamics(dynamics)
        check_choice(time_variable, TIME_VARIABLES, "time_variable")
        check_choice(schedule, SCHEDULES, "schedule")
        if time_variable not in solver.time_variables:
            raise IncompatibleError(
                f"argument `time_variable`: {type(solver).__name__} supports "
                f"{solver.time_variables}, got {time_variable!r}")
        max_steps = check_int(_int_like(max_steps), "max_steps")
        for name, flag in (("progress", progress), ("grad", grad)):
            if not isinstance(flag, bool):
                raise ArgumentTypeError(f"argument `{name}` must be a bool, got {flag!r}")
        if callback is not None and not callable(callback):
            raise ArgumentTypeError(f"argument `callback` must be callable, got {callback!r}")
        if (steps is None) == (controller is None):
            raise IncompatibleError(
                "arguments `steps` and `controller`: give exactly one (a step count or grid for "
                "fixed steps, or a Controller such as PIController for adaptive steps)")
        if controller is not None:
            _check_controller(controller, solver, corrector)
            if controller.max_steps is not None:
                max_steps = check_int(_int_like(controller.max_steps), "controller.max_steps")
        max_steps = min(max_steps, MAX_STEPS_CAP)
        _check_corrector(corrector, dynamics)
        stream = make_stream(generator, seeds, x0.shape[0], x0.device)
        tdtype = time_dtype(x0.dtype)
        t0v, t1v = as_time(t0, x0, "t0", tdtype), as_time(t1, x0, "t1", tdtype)
        check(bool(torch.isfinite(t0v).all() & torch.isfinite(t1v).all()), "t0",
              "finite (t0, t1)")
        _check_domain(getattr(dynamics, "process", None), t0v, t1v)
        if brownian is not None:
            _check_brownian(brownian, solver, time_variable, t0v, t1v)
        save_t = None if save_at is None else _check_save_at(save_at, t0v, t1v)
        return cls(dynamics=dynamics, x0=x0, t0=t0v, t1=t1v, solver=solver,
                   controller=controller, corrector=corrector, stream=stream, brownian=brownian,
                   save_t=save_t, max_steps=max_steps, progress=progress,
                   time_variable=time_variable, cond=RowCondition.of(cond, x0.shape[0]),
                   callback=callback)


def _int_like(value):
    return int(value) if isinstance(value, np.integer) else value


def _check_controller(controller, solver, corrector) -> None:
    if not (callable(getattr(controller, "init", None))
            and callable(getattr(controller, "adapt", None))):
        raise ArgumentTypeError(
            f"argument `controller` must implement the Controller protocol (init and adapt "
            f"methods, e.g. ds.PIController), got {controller!r}")
    if not hasattr(controller, "max_steps"):
        raise ArgumentTypeError("argument `controller` must have a `max_steps` attribute")
    if not solver.adaptive:
        raise IncompatibleError(
            f"argument `controller`: {type(solver).__name__} has no embedded error estimate; "
            "use Dopri5(), Bosh3(), Heun(), StochasticHeun() or DPMSolver(corrector=True), or "
            "fixed `steps`")
    if corrector is not None:
        raise IncompatibleError(
            "argument `corrector`: correctors run on fixed grids only (pass `steps`)")


def _check_corrector(corrector, dynamics) -> None:
    if corrector is None:
        return
    if not callable(getattr(corrector, "correct", None)):
        raise ArgumentTypeError(
            f"argument `corrector` must have a correct(dynamics, x, t, generator) method, got "
            f"{corrector!r}")
    corrector_check = getattr(corrector, "check", None)
    if corrector_check is not None:
        corrector_check(dynamics)


def _check_domain(process, t0v: torch.Tensor, t1v: torch.Tensor) -> None:
    """Times must lie in the process's domain (where its marginals are defined)."""
    domain = getattr(process, "domain", None)
    if domain is None:
        return
    lo, hi = domain
    for name, t in (("t0", t0v), ("t1", t1v)):
        inside = bool(((t >= lo) & (t <= hi)).all())
        check(inside, name, f"in the domain [{lo}, {hi}] of {type(process).__name__}",
              t if t.numel() <= 4 else None)


def _check_brownian(brownian, solver, time_variable, t0v, t1v) -> None:
    if not isinstance(brownian, NoiseSource):
        raise ArgumentTypeError(
            f"argument `brownian` must be a BrownianPath or a NoiseSource (init, propose, "
            f"commit), got {brownian!r}")
    if not solver.sde:
        raise IncompatibleError("argument `brownian`: only SDE solvers use a Brownian path")
    if not isinstance(brownian, BrownianPath):
        return
    if time_variable != "t":
        raise IncompatibleError(
            "argument `brownian`: a BrownianPath is defined in t; use time_variable='t'")
    lo = float(torch.minimum(t0v, t1v).min())
    hi = float(torch.maximum(t0v, t1v).max())
    tol = 1e-9 * max(1.0, abs(lo), abs(hi))
    check(brownian.t_lo <= lo + tol and brownian.t_hi >= hi - tol, "brownian",
          f"a BrownianPath covering the solve interval [{lo}, {hi}]",
          f"[{brownian.t_lo}, {brownian.t_hi}]")


def _check_save_at(save_at, t0v, t1v) -> torch.Tensor:
    if not isinstance(save_at, torch.Tensor):
        try:
            save_at = torch.as_tensor(save_at, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise ArgumentTypeError(
                f"argument `save_at` must be a 1-D tensor of times, got {save_at!r}") from None
    save_t = save_at.to(device=t0v.device, dtype=t0v.dtype).reshape(-1)
    check(save_t.numel() >= 1, "save_at", "a non-empty 1-D tensor of times")
    check(bool(torch.isfinite(save_t).all()), "save_at", "finite times")
    if t0v.numel():
        lo, hi = torch.minimum(t0v, t1v).min(), torch.maximum(t0v, t1v).max()
        check(bool(((save_t >= lo) & (save_t <= hi)).all()), "save_at",
              "times between t0 and t1", save_t)
    forward = bool((t1v >= t0v).all())
    check(forward or bool((t1v <= t0v).all()), "t1", "on the same side of t0 for every sample")
    return save_t.unique().sort(descending=not forward).values


# ----- fixed grids ---------------------------------------------------------------------------
def _grid(steps, schedule, problem: _Problem) -> torch.Tensor:
    """The time grid: ``(N + 1,)`` when shared by the batch, else ``(N + 1, B)``."""
    t0v, t1v = problem.t0, problem.t1
    shared = bool((t0v == t0v[0]).all() & (t1v == t1v[0]).all())
    if isinstance(steps, torch.Tensor):
        check(steps.ndim == 1 and steps.numel() >= 2, "steps",
              "a 1-D tensor of at least 2 times", tuple(steps.shape))
        check(steps.is_floating_point() or not steps.dtype.is_complex, "steps", "real times")
        check(steps.numel() - 1 <= problem.max_steps, "steps",
              f"at most max_steps={problem.max_steps} steps", steps.numel() - 1)
        g = steps.to(device=t0v.device, dtype=t0v.dtype)
        check(bool(torch.isfinite(g).all()), "steps", "finite times")
        diffs = g[1:] - g[:-1]
        check(bool((diffs > 0).all() or (diffs < 0).all()), "steps",
              "a strictly monotone tensor of times")
        tol = 1e-6 * float(g.abs().max()) + 1e-12
        check(bool(((t0v - g[0]).abs() <= tol).all() and ((t1v - g[-1]).abs() <= tol).all()),
              "steps", f"a grid starting at t0 and ending at t1 (got {float(g[0])} ... "
              f"{float(g[-1])})")
        grid = g.clone()
        grid[0], grid[-1] = t0v[0], t1v[0]
        shared = True
    else:
        steps = _int_like(steps)
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise ArgumentTypeError(
                f"argument `steps` must be an int or a 1-D tensor of times, got {steps!r}")
        check(steps >= 1, "steps", "an int >= 1", steps)
        check(steps <= problem.max_steps, "steps",
              f"at most max_steps={problem.max_steps} steps", steps)
        if shared:
            grid = make_grid(schedule, steps, t0v[:1], t1v[:1], problem.process)[:, 0]
        else:
            grid = make_grid(schedule, steps, t0v, t1v, problem.process)
    if problem.save_t is not None:
        check(shared, "save_at", "used with the same t0 and t1 for every sample on a fixed grid")
        forward = bool(grid[-1] > grid[0])
        tol = 1e-9 * (float(grid.abs().max()) + 1.0)
        extra = [s for s in problem.save_t.tolist() if float((grid - s).abs().min()) > tol]
        if extra:
            grid = torch.cat([grid, torch.tensor(extra, dtype=grid.dtype, device=grid.device)])
            grid = grid.sort(descending=not forward).values
    return grid


def _columns(grid: torch.Tensor, batch: int) -> torch.Tensor:
    """The grid as ``(N + 1, B)``: a grid shared by the batch is expanded, not copied, so
    ``columns[i]`` is a stride-0 ``(B,)`` view (one cheap select per step)."""
    return grid[:, None].expand(-1, batch) if grid.ndim == 1 else grid


def _solve_fixed(problem: _Problem, steps, schedule) -> Solution:
    run = FixedRun.setup(problem, steps, schedule)
    return run.solution(*run.loop(problem.x0))


@dataclass
class FixedRun:
    """A fixed-step solve in three parts: :meth:`setup` does the host-side work (the grid, its
    columns, the solver's per-grid plan), :meth:`loop` runs the steps from a starting state (on
    accelerators without a host synchronisation, so that :class:`~difsolve.CapturedSolve` can
    record it as a CUDA graph) and :meth:`solution` assembles the result."""

    problem: _Problem
    n: int
    outer: object  # the dynamics with the condition bound
    warp: object  # the time change (None in t)
    t_cols: torch.Tensor  # (N + 1, B) grid in t (stride-0 columns where shared)
    us: tuple  # the grid's times and steps in the integration variable, one view per step
    hs: tuple
    ctx: StepContext
    save_idx: dict[int, int]

    @property
    def dynamics(self):
        return self.warp if self.warp is not None else self.outer

    @classmethod
    def setup(cls, problem: _Problem, steps, schedule) -> FixedRun:
        grid_t = _grid(steps, schedule, problem)
        n, batch = grid_t.shape[0] - 1, problem.batch
        outer, warp = problem.bind(problem.cond)
        grid_u = warp.to_u(grid_t) if warp is not None else grid_t
        u_cols, h_cols = _columns(grid_u, batch), _columns(grid_u[1:] - grid_u[:-1], batch)
        process = problem.process
        final_zero = bool(process is not None
                          and float(process.sigma(grid_t[-1].reshape(-1)[:1])[0]) == 0.0)
        ctx = problem.context(n_steps=n, final_sigma_zero=final_zero)
        save_idx = _save_indices(grid_t if grid_t.ndim == 1 else grid_t[:, 0], problem.save_t)
        # views made once, not indexed per step
        run = cls(problem, n, outer, warp, _columns(grid_t, batch), u_cols.unbind(0),
                  h_cols.unbind(0), ctx, save_idx)
        if grid_u.ndim == 1:  # a grid shared by the batch: per-grid work done once
            ctx.plan = problem.solver.prepare(run.dynamics, grid_u)
        return run

    def loop(self, x0: torch.Tensor) -> tuple[torch.Tensor, _LastGood, int, list]:
        """The steps from ``x0``: ``(x at the end, the last checked state, evaluations, saved
        states)``."""
        problem, n, warp, t_cols, ctx = self.problem, self.n, self.warp, self.t_cols, self.ctx
        solver, dynamics = problem.solver, self.dynamics
        noise = problem.noise_source(adaptive=False)
        xs = [x0] if 0 in self.save_idx else []
        x = x0 if warp is None else warp.encode(x0, t_cols[0])
        state, nfe = solver.init(dynamics, x, self.us[0], ctx)
        nstate = noise.init(x, None) if noise is not None else ()
        good = _LastGood.start(x, t_cols[0])
        bar = None
        if problem.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc="solve", unit="step")
        plain = (problem.corrector is None and noise is None and not self.save_idx
                 and problem.callback is None)
        for block in range(0, n, CHECK_EVERY):  # the rows are checked after every block
            stop = min(block + CHECK_EVERY, n)
            if plain:  # nothing but the steps
                x, state, k = solver.advance(dynamics, x, state, self.us, self.hs, ctx, block,
                                             stop)
                nfe += k
            else:
                for i in range(block, stop):
                    x, state, nstate, k = self._step_with_extras(i, x, state, noise, nstate, xs)
                    nfe += k
            good = good.update(x, t_cols[stop], stop)
            if bar is not None:
                bar.update(stop - block)
        if bar is not None:
            bar.close()
        if warp is not None:
            x = warp.decode(x, t_cols[n])
            good = good.decoded(warp)
        return x, good, nfe, xs

    def _step_with_extras(self, i: int, x, state, noise, nstate, xs: list):
        """Step ``i`` with what the plain block leaves out: the corrector before it, the
        Brownian increment, the save point and the callback after it; ``(x, state, noise
        state, evaluations)``."""
        problem, warp, t_cols, solver = self.problem, self.warp, self.t_cols, self.problem.solver
        nfe = 0
        if problem.corrector is not None:
            x_t = x if warp is None else warp.decode(x, t_cols[i])
            x_t, nfe = problem.corrector.correct(self.outer, x_t, t_cols[i], problem.stream)
            x = x_t if warp is None else warp.encode(x_t, t_cols[i])
        dw = None
        if noise is not None:
            dw, proposal = noise.propose(nstate, x, self.us[i], self.hs[i], None)
            nstate = noise.commit(nstate, proposal, None)
        x, state, k = solver.advance(self.dynamics, x, state, self.us, self.hs, self.ctx, i,
                                     i + 1, dw)
        if i + 1 in self.save_idx:
            xs.append(x if warp is None else warp.decode(x, t_cols[i + 1]))
        if problem.callback is not None:
            x_t = x if warp is None else warp.decode(x, t_cols[i + 1])
            problem.callback(_info(i + 1, t_cols[i + 1], x_t, solver.denoised(state)))
        return x, state, nstate, nfe + k

    def solution(self, x: torch.Tensor, good: _LastGood, nfe: int, xs: list) -> Solution:
        n = self.n
        status = torch.where(good.alive, Status.SUCCESS.value, Status.NONFINITE.value)
        steps_done = torch.where(good.alive, n, torch.as_tensor(good.steps, device=x.device))
        stats = Stats(nfe=nfe, nfe_per_sample=torch.full_like(steps_done, nfe),
                      steps=steps_done, accepted=steps_done.clone(),
                      rejected=torch.zeros_like(steps_done))
        saved = None
        if xs:
            saved = torch.stack(xs)
            saved = torch.where(bcast(good.alive, saved[0])[None], saved, math.nan)
        return _finish(Solution(x=x, t=self.t_cols[n].clone(), stats=stats, status=status,
                                ts=self.problem.save_t, xs=saved, last_x=good.x,
                                last_t=good.t.contiguous()))


@dataclass
class _LastGood:
    """Per row: still finite, and the last state and time at which it was checked finite.

    On the CPU, where reading a value on the host costs nothing, a check first sums the state: a
    finite sum means every row is finite, and the check keeps references only (no pass writing
    the state). Otherwise, and on accelerators (no host synchronisation in the loop), each row is
    checked and the last good values are selected row by row.
    """

    alive: torch.Tensor
    x: torch.Tensor
    t: torch.Tensor
    steps: torch.Tensor | int  # an int while every row is alive (the step of the last check)
    host_check: bool
    intact: bool = True  # no row has failed yet

    @classmethod
    def start(cls, x, t):
        alive = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        return cls(alive, x, t, 0, host_check=host_reads_free(x))

    def update(self, x, t, step: int) -> _LastGood:
        if self.host_check and self.intact and sum_is_finite(x):
            return _LastGood(self.alive, x, t, step, True)
        ok = all_finite(x) & self.alive
        steps = self.steps
        if not isinstance(steps, torch.Tensor):
            steps = torch.full_like(ok, steps, dtype=torch.long)
        return _LastGood(ok, torch.where(bcast(ok, x), x, self.x), torch.where(ok, t, self.t),
                         torch.where(ok, step, steps), self.host_check, intact=False)

    def decoded(self, warp) -> _LastGood:
        return dataclasses.replace(self, x=warp.decode(self.x, self.t))


def _save_indices(col: torch.Tensor, save_t: torch.Tensor | None) -> dict[int, int]:
    if save_t is None:
        return {}
    return {int((col - s).abs().argmin()): j for j, s in enumerate(save_t.tolist())}


def _info(step: int, t, x, denoised) -> dict:
    info = {"step": step, "t": t, "x": x}
    if denoised is not None:
        info["denoised"] = denoised
    return info


def _finish(sol: Solution) -> Solution:
    """Rows that did not succeed hold NaN (their last finite state is in ``last_x``)."""
    failed = sol.status != Status.SUCCESS.value
    sol.x = torch.where(bcast(failed, sol.x), math.nan, sol.x)
    return sol


# ----- adaptive steps ------------------------------------------------------------------------
@dataclass
class LoopState:
    """Every per-row value of the adaptive loop, batch first (rows of the working set).

    ``select(keep)`` returns the state of a subset of rows (tensors, tuples of tensors and the
    condition alike), so dropping finished rows is one call; :meth:`write_to` stores the rows'
    results in the full-batch outputs. Times are in the integration variable.
    """

    rows: torch.Tensor  # global row index
    x: torch.Tensor
    t: torch.Tensor
    h: torch.Tensor  # next signed step proposed by the controller
    end: torch.Tensor
    direction: torch.Tensor
    next_stop: torch.Tensor  # index of the next save point
    solver: tuple
    controller: tuple
    noise: tuple
    cond: RowCondition
    steps: torch.Tensor
    accepted: torch.Tensor
    rejected: torch.Tensor
    nfe: torch.Tensor
    status: torch.Tensor
    done: torch.Tensor
    #: landing tolerance per row (a step within it of its target lands on it), set once by the
    #: loop (:func:`_landing_slack`); None in a state the loop did not build
    slack: torch.Tensor | None = None

    def select(self, keep: torch.Tensor) -> LoopState:
        def pick(value):
            if value is None:
                return None
            if isinstance(value, torch.Tensor):
                return value[keep]
            if isinstance(value, tuple):
                return tuple(pick(v) for v in value)
            return value.select(keep)

        return LoopState(**{f.name: pick(getattr(self, f.name))
                            for f in dataclasses.fields(self)})

    def write_to(self, out: dict[str, torch.Tensor]) -> None:
        for name, target in out.items():
            target[self.rows] = getattr(self, name)


def _solve_adaptive(problem: _Problem) -> Solution:
    solver, controller, x0 = problem.solver, problem.controller, problem.x0
    batch, device = problem.batch, x0.device
    outer, warp = problem.bind(problem.cond)
    dynamics = warp if warp is not None else outer
    to_u = warp.to_u if warp is not None else (lambda t: t)
    t0, t1 = to_u(problem.t0), to_u(problem.t1)
    stops = None if problem.save_t is None else to_u(problem.save_t)
    direction = torch.sign(t1 - t0)
    span = (t1 - t0).abs()
    ctx = problem.context(keeps_still_rows=True)  # see _adaptive_step
    noise = problem.noise_source(adaptive=True)
    rows = torch.arange(batch, device=device)

    x = x0 if warp is None else warp.encode(x0, problem.t0)
    ctx.rows = rows
    solver_state, nfe = solver.init(dynamics, x, t0, ctx)
    h, ctrl_state, nfe_init = controller.init(dynamics, solver, x, t0, span, direction,
                                              solver_state)
    nfe += nfe_init
    long = dict(dtype=torch.long, device=device)
    s = LoopState(rows=rows, x=x, t=t0.clone(), h=h, end=t1.clone(), direction=direction,
                  next_stop=torch.zeros(batch, **long), solver=tuple(solver_state),
                  controller=tuple(ctrl_state),
                  noise=noise.init(x, rows) if noise is not None else (), cond=problem.cond,
                  steps=torch.zeros(batch, **long), accepted=torch.zeros(batch, **long),
                  rejected=torch.zeros(batch, **long), nfe=torch.full((batch,), nfe, **long),
                  status=torch.zeros(batch, **long), done=span == 0,
                  slack=_landing_slack(t0, t1, stops))
    out = {"x": x.clone(), "t": t0.clone(), "status": s.status.clone(), "steps": s.steps.clone(),
           "accepted": s.steps.clone(), "rejected": s.steps.clone(), "nfe": s.nfe.clone()}
    xs = None
    if stops is not None:
        xs = torch.full((stops.numel(), *x0.shape), math.nan, device=device, dtype=x0.dtype)
        s = _save_at_start(s, stops, xs, x0)
    bar = _Progress(problem.progress)
    n_active, iteration = int((~s.done).sum()), 0
    while n_active > 0:
        s, step_nfe = _adaptive_step(s, dynamics, solver, controller, noise, ctx, stops, xs,
                                     warp, problem, iteration)
        iteration += 1
        nfe += step_nfe
        n_left, fraction = _sync(s, span, bar.enabled)  # the one host synchronisation per step
        bar.update(fraction)
        if n_left and n_left <= 0.75 * s.rows.numel():
            s.write_to(out)
            s = s.select(~s.done)
            outer, warp = problem.bind(s.cond)
            dynamics = warp if warp is not None else outer
        n_active = n_left
    s.write_to(out)
    bar.close()
    status = out["status"]
    x_out, t_out = out["x"], out["t"]
    ok = status == Status.SUCCESS.value
    if warp is not None:
        t_out = torch.where(ok, problem.t1, warp.to_t(t_out))
        x_out = warp.decode(x_out, t_out)
    else:
        t_out = torch.where(ok, problem.t1, t_out)
    stats = Stats(nfe=nfe, nfe_per_sample=out["nfe"], steps=out["steps"],
                  accepted=out["accepted"], rejected=out["rejected"])
    return _finish(Solution(x=x_out, t=t_out, stats=stats, status=status, ts=problem.save_t,
                            xs=xs, last_x=x_out.clone(), last_t=t_out.clone()))


def _save_at_start(s: LoopState, stops, xs, x0) -> LoopState:
    """Record the save points that coincide with the start time."""
    next_stop = s.next_stop
    for _ in range(stops.numel()):
        at_start = (next_stop < stops.numel()) & (
            stops[next_stop.clamp(max=stops.numel() - 1)] == s.t)
        if not bool(at_start.any()):
            break
        xs[next_stop[at_start], s.rows[at_start]] = x0[at_start]
        next_stop = next_stop + at_start
    return dataclasses.replace(s, next_stop=next_stop)


def _adaptive_step(s: LoopState, dynamics, solver, controller, noise, ctx, stops, xs, warp,
                   problem: _Problem, iteration: int) -> tuple[LoopState, int]:
    """Attempt one step on every row of the working set; accept or reject each row."""
    if stops is not None:
        has_stop = s.next_stop < stops.numel()
        target = torch.where(has_stop, stops[s.next_stop.clamp(max=stops.numel() - 1)], s.end)
    else:
        has_stop, target = None, s.end
    remaining = (target - s.t) * s.direction
    # land when the step covers what is left up to rounding (no sliver steps of a few ulps)
    h_abs = s.h.abs()
    landing = h_abs >= remaining - s.slack
    h_try = s.direction * torch.minimum(h_abs, remaining)
    dw = proposal = None
    if noise is not None:
        dw, proposal = noise.propose(s.noise, s.x, s.t, h_try, s.rows)
    ctx.rows = s.rows
    step = solver.step(dynamics, s.x, s.t, h_try, s.solver, dw, ctx)
    x_new = step.x if step.x.dtype == s.x.dtype else step.x.to(s.x.dtype)
    # (a NaN error estimate is a fault, not a reason to shrink h)
    finite, every_finite = _finite_rows(x_new, step.error)
    t_new = torch.where(landing, target, s.t + h_try)
    decision = controller.adapt(s.controller, Proposal(
        x=s.x, x_new=x_new, error=step.error, h_proposed=s.h, h_tried=h_try, t_new=t_new,
        left=(s.end - t_new).abs(), finite=finite, error_order=solver.error_order,
        every_finite=every_finite))
    live = ~s.done
    accept = decision.accept & live if every_finite else decision.accept & finite & live
    x, t = where_rows(accept, (x_new, t_new), (s.x, s.t))
    # a zero-length step (a save point within rounding of the last one) moves nothing, and its
    # solver state must not enter a multistep history (a repeated node)
    solver_state = where_rows(accept & (h_try != 0), step.state, s.solver)
    noise_state = noise.commit(s.noise, proposal, accept) if noise is not None else s.noise
    steps = s.steps + live
    accepted = s.accepted + accept
    rejected = steps - accepted  # (every attempt of a live row is accepted or rejected)
    nfe = torch.add(s.nfe, live, alpha=step.nfe)
    arrived = accept & landing
    next_stop = s.next_stop
    if stops is not None:
        hit = arrived & has_stop
        hit_rows = hit.nonzero().squeeze(1)
        if hit_rows.numel():
            saved = x[hit_rows]
            if warp is not None:
                saved = warp.decode(saved, warp.to_t(t[hit_rows]))
            xs[next_stop[hit_rows], s.rows[hit_rows]] = saved.to(xs.dtype)
        next_stop = next_stop + hit
    reached = arrived & (t == s.end)
    code = decision.fault  # -1 (or None for every row): none
    if iteration + 1 >= problem.max_steps:  # (no row has taken more steps than the loop)
        if code is None:
            code = torch.full_like(s.status, _NO_FAULT)
        code = torch.where((steps >= problem.max_steps) & (code < 0), Status.MAX_STEPS.value,
                           code)
    if code is None:  # a row finishes only by arriving (an arrived row is live)
        finished, status = reached, torch.where(reached, Status.SUCCESS.value, s.status)
    else:
        code = torch.where(reached, Status.SUCCESS.value, code)
        finished = live & (code >= 0)
        status = torch.where(finished, code, s.status)
    if problem.callback is not None:
        t_info = warp.to_t(t) if warp is not None else t
        x_info = warp.decode(x, t_info) if warp is not None else x
        info = _info(int(steps.max()), t_info, x_info, solver.denoised(solver_state))
        info.update(rows=s.rows, accepted=accept)
        problem.callback(info)
    # (a finished row's step size and controller state are never used again)
    new = LoopState(rows=s.rows, x=x, t=t, h=decision.h, end=s.end,
                    direction=s.direction, next_stop=next_stop, solver=solver_state,
                    controller=tuple(decision.state), noise=noise_state, cond=s.cond, steps=steps,
                    accepted=accepted, rejected=rejected, nfe=nfe,
                    status=status, done=s.done | finished,
                    slack=s.slack)
    return new, step.nfe


def _finite_rows(x: torch.Tensor, error: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    """Per-row finiteness of a proposal (and its error estimate), and whether every row is known
    finite. On the CPU a finite sum, read on the host for free, clears every row at once;
    otherwise (or where the sum is not finite, e.g. an overflow of finite values) each row is
    tested exactly."""
    tensors = (x,) if error is None else (x, error)
    if host_reads_free(x) and sum_is_finite(*tensors):
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device), True
    return all_finite(*tensors), False


def _landing_slack(t0: torch.Tensor, t1: torch.Tensor, stops) -> torch.Tensor:
    """64 rounding units of the largest time a row can meet (its ends and the save points)."""
    largest = torch.maximum(t0.abs(), t1.abs())
    if stops is not None:
        largest = torch.maximum(largest, stops.abs().max())
    return 64 * torch.finfo(t0.dtype).eps * largest


def _sync(s: LoopState, span: torch.Tensor, with_fraction: bool) -> tuple[int, float]:
    """Rows left, and (for the progress bar) the slowest row's fraction of its interval."""
    if not with_fraction:
        return s.rows.numel() - int(s.done.sum()), 0.0
    left = (~s.done).sum()
    total = span[s.rows].clamp(min=torch.finfo(span.dtype).tiny)
    frac = 1.0 - ((s.end - s.t).abs() / total).clamp(0.0, 1.0)
    frac = torch.where(s.done, 1.0, frac).min() if frac.numel() else frac.new_ones(())
    values = torch.stack([left.to(frac.dtype), frac]).tolist()
    return int(values[0]), float(values[1])


class _Progress:
    """tqdm bar of the slowest row's progress through its interval (in percent)."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar, self.shown = enabled, None, 0
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=100, desc="solve (slowest row)", unit="%")

    def update(self, fraction: float) -> None:
        if self.bar is not None:
            pct = int(100 * fraction)
            if pct > self.shown:
                self.bar.update(pct - self.shown)
                self.shown = pct

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(100 - self.shown)
            self.bar.close()
