"""The EDM process (Karras et al., NeurIPS 2022): time is sigma."""

from __future__ import annotations

from .._errors import check, check_positive
from .base import SigmaTime

__all__ = ["EDM"]


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
