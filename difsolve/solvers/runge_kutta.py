r"""Explicit Runge-Kutta methods, each a Butcher tableau driven by one step function.

For stages ``k_i = f(x + h sum_j a_ij k_j, t + c_i h)`` the step is ``x + h sum_i b_i k_i`` and the
embedded error estimate is ``h sum_i e_i k_i`` with ``e = b - b_hat``. First-same-as-last (FSAL)
tableaux reuse their last stage, ``f(x_{n+1}, t_{n+1})``, as the next step's first stage.

References: Hairer, Norsett & Wanner, *Solving Ordinary Differential Equations I* (2nd ed., 1993),
Table II.1.1 (RK4), II.5.2 (Dopri5); Bogacki & Shampine, Appl. Math. Lett. 2 (1989) (Bosh3);
Dormand & Prince, J. Comput. Appl. Math. 6 (1980).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._errors import ArgumentTypeError, check, check_real
from .._tensor import bcast
from .base import Solver, State, Step, StepContext

__all__ = ["RK4", "Bosh3", "ButcherTableau", "Dopri5", "Euler", "ExplicitRK", "Heun", "Midpoint"]


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit tableau: nodes ``c``, lower-triangular rows ``a``, weights ``b``, error ``e``."""

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    e: tuple[float, ...] | None = None  # b - b_hat, or None without an embedded method
    fsal: bool = False

    def __post_init__(self):
        c, b = _reals(self.c, "c"), _reals(self.b, "b")
        if isinstance(self.a, (str, bytes)) or not hasattr(self.a, "__iter__"):
            raise ArgumentTypeError(f"argument `a` must be a sequence of rows, got {self.a!r}")
        a = tuple(_reals(row, "a") for row in self.a)
        e = None if self.e is None else _reals(self.e, "e")
        if not isinstance(self.fsal, bool):
            raise ArgumentTypeError(f"argument `fsal` must be a bool, got {self.fsal!r}")
        s = len(c)
        check(s >= 1, "c", "a non-empty sequence of nodes", self.c)
        check(len(b) == s, "b", f"{s} weights (one per node)", len(b))
        check(len(a) == s and all(len(row) == i for i, row in enumerate(a)), "a",
              f"{s} rows, row i with i entries (explicit, strictly lower triangular)",
              tuple(len(row) for row in a))
        check(e is None or len(e) == s, "e", f"{s} error weights (one per node)", self.e)
        check(all(abs(sum(row) - ci) < 1e-14 for row, ci in zip(a, c)), "a",
              "rows summing to the nodes c (sum_j a_ij = c_i)", self.a)
        if self.fsal:
            check(c[-1] == 1.0 and a[-1] == b[:-1], "fsal",
                  "used only when c[-1] = 1 and the last row of a equals b[:-1]", self.fsal)
        for name, value in (("c", c), ("a", a), ("b", b), ("e", e)):
            object.__setattr__(self, name, value)


def _reals(values, name: str) -> tuple[float, ...]:
    """A sequence of finite real coefficients as a tuple of floats."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ArgumentTypeError(f"argument `{name}` must be a sequence of numbers, got {values!r}")
    return tuple(check_real(v, name) for v in values)


def _combine(x: torch.Tensor, hb: torch.Tensor, coeffs, ks) -> torch.Tensor:
    """``x + h * sum_j coeffs[j] ks[j]`` skipping zero coefficients, the last operation fused
    (one ``addcmul``; Euler's step is a single kernel)."""
    acc = None
    for cj, kj in zip(coeffs, ks):
        if cj != 0.0:
            if acc is None:
                acc = kj if cj == 1.0 else kj * cj
            else:
                acc = acc.add(kj, alpha=cj)
    return x if acc is None else torch.addcmul(x, hb, acc)


class ExplicitRK(Solver):
    """An ODE solver defined by a :class:`ButcherTableau`."""

    tableau: ButcherTableau

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "tableau" in cls.__dict__:
            cls.stages = len(cls.tableau.c)
            cls.adaptive = cls.tableau.e is not None

    def init(self, dynamics, x, t, ctx):
        if self.tableau.fsal:
            return (dynamics.drift(x, t),), 1
        return (), 0

    def initial_drift(self, state: State) -> torch.Tensor | None:
        return state[0] if self.tableau.fsal and len(state) else None

    def step(self, dynamics, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor, state: State,
             dw, ctx: StepContext) -> Step:
        tab = self.tableau
        hb = bcast(h, x)
        fsal = tab.fsal and len(state) > 0
        ks = [state[0] if fsal else dynamics.drift(x, t)]
        nfe = 0 if fsal else 1
        xi = x
        for ci, row in zip(tab.c[1:], tab.a[1:]):
            xi = _combine(x, hb, row, ks)
            ks.append(dynamics.drift(xi, t + ci * h))
            nfe += 1
        # with FSAL the last stage input *is* the new state
        x_new = xi if tab.fsal else _combine(x, hb, tab.b, ks)
        error = None
        if tab.e is not None:
            error = _combine(torch.zeros_like(x), hb, tab.e, ks)
        return Step(x_new, error, (ks[-1],) if tab.fsal else (), nfe)


def _err(b, b_hat):
    return tuple(bi - bh for bi, bh in zip(b, b_hat))


class Euler(ExplicitRK):
    """Forward Euler. Order 1, 1 stage, no error estimate."""

    order = 1
    tableau = ButcherTableau(c=(0.0,), a=((),), b=(1.0,))

    def step(self, dynamics, x, t, h, state, dw, ctx):
        return Step(self.advance(dynamics, x, state, (t,), (h,), ctx, 0, 1)[0], None, (), 1)

    def advance(self, dynamics, x, state, times, steps, ctx, start, stop, dw=None):
        # the tableau's step, written out (one evaluation and one fused addcmul), in one loop
        drift, dtype = dynamics.drift, x.dtype
        for i in range(start, stop):
            x = torch.addcmul(x, bcast(steps[i], x), drift(x, times[i]))
            if x.dtype != dtype:
                x = x.to(dtype)
        return x, state, stop - start


class Heun(ExplicitRK):
    """Heun's method (explicit trapezoid). Order 2, 2 stages; embedded Euler gives an error
    estimate of order 2 (usable adaptively). On the EDM ODE this is Karras et al.'s Algorithm 1
    (with churn 0) and k-diffusion's ``sample_heun`` between nonzero sigmas."""

    order = 2
    tableau = ButcherTableau(c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5),
                             e=_err((0.5, 0.5), (1.0, 0.0)))


class Midpoint(ExplicitRK):
    """Explicit midpoint rule. Order 2, 2 stages, no error estimate."""

    order = 2
    tableau = ButcherTableau(c=(0.0, 0.5), a=((), (0.5,)), b=(0.0, 1.0))


class RK4(ExplicitRK):
    """The classical Runge-Kutta method. Order 4, 4 stages, no error estimate."""

    order = 4
    tableau = ButcherTableau(
        c=(0.0, 0.5, 0.5, 1.0),
        a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
        b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
    )


class Bosh3(ExplicitRK):
    """Bogacki-Shampine 3(2). Order 3, 4 stages (3 with FSAL), embedded order-2 error."""

    order = 3
    _b = (2 / 9, 1 / 3, 4 / 9, 0.0)
    tableau = ButcherTableau(
        c=(0.0, 0.5, 0.75, 1.0),
        a=((), (0.5,), (0.0, 0.75), (2 / 9, 1 / 3, 4 / 9)),
        b=_b,
        e=_err(_b, (7 / 24, 1 / 4, 1 / 3, 1 / 8)),
        fsal=True,
    )


class Dopri5(ExplicitRK):
    """Dormand-Prince 5(4) (RK45). Order 5, 7 stages (6 with FSAL), embedded order-4 error.

    Its 5th-order weights nearly satisfy the 6th-order quadrature conditions, so on flows that are
    close to pure quadrature (as the Gaussian probability-flow ODEs are) it shows about order 6.
    """

    order = 5
    _b = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
    tableau = ButcherTableau(
        c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
        a=(
            (),
            (1 / 5,),
            (3 / 40, 9 / 40),
            (44 / 45, -56 / 15, 32 / 9),
            (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
            (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
            (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
        ),
        b=_b,
        e=_err(_b, (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100,
                    1 / 40)),
        fsal=True,
    )
