r"""Forward noising processes ``x_t = a(t) x_0 + b(t) z``.

Every process is linear in ``x``: the forward SDE is ``dx = f(t) x dt + g(t) dw`` with
``da/dt = f a`` and ``d(b^2)/dt = 2 f b^2 + g^2``. Time arguments are per-sample ``(B,)``
tensors (Python numbers are accepted and broadcast). The noise level is ``sigma(t) = b/a`` and
the log signal-to-noise ratio ``lambda(t) = log(a/b) = -log sigma``.

References: Song et al., *Score-Based Generative Modeling through SDEs*, ICLR 2021 (VE, VP,
sub-VP); Karras et al., *Elucidating the Design Space of Diffusion-Based Generative Models*,
NeurIPS 2022 (EDM). This module holds the base classes; the processes are in the sibling modules.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from .._errors import check_tensor
from .._tensor import TimeLike, as_time, bcast, flat_sum, time_dtype

__all__ = ["Process", "SigmaTime"]


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
    #: times at which the marginals are defined; solves outside it are refused
    domain: tuple[float, float] = (0.0, math.inf)

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

    def perturb(self, x0: torch.Tensor, t: TimeLike, *, generator=None) -> torch.Tensor:
        """A draw of ``x_t = a(t) x0 + b(t) z`` (the forward process at time ``t``, e.g. the
        starting state of SDEdit / img2img with :func:`~difsolve.sample`'s ``t_start``)."""
        check_tensor(x0, "x0")
        t = as_time(t, x0, "t", time_dtype(x0.dtype))
        a, b = self.marginal(t)
        z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return (bcast(a, x0) * x0 + bcast(b, x0) * z).to(x0.dtype)

    def prior_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log-density of the prior at ``x``, shape ``(B,)``."""
        check_tensor(x, "x")
        d = x[0].numel()
        s2 = self.prior_std**2
        return -0.5 * flat_sum(x.square()) / s2 - 0.5 * d * math.log(2 * math.pi * s2)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


class SigmaTime(Process):
    """Base of the processes whose time *is* the noise level: ``a = 1``, ``b = sigma = t``,
    ``f = 0``, ``g^2 = d sigma^2/dt = 2 sigma`` (EDM, and PFGM++'s :class:`~difsolve.Poisson`)."""

    unit_scale = True

    def marginal(self, t):
        t = _t(t)
        return torch.ones_like(t), t  # (b is t itself: no copy)

    def sigma(self, t):
        return _t(t)

    def t_of_sigma(self, sigma):
        return _t(sigma)

    def dsigma_dt(self, t):
        return torch.ones_like(_t(t))

    def drift_coef(self, t):
        return torch.zeros_like(_t(t))

    def g2(self, t):
        return 2.0 * _t(t)
