r"""DPM-Solver++ multistep exponential integrators (data-prediction form), optionally with a free
corrector that also gives an embedded error estimate for per-sample adaptive steps.

With ``lambda = log(a/b)`` and the data prediction ``D = x0(x, t)``, the probability-flow ODE has
the exact solution (Lu et al. 2022, eq. 9)

``x_t = (b_t / b_s) x_s + a_t int_0^h e^{-(h - v)} D(lambda_s + v) dv``,  ``h = lambda_t - lambda_s``.

A multistep method replaces ``D`` by the polynomial interpolating the data predictions at the last
``k`` points (nodes ``0, -h_1, -h_1 - h_2, ...`` in ``v``) and integrates it exactly against the
exponential weight: with ``psi_1 = 1 - e^{-h}`` and ``psi_{j+1} = h^j / j! - psi_j`` (Taylor series
for small ``|h|``), ``int_0^h e^{-(h-v)} v^j dv = j! psi_{j+1}``, so the weights of the ``k`` values
solve a ``k x k`` Vandermonde system per sample. Variable steps, per-sample histories and every
order share this one construction. Order ``k`` costs one field evaluation per step.

``corrector=True`` adds the evaluation at the predicted point as one more node (the UniC idea of
Zhao et al., *UniPC*, 2023): the corrected value has order ``k + 1`` at no extra cost, and
``corrected - predicted`` (the predictor's local error) is an embedded error estimate, so the
method runs under a :class:`~difsolve.PIController` with one evaluation per attempted step (a
rejected step reuses the cached prediction at its start). The next step uses the evaluation at the
predicted point, as UniPC does.

References: Lu et al., *DPM-Solver++* (2022), Alg. 2; Zhao et al., *UniPC* (2023); Hochbruck &
Ostermann, *Exponential integrators*, Acta Numerica 19 (2010), section 2.
"""

from __future__ import annotations

import math

import torch

from .._errors import IncompatibleError, check
from .._tensor import bcast
from .base import Solver, Step

__all__ = ["DPMSolver"]

#: below this |h| the psi functions are summed from their Taylor series (no cancellation)
_SERIES_BELOW = 0.5
_SERIES_TERMS = 16


def _psi_moments(h: torch.Tensor, k: int) -> torch.Tensor:
    """``m_j = int_0^h e^{-(h-v)} (v/h)^j dv = j! psi_{j+1}(h) / h^j`` for ``j < k``: ``(B, k)``."""
    psi = [-torch.expm1(-h)]
    for j in range(1, k):
        psi.append(h**j / math.factorial(j) - psi[-1])
    # series psi_{j+1}(h) = h^{j+1} sum_i (-h)^i / (j+1+i)!  for small |h|
    small = h.abs() < _SERIES_BELOW
    hs = torch.where(small, h, torch.zeros_like(h))
    out = []
    for j in range(k):
        series = sum((-hs) ** i / math.factorial(j + 1 + i) for i in range(_SERIES_TERMS))
        series = hs ** (j + 1) * series
        val = torch.where(small, series, psi[j])
        scale = torch.where(h == 0, torch.ones_like(h), h) ** j
        out.append(math.factorial(j) * val / scale)
    return torch.stack(out, dim=1)


def _weights(nodes: torch.Tensor, moments: torch.Tensor) -> torch.Tensor:
    """Quadrature weights ``w`` with ``sum_j w_j P(v_j) = int e^{-(h-v)} P(v) dv`` for every
    polynomial ``P`` of degree ``< k`` (``nodes`` scaled by ``h``): solves ``V^T w = m``."""
    k = nodes.shape[1]
    powers = torch.arange(k, device=nodes.device, dtype=nodes.dtype)
    vander = nodes[:, :, None] ** powers  # (B, k, k): V[j, i] = v_j^i
    return torch.linalg.solve(vander.mT, moments[:, :k, None])[..., 0]


def _unwrap(dynamics):
    """(process, denoise, time map) of a probability-flow ODE, possibly in log-sigma time."""
    to_t = getattr(dynamics, "to_t", None)
    inner = getattr(dynamics, "inner", dynamics) if to_t is not None else dynamics
    return inner.process, inner.denoise, (to_t if to_t is not None else (lambda t: t))


class DPMSolver(Solver):
    """Multistep DPM-Solver++ of ``order`` 1-3 on the probability-flow ODE; 1 NFE per step.

    ``corrector=True`` adds the free UniC corrector: order ``order + 1``, an embedded error
    estimate (usable with a controller; error order ``order + 1``). The first steps use the orders
    the history allows. Integrates in ``t`` or, for step control, ``time_variable="log_sigma"``.
    """

    stages = 1
    native_time = True
    time_variables = ("t", "log_sigma")

    def __init__(self, order: int = 2, corrector: bool = False):
        check(order in (1, 2, 3, 4), "order", "1, 2, 3 or 4", order)
        check(isinstance(corrector, bool), "corrector", "a bool", corrector)
        self.predictor_order = order
        self.corrector = corrector
        self.order = order + 1 if corrector else order
        self.adaptive = corrector

    def check_dynamics(self, dynamics) -> None:
        super().check_dynamics(dynamics)
        inner = getattr(dynamics, "inner", dynamics)
        if not callable(getattr(inner, "denoise", None)) or not hasattr(inner, "process"):
            raise IncompatibleError(
                "argument `solver`: DPMSolver needs a ProbabilityFlowODE (dynamics with "
                "`denoise(x, t)` and a `process`)")

    def _lam(self, process, t):
        a, b = process.marginal(t)
        return a, b, torch.log(a) - torch.log(b)

    def init(self, dynamics, x, t, ctx):
        process, denoise, to_t = _unwrap(dynamics)
        t = to_t(t)
        d0 = denoise(x, t)
        lam = self._lam(process, t)[2]
        hist = self.predictor_order - 1
        return (d0, lam, *([torch.zeros_like(x)] * hist), *([torch.zeros_like(lam)] * hist),
                torch.zeros_like(lam)), 1

    def step(self, dynamics, x, t, h, state, dw, ctx):
        process, denoise, to_t = _unwrap(dynamics)
        p = self.predictor_order
        d0, lam_s = state[0], state[1]
        d_hist, lam_hist, count = state[2:1 + p], state[1 + p:2 * p], state[-1]
        t_next = to_t(t + h)
        _, b_s, _ = self._lam(process, to_t(t))
        a_t, b_t, lam_t = self._lam(process, t_next)
        hh = lam_t - lam_s
        wdtype = torch.float64 if hh.device.type != "mps" else hh.dtype
        h64 = hh.to(wdtype)
        safe_h = torch.where(h64 == 0, torch.ones_like(h64), h64)
        # past nodes scaled by h (distinct dummies where the history is not there yet)
        past = [((lam.to(wdtype) - lam_s.to(wdtype)) / safe_h) for lam in lam_hist]
        past = [torch.where(count > j, v, torch.full_like(v, 1e3 * (j + 2)))
                for j, v in enumerate(past)]
        order_now = torch.clamp(count + 1, max=p)  # usable predictor order per sample
        moments = _psi_moments(h64, p + 1)
        values = [d0, *d_hist]
        zero_nodes = torch.zeros_like(h64)

        def combine(nodes, vals, orders, shift):
            """sum_j w_j vals_j with the weights of the per-sample order (extra nodes: shift)."""
            acc = None
            for k in range(1, p + 1):
                n = torch.stack(nodes[:k + shift], dim=1)
                w = _weights(n, moments)
                use = (orders == k)[:, None]
                acc = torch.where(use, torch.nn.functional.pad(w, (0, p + shift - w.shape[1])),
                                  acc if acc is not None else torch.zeros(
                                      h64.shape[0], p + shift, dtype=wdtype, device=h64.device))
            total = None
            for j, v in enumerate(vals):
                term = bcast(acc[:, j].to(x.dtype), x) * v
                total = term if total is None else total + term
            return total

        ratio = bcast(b_t / b_s, x) * x
        x_pred = ratio + bcast(a_t, x) * combine([zero_nodes, *past], values, order_now, 0)
        last_fixed = (not self.corrector and ctx.n_steps is not None
                      and ctx.index == ctx.n_steps - 1)
        if last_fixed:  # nothing needs the prediction at the final point
            d_new, nfe = torch.zeros_like(x), 0
        else:
            d_new, nfe = denoise(x_pred, t_next), 1
        x_new, error = x_pred, None
        if self.corrector:
            one = torch.ones_like(h64)
            x_new = ratio + bcast(a_t, x) * combine([one, zero_nodes, *past], [d_new, *values],
                                                    order_now, 1)
            error = x_new - x_pred
        new_state = (d_new, lam_t, d0, *d_hist[:-1], lam_s, *lam_hist[:-1], count + 1) \
            if p > 1 else (d_new, lam_t, count + 1)
        return Step(x_new, error, new_state, nfe)
