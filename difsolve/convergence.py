r"""Observed-order studies: does a solver converge at the order it claims?

Each study integrates one problem with a solver at several step counts ``N`` (always through
:func:`difsolve.solve`), measures an error ``e(N)`` at ``t1`` and fits ``log e = c - p log N`` by
least squares. ``p`` is the observed order; its 95% interval is ``p +- t_{0.975, n-2} SE(p)`` with
the regression's standard error (``n`` step counts; Student-t quantile).

* :func:`ode_order`: ``e(N) = RMS(x_N(t1) - x(t1))`` against ``exact(x0, t0, t1)`` when given, else
  against the same solver at ``16 N_max`` steps (self-convergence).
* :func:`strong_order`: each row of ``x0`` is one path; every step count integrates along the
  **same** :class:`~difsolve.BrownianPath`; ``e(N) = sqrt(mean over paths and entries of
  (x_N(t1) - x(t1))^2)`` against ``exact(x0, path)`` or the same solver at ``16 N_max`` steps
  along the same path.
* :func:`weak_order`: ``e(N) = RMS over components of (mean_paths phi(x_N(t1)) - E phi(x(t1)))``
  for a statistic ``phi``, against ``exact`` (a number or tensor: ``E phi``) or a fine-step run
  along the same paths (then the mean of the *difference* ``phi(x_N) - phi(x_ref)`` is used: the
  two runs share their noise, which removes most of the Monte-Carlo error). Each level reports the
  Monte-Carlo floor, the standard error of the mean it estimates; errors below about twice the
  floor say nothing about the order.

The theory: on a smooth problem a method of order ``p`` has global error ``C N^-p``; Euler-Maruyama
has strong order 1/2 for multiplicative noise and 1 for additive noise, weak order 1; the
stochastic Heun method has strong order 1 and weak order 2 for additive noise (Kloeden & Platen,
*Numerical Solution of SDEs*, 1992, ch. 10, 14, 15).

:func:`run_converge` (the ``difsolve converge`` command) prints the observed order of every solver
on closed-form problems and can draw them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ._errors import (
    ArgumentTypeError,
    InvalidArgumentError,
    check,
    check_int,
    check_real,
    check_tensor,
)
from .brownian import BrownianPath
from .dynamics import ProbabilityFlowODE, ReverseSDE
from .integrate import solve
from .problems import GeometricBrownianMotion, gaussian_problem
from .solution import Status
from .solvers import (
    RK4,
    Bosh3,
    Dopri5,
    DPMSolver,
    Euler,
    EulerMaruyama,
    Heun,
    Midpoint,
    StochasticHeun,
)
from .solvers.base import Solver

__all__ = ["Study", "fit_order", "ode_order", "plot_studies", "run_converge", "strong_order",
           "weak_order"]

#: the reference of a self-convergence study takes this many times the finest step count
REFERENCE_FACTOR = 16


def fit_order(steps: Sequence[int], errors: Sequence[float]) -> tuple[float, tuple[float, float]]:
    """Least-squares slope of ``log error`` against ``log steps``, as a positive order, and its
    95% confidence interval (Student-t with ``n - 2`` degrees of freedom; infinite for two
    points). Non-positive or non-finite errors are left out; fewer than two left gives NaN."""
    pts = [(math.log(n), math.log(e)) for n, e in zip(steps, errors)
           if math.isfinite(e) and e > 0]
    if len(pts) < 2:
        return math.nan, (math.nan, math.nan)
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    slope = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    order = -slope
    if n == 2:
        return order, (-math.inf, math.inf)
    resid = sum((p[1] - my - slope * (p[0] - mx)) ** 2 for p in pts)
    se = math.sqrt(resid / (n - 2) / sxx)
    from scipy.stats import t as student_t

    q = float(student_t.ppf(0.975, n - 2))
    return order, (order - q * se, order + q * se)


@dataclass
class Study:
    """Result of a convergence study.

    Attributes:
        steps: the step counts.
        errors: the error at each step count.
        order: fitted observed order (least-squares slope of ``-log error`` vs ``log steps``).
        interval: its 95% confidence interval.
        kind: ``"ode"``, ``"strong"`` or ``"weak"``.
        solver: the solver's name.
        expected: the order the solver declares for this kind of study (or None).
        floor: for weak studies, the Monte-Carlo standard error at each step count.
        nfe: batched field evaluations of each run.
        reference: ``"exact"`` or ``"N steps"`` (self-convergence).
        label: free text naming the problem.
    """

    steps: tuple[int, ...]
    errors: tuple[float, ...]
    kind: str = "ode"
    solver: str = ""
    expected: float | None = None
    floor: tuple[float, ...] | None = None
    nfe: tuple[int, ...] = ()
    reference: str = "exact"
    label: str = ""
    order: float = field(init=False)
    interval: tuple[float, float] = field(init=False)

    def __post_init__(self):
        self.steps = tuple(int(s) for s in self.steps)
        self.errors = tuple(float(e) for e in self.errors)
        if self.floor is not None:
            self.floor = tuple(float(f) for f in self.floor)
        self.order, self.interval = fit_order(self.steps, self.errors)

    @property
    def name(self) -> str:
        return f"{self.solver} ({self.kind})" if self.kind != "ode" else self.solver

    def table(self) -> str:
        """The study as text: one row per step count (error, ratio to the previous error and the
        local order ``log2`` of it), then the fitted order and interval."""
        head = f"{self.name}" + (f" on {self.label}" if self.label else "")
        exp = "" if self.expected is None else f", expected order {self.expected:g}"
        lines = [f"{head}: reference {self.reference}{exp}"]
        cols = f"{'steps':>7} {'error':>11} {'ratio':>7} {'local':>6}"
        if self.floor is not None:
            cols += f" {'MC floor':>10}"
        lines.append(cols)
        prev = None
        for i, (n, e) in enumerate(zip(self.steps, self.errors)):
            if prev is None or not (prev[1] > 0 and e > 0):
                ratio, local = "-", "-"
            else:
                r = prev[1] / e
                ratio = f"{r:.2f}"
                local = f"{math.log(r) / math.log(n / prev[0]):.2f}"
            row = f"{n:>7d} {e:>11.3e} {ratio:>7} {local:>6}"
            if self.floor is not None:
                row += f" {self.floor[i]:>10.2e}"
            lines.append(row)
            prev = (n, e)
        lo, hi = self.interval
        lines.append(f"observed order {self.order:.3f} (95% CI {lo:.3f} .. {hi:.3f})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def plot(self, path: str | None = None, ax=None):
        """Log-log plot of error against step count with the fitted line (slope in the legend),
        the declared order as a dashed guide and, for weak studies, the Monte-Carlo floor.
        Writes a PNG to ``path`` when given. Returns the matplotlib figure."""
        import matplotlib

        if ax is None and path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(4.2, 3.4))
        else:
            fig = ax.figure
        _draw(self, ax)
        if path is not None:
            fig.tight_layout()
            fig.savefig(path, dpi=110)
        return fig


def _draw(study: Study, ax) -> None:
    from matplotlib.ticker import NullFormatter

    ns = list(study.steps)
    es = list(study.errors)
    ax.loglog(ns, es, "o", color="C0", label="error")
    if math.isfinite(study.order):
        good = [(n, e) for n, e in zip(ns, es) if math.isfinite(e) and e > 0]
        lmx = sum(math.log(n) for n, _ in good) / len(good)
        lmy = sum(math.log(e) for _, e in good) / len(good)
        fit = [math.exp(lmy - study.order * (math.log(n) - lmx)) for n in ns]
        lo, hi = study.interval
        ax.loglog(ns, fit, "-", color="C0",
                  label=f"fit: order {study.order:.2f} [{lo:.2f}, {hi:.2f}]")
        if study.expected is not None:
            guide = [fit[0] * (ns[0] / n) ** study.expected for n in ns]
            ax.loglog(ns, guide, "--", color="0.5", label=f"order {study.expected:g}")
    if study.floor is not None:
        positive = [e for e in es if math.isfinite(e) and e > 0]
        if positive and max(study.floor) > 1e-3 * min(positive):
            ax.loglog(ns, study.floor, ":", color="C3", label="MC floor")
        else:
            ax.plot([], [], " ", label=f"MC floor < {max(study.floor):.0e}")
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("steps")
    ax.set_ylabel(f"{study.kind} error")
    title = study.name if not study.label else f"{study.name}\n{study.label}"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def plot_studies(studies: Sequence[Study], path: str | None = None, ncols: int = 4,
                 title: str | None = None):
    """Grid of :meth:`Study.plot` panels; writes a PNG to ``path`` when given; returns the
    figure."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    check(len(studies) >= 1, "studies", "at least one Study")
    ncols = min(check_int(ncols, "ncols"), len(studies))
    nrows = math.ceil(len(studies) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.0 * nrows), squeeze=False)
    for ax, study in zip(axes.flat, studies):
        _draw(study, ax)
    for ax in list(axes.flat)[len(studies):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


# ----- the studies ---------------------------------------------------------------------------


def _check_steps(steps) -> tuple[int, ...]:
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence):
        raise ArgumentTypeError(
            f"argument `steps` must be a sequence of step counts, got {steps!r}")
    out = tuple(check_int(s, "steps") for s in steps)
    check(len(out) >= 2, "steps", "at least two step counts", steps)
    check(all(b > a for a, b in itertools.pairwise(out)), "steps", "strictly increasing", steps)
    return out


def _check_solver(solver, sde: bool) -> None:
    if not isinstance(solver, Solver):
        raise ArgumentTypeError(
            f"argument `solver` must be a difsolve Solver instance, got {solver!r}")
    if sde and not solver.sde:
        raise InvalidArgumentError(
            f"argument `solver` must be an SDE solver for this study, got {type(solver).__name__}")


def _time(value, name: str) -> float:
    if isinstance(value, torch.Tensor):
        check(value.numel() == 1, name, "a number (the same time for every path)",
              tuple(value.shape))
    return check_real(value, name)


def _run(dynamics, x0, t0, t1, solver, n, schedule, kwargs) -> tuple[torch.Tensor, int]:
    sol = solve(dynamics, x0, t0, t1, solver=solver, steps=n, schedule=schedule, **kwargs)
    x = torch.where((sol.status == Status.SUCCESS).reshape(-1, *[1] * (x0.ndim - 1)), sol.x,
                    torch.full_like(sol.x, math.nan))
    return x, sol.stats.nfe


def _rms(d: torch.Tensor) -> float:
    return float(d.double().square().mean().sqrt())


def _solver_name(solver: Solver) -> str:
    name = type(solver).__name__
    if name == "DPMSolver":
        return f"DPMSolver({solver.order})"
    return name


def ode_order(dynamics, x0: torch.Tensor, t0, t1, *, solver: Solver,
              steps: Sequence[int] = (8, 16, 32, 64), exact: Callable | None = None,
              schedule: str = "uniform", label: str = "", **solve_kwargs) -> Study:
    """Observed order of an ODE solver: ``RMS(x_N(t1) - x(t1))`` over every entry of the batch.

    Args:
        dynamics, x0, t0, t1: as for :func:`difsolve.solve`.
        solver: an ODE solver.
        steps: increasing step counts.
        exact: ``exact(x0, t0, t1) -> x(t1)``; None: the same solver at ``16 max(steps)`` steps.
        schedule: the step schedule of every run (e.g. ``"logsnr"`` for DPM-Solver).
        label: names the problem in tables and plots.
        **solve_kwargs: passed on to :func:`difsolve.solve` (e.g. ``time_variable``, ``cond``).
    """
    x0 = check_tensor(x0, "x0")
    _check_solver(solver, sde=False)
    steps = _check_steps(steps)
    _check_exact(exact)
    errors, nfes, reference = _pathwise_errors(
        dynamics, x0, t0, t1, solver, steps, schedule, solve_kwargs,
        None if exact is None else exact(x0, t0, t1))
    return Study(steps, errors, kind="ode", solver=_solver_name(solver),
                 expected=getattr(solver, "order", None), nfe=nfes, reference=reference,
                 label=label)


def _check_exact(exact) -> None:
    if exact is not None and not callable(exact):
        raise ArgumentTypeError(f"argument `exact` must be callable, got {exact!r}")


def _pathwise_errors(dynamics, x0, t0, t1, solver, steps, schedule, kwargs, exact_value):
    """RMS errors at ``t1`` of every step count against ``exact_value`` or, when it is None, the
    same solver at ``REFERENCE_FACTOR`` times the finest step count; with NFEs and a label."""
    if exact_value is None:
        n_ref = REFERENCE_FACTOR * steps[-1]
        exact_value, _ = _run(dynamics, x0, t0, t1, solver, n_ref, schedule, kwargs)
        reference = f"{n_ref} steps"
    else:
        reference = "exact"
    errors, nfes = [], []
    for n in steps:
        x, nfe = _run(dynamics, x0, t0, t1, solver, n, schedule, kwargs)
        errors.append(_rms(x - exact_value))
        nfes.append(nfe)
    return errors, tuple(nfes), reference


def _sde_expected(solver: Solver, dynamics, kind: str) -> float | None:
    if kind == "weak":
        return solver.weak_order
    if getattr(dynamics, "noise", "additive") == "diagonal":
        return getattr(solver, "strong_order_diagonal", solver.strong_order)
    return solver.strong_order


def strong_order(dynamics, x0: torch.Tensor, t0: float, t1: float, *, solver: Solver,
                 steps: Sequence[int] = (8, 16, 32, 64), exact: Callable | None = None,
                 generator: torch.Generator | None = None, schedule: str = "uniform",
                 path: BrownianPath | None = None, label: str = "",
                 **solve_kwargs) -> Study:
    """Observed strong order of an SDE solver along shared Brownian paths.

    Each row of ``x0`` is one path. One :class:`~difsolve.BrownianPath` (drawn from ``generator``,
    or ``path``) drives every step count, and the error is ``sqrt(mean over paths and entries of
    (x_N(t1) - x(t1))^2)``.

    Args:
        exact: ``exact(x0, path) -> x(t1)`` (the solution driven by ``path``, e.g. for geometric
            Brownian motion ``x0 exp((mu - s^2/2)(t1 - t0) + s path(t0, t1))``); None: the same
            solver at ``16 max(steps)`` steps along the same path.
        Other arguments as in :func:`ode_order`.
    """
    x0 = check_tensor(x0, "x0")
    _check_solver(solver, sde=True)
    steps = _check_steps(steps)
    t0, t1 = _time(t0, "t0"), _time(t1, "t1")
    if path is None:
        path = BrownianPath(t0, t1, x0.shape, generator=generator, device=x0.device,
                            dtype=x0.dtype)
    elif not isinstance(path, BrownianPath):
        raise ArgumentTypeError(f"argument `path` must be a BrownianPath, got {path!r}")
    _check_exact(exact)
    errors, nfes, reference = _pathwise_errors(
        dynamics, x0, t0, t1, solver, steps, schedule, dict(solve_kwargs, brownian=path),
        None if exact is None else exact(x0, path))
    return Study(steps, errors, kind="strong", solver=_solver_name(solver),
                 expected=_sde_expected(solver, dynamics, "strong"), nfe=nfes,
                 reference=reference, label=label)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def weak_order(dynamics, x0: torch.Tensor, t0: float, t1: float, *, solver: Solver,
               steps: Sequence[int] = (4, 8, 16, 32),
               statistic: Callable[[torch.Tensor], torch.Tensor] = _identity,
               exact=None, generator: torch.Generator | None = None,
               schedule: str = "uniform", path: BrownianPath | None = None,
               antithetic: bool = False, label: str = "", **solve_kwargs) -> Study:
    """Observed weak order of an SDE solver: error of the mean of ``statistic(x(t1))``.

    Each row of ``x0`` is one path; every step count integrates along the same Brownian paths.
    ``statistic(x)`` maps the ``(B, ...)`` states to ``(B,)`` or ``(B, k...)`` values.

    Args:
        exact: ``E statistic(x(t1))``, a number or a tensor of the statistic's per-row shape; the
            error is then ``RMS_components(mean phi(x_N) - exact)`` with Monte-Carlo floor
            ``RMS_components(std phi(x_N)) / sqrt(B)``. None: a run at ``16 max(steps)`` steps on
            the same paths, and the error is ``RMS_components(mean (phi(x_N) - phi(x_ref)))`` with
            the floor the standard error of that mean.
        antithetic: also integrate along the negated path ``-W`` and use the pair average of the
            statistic per row (antithetic variates: for linear SDEs with additive noise the
            Monte-Carlo noise of an odd statistic such as ``x`` then cancels exactly).
        Other arguments as in :func:`strong_order`.
    """
    x0 = check_tensor(x0, "x0")
    _check_solver(solver, sde=True)
    steps = _check_steps(steps)
    if not isinstance(antithetic, bool):
        raise ArgumentTypeError(f"argument `antithetic` must be a bool, got {antithetic!r}")
    if not callable(statistic):
        raise ArgumentTypeError(f"argument `statistic` must be callable, got {statistic!r}")
    t0, t1 = _time(t0, "t0"), _time(t1, "t1")
    check(x0.shape[0] >= 2, "x0", "at least two rows (paths)", tuple(x0.shape))
    if path is None:
        path = BrownianPath(t0, t1, x0.shape, generator=generator, device=x0.device,
                            dtype=x0.dtype)
    elif not isinstance(path, BrownianPath):
        raise ArgumentTypeError(f"argument `path` must be a BrownianPath, got {path!r}")
    batch = x0.shape[0]
    paths = [path, path.negated()] if antithetic else [path]

    def run(n):
        vals, nfe = [], 0
        for p in paths:
            x, k = _run(dynamics, x0, t0, t1, solver, n, schedule, dict(solve_kwargs, brownian=p))
            vals.append(phi(x))
            nfe += k
        return sum(vals) / len(vals), nfe

    def phi(x):
        v = statistic(x)
        if not isinstance(v, torch.Tensor) or v.ndim < 1 or v.shape[0] != batch:
            raise InvalidArgumentError(
                f"argument `statistic` must return a tensor of shape (B, ...) with B={batch}, "
                f"got {getattr(v, 'shape', v)!r}")
        return v.reshape(batch, -1).double()

    if exact is not None:
        try:
            target = torch.as_tensor(exact, dtype=torch.float64, device=x0.device).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            raise ArgumentTypeError(
                f"argument `exact` must be a number or a tensor (E statistic), got {exact!r}"
            ) from None
        check(bool(torch.isfinite(target).all()), "exact", "finite", exact)
        reference, ref_phi = "exact", None
    else:
        n_ref = REFERENCE_FACTOR * steps[-1]
        ref_phi, _ = run(n_ref)
        reference = f"{n_ref} steps (same paths)"
    errors, floors, nfes = [], [], []
    for n in steps:
        v, nfe = run(n)
        if ref_phi is not None:
            d = v - ref_phi
            err = d.mean(0)
        else:
            check(target.numel() in (1, v.shape[1]), "exact",
                  f"a number or a tensor with {v.shape[1]} entries (the statistic's)",
                  tuple(target.shape))
            d = v
            err = v.mean(0) - target
        errors.append(float(err.square().mean().sqrt()))
        floors.append(float((d.var(0) / batch).mean().sqrt()))
        nfes.append(nfe)
    return Study(steps, errors, kind="weak", solver=_solver_name(solver),
                 expected=_sde_expected(solver, dynamics, "weak"), floor=tuple(floors),
                 nfe=tuple(nfes), reference=reference, label=label)


# ----- the command-line study ----------------------------------------------------------------


def default_studies(paths: int = 64, weak_paths: int = 16000, ode_samples: int = 16,
                    seed: int = 0, shrink: int = 1) -> list[Study]:
    """Every solver on closed-form problems (the ``difsolve converge`` set).

    * ODE solvers: probability-flow ODE of a rotated anisotropic 2-D Gaussian under VP, ``t`` from
      1 to ``1e-3`` (uniform in ``t``; DPM-Solver on the ``"logsnr"`` grid), against the exact flow
      (:class:`~difsolve.problems.GaussianFlow`), step counts in the asymptotic range.
    * SDE solvers on the reverse SDE of the same data (additive noise), ``t`` from 1 to 0.05:
      strong error against 16x the finest steps along shared Brownian paths (``paths`` start
      points from the exact ``p_1``); weak error of the mean from one start point, antithetic
      pairs of shared paths, against 16x the finest steps.
    * Euler-Maruyama on geometric Brownian motion (multiplicative noise, ``mu = 1``, ``s = 0.8``):
      strong error against the exact solution on the path (``16 paths`` paths), weak error of
      ``E X_1 = e^mu`` (``weak_paths`` antithetic pairs).

    ``shrink`` divides every step count (a quick smoke run; the orders are then pre-asymptotic).
    """
    shrink = check_int(shrink, "shrink")

    def steps_of(*ns):
        return tuple(max(1 + i, n // shrink) for i, n in enumerate(ns))

    flow = gaussian_problem()
    g = torch.Generator().manual_seed(seed)
    x_ode = flow.sample(ode_samples, 1.0, generator=g)
    ode = ProbabilityFlowODE(flow.field)
    t0, t1 = 1.0, flow.process.t_min
    label = "VP Gaussian PF-ODE"
    studies = []
    for solver, steps in [(Euler(), steps_of(64, 128, 256, 512)),
                          (Heun(), steps_of(32, 64, 128, 256)),
                          (Midpoint(), steps_of(64, 128, 256, 512)),
                          (Bosh3(), steps_of(32, 64, 128, 256)),
                          (RK4(), steps_of(32, 64, 128, 256)),
                          (Dopri5(), steps_of(8, 16, 32, 64))]:
        studies.append(ode_order(ode, x_ode, t0, t1, solver=solver, steps=steps,
                                 exact=flow.flow, label=label))
    for order in (2, 3):
        studies.append(ode_order(ode, x_ode, t0, t1, solver=DPMSolver(order),
                                 steps=steps_of(16, 32, 64, 128), exact=flow.flow, schedule="logsnr",
                                 label=label + ", logsnr"))
    sde = ReverseSDE(flow.field)
    s0, s1 = 1.0, 0.05
    x_sde = flow.sample(paths, s0, generator=g)
    x_one = flow.sample(1, s0, generator=g).expand(2, -1).clone()  # no noise left: 2 rows do
    for solver in (EulerMaruyama(), StochasticHeun()):
        studies.append(strong_order(sde, x_sde, s0, s1, solver=solver, steps=steps_of(16, 32, 64, 128),
                                    generator=g, label="VP Gaussian reverse SDE"))
        studies.append(weak_order(sde, x_one, s0, s1, solver=solver, steps=steps_of(16, 32, 64, 128),
                                  generator=g, antithetic=True, label="VP Gaussian reverse SDE"))
    gbm = GeometricBrownianMotion()
    x_gbm = torch.ones(16 * paths, 1, dtype=torch.float64)  # scalar: more paths are cheap
    studies.append(strong_order(
        gbm, x_gbm, 0.0, 1.0, solver=EulerMaruyama(), steps=steps_of(16, 32, 64, 128, 256), generator=g,
        exact=lambda x, p: gbm.exact(x, p, 0.0, 1.0), label="geometric Brownian motion"))
    studies.append(weak_order(
        gbm, torch.ones(weak_paths, 1, dtype=torch.float64), 0.0, 1.0, solver=EulerMaruyama(),
        steps=steps_of(4, 8, 16, 32), exact=math.exp(gbm.mu), generator=g, antithetic=True,
        label="geometric Brownian motion"))
    return studies


def run_converge(plot: str | None = None, **sizes) -> int:
    """``difsolve converge``: print the observed order of every solver on the problems of
    :func:`default_studies` (``sizes`` are its keyword arguments) and write the figure to
    ``plot`` when given."""
    import time

    start = time.perf_counter()
    studies = default_studies(**sizes)
    print(f"{'solver':<26} {'problem':<30} {'steps':<18} {'observed':>8} {'95% CI':>16} "
          f"{'expected':>8}")
    for s in studies:
        lo, hi = s.interval
        steps = ",".join(str(n) for n in s.steps)
        exp = "-" if s.expected is None else f"{s.expected:g}"
        print(f"{s.name:<26} {s.label:<30} {steps:<18} {s.order:>8.2f} "
              f"{f'[{lo:.2f}, {hi:.2f}]':>16} {exp:>8}")
    print(f"({len(studies)} studies in {time.perf_counter() - start:.1f} s)")
    if plot:
        plot_studies(studies, plot, ncols=4, title="difsolve: observed convergence orders")
        print(f"wrote {plot}")
    return 0
