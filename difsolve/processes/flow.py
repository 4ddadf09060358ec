r"""Rectified flow / flow matching (Liu et al. 2022; Lipman et al. 2022; Esser et al. 2024, SD3).

``x_t = (1 - t) x_0 + t z``: ``a = 1 - t``, ``b = t``, ``sigma = t / (1 - t)``;
``f = d log a/dt = -1/(1 - t)``, ``g^2 = d b^2/dt - 2 f b^2 = 2 t / (1 - t)``. The velocity
``v = dx_t/dt = z - x_0`` of a flow-matching model is the probability-flow drift:
``f x - g^2 s / 2 = E[v | x_t]`` (``ScoreNetwork(..., predicts="flow")``).
"""

from __future__ import annotations

import math

from .._errors import check, check_positive
from .base import Process, _t

__all__ = ["RectifiedFlow"]


class RectifiedFlow(Process):
    r"""Linear-interpolation process ``x_t = (1 - t) x_0 + t z``, ``t`` in ``[t_min, t_max]``.

    ``a = 1 - t``, ``b = t``, ``sigma = t/(1 - t)``, ``f = -1/(1 - t)``, ``g^2 = 2t/(1 - t)``;
    prior ``N(0, I)`` at ``t_max`` (``< 1``: the probability-flow drift in score form has a
    ``1/(1 - t)`` factor).
    """

    #: t = 1 (pure noise, a = 0) is excluded: the score-form drift is singular there
    domain = (0.0, math.nextafter(1.0, 0.0))

    def __init__(self, t_min: float = 1e-3, t_max: float = 1 - 1e-3):
        self.t_min = check_positive(t_min, "t_min")
        self.t_max = check_positive(t_max, "t_max")
        check(self.t_max < 1.0, "t_max", "smaller than 1", t_max)
        check(self.t_min < self.t_max, "t_min", f"smaller than t_max={t_max}", t_min)
        self.prior_std = 1.0

    def marginal(self, t):
        t = _t(t)
        return 1.0 - t, t.clone()

    def sigma(self, t):
        t = _t(t)
        return t / (1.0 - t)

    def t_of_sigma(self, sigma):
        sigma = _t(sigma)
        return sigma / (1.0 + sigma)

    def dsigma_dt(self, t):
        return (1.0 - _t(t)).square().reciprocal()

    def drift_coef(self, t):
        return -(1.0 - _t(t)).reciprocal()

    def g2(self, t):
        t = _t(t)
        return 2.0 * t / (1.0 - t)
