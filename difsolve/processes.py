r"""Forward noising processes ``x_t = a(t) x_0 + b(t) z``.

Every process is linear in ``x``: the forward SDE is ``dx = f(t) x dt + g(t) dw`` with
``da/dt = f a`` and ``d(b^2)/dt = 2 f b^2 + g^2``. Time arguments are per-sample ``(B,)``
tensors (Python numbers are accepted and broadcast). The noise level is ``sigma(t) = b/a`` and
the log signal-to-noise ratio ``lambda(t) = log(a/b) = -log sigma``.

References: Song et al., *Score-Based Generative Modeling through SDEs*, ICLR 2021 (VE, VP,
sub-VP); Karras et al., *Elucidating the Design Space of Diffusion-Based Generative Models*,
NeurIPS 2022 (EDM). The PFGM++ process lives in :mod:`difsolve.poisson`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from ._errors import check, check_positive, check_tensor
from ._tensor import TimeLike, flat_sum

__all__ = ["EDM", "VE", "VP", "Process", "SigmaTime", "SubVP"]


def _t(t: TimeLike, ref: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` as a tensor (on the device and dtype of ``ref`` when given)."""
    if isinstance(t, torch.Tensor):
        return t if ref is None else t.to(device=ref.device, dtype=ref.dtype)
    if ref is not None:
        return torch.as_tensor(float(t), device=ref.device, dtype=ref.dtype)
    return torch.as_tensor(float(t), dtype=torch.get_default_dtype())


class Process(ABC):
    """A forward noising process ``x_t = a(t) x_0 + b(t) z`` with a Gaussian (or other) prior.

    Subclasses implement :meth:`marginal`, :meth:`t_of_sigma`, :meth:`dsigma_dt`,
    :meth:`drift_coef` and :meth:`g2`; everything else derives from them.
    """

    t_min: float
    t_max: float
    has_sde: bool = True
    #: ``a(t) = 1`` at every t (VE-type processes: time is a noise level only)
    unit_scale: bool = False
    #: standard deviation of the Gaussian prior N(0, prior_std^2 I) at t_max
    prior_std: float = 1.0

    # ----- schedule -----------------------------------------------------------------------
    @abstractmethod
    def marginal(self, t: TimeLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(a(t), b(t))`` with the shape of ``t``."""

    def sigma(self, t: TimeLike) -> torch.Tensor:
        """Noise-to-signal ratio ``sigma(t) = b(t) / a(t)``."""
        a, b = self.marginal(t)
        return b / a

    @abstractmethod
    def t_of_sigma(self, sigma: TimeLike) -> torch.Tensor:
        """Inverse of :meth:`sigma`."""

    @abstractmethod
    def dsigma_dt(self, t: TimeLike) -> torch.Tensor:
        """Derivative ``d sigma / dt`` (positive: sigma increases with t)."""

    def log_snr(self, t: TimeLike) -> torch.Tensor:
        """``lambda(t) = log(a / b) = -log sigma(t)``."""
        return -torch.log(self.sigma(t))

    @property
    def sigma_min(self) -> float:
        """``sigma(t_min)`` (evaluated in float64)."""
        return float(self.sigma(torch.tensor(self.t_min, dtype=torch.float64)))

    @property
    def sigma_max(self) -> float:
        """``sigma(t_max)`` (evaluated in float64)."""
        return float(self.sigma(torch.tensor(self.t_max, dtype=torch.float64)))

    # ----- forward SDE --------------------------------------------------------------------
    @abstractmethod
    def drift_coef(self, t: TimeLike) -> torch.Tensor:
        """``f(t)`` with forward drift ``f(t) x``."""

    @abstractmethod
    def g2(self, t: TimeLike) -> torch.Tensor:
        """Squared diffusion coefficient ``g(t)^2``."""

    def drift(self, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """Forward drift ``f(t) x``."""
        f = self.drift_coef(_t(t, x))
        return (f.reshape(-1, *([1] * (x.ndim - 1))) if f.ndim else f) * x

    def diffusion(self, t: TimeLike) -> torch.Tensor:
        """Forward diffusion coefficient ``g(t)`` (additive noise)."""
        return self.g2(_t(t)).sqrt()

    # ----- prior --------------------------------------------------------------------------
    def prior_sample(self, shape, *, generator=None, device=None, dtype=None) -> torch.Tensor:
        """Draw from the prior ``N(0, prior_std^2 I)`` of shape ``shape = (B, ...)``.

        ``device`` defaults to the generator's device (CPU without a generator).
        """
        if device is None and generator is not None:
            device = generator.device
        z = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
        return self.prior_std * z

    def prior_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log-density of the prior at ``x``, shape ``(B,)``."""
        check_tensor(x, "x")
        d = x[0].numel()
        s2 = self.prior_std**2
        return -0.5 * flat_sum(x.square()) / s2 - 0.5 * d * math.log(2 * math.pi * s2)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


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


class SigmaTime(Process):
    """Base of the processes whose time *is* the noise level: ``a = 1``, ``b = sigma = t``,
    ``f = 0``, ``g^2 = d sigma^2/dt = 2 sigma`` (EDM, and PFGM++'s :class:`~difsolve.Poisson`)."""

    unit_scale = True

    def marginal(self, t):
        t = _t(t)
        return torch.ones_like(t), t.clone()

    def sigma(self, t):
        return _t(t).clone()

    def t_of_sigma(self, sigma):
        return _t(sigma).clone()

    def dsigma_dt(self, t):
        return torch.ones_like(_t(t))

    def drift_coef(self, t):
        return torch.zeros_like(_t(t))

    def g2(self, t):
        return 2.0 * _t(t)


class EDM(SigmaTime):
    r"""EDM process (Karras et al. 2022): time *is* sigma, ``x_sigma = x_0 + sigma z``.

    ``a = 1``, ``b = sigma = t``, ``f = 0``, ``g^2 = 2 sigma``; prior ``N(0, s_max^2 I)``.
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        self.t_min = check_positive(sigma_min, "sigma_min")
        self.t_max = check_positive(sigma_max, "sigma_max")
        check(self.t_max > self.t_min, "sigma_max", f"greater than sigma_min={sigma_min}",
              sigma_max)
        self.prior_std = self.t_max
