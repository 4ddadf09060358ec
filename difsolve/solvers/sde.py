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

from .._errors import IncompatibleError, check, check_positive
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

    def step(self, dynamics, x, t, h, state, dw, ctx):
        x_new = x + bcast(h, x) * dynamics.drift(x, t) + diffusion_term(dynamics, x, t) * dw
        return Step(x_new, None, (), 1)


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
    r"""EDM's stochastic sampler (Karras et al. 2022, Algorithm 2) on the probability-flow ODE.

    At each step with noise level ``sigma`` in ``[s_tmin, s_tmax]``: ``gamma = min(churn/N,
    sqrt(2) - 1)``, ``sigma_hat = sigma (1 + gamma)``, ``x_hat = x + sqrt(sigma_hat^2 - sigma^2)
    s_noise z``; then a Heun step from ``sigma_hat`` to the next level (Euler when the next level is
    ``sigma = 0``). With ``churn=0`` this is Algorithm 1 (deterministic Heun, NFE ``2N - 1`` when the
    grid ends at 0). Needs a process with ``a(t) = 1`` (VE, EDM, Poisson) and a fixed grid.
    2 stages; order 2 when ``churn = 0``. It steps in the process time ``t`` only (its noise-level
    arithmetic is in ``sigma(t)``, as in EDM and k-diffusion): ``time_variables = ("t",)``.
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
        check(s_tmax > self.s_tmin, "s_tmax", f"greater than s_tmin={s_tmin}", s_tmax)
        self.s_tmax = float(s_tmax)
        self.s_noise = check_positive(s_noise, "s_noise", allow_zero=True)

    def check_dynamics(self, dynamics) -> None:
        super().check_dynamics(dynamics)
        process = getattr(dynamics, "process", None)
        if process is None or not getattr(process, "unit_scale", False):
            raise IncompatibleError(
                "argument `solver`: EDMStochasticHeun needs a ProbabilityFlowODE whose process "
                "has a(t) = 1 (VE, EDM or Poisson)")
        if self.churn > 0 and not getattr(getattr(dynamics, "field", None), "exact_score", True):
            raise IncompatibleError(
                "argument `solver`: EDMStochasticHeun with churn > 0 injects Gaussian noise, "
                "which needs an exact score field; this field has exact_score=False")

    def step(self, dynamics, x, t, h, state, dw, ctx: StepContext):
        process = dynamics.process
        t_next = t + h
        nfe = 0
        if self.churn > 0:
            if ctx.n_steps is None:
                raise IncompatibleError(
                    "argument `solver`: EDMStochasticHeun with churn > 0 needs a fixed grid")
            sigma = process.sigma(t)
            gamma = min(self.churn / ctx.n_steps, math.sqrt(2.0) - 1.0)
            inside = (sigma >= self.s_tmin) & (sigma <= self.s_tmax)
            sigma_hat = torch.where(inside, sigma * (1.0 + gamma), sigma)
            t = process.t_of_sigma(sigma_hat)
            noise = (sigma_hat.square() - sigma.square()).clamp(min=0).sqrt() * self.s_noise
            x = x + bcast(noise, x) * ctx.randn_like(x)
        hb = bcast(t_next - t, x)
        d1 = dynamics.drift(x, t)
        x_euler = x + hb * d1
        nfe += 1
        last = ctx.final_sigma_zero and ctx.n_steps is not None and ctx.index == ctx.n_steps - 1
        if last:
            return Step(x_euler, None, (), nfe)
        d2 = dynamics.drift(x_euler, t_next)
        return Step(x + 0.5 * hb * (d1 + d2), None, (), nfe + 1)
