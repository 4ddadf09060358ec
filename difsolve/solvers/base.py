"""The solver interface: a small immutable object that knows one step and its orders.

A solver advances ``x`` from per-sample time ``t`` by a per-sample step ``h`` (both ``(B,)``)::

    state, nfe = solver.init(dynamics, x, t, ctx)
    step = solver.step(dynamics, x, t, h, state, dw, ctx)   # -> Step(x, error, state, nfe)

On a fixed grid shared by the batch the loop may first set ``ctx.plan = solver.prepare(dynamics,
grid)`` (precomputed per-step coefficients, e.g. the multistep quadrature weights).

``state`` is a tuple of tensors whose first dimension is the batch (e.g. the FSAL derivative of
Dopri5, or the history of a multistep method); the loop keeps it for accepted samples and rolls it
back for rejected ones, and may select rows of it. ``dw`` is the Brownian increment over the step
(SDE solvers only). Solvers contain no host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._errors import IncompatibleError
from ..dynamics import TIME_VARIABLES, is_sde

__all__ = ["Solver", "Step", "StepContext"]

State = tuple[torch.Tensor, ...]


@dataclass
class Step:
    """Result of one step: new state, embedded error estimate (or None), solver state, NFE."""

    x: torch.Tensor
    error: torch.Tensor | None
    state: State
    nfe: int


@dataclass
class StepContext:
    """What the loop tells a solver about the solve (host-side values, and the random stream).

    ``stream`` is the solve's :mod:`random stream <difsolve.noise>` (a generator, or one per row
    with ``seeds=``); ``rows`` the global indices of the rows being stepped (None: all, in order).
    Solvers draw extra randomness only through :meth:`randn_like`.
    """

    generator: torch.Generator | None = None
    n_steps: int | None = None  # number of steps of a fixed grid, None when adaptive
    index: int = 0  # index of the current step on a fixed grid
    final_sigma_zero: bool = False  # the grid ends at sigma = 0 (EDM's last Euler step)
    stream: object | None = None
    rows: torch.Tensor | None = None
    plan: object = None  # what ``solver.prepare(dynamics, grid)`` returned for a shared grid
    #: the loop keeps the solver state of rows whose step has zero length (the adaptive loop
    #: does), so a solver need not select those rows itself
    keeps_still_rows: bool = False

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        if self.stream is not None:
            return self.stream.randn(x, self.rows)
        return torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)


class Solver:
    """Base class. Subclasses set the capability attributes and implement :meth:`step`.

    Attributes:
        order: convergence order on ODEs (None for SDE-only solvers).
        strong_order, weak_order: orders on SDEs with additive noise (None for ODE solvers).
        stages: drift evaluations per step (without FSAL reuse).
        adaptive: has an embedded error estimate (usable with a step controller).
        stochastic: draws random numbers.
        sde: integrates SDE dynamics (needs Brownian increments and a ``diffusion``).
        noise_types: SDE noise types supported.
        native_time: integrates the field's ODE through its own formula (needs a probability-flow
            ODE with ``denoise``), not a generic drift.
        time_variables: the ``time_variable`` choices of :func:`~difsolve.solve` it supports.
    """

    order: float | None = None
    strong_order: float | None = None
    weak_order: float | None = None
    stages: int = 1
    adaptive: bool = False
    stochastic: bool = False
    sde: bool = False
    noise_types: tuple[str, ...] = ()
    native_time: bool = False
    time_variables: tuple[str, ...] = TIME_VARIABLES

    @property
    def error_order(self) -> float:
        """Order ``k`` of the local error estimate: step factors scale as ``ratio^(-1/k)``."""
        if self.sde:
            return float(self.strong_order) + 0.5
        return float(self.order)

    def check_dynamics(self, dynamics) -> None:
        """Raise :class:`IncompatibleError` if this solver cannot integrate ``dynamics``."""
        name = type(self).__name__
        if not callable(getattr(dynamics, "drift", None)):
            raise IncompatibleError(f"argument `dynamics` must have a drift(x, t) method ({name})")
        if self.sde and not is_sde(dynamics):
            raise IncompatibleError(
                f"argument `solver`: {name} is an SDE solver but the dynamics have no diffusion "
                "(an ODE); use an ODE solver such as Heun() or Dopri5()")
        if not self.sde and is_sde(dynamics):
            raise IncompatibleError(
                f"argument `solver`: {name} is an ODE solver but the dynamics are an SDE; use "
                "EulerMaruyama() or StochasticHeun(), or integrate the ProbabilityFlowODE")
        if self.sde:
            noise = getattr(dynamics, "noise", "additive")
            if noise not in self.noise_types:
                raise IncompatibleError(
                    f"argument `solver`: {name} supports noise {self.noise_types}, the dynamics "
                    f"have noise={noise!r}")

    def init(self, dynamics, x: torch.Tensor, t: torch.Tensor,
             ctx: StepContext) -> tuple[State, int]:
        """Initial solver state and the NFE it cost."""
        return (), 0

    def step(self, dynamics, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor, state: State,
             dw: torch.Tensor | None, ctx: StepContext) -> Step:
        raise NotImplementedError

    def advance(self, dynamics, x: torch.Tensor, state: State, times, steps, ctx: StepContext,
                start: int, stop: int, dw: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, State, int]:
        """Steps ``start .. stop - 1`` of a fixed grid (``times[i]``, ``steps[i]``: ``(B,)``;
        ``dw``: the increment of a single step): ``(x, state, NFE)``, the state kept in ``x``'s
        dtype. The default calls :meth:`step` per step; a solver may run the block in a tighter
        loop (the loop calls this, so ``step`` need not exist twice)."""
        nfe, dtype = 0, x.dtype
        for i in range(start, stop):
            ctx.index = i
            step = self.step(dynamics, x, times[i], steps[i], state, dw, ctx)
            x, state, nfe = step.x, step.state, nfe + step.nfe
            if x.dtype != dtype:
                x = x.to(dtype)
        return x, state, nfe

    def prepare(self, dynamics, grid: torch.Tensor) -> object:
        """Work shared by every step of a fixed grid common to the batch (``grid``: ``(n + 1,)``
        in the integration variable), handed back as ``StepContext.plan``; None: nothing."""
        return None

    def first_step(self, dynamics, t: torch.Tensor, span: torch.Tensor) -> torch.Tensor | None:
        """Size ``|h|`` of the first adaptive step if the solver knows a good one (else None:
        the controller's estimate is used)."""
        return None

    def denoised(self, state: State) -> torch.Tensor | None:
        """The data prediction at the current point if the solver state holds it (reported to
        ``callback``), else None."""
        return None

    def initial_drift(self, state: State) -> torch.Tensor | None:
        """``drift(x0, t0)`` if the initial state holds it (FSAL), so step control can reuse it."""
        return None

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


def diffusion_term(dynamics, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``g`` broadcast against ``x``: ``diffusion(t)`` for additive noise, ``(x, t)`` for diagonal.

    Additive noise at a time shared by the batch (a stride-0 column of a shared grid) is one value:
    ``diffusion`` is evaluated on one row and returned as a 0-d tensor (the noise term is then a
    scalar multiply)."""
    if getattr(dynamics, "noise", "additive") == "diagonal":
        g = dynamics.diffusion(x, t)
    elif t.ndim == 1 and t.shape[0] > 1 and t.stride(0) == 0:
        g = dynamics.diffusion(t[:1])
        return g[0] if g.ndim == 1 else g
    else:
        g = dynamics.diffusion(t)
    if g.ndim == 1 and x.ndim > 1:
        g = g.reshape(-1, *([1] * (x.ndim - 1)))
    return g
