r"""DPM-Solver++ multistep exponential integrators (data-prediction form).

With ``lambda = log(a/b)`` and the data prediction ``x0(x, t)``, the probability-flow ODE has the
exact solution ``x_t = (b_t / b_s) x_s + b_t int_{lambda_s}^{lambda_t} e^lambda x0 d lambda``.
Expanding ``x0`` in ``lambda`` around ``lambda_s`` (step ``h = lambda_t - lambda_s``) gives

``x_t = (b_t/b_s) x_s + a_t [phi_1 D0 + phi_2 D1 + phi_3 D2]`` with ``phi_1 = 1 - e^{-h}``,
``phi_2 = h - phi_1`` and ``phi_3 = h^2/2 - h + phi_1``,

where ``D0 = x0(x_s)`` and the derivatives ``D1 = x0'``, ``D2 = x0''`` (in lambda) come from
divided differences of the previous one (order 2) or two (order 3) data predictions. Each step
costs one field evaluation; the first steps use the orders the history allows.

Reference: Lu et al., *DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models* (2022), Algorithm 2 (multistep order 2); order 3 is the same construction with one more
divided difference.
"""

from __future__ import annotations

import torch

from .._errors import IncompatibleError, check
from .._tensor import bcast
from .base import Solver, Step

__all__ = ["DPMSolver"]


class DPMSolver(Solver):
    """Multistep DPM-Solver++ of ``order`` 2 or 3 on the probability-flow ODE. 1 NFE per step."""

    stages = 1
    native_time = True

    def __init__(self, order: int = 2):
        check(order in (1, 2, 3), "order", "1, 2 or 3", order)
        self.order = order

    def check_dynamics(self, dynamics) -> None:
        super().check_dynamics(dynamics)
        if not callable(getattr(dynamics, "denoise", None)) or not hasattr(dynamics, "process"):
            raise IncompatibleError(
                "argument `solver`: DPMSolver needs a ProbabilityFlowODE (dynamics with "
                "`denoise(x, t)` and a `process`)")

    def init(self, dynamics, x, t, ctx):
        zeros = torch.zeros_like(x)
        zt = torch.zeros_like(t)
        return (zeros, zeros, zt, zt, torch.zeros_like(t)), 0

    def step(self, dynamics, x, t, h, state, dw, ctx):
        x0_1, x0_2, lam_1, lam_2, count = state
        process = dynamics.process
        a_s, b_s = process.marginal(t)
        a_t, b_t = process.marginal(t + h)
        lam_s, lam_t = torch.log(a_s / b_s), torch.log(a_t / b_t)
        hh = lam_t - lam_s
        d0 = dynamics.denoise(x, t)
        phi1 = -torch.expm1(-hh)
        update = bcast(phi1, x) * d0
        if self.order >= 2:
            has1 = count >= 1
            h1 = torch.where(has1, lam_s - lam_1, torch.ones_like(hh))
            f01 = (d0 - x0_1) / bcast(h1, x)
            d1 = f01
            if self.order >= 3:
                has2 = count >= 2
                h2 = torch.where(has2, lam_1 - lam_2, torch.ones_like(hh))
                f12 = (x0_1 - x0_2) / bcast(h2, x)
                f012 = (f01 - f12) / bcast(h1 + h2, x)
                d1 = d1 + bcast(torch.where(has2, h1, torch.zeros_like(h1)), x) * f012
                phi3 = 0.5 * hh.square() - hh + phi1
                update = update + bcast(torch.where(has2, 2.0 * phi3, torch.zeros_like(hh)),
                                        x) * f012
            phi2 = hh - phi1
            update = update + bcast(torch.where(has1, phi2, torch.zeros_like(hh)), x) * d1
        x_new = bcast(b_t / b_s, x) * x + bcast(a_t, x) * update
        return Step(x_new, None, (d0, x0_1, lam_s, lam_1, count + 1), 1)
