r"""Stochastic exponential integrators in data-prediction form: DPM-Solver++ SDE (1, 2M, 3M),
SA-Solver (stochastic Adams predictor-corrector), DDIM with ``eta`` and ancestral Euler.

Every process ``x_t = a x0 + b z`` is handled through ``y = x/a``, ``sigma = b/a`` and
``lambda = -log sigma``. With the data prediction ``D(lambda)`` (the field's Tweedie ``x0``), the
family of reverse SDEs with the data marginals, indexed by ``eta >= 0``, reads in ``lambda`` time

``dy = -(1 + eta) (y - D) dlambda + sqrt(2 eta) sigma dW_lambda``

(``eta = 0``: the probability-flow ODE; ``eta = 1``: the reverse SDE of Anderson / Song et al.,
i.e. drift ``f x - (1 + eta)/2 g^2 s`` and diffusion ``sqrt(eta) g`` in ``t``). Its exact solution
over ``h = lambda_t - lambda_s`` (variation of constants) is, in ``x``,

``x_t = (b_t/b_s) e^{-eta h} x_s + a_t int_0^h (1+eta) e^{-(1+eta)(h-v)} D(lambda_s+v) dv
+ b_t sqrt(1 - e^{-2 eta h}) xi``,  ``xi ~ N(0, I)``:

the linear part and its Ornstein-Uhlenbeck noise are exact; only ``D`` is approximated. A
``k``-step method interpolates ``D`` through its last ``k`` values (nodes ``v/h = 0, -r_1, ...``)
and integrates the polynomial exactly: with ``H = (1 + eta) h`` the weights are built from the
moments ``m_j(H) = int_0^H e^{-(H-w)} (w/H)^j dw`` (a ``k x k`` Vandermonde solve per sample).
This one construction gives DPM-Solver++(1) SDE (= DDIM with eta = 1), 2M SDE, 3M SDE and the
SA-Solver predictor; the SA-Solver corrector adds the value at the predicted point as one more
node (same noise ``xi``).

Noise: ``xi`` is ``dw / sqrt|dt|`` of the Brownian increment the solve loop passes to the step
(one standard normal per element and step), so per-sample seeds and Brownian paths drive these
methods like any other SDE solver. Every method here needs one normal per step only.

Orders: on the SDE of their own ``eta`` (for ``eta = 1`` the reverse SDE) all of them converge
with strong order 1 for additive noise (one normal per step cannot resolve the stochastic
integrals beyond the leading term); weak orders are declared per class (measured on Gaussian data
by exact propagation of the scheme's mean and covariance in tests/test_stochastic.py).

References: Lu et al., *DPM-Solver++* (2022), section 5 and appendix (SDE variant); k-diffusion
``sample_dpmpp_2m_sde`` / ``sample_dpmpp_3m_sde``; diffusers ``DPMSolverMultistepScheduler``
``algorithm_type="sde-dpmsolver++"``; Xue et al., *SA-Solver: Stochastic Adams Solver for Fast
Sampling of Diffusion Models* (NeurIPS 2023); Song, Meng & Ermon, *DDIM* (2021), eq. 12; Ho et
al., *DDPM* (2020); Karras et al. (2022) / k-diffusion ``sample_euler_ancestral``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._errors import (
    ArgumentTypeError,
    check,
    check_choice,
    check_int,
    check_positive,
)
from .._tensor import bcast
from .base import Solver, Step
from .exponential import (
    check_data_prediction,
    marginal_log_snr,
    masked_weights,
    unit_moments,
    unwrap_flow,
)

__all__ = ["DDIM", "DPMSolverSDE", "EulerAncestral", "SASolver"]

def _standard_normal(dw: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``dw / sqrt|h|``: the increment over the step as standard normals (0 where ``h = 0``)."""
    span = h.abs()
    safe = torch.where(span > 0, span, torch.ones_like(span))
    return dw / bcast(safe.sqrt(), dw)


class _DataPredictionSDE(Solver):
    """Shared checks of the stochastic data-prediction solvers (they need ``denoise``)."""

    stages = 1
    stochastic = True
    sde = True
    native_time = True
    noise_types = ("additive",)
    time_variables = ("t", "log_sigma")

    def check_dynamics(self, dynamics) -> None:
        super().check_dynamics(dynamics)
        check_data_prediction(dynamics, self, "a ReverseSDE of a score field")


def _check_eta(eta: float, name: str = "eta") -> float:
    return check_positive(eta, name, allow_zero=True)


class _ExponentialMultistep(_DataPredictionSDE):
    r"""The engine: ``p``-step exponential predictor, optional ``c``-point corrector, rate ``eta``.

    State: ``(D_0, lambda_0, D_1..D_{L-1}, lambda_1..lambda_{L-1}, count)`` with ``D_0`` the data
    prediction at the current point. One field evaluation per step (the data prediction at the
    new point, which the corrector also uses); none on the last step of a fixed grid (nothing
    needs it; ``sample(denoise=True)`` evaluates it once).
    """

    def __init__(self, predictor_order: int, corrector_order: int, eta: float, variant: str,
                 eta_range: tuple[float, float] | None, range_name: str = "eta_range"):
        self.predictor_order = predictor_order
        self.corrector_order = corrector_order
        self.eta = eta
        self.variant = variant
        self.eta_range = None if eta_range is None else _check_range(eta_range, range_name)
        self._history = max(predictor_order, corrector_order - 1)

    # --- weights --------------------------------------------------------------------------
    def _predictor_moments(self, m: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Moments ``(p, B)`` of each row's predictor (of order ``order``): the ``"reference"``
        variant reproduces the published formulas at the full order, 2M midpoint
        (``m_1 -> m_0/2``) and DPM-Solver's 3M (``m_2 -> m_2/2``)."""
        p = self.predictor_order
        if self.variant != "reference" or p not in (2, 3):
            return m
        j = p - 1
        changed = torch.cat([m[:j], (0.5 * m[0] if p == 2 else 0.5 * m[2])[None], m[j + 1:]])
        return torch.where(order == p, changed, m)

    def _eta(self, process, t: torch.Tensor) -> torch.Tensor:
        eta = torch.full_like(t, self.eta)
        if self.eta_range is None:
            return eta
        sigma = process.sigma(t)
        inside = (sigma >= self.eta_range[0]) & (sigma <= self.eta_range[1])
        return torch.where(inside, eta, torch.zeros_like(eta))

    # --- stepping -------------------------------------------------------------------------
    def init(self, dynamics, x, t, ctx):
        process, denoise, to_t = unwrap_flow(dynamics)
        t = to_t(t)
        lam = marginal_log_snr(process, t)[2]
        hist = self._history - 1
        return (denoise(x, t), lam, *([torch.zeros_like(x)] * hist),
                *([torch.zeros_like(lam)] * hist), torch.zeros_like(lam)), 1

    def _coefficients(self, process, t_s, t_next, lam_hist, count):
        """Per-row coefficients of a step from ``t_s`` to ``t_next`` (``(N,)`` each, ``count``
        steps done before it, ``lam_hist`` the older log-SNRs, newest first): predictor weights
        ``(N, p)``, corrector weights ``(N, c)`` (None without a corrector), the factor of ``x``,
        the noise standard deviation and ``a_t``; weights in float64 (float32 on MPS)."""
        p, c = self.predictor_order, self.corrector_order
        _, b_s, lam_s = marginal_log_snr(process, t_s)
        a_t, b_t, lam_t = marginal_log_snr(process, t_next)
        eta = self._eta(process, t_s)
        w64 = torch.float64 if t_s.device.type != "mps" else t_s.dtype
        hl = (lam_t - lam_s).to(w64)
        H = (1.0 + eta.to(w64)) * hl
        safe_h = torch.where(hl == 0, torch.ones_like(hl), hl)
        # nodes in units of h, one masked Lagrange pass for the rows of every order (the nodes a
        # row's history does not have yet are not used)
        past = [(lam.to(w64) - lam_s.to(w64)) / safe_h for lam in lam_hist]
        moments = unit_moments(H, max(p, c))
        order = torch.clamp(count + 1, max=p)
        nodes = torch.stack([torch.zeros_like(hl), *past])[:p]
        used = torch.arange(p, device=hl.device)[:, None] < order
        w_pred = masked_weights(nodes, used, self._predictor_moments(moments[:p], order)).T
        w_corr = None
        if c:  # the corrector's nodes: the predicted point (v = 1), then the predictor's
            nodes_c = torch.stack([torch.ones_like(hl), torch.zeros_like(hl), *past])[:c]
            used_c = torch.arange(c, device=hl.device)[:, None] < torch.clamp(count + 2, max=c)
            w_corr = masked_weights(nodes_c, used_c, moments[:c]).T
        decay = torch.exp(-eta * (lam_t - lam_s))
        noise_std = b_t * (-torch.expm1(-2.0 * eta * (lam_t - lam_s))).clamp(min=0).sqrt()
        return w_pred, w_corr, b_t / b_s * decay, noise_std, a_t

    def prepare(self, dynamics, grid: torch.Tensor) -> _StepPlan:
        """Coefficients of every step of a grid shared by the batch (``grid``: ``(n + 1,)`` in
        the integration variable), computed once for the ``n`` steps instead of per row and
        step; :meth:`step` then only combines stored values (same numbers as the per-row path:
        the history a step sees on a shared grid is the grid itself)."""
        process, _, to_t = unwrap_flow(dynamics)
        t = to_t(grid)
        lam = marginal_log_snr(process, t)[2]
        n = t.shape[0] - 1
        idx = torch.arange(n, device=t.device)
        lam_hist = [lam[(idx - 1 - j).clamp(min=0)] for j in range(self._history - 1)]
        count = idx.to(lam.dtype)
        return _StepPlan(*self._coefficients(process, t[:-1], t[1:], lam_hist, count))

    def step(self, dynamics, x, t, h, state, dw, ctx):
        process, denoise, to_t = unwrap_flow(dynamics)
        L = self._history
        d0, lam_s = state[0], state[1]
        d_hist, lam_hist, count = state[2:1 + L], state[1 + L:2 * L], state[-1]
        t_s, t_next = to_t(t), to_t(t + h)
        lam_t = marginal_log_snr(process, t_next)[2]
        plan = getattr(ctx, "plan", None)
        if isinstance(plan, _StepPlan):  # a grid shared by the batch: one row of the plan
            i = ctx.index
            w_pred, w_corr = plan.w_pred[i].to(x.dtype), plan.w_corr
            w_corr = None if w_corr is None else w_corr[i].to(x.dtype)
            scale_x, noise_std, a_t = plan.scale_x[i], plan.noise_std[i], plan.a_t[i]

            def coef(v, vals):  # 0-d coefficients broadcast against x
                return v
        else:
            w_pred, w_corr, scale_x, noise_std, a_t = self._coefficients(
                process, t_s, t_next, lam_hist, count)
            w_pred = w_pred.to(x.dtype)
            w_corr = None if w_corr is None else w_corr.to(x.dtype)

            def coef(v, vals):
                return bcast(v, vals)
        values = [d0, *d_hist]

        def combine(w, vals):
            cols = w.shape[-1]
            total = coef(w[..., 0], x) * vals[0]
            for j in range(1, min(len(vals), cols)):
                total = total + coef(w[..., j], x) * vals[j]
            return total

        base = coef(scale_x, x) * x + coef(noise_std, x) * _standard_normal(dw, h)
        x_pred = base + coef(a_t, x) * combine(w_pred, values)
        last = ctx.n_steps is not None and ctx.index == ctx.n_steps - 1
        if last:  # the final point of a fixed grid: no corrector, nothing needs D there
            return Step(x_pred, None, state, 0)
        d_new = denoise(x_pred, t_next)
        x_new = x_pred
        if w_corr is not None:
            x_new = base + coef(a_t, x) * combine(w_corr, [d_new, *values])
        new_state = (d_new, lam_t, d0, *d_hist[:-1], lam_s, *lam_hist[:-1], count + 1) \
            if L > 1 else (d_new, lam_t, count + 1)
        return Step(x_new, None, new_state, 1)


@dataclass(frozen=True)
class _StepPlan:
    """Per-step coefficients of a shared grid: weights ``(n, p)`` / ``(n, c)``, ``(n,)``
    factors of ``x``, noise standard deviations and ``a_t``."""

    w_pred: torch.Tensor
    w_corr: torch.Tensor | None
    scale_x: torch.Tensor
    noise_std: torch.Tensor
    a_t: torch.Tensor


class DPMSolverSDE(_ExponentialMultistep):
    r"""DPM-Solver++(1/2M/3M) SDE: multistep exponential integrator of the ``eta``-SDE.

    ``x_t = (b_t/b_s) e^{-eta h} x_s + a_t sum_j w_j D_j + b_t sqrt(1 - e^{-2 eta h}) xi`` (module
    docstring), ``order`` history values of ``D``; 1 field evaluation per step; the first steps
    use the orders the history allows.

    ``variant="reference"`` (default) is the published formula of k-diffusion
    ``sample_dpmpp_2m_sde`` (``solver_type="midpoint"``) / ``sample_dpmpp_3m_sde`` and diffusers
    ``sde-dpmsolver++``: 2M replaces ``m_1`` by ``m_0/2``; 3M (DPM-Solver's multistep third-order
    update) weights the curvature term by half its exact quadrature (``-phi_3`` against
    ``-2 phi_3``). ``variant="exact"`` integrates the interpolating polynomial exactly (for 2M it is
    k-diffusion's ``solver_type="heun"``).

    ``eta_range = (sigma_lo, sigma_hi)`` injects noise only on the steps that start at
    ``sigma_lo <= sigma <= sigma_hi`` (ODE steps elsewhere). Switching it off below the data's
    finest scale (e.g. ``(0.05, sigma_max)``, EDM's ``S_tmin``) removes the first-order noise bias
    of the widths there while keeping the noise that commits samples to modes
    (docs/stochastic.md).

    Orders (eta > 0): strong 1; weak 1 for order 1 (with ``eta = 1`` it is DDIM with ``eta = 1``,
    i.e. DDPM ancestral sampling), and for 2M / 3M weak order 2 on Gaussian data (measured, see
    tests). ``eta = 0`` is the deterministic DPM-Solver++ of the same order (ODE order 1, 2, 3 for
    the exact variant; the reference 3M has ODE order 2). Noise law: one ``N(0, I)`` per step,
    ``xi = dw / sqrt|dt|``.
    """

    strong_order = 1.0
    weak_order = 2.0  # of 2M / 3M; an order-1 instance has weak_order 1

    def __init__(self, order: int = 2, eta: float = 1.0, variant: str = "reference",
                 eta_range: tuple[float, float] | None = None):
        check(check_int(order, "order") in (1, 2, 3), "order", "1, 2 or 3", order)
        variant = check_choice(variant, ("reference", "exact"), "variant")
        super().__init__(order, 0, _check_eta(eta), variant, eta_range)
        # ODE order (eta = 0); the published 3M halves the curvature term: order 2
        self.order = 2 if (order == 3 and variant == "reference") else order
        if order == 1:
            self.weak_order = 1.0


class SASolver(_ExponentialMultistep):
    r"""SA-Solver (Xue et al. 2023): stochastic Adams predictor-corrector in data-prediction form.

    Predictor: the ``predictor_order``-step exponential Adams-Bashforth formula of the module
    docstring with ``eta = tau^2`` (exact quadrature of the Lagrange interpolant); corrector
    (``corrector_order`` points, 0 to disable): the same formula with the data prediction at the
    predicted point as an extra node ``v = h`` (Adams-Moulton type) and the same noise ``xi``. The
    evaluation at the predicted point is reused by the next step, so it costs 1 field evaluation
    per step (the last step of a fixed grid skips the corrector, as UniPC does). ``tau_range =
    (sigma_lo, sigma_hi)`` injects noise only where ``sigma_lo <= sigma <= sigma_hi`` (ODE steps
    elsewhere; the paper and diffusers use such a window). A window at high noise (``tau = 1`` from
    well above the data's scale up to ``sigma_max``) removes the bias that starting from
    ``N(0, sigma_max^2 I)`` instead of the exact marginal leaves in the result: the reverse SDE
    contracts the start's offset like ``(sigma / sigma_max)^eta``, the ODE keeps it
    (docs/stochastic.md).

    Orders: strong 1 (eta > 0); weak order 2 on Gaussian data with the corrector (measured); with
    ``tau = 0`` it is a deterministic predictor-corrector of order ``corrector_order`` (the
    predictor alone: ``predictor_order``). Noise law: one ``N(0, I)`` per step, ``xi = dw /
    sqrt|dt|``, shared by predictor and corrector.
    """

    strong_order = 1.0
    weak_order = 2.0

    def __init__(self, predictor_order: int = 3, corrector_order: int = 3, tau: float = 1.0,
                 tau_range: tuple[float, float] | None = None):
        predictor_order = check_int(predictor_order, "predictor_order")
        corrector_order = check_int(corrector_order, "corrector_order", minimum=0)
        check(predictor_order in (1, 2, 3, 4), "predictor_order", "1, 2, 3 or 4",
              predictor_order)
        check(corrector_order in (0, 2, 3, 4), "corrector_order", "0, 2, 3 or 4",
              corrector_order)
        self.tau = check_positive(tau, "tau", allow_zero=True)
        super().__init__(predictor_order, corrector_order, self.tau**2, "exact", tau_range,
                         "tau_range")
        self.order = max(predictor_order, corrector_order)


class DDIM(_DataPredictionSDE):
    r"""DDIM with ``eta`` (Song et al. 2021, eq. 12), on every process through ``y = x/a``.

    ``sigma_up = min(sigma', eta sigma' sqrt(1 - sigma'^2/sigma^2))``, ``sigma_down =
    sqrt(sigma'^2 - sigma_up^2)`` and ``y' = D + (sigma_down/sigma)(y - D) + sigma_up xi``,
    ``x' = a' y'`` (``D`` the data prediction at ``x``). In ``y`` this is exactly k-diffusion's
    ``sample_euler_ancestral`` (an Euler step of ``dy/dsigma = (y - D)/sigma`` to ``sigma_down``
    plus noise): DDIM(eta) and "Euler a" are one method. ``eta = 1`` is DDPM ancestral sampling and
    equals DPM-Solver++(1) SDE; ``eta = 0`` is deterministic DDIM; in the small-step limit
    DDIM(eta) integrates the ``eta^2``-SDE of :mod:`difsolve.solvers.stochastic`.

    1 field evaluation per step; strong order 1 and weak order 1 (eta > 0). Noise law: one
    ``N(0, I)`` per step, ``xi = dw / sqrt|dt|``.
    """

    strong_order = 1.0
    weak_order = 1.0
    order = 1

    def __init__(self, eta: float = 1.0):
        self.eta = _check_eta(eta)

    def step(self, dynamics, x, t, h, state, dw, ctx):
        process, denoise, to_t = unwrap_flow(dynamics)
        t_s, t_next = to_t(t), to_t(t + h)
        a_s, b_s = process.marginal(t_s)
        a_t, b_t = process.marginal(t_next)
        s, s_next = b_s / a_s, b_t / a_t
        ratio = (s_next / s).clamp(max=1.0)
        up = torch.minimum(s_next, self.eta * s_next * (1.0 - ratio.square()).clamp(min=0).sqrt())
        down = (s_next.square() - up.square()).clamp(min=0).sqrt()
        d = denoise(x, t_s)
        y = d + bcast(down / s, x) * (x / bcast(a_s, x) - d) + bcast(up, x) * \
            _standard_normal(dw, h)
        return Step(bcast(a_t, x) * y, None, (), 1)


class EulerAncestral(DDIM):
    """Ancestral Euler ("Euler a", k-diffusion ``sample_euler_ancestral``) with ``eta``: the same
    method as :class:`DDIM` (see there); 1 field evaluation per step, strong and weak order 1."""


def _check_range(value, name: str) -> tuple[float, float]:
    """A noise window ``(sigma_lo, sigma_hi)`` with ``0 <= sigma_lo < sigma_hi``."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") or (
            isinstance(value, torch.Tensor) and value.ndim == 0):
        raise ArgumentTypeError(
            f"argument `{name}` must be a pair (sigma_lo, sigma_hi), got {value!r}")
    values = list(value)
    check(len(values) == 2, name, "a pair (sigma_lo, sigma_hi)", value)
    lo, hi = (check_positive(v, name, allow_zero=True) if not (
        isinstance(v, float) and v == float("inf")) else v for v in values)
    check(hi > lo, name, "(sigma_lo, sigma_hi) with sigma_hi > sigma_lo", value)
    return float(lo), float(hi)
