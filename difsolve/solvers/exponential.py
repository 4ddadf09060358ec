r"""Multistep exponential integrators of the probability-flow ODE, in one construction:
DPM-Solver++ (2M midpoint / heun, 3M), UniPC (bh1 / bh2, any order), DEIS (tAB) and iPNDM.

With ``lambda = log(a/b)``, ``v = lambda - lambda_s`` and ``h = lambda_t - lambda_s``, the ODE has
two exact integral forms (Lu et al. 2022, eqs. 9 and 3.4):

* data form:  ``x_t = (b_t/b_s) x_s + a_t int_0^h e^{-(h-v)} D(v) dv``  (``D``: data prediction);
* noise form: ``x_t = (a_t/a_s) x_s - b_t int_0^h e^{(h-v)} eps(v) dv``  (``eps = (x - a D)/b``).

A linear multistep method stores ``F`` (``D`` or ``eps``) at nodes ``v_j`` (``v_0 = 0`` the
current point, then the past ones) and integrates the interpolating polynomial against the
kernel ``K``: ``x_t = A x_s + C sum_j w_j F_j`` with the integrated Lagrange basis

``w_j = sum_m c_jm M_m / prod_{i != j} (v_j - v_i)``,  ``prod_{i != j} (v - v_i) = sum_m c_jm v^m``,

in closed form from the kernel moments ``M_m = int_0^h K(v) v^m dv`` (data kernel:
``M_m = m! psi_{m+1}(h)``, ``psi_1 = 1 - e^{-h}``, ``psi_{m+1} = h^m/m! - psi_m``; noise kernel:
``(-1)^{m+1} M_m(-h)``). No linear solve; a zero-length step has zero moments, so that row stays
put. The published methods differ only in the form, the nodes and the moments:

* DPM-Solver++ (Lu et al. 2022b), data form: ``variant="heun"`` is the exact moments (order
  ``k``); ``variant="midpoint"`` replaces ``M_1`` by ``h M_0 / 2`` at order 2 (2M midpoint:
  ``D = (1 + 1/(2r)) D_0 - D_1/(2r)`` times ``psi_1``; the reference code, diffusers
  ``solver_type="midpoint"``, k-diffusion ``sample_dpmpp_2m``) and ``M_2`` by ``M_2 / 2`` at
  order 3 (the reference's multistep third-order update, whose ``D2`` term carries half the
  quadratic's exact weight: local error ``h^3/12 D''``, so it is formally of order 2; its error
  sums to ``h^2/12 (D'(end) - D'(start))``, which vanishes where the data prediction is flat at
  both ends, as from pure noise to the data).
* UniPC (Zhao et al. 2023), data form: UniP-``k`` is the exact moments except at ``k = 2``,
  where ``M_1 = h B(h)/2`` with ``B(h) = h`` (bh1) or ``psi_1(h) = 1 - e^{-h}`` (bh2, which is the
  2M midpoint); the UniC corrector adds the evaluation at the predicted point as the node ``h``
  (order ``k + 1`` at no cost; at ``k = 1`` the same ``B(h)/2`` rule). The next step reuses that
  evaluation; the corrector is not applied after the last step of a fixed grid.
* DEIS tAB (Zhang & Chen 2023; diffusers ``DEISMultistepScheduler``): noise form, ``eps``
  interpolated in ``log sigma = -lambda`` and integrated exactly (order ``k``).
* iPNDM (Zhang & Chen 2023; Zhou et al. 2024, AMED): the EDM ODE ``d(x/a)/dsigma = eps`` with the
  fixed-step Adams-Bashforth coefficients (nodes ``0, -1, -2, ...`` in units of the current step,
  moments ``1/(m+1)``, scaled by ``sigma_t - sigma_s``), whatever the step ratios.

Every method costs one field evaluation per step and starts with the lower orders its history
allows (the published warm-up; from pure noise the data prediction is nearly constant, so this
costs little). ``start="singlestep"`` makes the first step of a fixed grid a single-step
DPM-Solver of order ``order - 1`` (2S: ``1/2``; 3S: ``1/3, 2/3`` with the final nodes
``0, 2/3``; Lu et al. 2022, Alg. 1), whose last stage joins the history: then the method has its
full order (up to 4) from any start time, for ``order - 2`` (at most 2) more evaluations.
``lower_order_final=True`` lowers the order to the number of steps left (diffusers' default for
UniPC, and for DPM-Solver++/DEIS below 15 steps).

References: Lu et al., *DPM-Solver* (2022) and *DPM-Solver++* (2022b); Zhao et al., *UniPC*
(2023); Zhang & Chen, *DEIS* (2023); Zhou et al., *AMED* (2024); Hochbruck & Ostermann,
*Exponential integrators*, Acta Numerica 19 (2010).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .._errors import ArgumentTypeError, IncompatibleError, check, check_choice
from .._tensor import bcast, host_reads_free, where_rows
from ..dynamics import TimeChange, split_time_change
from .base import Solver, Step

__all__ = ["DEIS", "IPNDM", "DPMSolver", "Multistep", "UniPC", "kernel_moments",
           "lagrange_weights", "masked_lagrange_weights", "masked_weights", "unit_moments"]

#: up to this |h| the kernel moments are integrated by quadrature (no cancellation)
_SERIES_BELOW = 2.0
#: Gauss-Legendre nodes of that quadrature (error far below float64 rounding for |h| <= 2)
_QUADRATURE_NODES = 10
#: single-step start (Lu et al. 2022, Alg. 1): the points as fractions of h (the start first)
#: and, per stage and for the final update, the indices of the points it interpolates
_STARTS = {
    2: ((0.0, 0.5), ((0,), (0, 1))),
    3: ((0.0, 1 / 3, 2 / 3), ((0,), (0, 1), (0, 2))),
}


def data_moments(h: torch.Tensor, k: int) -> torch.Tensor:
    """``M_m = int_0^h e^{-(h-v)} v^m dv = m! psi_{m+1}(h)`` for ``m < k``: ``(B, k)``
    (a transposed view of :func:`kernel_moments`)."""
    return kernel_moments(h, k, "data").T


def noise_moments(h: torch.Tensor, k: int) -> torch.Tensor:
    """``N_m = int_0^h e^{h-v} v^m dv = (-1)^{m+1} M_m(-h)``: ``(B, k)``."""
    return kernel_moments(h, k, "noise").T


def kernel_moments(h: torch.Tensor, k: int, form: str = "data") -> torch.Tensor:
    """Kernel moments ``m < k`` of the ``"data"`` kernel ``e^{-(h-v)}`` or the ``"noise"``
    kernel ``e^{h-v}`` (``N_m(h) = (-1)^{m+1} M_m(-h)``), moment-major: ``(k, B)``.

    For ``|h| <= 2``: ``M_m = h^{m+1} int_0^1 e^{-h(1-s)} s^m ds`` by Gauss-Legendre quadrature
    with :data:`_QUADRATURE_NODES` nodes (the integrand is entire; the rule is exact to rounding
    there, and a small ``h`` does not cancel). Elsewhere the forward recurrence
    ``M_0 = 1 - e^{-h}``, ``M_m = h^m - m M_{m-1}``, stable for large ``|h|``. Elementwise
    operations and reductions over a leading dimension only: a row's moments do not depend on
    its position in the batch.
    """
    if form == "noise":
        h = -h

    def far(hl):  # M_0 = 1 - e^{-h}, M_m = h^m - m M_{m-1}
        powers = hl.expand(k, -1).cumprod(0)  # h, h^2, ...
        out = [-torch.expm1(-hl)]
        for m in range(1, k):
            out.append(powers[m - 1] - m * out[-1])
        return out

    moments = _two_branch_moments(h, k, lambda hs: hs.expand(k, -1).cumprod(0), far)
    if form == "noise":
        sign = _constant(tuple((-1.0) ** (m + 1) for m in range(k)), h)
        moments = moments * sign[:, None]
    return moments


def unit_moments(h: torch.Tensor, k: int) -> torch.Tensor:
    """``m_j(h) = int_0^h e^{-(h-w)} (w/h)^j dw = M_j(h) / h^j`` for ``j < k`` (nodes in units of
    the step; ``m_j(0) = 0``), moment-major ``(k, B)``: by the quadrature of
    :func:`kernel_moments` for ``|h| <= 2`` (``h int_0^1 e^{-h(1-s)} s^j ds``), else the stable
    recurrence ``m_0 = 1 - e^{-h}``, ``m_j = 1 - j m_{j-1} / h``."""

    def far(hl):
        out = [-torch.expm1(-hl)]
        for j in range(1, k):
            out.append(1.0 - j * out[-1] / hl)
        return out

    return _two_branch_moments(h, k, lambda hs: hs, far)


def _two_branch_moments(h: torch.Tensor, k: int, near_scale, far) -> torch.Tensor:
    """``near_scale(h) int_0^1 e^{-h(1-s)} s^m ds`` (``m < k``) by the Gauss-Legendre rule where
    ``|h| <= 2``, ``far(h)`` (a list of ``k`` rows) elsewhere: ``(k, B)``. On the CPU (a flag read
    on the host costs nothing) the branch no row needs is skipped."""
    small = h.abs() <= _SERIES_BELOW
    every_small = host_reads_free(h) and bool(small.all())
    hs = h if every_small else torch.where(small, h, 0.0)
    nodes, basis = _quadrature_rule(k, h.dtype, h.device)  # (Q, 1): s_q - 1; (k, Q, 1)
    moments = (basis * torch.exp(nodes * hs)).sum(1) * near_scale(hs)
    if not every_small:
        moments = torch.where(small, moments, torch.stack(far(torch.where(small, 1.0, h))))
    return moments


_RULES: dict = {}


def _constant(values: tuple, like: torch.Tensor) -> torch.Tensor:
    """``values`` as a tensor of ``like``'s dtype and device, made once (a tensor made from host
    data inside a step is a host-to-device copy, which a CUDA graph cannot record)."""
    key = (values, like.dtype, str(like.device))
    if key not in _RULES:
        _RULES[key] = torch.tensor(values, dtype=like.dtype, device=like.device)
    return _RULES[key]


def _quadrature_rule(k: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Legendre ``s_q - 1`` ``(Q, 1)`` on ``[0, 1]`` and ``w_q s_q^m`` ``(k, Q, 1)``,
    cached per dtype and device."""
    key = (k, dtype, str(device))
    if key not in _RULES:
        s, w = np.polynomial.legendre.leggauss(_QUADRATURE_NODES)
        s, w = (s + 1.0) / 2.0, w / 2.0
        basis = np.stack([w * s**m for m in range(k)])
        _RULES[key] = (torch.tensor(s - 1.0, dtype=dtype, device=device)[:, None],
                       torch.tensor(basis, dtype=dtype, device=device)[:, :, None])
    return _RULES[key]


def lagrange_weights(nodes: list, moments: torch.Tensor) -> torch.Tensor:
    """``w_j = int K L_j`` for the Lagrange basis ``L_j`` of ``nodes`` (``k`` tensors ``(B,)``, or
    numbers) from the kernel moments ``moments[:, m] = int K v^m`` (``m < k``): ``(B, k)``.

    Closed form, no linear solve: the coefficients of ``prod_{i != j} (v - v_i)`` by synthetic
    division of ``prod_i (v - v_i)`` by ``v - v_j``, divided by ``prod_{i != j} (v_j - v_i)``.
    """
    return _weights_of(nodes, moments.T).T


def masked_lagrange_weights(nodes: torch.Tensor, used: torch.Tensor,
                            moments: torch.Tensor) -> torch.Tensor:
    """:func:`lagrange_weights` of the nodes ``nodes[r, used[r]]`` of each row ``r`` (rows of
    different orders in one pass; ``nodes``, ``used``, ``moments``: ``(B, k)``), zero for the
    unused nodes."""
    return masked_weights(nodes.T, used.T, moments.T).T


def masked_weights(nodes: torch.Tensor, used: torch.Tensor | None, moments: torch.Tensor,
                   poly: torch.Tensor | None = None) -> torch.Tensor:
    """Node-major core of :func:`masked_lagrange_weights`: ``(k, B)`` in and out (``used``
    None: every node is used, and no mask is applied).

    An unused node is a node at infinity: its factor of every basis polynomial is 1. With
    ``P(v) = prod_{i used} (v - v_i)`` (its coefficients ``(k + 1, B)`` may be given),
    ``L_j = P(v) / ((v - v_j) P'(v_j))`` and ``w_j = sum_m c_jm M_m / P'(v_j)`` (see
    :func:`_basis_integrals`). Every operation runs along the batch on ``(k, B)`` tensors, the
    fast direction on every device.
    """
    (numerator,), derivative, _ = _basis_integrals(nodes, used, [moments], poly)
    if used is None:
        return numerator / derivative
    return torch.where(used, numerator / torch.where(used, derivative, 1.0), 0.0)


def _basis_integrals(nodes: torch.Tensor, used: torch.Tensor | None, moment_sets: list,
                     poly: torch.Tensor | None = None):
    """``(numerators, P'(v_j), P)``: for each moment set ``M`` (at least ``k`` rows) and every
    node ``j``, ``sum_m c_jm M_m`` with ``c_j`` the coefficients of ``P(v) / (v - v_j)`` by
    synthetic division (exact for a used ``v_j``; leading zero coefficients of a lower-degree row
    divide through), and ``P'(v_j)`` by Horner's rule, in one pass."""
    k = nodes.shape[0]
    if poly is None:
        poly = _product_poly(nodes, used)
    quotient = poly[k].expand(k, -1)  # c_{j, k-1}
    numerators = [quotient * m[k - 1] for m in moment_sets]
    derivative = k * quotient
    for m in range(k - 1, 0, -1):
        quotient = poly[m] + nodes * quotient  # c_{j, m-1}
        numerators = [torch.addcmul(n, quotient, ms[m - 1])
                      for n, ms in zip(numerators, moment_sets)]
        derivative = m * poly[m] + nodes * derivative
    return numerators, derivative, poly


def _product_poly(nodes: torch.Tensor, used: torch.Tensor | None) -> torch.Tensor:
    """Coefficients (low to high) of ``prod_{i used} (v - v_i)`` (``used`` None: every node):
    ``(k + 1, B)``."""
    zero = nodes.new_zeros((1, nodes.shape[1]))
    poly = torch.cat([torch.ones_like(zero), zero.expand(nodes.shape[0], -1)])
    for i in range(nodes.shape[0]):
        times = _times_linear(poly, nodes[i], zero)
        poly = times if used is None else torch.where(used[i], times, poly)
    return poly


def _times_linear(poly: torch.Tensor, root: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Coefficients of ``P(v) (v - root)`` (the top coefficient of ``P`` must be 0)."""
    return torch.cat([zero, poly[:-1]]) - root * poly


def _replace(moments: torch.Tensor, j: int, value: torch.Tensor) -> torch.Tensor:
    """Moment-major ``moments`` ``(k, B)`` with moment ``j`` replaced (out of place, so autograd
    can see through it)."""
    return torch.cat([moments[:j], value[None], moments[j + 1:]])


def _weights_of(nodes: list, moments: torch.Tensor) -> torch.Tensor:
    """Node-major Lagrange weights ``(k, B)`` of ``nodes`` (tensors ``(B,)`` or numbers) from
    moment-major ``moments``."""
    one = torch.ones_like(moments[0])
    return masked_weights(torch.stack([n * one for n in nodes]), None, moments)


def marginal_log_snr(process, t: torch.Tensor):
    """``(a, b, lambda = log a - log b)`` of ``process`` at ``t``."""
    a, b = process.marginal(t)
    return a, b, torch.log(a) - torch.log(b)


def check_data_prediction(dynamics, solver, kind: str) -> None:
    """Refuse dynamics without a data prediction (``denoise(x, t)``) and a ``process``, which the
    exponential integrators need (``kind`` names what to pass instead)."""
    inner = getattr(dynamics, "inner", dynamics)
    if not callable(getattr(inner, "denoise", None)) or not hasattr(inner, "process"):
        raise IncompatibleError(
            f"argument `solver`: {type(solver).__name__} needs {kind} (dynamics with "
            "`denoise(x, t)` and a `process`)")


def unwrap_flow(dynamics):
    """``(process, denoise, map to t)`` of dynamics with a data prediction, possibly integrated
    in a changed time (shared by the deterministic and stochastic exponential integrators)."""
    inner, to_t = split_time_change(dynamics)
    return inner.process, inner.denoise, to_t


def _check_order(order, name: str, allowed: tuple[int, ...]) -> int:
    if isinstance(order, bool) or not isinstance(order, int):
        raise ArgumentTypeError(f"argument `{name}` must be an int in {allowed}, got {order!r}")
    check(order in allowed, name, f"one of {allowed}", order)
    return order


def _weight_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.device.type == "mps" else torch.float64


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


@dataclass
class _Plan:
    """Per-step weights ``(p, n)`` / ``(p + 1, n)`` and scale factors ``(n,)`` of a shared grid."""

    predictor: torch.Tensor
    corrector: torch.Tensor | None
    scale_x: torch.Tensor
    scale_f: torch.Tensor


class Multistep(Solver):
    """One construction for the linear multistep exponential integrators (see the module doc).

    Subclasses choose the ``form`` (``"data"`` or ``"noise"``) and may change the moments
    (:meth:`predictor_moments`, :meth:`corrector_moments`) or the weights
    (:meth:`predictor_weights`). State: ``(F_0, lambda_0, F_1..F_m, lambda_1..lambda_m, count)``
    with ``m = order - 1`` past values and ``count`` the history length per sample.
    """

    form = "data"
    stages = 1
    native_time = True
    time_variables = ("t", "log_sigma")
    #: apply the corrector after the last step of a fixed grid (it costs one more evaluation)
    final_corrector = False

    def __init__(self, order: int, corrector: bool, start: str, lower_order_final: bool,
                 orders: tuple[int, ...]):
        self.predictor_order = _check_order(order, "order", orders)
        if not isinstance(corrector, bool):
            raise ArgumentTypeError(f"argument `corrector` must be a bool, got {corrector!r}")
        start = check_choice(start, ("multistep", "singlestep"), "start")
        if not isinstance(lower_order_final, bool):
            raise ArgumentTypeError(
                f"argument `lower_order_final` must be a bool, got {lower_order_final!r}")
        self.corrector = corrector
        self.start = start
        self.lower_order_final = lower_order_final
        self.order = order + 1 if corrector else order
        self.adaptive = corrector

    # ----- what distinguishes the methods ---------------------------------------------------

    # Moments, nodes and weights are moment-/node-major, ``(k, B)``: every operation then runs
    # along the batch (a small trailing dimension makes each elementwise kernel several times
    # slower on the CPU).

    def predictor_moments(self, moments: torch.Tensor, h: torch.Tensor, k: int) -> torch.Tensor:
        """Moments ``(k, B)`` used by the order-``k`` predictor (default: exact)."""
        return moments

    def corrector_moments(self, moments: torch.Tensor, h: torch.Tensor, k: int) -> torch.Tensor:
        """Moments ``(k + 1, B)`` used by the corrector of predictor order ``k`` (default:
        exact)."""
        return moments

    def moments(self, h: torch.Tensor, k: int) -> torch.Tensor:
        """Exact kernel moments ``m < k`` of this method's form: ``(k, B)``."""
        return kernel_moments(h, k, self.form)

    def predictor_weights(self, h: torch.Tensor, past: list[torch.Tensor], k: int,
                          moments: torch.Tensor) -> torch.Tensor:
        """Weights ``(k, B)`` of ``F_0, F_1, ...`` for the order-``k`` predictor (``moments``:
        the exact kernel moments, at least ``k`` of them). Overriding it (as iPNDM does) makes
        the per-row path compute each order separately."""
        m = self.predictor_moments(moments[:k], h, k)
        return _weights_of([torch.zeros_like(h), *past[:k - 1]], m)

    def corrector_weights(self, h: torch.Tensor, past: list[torch.Tensor], k: int,
                          moments: torch.Tensor) -> torch.Tensor:
        """Weights ``(k + 1, B)`` of ``F_new, F_0, F_1, ...`` (UniC with ``k + 1`` nodes)."""
        m = self.corrector_moments(moments[:k + 1], h, k)
        node = torch.where(h == 0, torch.ones_like(h), h)  # h = 0: zero moments, zero weights
        return _weights_of([node, torch.zeros_like(h), *past[:k - 1]], m)

    # ----- the shared machinery ---------------------------------------------------------------

    def check_dynamics(self, dynamics) -> None:
        super().check_dynamics(dynamics)
        check_data_prediction(dynamics, self, "a ProbabilityFlowODE")

    def first_step(self, dynamics, t, span):
        """In ``log sigma`` time: ``min(1, span)`` (a factor ``e`` in sigma). Sampling starts
        where the noise dominates the data, so the data prediction is nearly constant and an
        exponential integrator is nearly exact there; this replaces the controller's
        two-evaluation estimate. In ``t`` time: None (the controller's estimate)."""
        if not isinstance(dynamics, TimeChange):
            return None
        return span.clamp(max=1.0)

    def nfe(self, steps: int) -> int:
        """Field evaluations of a fixed grid of ``steps`` steps (initial evaluation included)."""
        extra = 0
        if self.start == "singlestep" and self._start_order() >= 2:
            extra = len(_STARTS[self._start_order()][0]) - 1
        final = 1 if (self.corrector and self.final_corrector) else 0
        return steps + extra + final

    def _start_order(self) -> int:
        return min(self.order - 1, 3)

    def _field_value(self, d, x, a, b):
        if self.form == "data":
            return d
        return (x - bcast(a, x) * d) / bcast(b, x)

    def _coefs(self, a_s, b_s, a_t, b_t):
        """``(A, C)`` of ``x_t = A x_s + C sum_j w_j F_j``."""
        if self.form == "data":
            return b_t / b_s, a_t
        return a_t / a_s, -b_t

    def init(self, dynamics, x, t, ctx):
        process, denoise, to_t = unwrap_flow(dynamics)
        t = to_t(t)
        a, b, lam = marginal_log_snr(process, t)
        lam = lam.to(_weight_dtype(x))
        f0 = self._field_value(denoise(x, t), x, a, b)
        m = self.predictor_order - 1
        return (f0, lam, *([torch.zeros_like(x)] * m), *([torch.zeros_like(lam)] * m),
                torch.zeros_like(lam, dtype=torch.long)), 1

    def _combine(self, x, scale_x, scale_f, weights, values):
        """``scale_x x + scale_f sum_j weights[:, j] values[j]``, accumulated in at least
        float32."""
        acc = _acc_dtype(x)
        w = weights.to(acc)  # (k, B)
        total = bcast(w[0], x) * values[0].to(acc)
        for j in range(1, len(values)):
            total = torch.addcmul(total, bcast(w[j], x), values[j].to(acc))
        out = torch.addcmul(bcast(scale_x, x).to(acc) * x.to(acc), bcast(scale_f, x).to(acc),
                            total)
        return out.to(x.dtype)

    def step(self, dynamics, x, t, h, state, dw, ctx):
        process, denoise, to_t = unwrap_flow(dynamics)
        p, m = self.predictor_order, self.predictor_order - 1
        f0, lam_s = state[0], state[1]
        f_hist, lam_hist, count = state[2:2 + m], state[2 + m:2 + 2 * m], state[-1]
        t_next = to_t(t + h)
        a_s, b_s = process.marginal(to_t(t))
        a_t, b_t, lam_t = marginal_log_snr(process, t_next)
        lam_t = lam_t.to(lam_s.dtype)  # (the log-SNRs are kept in the weights' dtype)
        hh = lam_t - lam_s
        fixed = ctx.n_steps is not None
        last = fixed and ctx.index == ctx.n_steps - 1
        scale_x, scale_f = self._coefs(a_s, b_s, a_t, b_t)
        if fixed and ctx.index == 0 and self.start == "singlestep" and self._start_order() >= 2:
            return self._singlestep_start(process, denoise, x, state, hh, lam_s, lam_t, a_s, b_s,
                                          scale_x, scale_f, t_next, last)
        plan = getattr(ctx, "plan", None)
        values = [f0, *f_hist]
        if plan is not None:  # weights of a grid shared by the batch, computed up front
            i = ctx.index
            w = plan.predictor[:, i, None].expand(-1, x.shape[0])  # stride-0 rows: scalars
            wc = None if plan.corrector is None else plan.corrector[:, i, None].expand(
                -1, x.shape[0])
            scale_x, scale_f = plan.scale_x[i], plan.scale_f[i]
        else:
            past = [lam - lam_s for lam in lam_hist]  # (unused where there is no history)
            cap = p
            if self.lower_order_final and fixed:
                cap = max(1, min(p, ctx.n_steps - ctx.index))
            w, wc = self._weights(hh, past, torch.clamp(count + 1, max=cap), cap)
        x_pred = self._combine(x, scale_x, scale_f, w, values)
        correct = self.corrector and not (last and not self.final_corrector)
        if last and not correct:  # nothing needs the evaluation at the final point
            f_new, nfe = torch.zeros_like(x), 0
        else:
            f_new = self._field_value(denoise(x_pred, t_next), x_pred, a_t, b_t)
            nfe = 1
        x_new, error = x_pred, None
        if correct:
            x_new = self._combine(x, scale_x, scale_f, wc, [f_new, *values])
            error = x_new - x_pred
        new_state = self._push(state, f_new, lam_t, [f0], [lam_s], count + 1)
        if not ctx.keeps_still_rows:
            new_state = self._keep_where_still(state, new_state, hh)
        return Step(x_new, error, new_state, nfe)

    def _weights(self, hh, past, order_now, cap):
        """Predictor ``(p, B)`` and corrector ``(p + 1, B)`` (or None) weights of each row's
        order ``order_now`` (at most ``cap``), zero-padded: one masked Lagrange construction for
        all rows of every order, the corrector's systems (nodes ``h``, then the predictor's)
        stacked beside the predictor's along the batch. Where every row has the full order
        (known on the CPU from a free host read) the masks are left out."""
        if self._custom_weights():
            return self._weights_by_order(hh, past, order_now, cap)
        p = self.predictor_order
        moments = self.moments(hh, p + 1 if self.corrector else p)
        full = cap == p and host_reads_free(order_now) and bool((order_now >= p).all())
        used = None if full else torch.arange(p, device=hh.device)[:, None] < order_now
        past = torch.stack(past) if past else hh[:0, None].expand(0, hh.shape[0])
        nodes = torch.cat([torch.zeros_like(hh)[None], past])  # (p, B)
        # P(v) = v prod_{i >= 1} (v - v_i): the node 0 is a shift of the coefficients
        poly = torch.cat([torch.zeros_like(hh)[None],
                          _product_poly(past, None if used is None else used[1:])])

        def masked(value, fill):
            return value if used is None else torch.where(used, value, fill)

        def by_order(rule, m):
            if used is None:
                return rule(m, hh, p)
            return self._moments_by_order(rule, m, hh, order_now, cap)

        m_pred = by_order(self.predictor_moments, moments[:p])
        if not self.corrector:
            return masked_weights(nodes, used, m_pred, poly), None
        m_corr = by_order(self.corrector_moments, moments)
        # the corrector's nodes are h and the predictor's: L^c_j = L_j (v - h) / (v_j - h) and
        # L^c_h = P(v) / P(h), so its weights come from the same pass with shifted moments
        (n_pred, n_corr, n_shift), derivative, poly = _basis_integrals(
            nodes, used, [m_pred, m_corr, m_corr[1:]], poly)
        safe = masked(derivative, 1.0)
        node = torch.where(hh == 0, 1.0, hh)  # h = 0: zero moments, zero weights
        pred = masked(n_pred / safe, 0.0)
        corr = masked(torch.addcmul(n_shift, n_corr, -node) / (safe * (nodes - node)), 0.0)
        at_h = (poly * m_corr).sum(0) / masked(node - nodes, 1.0).prod(0)
        return pred, torch.cat([at_h[None], corr])

    @staticmethod
    def _moments_by_order(rule, moments, hh, order_now, cap):
        """``rule(moments, h, k)`` in the rows of order ``k`` (one ``where`` per order the rule
        changes)."""
        out = moments
        for k in range(1, cap + 1):
            changed = rule(moments, hh, k)
            if changed is not moments:
                out = torch.where(order_now == k, changed, out)
        return out

    def _custom_weights(self) -> bool:
        """A subclass with its own weights (e.g. iPNDM's fixed coefficients) takes them order by
        order."""
        cls = type(self)
        return (cls.predictor_weights is not Multistep.predictor_weights
                or cls.corrector_weights is not Multistep.corrector_weights)

    def _weights_by_order(self, hh, past, order_now, cap):
        p = self.predictor_order
        # distinct dummies for the nodes a row does not use
        past = [torch.where(order_now > j + 1, v, -10.0 * (j + 1)) for j, v in enumerate(past)]
        moments = self.moments(hh, cap + 1 if self.corrector else cap)

        def by_order(weights):  # (k or k + 1, B) per order, zero-padded to the top order
            stacked = torch.stack([torch.nn.functional.pad(weights(hh, past, k, moments).T,
                                                           (0, p - k))
                                   for k in range(1, cap + 1)])  # (cap, B, width)
            rows = torch.arange(hh.shape[0], device=hh.device)
            return stacked[order_now - 1, rows].T

        pred = by_order(self.predictor_weights)
        corr = by_order(self.corrector_weights) if self.corrector else None
        return pred, corr

    def prepare(self, dynamics, grid: torch.Tensor) -> _Plan | None:
        """Weights of every step of a grid shared by the whole batch (``grid``: ``(n + 1,)`` in
        the integration variable), to pass as ``StepContext.plan``: the steps then only combine
        stored values. None where the per-row path is needed (a repeated time, or the single-step
        start). One host check, here, not in the steps."""
        if self.start == "singlestep" and self._start_order() >= 2:
            return None
        process, _, to_t = unwrap_flow(dynamics)
        wd = _weight_dtype(grid)
        a, b, lam = marginal_log_snr(process, to_t(grid))
        lam_w = lam.to(wd)
        hh = lam_w[1:] - lam_w[:-1]
        if not bool((hh != 0).all()):
            return None
        n, p = hh.shape[0], self.predictor_order
        idx = torch.arange(n, device=grid.device)
        past = [torch.where(idx > j, lam_w[(idx - 1 - j).clamp(min=0)] - lam_w[:-1],
                            torch.full_like(hh, -10.0 * (j + 1))) for j in range(p - 1)]
        order_now = torch.clamp(idx + 1, max=p)
        if self.lower_order_final:
            order_now = torch.minimum(order_now, (n - idx).clamp(min=1))
        pred, corr = self._weights(hh, past, order_now, p)
        scale_x, scale_f = self._coefs(a[:-1], b[:-1], a[1:], b[1:])
        return _Plan(pred, corr, scale_x, scale_f)

    def _push(self, state, f_new, lam_new, fs, lams, count):
        """State with ``f_new`` current and ``fs`` (newest first) prepended to the history."""
        m = self.predictor_order - 1
        f_hist, lam_hist = list(state[2:2 + m]), list(state[2 + m:2 + 2 * m])
        f_hist = (list(fs) + f_hist)[:m]
        lam_hist = (list(lams) + lam_hist)[:m]
        return (f_new, lam_new, *f_hist, *lam_hist, count)

    @staticmethod
    def _keep_where_still(old, new, hh):
        """Rows with a zero-length step keep their state (no repeated node in the history)."""
        return where_rows(hh == 0, old, new)

    def _singlestep_start(self, process, denoise, x, state, hh, lam_s, lam_t, a_s, b_s,
                          scale_x, scale_f, t_next, last):
        """First step by a single-step DPM-Solver of order ``min(order - 1, 3)``; the stage
        evaluations join the history (their nodes are fractions of the step)."""
        fracs, node_sets = _STARTS[self._start_order()]
        f0, count = state[0], state[-1]
        values, lams, nfe = [f0], [lam_s], 0
        hn = torch.where(hh == 0, torch.ones_like(hh), hh)  # node spacing (h = 0: zero weights)
        for c, nodes in zip(fracs[1:], node_sets[:-1]):
            lam_c = lam_s + c * (lam_t - lam_s)
            t_c = process.t_of_sigma(torch.exp(-lam_c.to(t_next.dtype)))
            a_c, b_c, _ = marginal_log_snr(process, t_c)
            w = _weights_of([fracs[i] * hn for i in nodes], self.moments(c * hh, len(nodes)))
            sx, sf = self._coefs(a_s, b_s, a_c, b_c)
            x_c = self._combine(x, sx, sf, w, [values[i] for i in nodes])
            values.append(self._field_value(denoise(x_c, t_c), x_c, a_c, b_c))
            lams.append(lam_c)
            nfe += 1
        final = node_sets[-1]
        w = _weights_of([fracs[i] * hn for i in final], self.moments(hh, len(final)))
        x_new = self._combine(x, scale_x, scale_f, w, [values[i] for i in final])
        if last:
            f_new = torch.zeros_like(x)
        else:
            a_t, b_t, _ = marginal_log_snr(process, t_next)
            f_new = self._field_value(denoise(x_new, t_next), x_new, a_t, b_t)
            nfe += 1
        # the history keeps the last stage and the start (the earlier stages are less accurate:
        # reusing the Euler stage of 3S would cap the order at 3)
        new_state = self._push(state, f_new, lam_t, [values[-1], values[0]], [lams[-1], lams[0]],
                               count + 2)
        return Step(x_new, None, self._keep_where_still(state, new_state, hh), nfe)


class DPMSolver(Multistep):
    """Multistep DPM-Solver++ (data prediction) of ``order`` 1-4; 1 NFE per step.

    ``variant``: ``"midpoint"`` (the published 2M and 3M of the reference code, diffusers and
    k-diffusion; orders 1-3) or ``"heun"`` (the exact integral of the interpolating polynomial:
    order ``order``; diffusers' ``solver_type="heun"`` at order 2). Default: ``"midpoint"`` for
    order 2 without corrector (2M as published), else ``"heun"`` (the reference's 3M is formally
    of order 2; see the module doc). ``corrector=True`` adds the free UniC corrector
    (exact moments): order ``order + 1`` and an embedded error estimate (usable with a controller);
    on a fixed grid it is applied after the last step too (one more evaluation; :class:`UniPC`
    skips it). ``start``, ``lower_order_final``: see :mod:`difsolve.solvers.exponential`.
    """

    final_corrector = True

    def __init__(self, order: int = 2, variant: str | None = None, corrector: bool = False, *,
                 start: str = "multistep", lower_order_final: bool = False):
        super().__init__(order, corrector, start, lower_order_final, (1, 2, 3, 4))
        if variant is None:
            variant = "midpoint" if order == 2 and not corrector else "heun"
        variant = check_choice(variant, ("midpoint", "heun"), "variant")
        check(variant == "heun" or order <= 3, "variant",
              "'heun' for order 4 (no published midpoint form)", variant)
        self.variant = variant

    def predictor_moments(self, moments, h, k):
        if self.variant != "midpoint" or k < 2:
            return moments
        if k == 2:
            return _replace(moments, 1, h * moments[0] / 2)
        return _replace(moments, 2, moments[2] / 2)  # k == 3: the reference's 3M


class UniPC(Multistep):
    """UniPC (Zhao et al. 2023): UniP-``order`` predictor and the free UniC corrector, data form.

    Order ``order + 1`` with one evaluation per step; ``bh`` is ``"bh1"`` (``B(h) = h``) or
    ``"bh2"`` (``B(h) = e^h - 1``). On a fixed grid the corrector is skipped after the last step;
    under a controller ``corrected - predicted`` is the embedded error estimate. Orders 1-6.
    """

    def __init__(self, order: int = 2, bh: str = "bh2", *, start: str = "multistep",
                 lower_order_final: bool = False):
        super().__init__(order, True, start, lower_order_final, (1, 2, 3, 4, 5, 6))
        check(bh in ("bh1", "bh2"), "bh", "'bh1' or 'bh2'", bh)
        self.bh = bh

    def _b_rule(self, moments, h):
        b = h if self.bh == "bh1" else moments[0]
        return _replace(moments, 1, h * b / 2)

    def predictor_moments(self, moments, h, k):
        return self._b_rule(moments, h) if k == 2 else moments

    def corrector_moments(self, moments, h, k):
        return self._b_rule(moments, h) if k == 1 else moments


class DEIS(Multistep):
    """DEIS tAB (Zhang & Chen 2023) as in diffusers' ``DEISMultistepScheduler``: the noise
    prediction interpolated in ``log sigma`` and integrated exactly; order ``order`` (1-3),
    1 NFE per step."""

    form = "noise"

    def __init__(self, order: int = 3, *, start: str = "multistep",
                 lower_order_final: bool = False):
        super().__init__(order, False, start, lower_order_final, (1, 2, 3))


class IPNDM(Multistep):
    """Improved PNDM (Zhang & Chen 2023; Zhou et al. 2024): Adams-Bashforth on
    ``d(x/a)/dsigma = eps`` with the fixed-step coefficients (``order`` 1-4; 3/2, -1/2;
    23/12, -16/12, 5/12; 55/24, -59/24, 37/24, -9/24) and the lower orders as warm start;
    1 NFE per step. Second order on smooth grids; the published sampler of AMED uses order 4."""

    form = "noise"

    def __init__(self, order: int = 4, *, lower_order_final: bool = False):
        super().__init__(order, False, "multistep", lower_order_final, (1, 2, 3, 4))

    def predictor_weights(self, h, past, k, moments):
        unit = _constant(tuple(1.0 / (m + 1) for m in range(k)), h)
        scaled = moments[:1] * unit[:, None]  # (e^h - 1) int_0^1 u^m du
        return _weights_of([-float(j) for j in range(k)], scaled)
