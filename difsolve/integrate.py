"""``solve``: the one loop that drives every solver, on a fixed grid or under a step controller.

Time is a per-sample ``(B,)`` tensor throughout. On a fixed grid the loop never synchronises with
the host. Under a controller each sample has its own step size and is accepted or rejected on its
own (``torch.where``); the loop checks "all done?" once per step (its only synchronisation) and
evaluates the dynamics on the unfinished rows only once enough rows have finished. Faults are
reported per sample in :attr:`Solution.status`; a solve never hangs (``max_steps``, step-size
underflow).
"""

from __future__ import annotations

import math

import torch

from ._errors import ArgumentTypeError, IncompatibleError, check, check_int, check_tensor
from ._tensor import all_finite, as_time, bcast
from .brownian import BridgedNoise, BrownianPath, FreshNoise
from .control import PIController, make_grid
from .dynamics import time_change
from .solution import Solution, Stats, Status
from .solvers.base import Solver, StepContext

__all__ = ["Solution", "Stats", "Status", "solve"]

TIME_VARIABLES = ("t", "log_sigma", "snr")
#: consecutive non-finite proposals after which an adaptive sample stops with NONFINITE
NONFINITE_RETRIES = 5


class _PathNoise:
    """Adapter giving a :class:`BrownianPath` the interface of the adaptive noise sources."""

    def __init__(self, path: BrownianPath):
        self.path = path

    def init(self, x):
        return ()

    def propose(self, state, x, t, h, rows):
        return self.path.increment(x, t, h, rows=rows), (), ()

    @staticmethod
    def commit(accept, on_accept, on_reject):
        return ()


class _BridgeAdapter:
    def __init__(self, noise: BridgedNoise):
        self.noise = noise

    def init(self, x):
        return self.noise.init(x)

    def propose(self, state, x, t, h, rows):
        return self.noise.propose(state, x, h)

    commit = staticmethod(BridgedNoise.commit)


def solve(dynamics, x0: torch.Tensor, t0, t1, *, solver: Solver, steps=None,
          schedule: str = "uniform", controller: PIController | None = None, corrector=None,
          generator: torch.Generator | None = None, brownian: BrownianPath | None = None,
          save_at: torch.Tensor | None = None, max_steps: int = 10_000, progress: bool = False,
          time_variable: str = "t") -> Solution:
    """Integrate ``dynamics`` from ``t0`` to ``t1`` (either direction) starting at ``x0``.

    Args:
        dynamics: an object with ``drift(x, t)`` (and ``diffusion`` and ``noise`` for SDEs), such
            as :class:`~difsolve.ProbabilityFlowODE` or :class:`~difsolve.ReverseSDE`.
        x0: initial state ``(B, ...)``.
        t0, t1: start and end times, numbers or per-sample ``(B,)`` tensors.
        solver: a :class:`~difsolve.solvers.base.Solver` instance.
        steps: number of fixed steps (with ``schedule``) or a 1-D tensor of times from ``t0`` to
            ``t1``. Exactly one of ``steps`` and ``controller`` is required.
        schedule: ``"uniform"``, ``"karras"``, ``"logsnr"`` or ``"quadratic"`` (see
            :mod:`difsolve.control`); ignored for an explicit grid.
        controller: a :class:`~difsolve.PIController` for per-sample adaptive steps (needs a
            solver with an embedded error estimate).
        corrector: a corrector (e.g. :class:`~difsolve.Langevin`) applied before each fixed step.
        generator: source of all randomness.
        brownian: a :class:`~difsolve.BrownianPath` to integrate an SDE along a given path.
        save_at: 1-D tensor of times at which to record the state (added to a fixed grid as
            extra points; steps stop on them under a controller).
        max_steps: most steps per sample (accepted + rejected) before ``Status.MAX_STEPS``.
        progress: show a tqdm progress bar.
        time_variable: ``"t"``; ``"log_sigma"``: integrate in ``u = log sigma(t)`` of the
            dynamics' process (smooth at every noise level); ``"snr"`` (probability-flow ODEs
            only): time ``w = 1/sigma`` and state ``z = x / b``, where ``dz/dw`` is the data
            prediction (see :class:`~difsolve.dynamics.SNRTime`). Times and states in and out stay
            in ``t`` and ``x``; a controller's tolerances apply to the integrated state.

    Returns:
        :class:`Solution`.
    """
    x0 = check_tensor(x0, "x0")
    if not isinstance(solver, Solver):
        raise ArgumentTypeError(
            f"argument `solver` must be a difsolve Solver instance (e.g. ds.Heun()), got "
            f"{solver!r}")
    solver.check_dynamics(dynamics)
    check(time_variable in TIME_VARIABLES, "time_variable", f"one of {TIME_VARIABLES}",
          time_variable)
    check_int(max_steps, "max_steps")
    if (steps is None) == (controller is None):
        raise IncompatibleError(
            "arguments `steps` and `controller`: give exactly one (a step count or grid for fixed "
            "steps, or a PIController for adaptive steps)")
    if controller is not None:
        if not isinstance(controller, PIController):
            raise ArgumentTypeError(
                f"argument `controller` must be a PIController, got {controller!r}")
        if not solver.adaptive:
            raise IncompatibleError(
                f"argument `controller`: {type(solver).__name__} has no embedded error estimate; "
                "use Dopri5(), Bosh3(), Heun() or StochasticHeun(), or fixed `steps`")
        if corrector is not None:
            raise IncompatibleError(
                "argument `corrector`: correctors run on fixed grids only (pass `steps`)")
    if corrector is not None:
        if not callable(getattr(corrector, "correct", None)):
            raise ArgumentTypeError(
                f"argument `corrector` must have a correct(dynamics, x, t, generator) method, got "
                f"{corrector!r}")
        corrector_check = getattr(corrector, "check", None)
        if corrector_check is not None:
            corrector_check(dynamics)
    if brownian is not None:
        if not isinstance(brownian, BrownianPath):
            raise ArgumentTypeError(f"argument `brownian` must be a BrownianPath, got {brownian!r}")
        if not solver.sde:
            raise IncompatibleError("argument `brownian`: only SDE solvers use a Brownian path")
        if time_variable != "t":
            raise IncompatibleError(
                "argument `brownian`: a BrownianPath is defined in t; use time_variable='t'")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ArgumentTypeError(f"argument `generator` must be a torch.Generator, got {generator!r}")

    t0v, t1v = as_time(t0, x0, "t0"), as_time(t1, x0, "t1")
    check(bool(torch.isfinite(t0v).all() & torch.isfinite(t1v).all()), "t0", "finite (t0, t1)")
    process = getattr(dynamics, "process", None)
    outer = dynamics
    warp = None
    if time_variable not in solver.time_variables:
        raise IncompatibleError(
            f"argument `time_variable`: {type(solver).__name__} supports {solver.time_variables}, "
            f"got {time_variable!r}")
    warp = time_change(dynamics, time_variable)
    dynamics = warp if warp is not None else dynamics
    save_t = None
    if save_at is not None:
        save_t = _check_save_at(save_at, x0, t0v, t1v)

    if controller is None:
        grid = _fixed_grid(steps, schedule, t0v, t1v, process, save_t, x0)
        n = grid.shape[0] - 1
        check(n <= max_steps, "steps", f"at most max_steps={max_steps} steps", n)
        return _solve_fixed(outer, dynamics, warp, x0, grid, solver, corrector, generator,
                            brownian, save_t, progress)
    return _solve_adaptive(dynamics, warp, x0, t0v, t1v, solver, controller, generator, brownian,
                           save_t, controller.max_steps or max_steps, progress)


# ----- helpers -------------------------------------------------------------------------------


def _check_save_at(save_at, x0, t0v, t1v) -> torch.Tensor:
    if not isinstance(save_at, torch.Tensor):
        save_at = torch.as_tensor(save_at)
    save_t = save_at.to(device=x0.device, dtype=x0.dtype).reshape(-1)
    check(save_t.numel() >= 1, "save_at", "a non-empty 1-D tensor of times")
    lo, hi = torch.minimum(t0v, t1v).min(), torch.maximum(t0v, t1v).max()
    check(bool(((save_t >= lo) & (save_t <= hi)).all()), "save_at",
          "times between t0 and t1", save_t)
    forward = bool((t1v >= t0v).all())
    check(forward or bool((t1v <= t0v).all()), "t1", "on the same side of t0 for every sample")
    save_t = save_t.sort(descending=not forward).values
    return save_t


def _fixed_grid(steps, schedule, t0v, t1v, process, save_t, x0) -> torch.Tensor:
    if isinstance(steps, torch.Tensor):
        check(steps.ndim == 1 and steps.numel() >= 2, "steps", "a 1-D tensor of at least 2 times",
              tuple(steps.shape))
        g = steps.to(device=x0.device, dtype=x0.dtype)
        diffs = g[1:] - g[:-1]
        check(bool((diffs > 0).all() or (diffs < 0).all()), "steps",
              "a strictly monotone tensor of times")
        tol = 1e-6 * float(g.abs().max()) + 1e-12
        check(bool(((t0v - g[0]).abs() <= tol).all() and ((t1v - g[-1]).abs() <= tol).all()),
              "steps", f"a grid starting at t0 and ending at t1 (got {float(g[0])} ... "
              f"{float(g[-1])})")
        grid = g[:, None].expand(-1, x0.shape[0]).clone()
    else:
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise ArgumentTypeError(
                f"argument `steps` must be an int or a 1-D tensor of times, got {steps!r}")
        grid = make_grid(schedule, steps, t0v, t1v, process)
    if save_t is not None:
        check(bool((grid == grid[:, :1]).all()), "save_at",
              "used with the same t0 and t1 for every sample on a fixed grid")
        col = grid[:, 0]
        forward = bool(col[-1] > col[0])
        tol = 1e-9 * (float(col.abs().max()) + 1.0)
        extra = [s for s in save_t.tolist() if float((col - s).abs().min()) > tol]
        if extra:
            col = torch.cat([col, torch.tensor(extra, dtype=col.dtype, device=col.device)])
            col = col.sort(descending=not forward).values
        grid = col[:, None].expand(-1, x0.shape[0]).clone()
    return grid


def _solve_fixed(outer, dynamics, warp, x0, grid, solver, corrector, generator, brownian,
                 save_t, progress) -> Solution:
    n = grid.shape[0] - 1
    process = getattr(outer, "process", None)
    final_zero = bool(process is not None and float(process.sigma(grid[-1, :1])[0]) == 0.0)
    ctx = StepContext(generator=generator, n_steps=n, final_sigma_zero=final_zero)
    tgrid = grid
    if warp is not None:
        grid = warp.to_u(grid)
    noise = None
    if solver.sde:
        noise = brownian if brownian is not None else FreshNoise(generator)
    x = x0 if warp is None else warp.encode(x0, tgrid[0])
    state, nfe = solver.init(dynamics, x, grid[0], ctx)
    alive = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    steps = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    t_reached = tgrid[0].clone()
    xs = [] if save_t is not None else None
    save_idx = _save_indices(tgrid[:, 0], save_t) if save_t is not None else {}
    if 0 in save_idx:
        xs.append(x0)
    iterator = range(n)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="solve", unit="step")
    for i in iterator:
        t, h = grid[i], grid[i + 1] - grid[i]
        if corrector is not None:
            if warp is None:
                x, c_nfe = corrector.correct(outer, x, tgrid[i], generator)
            else:
                x, c_nfe = corrector.correct(outer, warp.decode(x, tgrid[i]), tgrid[i], generator)
                x = warp.encode(x, tgrid[i])
            nfe += c_nfe
        dw = noise.increment(x, t, h) if noise is not None else None
        ctx.index = i
        step = solver.step(dynamics, x, t, h, state, dw, ctx)
        nfe += step.nfe
        ok = alive & all_finite(step.x)
        x = torch.where(bcast(ok, x), step.x, x)
        state = step.state
        t_reached = torch.where(ok, tgrid[i + 1], t_reached)
        steps += ok
        alive = ok
        if i + 1 in save_idx:
            xs.append(x if warp is None else warp.decode(x, t_reached))
    if warp is not None:
        x = warp.decode(x, t_reached)
    status = torch.where(alive, Status.SUCCESS.value, Status.NONFINITE.value)
    zeros = torch.zeros_like(steps)
    stats = Stats(nfe=nfe, nfe_per_sample=torch.full_like(steps, nfe), steps=steps,
                  accepted=steps.clone(), rejected=zeros)
    return Solution(x=x, t=t_reached, stats=stats, status=status, ts=save_t,
                    xs=torch.stack(xs) if xs is not None else None)


def _save_indices(col: torch.Tensor, save_t: torch.Tensor) -> dict[int, int]:
    out = {}
    for j, s in enumerate(save_t.tolist()):
        out[int((col - s).abs().argmin())] = j
    return out


def _solve_adaptive(dynamics, warp, x0, t0v, t1v, solver, controller, generator, brownian,
                    save_t, max_steps, progress) -> Solution:
    device, dtype = x0.device, x0.dtype
    batch = x0.shape[0]
    t0_orig, t1_orig = t0v, t1v
    stops = save_t
    if warp is not None:
        t0v, t1v = warp.to_u(t0v), warp.to_u(t1v)
        stops = None if save_t is None else warp.to_u(save_t)
    direction = torch.sign(t1v - t0v)
    span = (t1v - t0v).abs()
    ctx = StepContext(generator=generator)
    if solver.sde:
        noise = _PathNoise(brownian) if brownian is not None else _BridgeAdapter(
            BridgedNoise(generator))
    else:
        noise = None

    x = x0 if warp is None else warp.encode(x0, t0_orig)
    t = t0v.clone()
    state, nfe = solver.init(dynamics, x, t, ctx)
    f0 = solver.initial_drift(state)
    h, nfe_init = controller.initial_step(dynamics, solver, x, t, direction, span, f0)
    nfe += nfe_init

    long = dict(dtype=torch.long, device=device)
    out_x, out_t = x.clone(), t0v.clone()
    out_status = torch.zeros(batch, **long)
    out_steps, out_acc, out_rej = (torch.zeros(batch, **long) for _ in range(3))
    out_nfe = torch.full((batch,), nfe, **long)
    xs = None
    if stops is not None:
        xs = torch.full((stops.numel(), *x0.shape), math.nan, device=device, dtype=dtype)

    # working set (rows not finished yet)
    idx = torch.arange(batch, device=device)
    nstate = noise.init(x) if noise is not None else ()
    prev_ratio = torch.ones(batch, device=device, dtype=dtype)
    steps, acc, rej, nfe_ps = (torch.zeros(batch, **long) for _ in range(4))
    nfe_ps += nfe
    streak = torch.zeros(batch, **long)
    status = torch.zeros(batch, **long)
    next_stop = torch.zeros(batch, **long)
    done = span == 0
    tiny_dt = 8 * torch.finfo(dtype).eps
    end, direction_w = t1v.clone(), direction

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=batch, desc="solve", unit="sample")

    def write_back():
        out_x[idx] = x
        out_t[idx] = t
        out_status[idx] = status
        out_steps[idx], out_acc[idx], out_rej[idx], out_nfe[idx] = steps, acc, rej, nfe_ps

    if stops is not None:  # save points at the start time
        for _ in range(stops.numel()):
            at_start = (next_stop < stops.numel()) & (
                stops[next_stop.clamp(max=stops.numel() - 1)] == t)
            if not bool(at_start.any()):
                break
            xs[next_stop[at_start], idx[at_start]] = x0[at_start]
            next_stop = next_stop + at_start
    n_active = int((~done).sum())
    while n_active > 0:
        if stops is not None:
            has_stop = next_stop < stops.numel()
            target = torch.where(has_stop, stops[next_stop.clamp(max=stops.numel() - 1)], end)
        else:
            has_stop, target = None, end
        remaining = (target - t) * direction_w
        h_ctrl = h.abs()
        landing = h_ctrl >= remaining
        h_abs = torch.minimum(h_ctrl, remaining)
        hs = direction_w * h_abs
        dw, on_acc, on_rej = (noise.propose(nstate, x, t, hs, idx) if noise is not None
                              else (None, (), ()))
        step = solver.step(dynamics, x, t, hs, state, dw, ctx)
        nfe += step.nfe
        live = ~done
        nfe_ps += step.nfe * live
        finite = all_finite(step.x)
        ratio = controller.error_ratio(step.error, x, step.x)
        ratio = torch.where(finite, ratio, math.inf)
        accept = (ratio <= 1.0) & live
        x = torch.where(bcast(accept, x), step.x, x)
        t = torch.where(accept, torch.where(landing, target, t + hs), t)
        state = tuple(torch.where(bcast(accept, new), new, old)
                      for new, old in zip(step.state, state))
        if noise is not None:
            nstate = noise.commit(accept, on_acc, on_rej)
        fac = controller.factor(ratio, prev_ratio, accept, solver.error_order)
        # after an accepted step cut short to land on a save point, resume the controller's size
        cut = accept & (h_ctrl > h_abs)
        h_next = controller.clip(direction_w * torch.where(cut, h_ctrl, h_abs * fac))
        h = torch.where(live, h_next, h)
        prev_ratio = torch.where(accept, ratio, prev_ratio)
        steps += live
        acc += accept
        rej += live & ~accept
        streak = torch.where(finite | ~live, 0, streak + 1)
        arrived = accept & landing
        if stops is not None:
            hit = arrived & has_stop
            rows = hit.nonzero().squeeze(1)
            if rows.numel():
                xs[next_stop[rows], idx[rows]] = (
                    x[rows] if warp is None else warp.decode(x[rows], warp.to_t(t[rows])))
            next_stop = next_stop + hit
        reached = arrived & (t == end)
        # faults
        left = (end - t).abs()
        too_small = (h.abs() < tiny_dt * t.abs().clamp(min=1.0)) & (h.abs() < left)
        if controller.dt_min is not None:
            too_small = too_small | ((h.abs() < controller.dt_min) & (h.abs() < left))
        code = torch.full_like(status, -1)
        code = torch.where(steps >= max_steps, Status.MAX_STEPS.value, code)
        code = torch.where(too_small, Status.DT_UNDERFLOW.value, code)
        code = torch.where(streak >= NONFINITE_RETRIES, Status.NONFINITE.value, code)
        code = torch.where(reached, Status.SUCCESS.value, code)
        finished = live & (code >= 0)
        status = torch.where(finished, code, status)
        done = done | finished
        n_left = int((~done).sum())  # the one host synchronisation per step
        if bar is not None:
            bar.update(n_active - n_left)
        if n_left and n_left <= 0.75 * idx.numel():
            write_back()
            keep = ~done
            idx, x, t, h, done = idx[keep], x[keep], t[keep], h[keep], done[keep]
            state = tuple(s[keep] for s in state)
            if noise is not None and len(nstate):
                nstate = tuple(s[:, keep] for s in nstate)
            prev_ratio, steps, acc, rej, nfe_ps = (
                v[keep] for v in (prev_ratio, steps, acc, rej, nfe_ps))
            streak, status, next_stop, end, direction_w = (
                v[keep] for v in (streak, status, next_stop, end, direction_w))
        n_active = n_left
    write_back()
    if bar is not None:
        bar.close()
    t_out = out_t
    if warp is not None:
        t_out = torch.where(out_status == Status.SUCCESS.value, t1_orig, warp.to_t(out_t))
        out_x = warp.decode(out_x, t_out)
    stats = Stats(nfe=nfe, nfe_per_sample=out_nfe, steps=out_steps, accepted=out_acc,
                  rejected=out_rej)
    return Solution(x=out_x, t=t_out, stats=stats, status=out_status, ts=save_t, xs=xs)
