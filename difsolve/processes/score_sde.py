"""score_sde processes: VE, VP and sub-VP (Song et al., ICLR 2021)."""

from __future__ import annotations

import math

import torch

from .._errors import check, check_positive
from .base import Process, _t

__all__ = ["VE", "VP", "SubVP"]


class VE(Process):
    r"""Variance-exploding process (score_sde): ``sigma(t) = s_min (s_max/s_min)^t``, ``a = 1``.

    ``f = 0``, ``g^2 = d sigma^2 / dt = 2 sigma^2 log(s_max/s_min)``; prior ``N(0, s_max^2 I)``;
    sampling interval ``[t_min, 1]``.
    """

    unit_scale = True

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 1e-5):
        self.sigma_min_ = check_positive(sigma_min, "sigma_min")
        self.sigma_max_ = check_positive(sigma_max, "sigma_max")
        check(self.sigma_max_ > self.sigma_min_, "sigma_max", f"greater than sigma_min={sigma_min}",
              sigma_max)
        self.t_min = check_positive(t_min, "t_min")
        check(self.t_min < 1.0, "t_min", "smaller than t_max=1", t_min)
        self.t_max = 1.0
        self.prior_std = self.sigma_max_
        self._log_ratio = math.log(self.sigma_max_ / self.sigma_min_)

    def marginal(self, t):
        t = _t(t)
        return torch.ones_like(t), self.sigma(t)

    def sigma(self, t):
        t = _t(t)
        return self.sigma_min_ * torch.exp(t * self._log_ratio)

    def t_of_sigma(self, sigma):
        sigma = _t(sigma)
        return torch.log(sigma / self.sigma_min_) / self._log_ratio

    def dsigma_dt(self, t):
        return self.sigma(t) * self._log_ratio

    def drift_coef(self, t):
        return torch.zeros_like(_t(t))

    def g2(self, t):
        return 2.0 * self.sigma(t).square() * self._log_ratio


class VP(Process):
    r"""Variance-preserving process (score_sde) with linear ``beta(t) = b0 + t (b1 - b0)``.

    ``log a(t) = -t^2 (b1 - b0)/4 - t b0/2``, ``b^2 = 1 - a^2``, ``f = -beta/2``,
    ``g^2 = beta``; prior ``N(0, I)``; sampling interval ``[t_min, 1]``.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3):
        self.beta_min = check_positive(beta_min, "beta_min")
        self.beta_max = check_positive(beta_max, "beta_max")
        check(self.beta_max >= self.beta_min, "beta_max", f">= beta_min={beta_min}", beta_max)
        self.t_min = check_positive(t_min, "t_min")
        check(self.t_min < 1.0, "t_min", "smaller than t_max=1", t_min)
        self.t_max = 1.0
        self.prior_std = 1.0

    def beta(self, t):
        return self.beta_min + _t(t) * (self.beta_max - self.beta_min)

    def _int_beta(self, t):
        t = _t(t)
        return 0.5 * t.square() * (self.beta_max - self.beta_min) + t * self.beta_min

    def _t_of_int_beta(self, c):
        db = self.beta_max - self.beta_min
        if db == 0:
            return c / self.beta_min
        # positive root of db/2 t^2 + b0 t - c = 0, written to avoid cancellation
        return 2.0 * c / (self.beta_min + torch.sqrt(self.beta_min**2 + 2.0 * db * c))

    def marginal(self, t):
        log_a = -0.5 * self._int_beta(t)
        return torch.exp(log_a), torch.sqrt(-torch.expm1(2.0 * log_a))

    def sigma(self, t):
        return torch.sqrt(torch.expm1(self._int_beta(t)))

    def t_of_sigma(self, sigma):
        return self._t_of_int_beta(torch.log1p(_t(sigma).square()))

    def dsigma_dt(self, t):
        s = self.sigma(t)
        return (1.0 + s.square()) * self.beta(t) / (2.0 * s)

    def drift_coef(self, t):
        return -0.5 * self.beta(t)

    def g2(self, t):
        return self.beta(t)


class SubVP(VP):
    r"""Sub-VP process (score_sde): the VP drift with ``g^2 = beta (1 - exp(-2 int beta))``.

    ``a`` as for VP, ``b = 1 - a^2``; prior ``N(0, I)``.
    """

    def marginal(self, t):
        log_a = -0.5 * self._int_beta(t)
        return torch.exp(log_a), -torch.expm1(2.0 * log_a)

    def sigma(self, t):
        a, b = self.marginal(t)
        return b / a

    def t_of_sigma(self, sigma):
        # sigma = 1/a - a = 2 sinh(int_beta / 2); asinh avoids the cancellation of log(a ~ 1)
        return self._t_of_int_beta(2.0 * torch.asinh(0.5 * _t(sigma)))

    def dsigma_dt(self, t):
        a, _ = self.marginal(t)
        return (1.0 / a + a) * self.beta(t) / 2.0

    def g2(self, t):
        return self.beta(t) * -torch.expm1(-2.0 * self._int_beta(t))
