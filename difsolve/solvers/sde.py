r"""SDE solvers for additive (and, for Euler-Maruyama, diagonal) noise, plus EDM's churn sampler.

Each step receives the Brownian increment ``dw`` over ``[t, t + h]`` (variance ``|h|``), so the
same code integrates forward SDEs and reverse-time SDEs (``h < 0``).

References: Kloeden & Platen, *Numerical Solution of SDEs* (1992), sections 10.2 and 15.1;
Jolicoeur-Martineau et al., *Gotta Go Fast When Generating Data with Score-Based Models* (2021);
Karras et al., *Elucidating the Design Space of Diffusion-Based Generative Models* (2022), Alg. 2.
"""

from __future__ import annotations

import math

import torch

from .._errors import (
    IncompatibleError,
    check,
    check_positive,
    check_real,
)
from .._tensor import bcast
from .base import Solver, Step, StepContext, diffusion_term

__all__ = ["EDMStochasticHeun", "EulerMaruyama", "StochasticHeun"]


class EulerMaruyama(Solver):
    """Euler-Maruyama ``x + f(x, t) h + g dw``. 1 stage; strong order 1 for additive noise (0.5
    for general diagonal noise), weak order 1."""

    strong_order = 1.0
    strong_order_diagonal = 0.5
    weak_order = 1.0
    stages = 1
    stochastic = True
    sde = True
    noise_types = ("additive", "diagonal")

    def prepare(self, dynamics, grid):
        """Additive noise on a grid shared by the batch: ``g`` at every grid time, in one call."""
        if getattr(dynamics, "noise", "additive") != "additive":
            return None
        g = dynamics.diffusion(grid)
        return g if g.ndim == 1 and g.shape[0] == grid.shape[0] else None

    def step(self, dynamics, x, t, h, state, dw, ctx):
        return Step(self._update(dynamics, x, t, h, dw, ctx, ctx.index), None, (), 1)

    def advance(self, dynamics, x, state, times, steps, ctx, start, stop, dw=None):
        if stop - start != 1:  # (one increment per step: the loop passes one step at a time)
            return super().advance(dynamics, x, state, times, steps, ctx, start, stop, dw)
        x_new = self._update(dynamics, x, times[start], steps[start], dw, ctx, start)
        return (x_new if x_new.dtype == x.dtype else x_new.to(x.dtype)), state, 1

    @staticmethod
    def _update(dynamics, x, t, h, dw, ctx, index: int):
        """``x + f(x, t) h + g dw`` (``g`` from the shared grid's plan at step ``index`` where
        there is one): two fused addcmul."""
        g = ctx.plan[index] if ctx.plan is not None else diffusion_term(dynamics, x, t)
        return torch.addcmul(torch.addcmul(x, bcast(h, x), dynamics.drift(x, t)), g, dw)


class StochasticHeun(Solver):
    r"""Euler-Maruyama predictor with an improved-Euler corrector sharing one increment.

    ``K1 = h f(x, t) + g(t) dw``, ``x' = x + K1``, ``K2 = h f(x', t + h) + g(t + h) dw``,
    ``x'' = x + (K1 + K2)/2``; the embedded error is ``x'' - x'``. 2 stages. For additive noise
    it has strong order 1 and weak order 2 (Kloeden & Platen 15.1); with a controller it is the
    adaptive "Gotta Go Fast" sampler of Jolicoeur-Martineau et al. (2021).
    """

    strong_order = 1.0
    weak_order = 2.0
    stages = 2
    adaptive = True
    stochastic = True
    sde = True
    noise_types = ("additive",)

    def step(self, dynamics, x, t, h, state, dw, ctx):
        hb = bcast(h, x)
        k1 = hb * dynamics.drift(x, t) + diffusion_term(dynamics, x, t) * dw
        x_em = x + k1
        k2 = hb * dynamics.drift(x_em, t + h) + diffusion_term(dynamics, x_em, t + h) * dw
        x_new = x + 0.5 * (k1 + k2)
        return Step(x_new, x_new - x_em, (), 2)


class EDMStochasticHeun(Solver):
    r"""EDM's stochastic sampler (Karras et al. 2022, Algorithm 2) on the probability-flow ODE of
    any process, in EDM's coordinates ``y = x/a`` and ``sigma = b/a``.

    At each step with noise level ``sigma`` in ``[s_tmin, s_tmax]``: ``gamma = min(churn/N,
    sqrt(2) - 1)``, ``sigma_hat = sigma (1 + gamma)``, ``y_hat = y + sqrt(sigma_hat^2 - sigma^2)
    s_noise z``; then a Heun step of ``dy/dsigma`` from ``sigma_hat`` to the next level (Euler when
    the next level is ``sigma = 0``), ``dy/dsigma = (drift(x, t) - f(t) x) / (a dsigma/dt)``
    (``= (y - D)/sigma`` for a probability-flow ODE). For ``a = 1`` and ``sigma = t`` (EDM) this is
    Algorithm 2 verbatim; on VP, sub-VP, VE or Poisson it is the same algorithm after the change of
    variables, so a VP run equals the EDM run of ``y`` on the same noise levels. With ``churn=0``
    it is Algorithm 1 (deterministic Heun in sigma, NFE ``2N - 1`` when the grid ends at 0).
    2 stages; order 2 when ``churn = 0``; needs a fixed grid when ``churn > 0``. Its noise ``z``
    comes from the solve's generator. ``time_variables = ("t",)``: the grid is given in the
    process time and the arithmetic is in sigma.
    """

    order = 2
    stages = 2
    stochastic = True
    native_time = True
    time_variables = ("t",)

    def __init__(self, churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
                 s_noise: float = 1.0):
        self.churn = check_positive(churn, "churn", allow_zero=True)
        self.s_tmin = check_positive(s_tmin, "s_tmin", allow_zero=True)
        s_tmax = check_real(s_tmax, "s_tmax", finite=False)
        check(s_tmax > self.s_tmin, "s_tmax", f"greater than s_tmin={s_tmin}", s_tmax)
        self.s_tmax = s_tmax
        self.s_noise = check_positive(s_noise, "s_noise", allow_zero=True)

    def check_dynamics(self, dynamics) -> None:
        super().check_dynamics(dynamics)
        process = getattr(dynamics, "process", None)
        if process is None:
            raise IncompatibleError(
                "argument `solver`: EDMStochasticHeun needs a ProbabilityFlowODE (dynamics with a "
                "`process`)")
        if self.churn > 0 and not getattr(getattr(dynamics, "field", None), "exact_score", True):
            raise IncompatibleError(
                "argument `solver`: EDMStochasticHeun with churn > 0 injects Gaussian noise, "
                "which needs an exact score field; this field has exact_score=False")

    @staticmethod
    def _dy_dsigma(dynamics, process, x, t, a):
        """``dy/dsigma`` of ``y = x/a`` along the ODE: ``(drift - f x) / (a dsigma/dt)``."""
        # for EDM (a = 1, f = 0, dsigma/dt = 1) this is the drift itself, bit for bit
        f = process.drift_coef(t)
        return (dynamics.drift(x, t) - bcast(f, x) * x) / bcast(a * process.dsigma_dt(t), x)

    def step(self, dynamics, x, t, h, state, dw, ctx: StepContext):
        process = dynamics.process
        t_next = t + h
        a, b = process.marginal(t)
        sigma = b / a
        y = x / bcast(a, x)
        if self.churn > 0:
            if ctx.n_steps is None:
                raise IncompatibleError(
                    "argument `solver`: EDMStochasticHeun with churn > 0 needs a fixed grid")
            gamma = min(self.churn / ctx.n_steps, math.sqrt(2.0) - 1.0)
            inside = (sigma >= self.s_tmin) & (sigma <= self.s_tmax)
            sigma_hat = torch.where(inside, sigma * (1.0 + gamma), sigma)
            t = torch.where(inside, process.t_of_sigma(sigma_hat), t)
            noise = (sigma_hat.square() - sigma.square()).clamp(min=0).sqrt() * self.s_noise
            y = y + bcast(noise, x) * ctx.randn_like(x)
            sigma = sigma_hat
            a = process.marginal(t)[0]
        a_next, b_next = process.marginal(t_next)
        sigma_next = b_next / a_next
        ds_ = bcast(sigma_next - sigma, x)
        d1 = self._dy_dsigma(dynamics, process, bcast(a, x) * y, t, a)
        y_euler = y + ds_ * d1
        last = ctx.final_sigma_zero and ctx.n_steps is not None and ctx.index == ctx.n_steps - 1
        if last:
            return Step(bcast(a_next, x) * y_euler, None, (), 1)
        d2 = self._dy_dsigma(dynamics, process, bcast(a_next, x) * y_euler, t_next, a_next)
        return Step(bcast(a_next, x) * (y + 0.5 * ds_ * (d1 + d2)), None, (), 2)
