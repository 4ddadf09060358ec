r"""Discrete-time DDPM schedules as a continuous-time process (``DiscreteVP``).

A DDPM model is trained on a table ``acp_i = prod_{j <= i} (1 - beta_j)``, ``i = 0 .. n-1``
(Ho et al. 2020), with ``x_i = sqrt(acp_i) x_0 + sqrt(1 - acp_i) z``. :class:`DiscreteVP` makes
the *timestep index* the time variable: ``t`` is a float in ``[0, n - 1]`` (the model's own
timestep input), integer ``t`` reproduces the table, and in between ``log sigma`` is interpolated
linearly (as k-diffusion's ``DiscreteSchedule`` does; DPM-Solver's discrete ``NoiseScheduleVP``
interpolates ``log alpha`` instead). With ``sigma_i^2 = (1 - acp_i) / acp_i`` and, on the piece
``[i, i + 1]``, the slope ``k_i = log sigma_{i+1} - log sigma_i``:

* ``log sigma(t) = log sigma_i + (t - i) k_i``, ``a = (1 + sigma^2)^(-1/2)``, ``b = sigma a``
  (variance preserving);
* ``f(t) = d log a / dt = -b^2 k_i`` and ``g^2(t) = d b^2/dt - 2 f b^2 = 2 b^2 k_i``, so the
  forward SDE ``dx = f x dt + g dw`` has exactly these marginals, piece by piece.

The derivatives jump at the integers (``k_i`` changes); an integer ``t`` belongs to the piece on
its right. Outside ``[0, n - 1]`` the end pieces are extended linearly, so :meth:`t_of_sigma` is
the exact inverse of :meth:`sigma` for every ``sigma > 0``.

Tables: linear (Ho et al. 2020), scaled linear (Stable Diffusion, Rombach et al. 2022), cosine
(Nichol & Dhariwal 2021), or read from a diffusers scheduler.
"""

from __future__ import annotations

import math

import torch

from .._errors import ArgumentTypeError, InvalidArgumentError, check, check_int, check_positive
from .base import Process, _t

__all__ = ["DiscreteVP"]


def _table(values, name: str) -> torch.Tensor:
    """A finite 1-D float64 CPU tensor of at least 2 entries."""
    try:
        v = torch.as_tensor(values).detach().to(device="cpu", dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidArgumentError(
            f"argument `{name}` must be a 1-D real tensor or sequence, got {values!r}") from exc
    check(v.ndim == 1 and v.numel() >= 2, name, "a 1-D tensor of at least 2 entries",
          tuple(v.shape))
    check(bool(torch.isfinite(v).all()), name, "finite")
    return v


class DiscreteVP(Process):
    r"""A DDPM table ``alphas_cumprod`` as a process whose time is the timestep index.

    ``t`` in ``[0, n - 1]``; ``marginal(t) = (sqrt(acp_t), sqrt(1 - acp_t))`` at integer ``t``;
    ``log sigma`` piecewise linear in ``t`` in between (see the module docstring for ``f`` and
    ``g^2``). Prior ``N(0, I)`` at ``t_max = n - 1``; ``t_min = 0``.

    Args:
        alphas_cumprod: ``(n,)`` strictly decreasing values in ``(0, 1)``.
    """

    def __init__(self, alphas_cumprod):
        acp = _table(alphas_cumprod, "alphas_cumprod")
        check(bool(((acp > 0) & (acp < 1)).all()), "alphas_cumprod", "values in (0, 1)",
              f"range [{float(acp.min()):.3g}, {float(acp.max()):.3g}]")
        check(bool((acp[1:] < acp[:-1]).all()), "alphas_cumprod", "strictly decreasing")
        self.alphas_cumprod = acp
        self.n = acp.numel()
        self.t_min, self.t_max = 0.0, float(self.n - 1)
        self.domain = (self.t_min, self.t_max)
        self.prior_std = 1.0
        # log sigma_i = (log(1 - acp) - log acp) / 2 (1 - acp is exact for acp >= 1/2)
        self._log_sigmas = 0.5 * (torch.log1p(-acp) - torch.log(acp))
        self._cache: dict = {}

    # ----- constructors ------------------------------------------------------------------
    @classmethod
    def from_betas(cls, betas) -> DiscreteVP:
        """From ``beta_i`` in ``(0, 1)``: ``acp_i = prod_{j <= i} (1 - beta_j)`` (in float64)."""
        b = _table(betas, "betas")
        check(bool(((b > 0) & (b < 1)).all()), "betas", "values in (0, 1)",
              f"range [{float(b.min()):.3g}, {float(b.max()):.3g}]")
        return cls(torch.exp(torch.cumsum(torch.log1p(-b), 0)))

    @classmethod
    def linear(cls, n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> DiscreteVP:
        """DDPM's linear betas ``linspace(beta_start, beta_end, n)`` (Ho et al. 2020)."""
        check_int(n, "n", 2)
        lo, hi = check_positive(beta_start, "beta_start"), check_positive(beta_end, "beta_end")
        return cls.from_betas(torch.linspace(lo, hi, n, dtype=torch.float64))

    @classmethod
    def scaled_linear(cls, n: int = 1000, beta_start: float = 0.00085,
                      beta_end: float = 0.012) -> DiscreteVP:
        """Stable Diffusion's betas ``linspace(sqrt(beta_start), sqrt(beta_end), n)^2``."""
        check_int(n, "n", 2)
        lo, hi = check_positive(beta_start, "beta_start"), check_positive(beta_end, "beta_end")
        return cls.from_betas(torch.linspace(math.sqrt(lo), math.sqrt(hi), n,
                                             dtype=torch.float64).square())

    @classmethod
    def cosine(cls, n: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> DiscreteVP:
        r"""Nichol & Dhariwal's cosine schedule: ``abar(u) = cos^2((u + s)/(1 + s) pi/2)``,
        ``beta_i = min(1 - abar((i+1)/n) / abar(i/n), max_beta)`` (diffusers' ``squaredcos_cap_v2``).
        """
        check_int(n, "n", 2)
        s = check_positive(s, "s")
        max_beta = check_positive(max_beta, "max_beta")
        u = torch.arange(n + 1, dtype=torch.float64) / n
        log_abar = 2.0 * torch.log(torch.cos((u + s) / (1 + s) * math.pi / 2))
        betas = -torch.expm1(log_abar[1:] - log_abar[:-1])
        return cls.from_betas(betas.clamp(max=max_beta))

    @classmethod
    def from_diffusers(cls, scheduler) -> DiscreteVP:
        """The table of a diffusers scheduler (its ``alphas_cumprod``).

        A zero-terminal-SNR table (``rescale_betas_zero_snr``, last entry 0) gets its last entry
        replaced by ``2^-24``, as diffusers' own Euler scheduler does, so that ``sigma`` is finite.
        """
        acp = getattr(scheduler, "alphas_cumprod", None)
        if acp is None:
            raise ArgumentTypeError(
                f"argument `scheduler` must be a diffusers DDPM-family scheduler with an "
                f"`alphas_cumprod` table (DDIMScheduler, DDPMScheduler, "
                f"DPMSolverMultistepScheduler, ...), got {type(scheduler).__name__}")
        acp = _table(acp, "scheduler.alphas_cumprod").clone()
        if acp[-1] == 0:
            acp[-1] = 2.0**-24
        return cls(acp)

    # ----- the table on a device / dtype ---------------------------------------------------
    def _on(self, ref: torch.Tensor) -> torch.Tensor:
        key = (ref.device, ref.dtype)
        if key not in self._cache:
            self._cache[key] = self._log_sigmas.to(device=ref.device, dtype=ref.dtype)
        return self._cache[key]

    def _log_sigma_and_slope(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        t = _t(t)
        ls = self._on(t)
        i = torch.floor(t).clamp(0, self.n - 2)
        lo, hi = ls[i.long()], ls[i.long() + 1]
        # torch.lerp is exact at both ends (w = 0 and w = 1): integer t gives the table entry
        return torch.lerp(lo, hi, t - i), hi - lo

    # ----- Process interface ---------------------------------------------------------------
    def marginal(self, t):
        ls, _ = self._log_sigma_and_slope(t)
        log_a = -0.5 * torch.logaddexp(torch.zeros_like(ls), 2.0 * ls)  # -log(1 + sigma^2)/2
        return torch.exp(log_a), torch.exp(ls + log_a)

    def sigma(self, t):
        return torch.exp(self._log_sigma_and_slope(t)[0])

    def log_snr(self, t):
        return -self._log_sigma_and_slope(t)[0]

    def t_of_sigma(self, sigma):
        sigma = _t(sigma)
        ls_t = torch.log(sigma)
        ls = self._on(ls_t)
        i = (torch.searchsorted(ls, ls_t.contiguous(), right=True) - 1).clamp(0, self.n - 2)
        lo, hi = ls[i], ls[i + 1]
        return i.to(ls_t.dtype) + (ls_t - lo) / (hi - lo)

    def dsigma_dt(self, t):
        ls, k = self._log_sigma_and_slope(t)
        return torch.exp(ls) * k

    def drift_coef(self, t):
        ls, k = self._log_sigma_and_slope(t)
        return -torch.sigmoid(2.0 * ls) * k  # -b^2 k

    def g2(self, t):
        ls, k = self._log_sigma_and_slope(t)
        return 2.0 * torch.sigmoid(2.0 * ls) * k  # 2 b^2 k

    def __repr__(self) -> str:
        return (f"DiscreteVP(n={self.n}, sigma_min={self.sigma_min:.4g}, "
                f"sigma_max={self.sigma_max:.4g})")
