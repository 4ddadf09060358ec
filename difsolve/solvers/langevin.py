r"""Langevin correctors and annealed Langevin dynamics.

Langevin dynamics ``dx = s(x) dt + sqrt(2) dw`` leaves ``p`` invariant when ``s = grad log p``;
its Euler discretisation (the unadjusted Langevin algorithm, ULA) ``x <- x + eps s(x) +
sqrt(2 eps) z`` does so up to an ``O(eps)`` bias **provided ``eps`` does not depend on ``x``**.

* :class:`Langevin`: the corrector of predictor-corrector sampling (Song et al., *Score-Based
  Generative Modeling through SDEs*, ICLR 2021, Algorithms 4-5 / ``LangevinCorrector`` of
  score_sde). At the current time ``t`` it runs ``steps`` ULA steps on ``p_t`` with
  ``eps = 2 alpha (snr ||z|| / ||s||)^2``. Used through ``corrector=`` of :func:`~difsolve.solve`
  and :func:`~difsolve.sample` (corrector first, then the predictor, at every grid time).
* :class:`AnnealedLangevin` and :func:`annealed_langevin`: Algorithm 1 of Song & Ermon,
  *Generative Modeling by Estimating Gradients of the Data Distribution*, NeurIPS 2019 (NCSN):
  for ``sigma_1 > ... > sigma_L``, ``T`` steps each of ``x <- x + alpha_i/2 s(x, sigma_i) +
  sqrt(alpha_i) z`` with ``alpha_i = eps sigma_i^2 / sigma_L^2``.

Both need a true score: fields with ``exact_score=False`` (finite-D PFGM++ pseudo-scores) are
refused with :class:`~difsolve.IncompatibleError`. Nothing here synchronises with the host.
"""

from __future__ import annotations

import math

import torch

from .._errors import (
    ArgumentTypeError,
    IncompatibleError,
    check,
    check_int,
    check_positive,
    check_shape,
)
from .._tensor import all_finite, bcast
from ..conditioning import ConditionedField, RowCondition
from ..fields.base import check_field, is_exact
from ..fields.base import denoise as tweedie
from ..noise import make_stream, randn_like
from ..solution import Solution, Stats, Status

__all__ = ["NORM_RULES", "AnnealedLangevin", "Langevin", "annealed_langevin"]

#: step-size rules of :class:`Langevin`
NORM_RULES = ("batch", "expected", "sample")


def _refuse_pseudo_score(field, who: str) -> None:
    if not is_exact(field):
        raise IncompatibleError(
            f"argument `field` has exact_score=False (a pseudo-score, e.g. a finite-D PFGM++ "
            f"field): {who} needs a true score; use an ODE solver without a corrector instead")


def _field_of(dynamics, who: str):
    field = getattr(dynamics, "field", None)
    if field is None or getattr(dynamics, "process", None) is None:
        raise IncompatibleError(
            f"argument `corrector`: {who} needs dynamics built from a score field (a ReverseSDE "
            f"or ProbabilityFlowODE with `.field` and `.process`), got {type(dynamics).__name__}")
    return field


def _norm(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).norm(dim=1)


class Langevin:
    r"""Langevin corrector with the signal-to-noise step rule of score_sde.

    Each of ``steps`` corrector steps at the (per-sample) time ``t`` draws ``z ~ N(0, I)`` and sets

    .. math::
        \epsilon = 2 \alpha \left(\mathrm{snr}\, \frac{\|z\|}{\|s(x, t)\|}\right)^2,\quad
        \bar x = x + \epsilon s(x, t),\quad x \leftarrow \bar x + \sqrt{2 \epsilon}\, z.

    ``alpha = 1 - beta_i`` with score_sde's DDPM discretisation ``beta_i = beta(t) / N``: here
    ``alpha = 1 + 2 f(t) / N`` with ``f`` the process's drift coefficient and ``N = ddpm_steps``
    (score_sde's ``N = 1000``), which is ``1 - beta(t)/N`` for VP and sub-VP (``f = -beta/2``) and
    ``1`` for VE and EDM (``f = 0``). The corrector does not know the predictor's grid, so ``N``
    is a fixed reference rather than the number of predictor steps; it changes ``alpha`` by at
    most ``beta_max / N`` (2% with the defaults).

    Norm rules (``norm=``), i.e. what ``||z|| / ||s||`` means:

    * ``"expected"`` (default, guarded per-sample): ``||s||`` is replaced by its upper bound
      ``sqrt(d) / b(t)`` (the RMS score norm of point data under ``x_t = a x_0 + b z``; any data
      spread only lowers it) and ``||z||`` by ``sqrt(d)``, so ``eps = 2 alpha snr^2 b(t)^2``:
      a step that depends on ``t`` only, so the chain is a genuine ULA on ``p_t``, a sample
      does not depend on its batch, and the step cannot explode where ``s`` vanishes.
    * ``"batch"`` (score_sde): the two norms are averaged over the batch (rows with a
      non-finite norm are left out of the average). A sample then depends on its batch. With
      per-sample times the score norms are compared at a common scale:
      ``mean_j(||s_j|| b_j) / b_i``, which is score_sde's batch mean when all rows share ``t``.
    * ``"sample"`` (naive per-sample, **unsafe**, kept for comparison): the sample's own norms.
      The step then depends on ``x`` and becomes huge where ``||s||`` is near zero (between modes
      in low dimension), which biases the stationary law.

    Measured (``pytest -m slow -s tests/test_langevin.py``; 2-D ring of 6 modes at radius 2,
    std 0.15, weights 0.30/0.22/0.17/0.13/0.10/0.08, VE, 4000 samples, float64, 6 seeds):
    predictor-corrector sampling (Euler-Maruyama, 200 steps, ``snr=0.16``) gives mode fractions
    whose seed-pooled largest bias is 0.004 with ``"expected"``, 0.004 with ``"batch"`` (Euler-
    Maruyama alone: 0.002) and 0.069 with ``"sample"`` (per seed 0.060-0.078: the naive rule
    moves mass from the heavy modes to the light ones). Started from exact samples of ``p_t`` at
    ``sigma = 0.5``, 200 corrector steps keep mean, covariance and the mean responsibilities
    within 3 standard errors under ``"expected"`` and ``"batch"``; under ``"sample"`` the
    covariance grows 5-17 fold and the weights move by 9-12 standard errors. ``"expected"`` is
    the default: as accurate as ``"batch"`` here, and a sample does not depend on its batch. In
    high dimension the two nearly coincide (the noise dominates ``s``, so ``||s|| ~ sqrt(d)/b``).

    Cost: ``steps`` score evaluations per call (counted in the solve's NFE).

    Args:
        snr: signal-to-noise ratio ``> 0`` (score_sde: 0.16 for VE on CIFAR-10).
        steps: corrector steps per call, ``>= 1``.
        norm: one of :data:`NORM_RULES`.
        ddpm_steps: reference ``N`` defining ``alpha``, ``>= 1``.
    """

    def __init__(self, snr: float = 0.16, steps: int = 1, norm: str = "expected",
                 ddpm_steps: int = 1000):
        self.snr = check_positive(snr, "snr")
        self.steps = check_int(steps, "steps", 1)
        if not isinstance(norm, str):
            raise ArgumentTypeError(f"argument `norm` must be a str, got {norm!r}")
        check(norm in NORM_RULES, "norm", f"one of {NORM_RULES}", norm)
        self.norm = norm
        self.ddpm_steps = check_int(ddpm_steps, "ddpm_steps", 1)

    def check(self, dynamics) -> None:
        """Raise :class:`~difsolve.IncompatibleError` unless ``dynamics`` carries a true score."""
        field = _field_of(dynamics, "Langevin")
        check_field(field, "field")
        _refuse_pseudo_score(field, "the Langevin corrector")

    def alpha(self, process, t: torch.Tensor) -> torch.Tensor:
        """``alpha(t) = 1 + 2 f(t) / ddpm_steps`` (``1 - beta_i`` for VP, 1 for VE), ``(B,)``."""
        return (1.0 + 2.0 * process.drift_coef(t) / self.ddpm_steps).clamp(min=0.0)

    def step_size(self, process, x: torch.Tensor, t: torch.Tensor, score: torch.Tensor,
                  z: torch.Tensor) -> torch.Tensor:
        """The ``(B,)`` step ``eps`` of one corrector step under the chosen norm rule."""
        alpha = self.alpha(process, t)
        _, b = process.marginal(t)
        tiny = torch.finfo(x.dtype).tiny
        if self.norm == "expected":
            return 2.0 * alpha * (self.snr * b).square()
        s_norm, z_norm = _norm(score), _norm(z)
        if self.norm == "sample":
            ratio = z_norm / s_norm.clamp(min=tiny)
        else:  # batch: score_sde's averages, with the score norms rescaled to a common time
            ok = torch.isfinite(s_norm) & torch.isfinite(z_norm)
            count = ok.sum().clamp(min=1)
            s_scaled = torch.where(ok, s_norm * b, 0.0).sum() / count
            z_mean = torch.where(ok, z_norm, 0.0).sum() / count
            ratio = z_mean * b / s_scaled.clamp(min=tiny)
        return 2.0 * alpha * (self.snr * ratio).square()

    def correct(self, dynamics, x: torch.Tensor, t: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """Run ``steps`` corrector steps on ``p_t``; return the new state and the NFE used."""
        field = dynamics.field
        process = field.process
        for _ in range(self.steps):
            score = field(x, t)
            z = randn_like(x, generator)
            eps = bcast(self.step_size(process, x, t, score, z), x)
            x = x + eps * score + (2.0 * eps).sqrt() * z
        return x, self.steps

    def __repr__(self) -> str:
        return (f"Langevin(snr={self.snr!r}, steps={self.steps!r}, norm={self.norm!r}, "
                f"ddpm_steps={self.ddpm_steps!r})")


def _check_sigmas(sigmas) -> torch.Tensor:
    if isinstance(sigmas, (int, float)) and not isinstance(sigmas, bool):
        sigmas = [sigmas]
    try:
        s = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ArgumentTypeError(
            f"argument `sigmas` must be a 1-D sequence or tensor of noise levels, got "
            f"{sigmas!r}") from exc
    check(s.ndim <= 1, "sigmas", "a 1-D sequence of noise levels", tuple(s.shape))
    s = s.reshape(-1)
    check(s.numel() >= 1, "sigmas", "a non-empty 1-D sequence of noise levels")
    check(bool(torch.isfinite(s).all() & (s > 0).all()), "sigmas", "finite and positive", s)
    check(bool((s[1:] < s[:-1]).all()), "sigmas", "strictly decreasing", s)
    return s


class AnnealedLangevin:
    r"""Annealed Langevin dynamics, NCSN Algorithm 1 (Song & Ermon 2019), as an object.

    For noise levels ``sigma_1 > ... > sigma_L`` (``sigmas``), ``T = steps_each`` steps at each:

    .. math::
        \alpha_i = \epsilon\, b_i^2 / b_L^2,\qquad
        x \leftarrow x + \tfrac{\alpha_i}{2} s(x, t_i) + \sqrt{\alpha_i}\, z,\quad z \sim N(0, I),

    with ``t_i = process.t_of_sigma(sigma_i)`` and ``b_i = b(t_i)`` the marginal noise std. For
    processes with ``a = 1`` (VE, EDM) ``b_i = sigma_i`` and this is exactly NCSN's
    ``alpha_i = eps sigma_i^2 / sigma_L^2``; for VP it keeps the step proportional to the
    variance of the noise actually present. Cost: ``L T`` score evaluations (+1 to denoise).

    Two uses:

    * :meth:`run` (or :func:`annealed_langevin`, which draws the start ``x ~ N(0, b_1^2 I)``, the
      process prior at the largest level) runs the algorithm on its own and returns a
      :class:`~difsolve.Solution`.
    * As ``corrector=`` of :func:`~difsolve.solve` / :func:`~difsolve.sample` the predictor's
      grid supplies the levels: at each grid time ``t`` it runs ``steps_each`` steps with
      ``alpha = eps b(t)^2 / b_L^2`` (``b_L`` from ``sigmas[-1]``), i.e. NCSN's step rule at the
      predictor's noise levels. Its NFE per call is ``steps_each``.

    Measured (``tests/test_langevin.py``, the 6-mode 2-D ring with weights 0.30 ... 0.08, VE,
    4000 samples): 20 levels from 5 to 0.01, 30 steps each, ``eps = 5e-5`` (601 NFE) give mode
    fractions within 0.007-0.018 of the weights over 6 seeds; the same 600 steps at
    ``sigma = 0.01`` alone (no annealing) leave every mode at about ``1/K`` (error 0.12-0.15):
    Langevin at low noise cannot move mass between separated modes.

    Args:
        sigmas: strictly decreasing positive noise levels ``sigma = b/a`` (a number is one level).
        steps_each: ``T >= 1`` steps per level (NCSN: 100).
        eps: base step ``> 0`` (NCSN: 2e-5 with ``sigma_L = 0.01``, i.e. ``alpha_L = 0.2 sigma_L^2``).
    """

    def __init__(self, sigmas, steps_each: int = 100, eps: float = 2e-5):
        self.sigmas = _check_sigmas(sigmas)
        self.steps_each = check_int(steps_each, "steps_each", 1)
        self.eps = check_positive(eps, "eps")

    # ----- helpers ----------------------------------------------------------------------
    def _levels(self, process, like: torch.Tensor):
        sig = self.sigmas.to(device=like.device, dtype=like.dtype)
        t = process.t_of_sigma(sig)
        _, b = process.marginal(t)
        check(bool(torch.isfinite(t).all() & torch.isfinite(b).all() & (b > 0).all()), "sigmas",
              f"noise levels that {type(process).__name__} can represent", self.sigmas)
        return t, b

    @staticmethod
    def _check_field(field) -> None:
        check_field(field, "field")
        _refuse_pseudo_score(field, "annealed Langevin dynamics")

    def _step(self, field, x, t, alpha, generator):
        z = randn_like(x, generator)
        return x + 0.5 * alpha * field(x, t) + alpha.sqrt() * z

    # ----- corrector protocol -----------------------------------------------------------
    def check(self, dynamics) -> None:
        """Raise :class:`~difsolve.IncompatibleError` unless ``dynamics`` carries a true score."""
        field = _field_of(dynamics, "AnnealedLangevin")
        self._check_field(field)
        self._levels(field.process, torch.zeros(1, dtype=torch.float64))

    def correct(self, dynamics, x: torch.Tensor, t: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """``steps_each`` NCSN steps at the current time ``t`` (``(B,)``); returns ``(x, nfe)``."""
        field = dynamics.field
        process = field.process
        sigma_l = self.sigmas[-1:].to(device=x.device, dtype=x.dtype)
        _, b_l = process.marginal(process.t_of_sigma(sigma_l))  # validated once by check()
        _, b = process.marginal(t)
        alpha = bcast(self.eps * (b / b_l).square(), x)
        for _ in range(self.steps_each):
            x = self._step(field, x, t, alpha, generator)
        return x, self.steps_each

    # ----- stand-alone sampler ----------------------------------------------------------
    def run(self, field, x: torch.Tensor, *, generator=None, denoise: bool = True,
            seeds=None, cond: dict | None = None):
        """Run Algorithm 1 from ``x`` (``(B, ...)``); return a :class:`~difsolve.Solution`.

        ``denoise=True`` ends with one Tweedie step ``x0 = (x + b_L^2 s) / a`` at ``sigma_L``
        (one more score evaluation). ``status`` is ``NONFINITE`` for rows that overflowed (their
        ``x`` is NaN, ``last_x`` their state). ``generator`` (a generator, an int seed or a random
        stream) or ``seeds`` (one int per row) drive the noise; ``cond`` is passed to the field.
        No autograd graph is built.
        """
        self._check_field(field)
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 1:
            raise ArgumentTypeError(
                f"argument `x` must be a floating-point tensor of shape (B, ...), got {x!r}")
        if not isinstance(denoise, bool):
            raise ArgumentTypeError(f"argument `denoise` must be a bool, got {denoise!r}")
        stream = make_stream(generator, seeds, x.shape[0], x.device)
        rows = RowCondition.of(cond, x.shape[0])
        if rows:
            field = ConditionedField(field, rows)
        with torch.no_grad():
            return self._run(field, x, stream, denoise)

    def _run(self, field, x, generator, denoise):
        ts, bs = self._levels(field.process, x)
        if x.shape[0] == 0:
            return _empty_solution(x, ts[-1])
        alphas = self.eps * (bs / bs[-1]).square()
        batch = x.shape[0]
        for i in range(ts.numel()):
            t = ts[i].expand(batch)
            alpha = alphas[i]
            for _ in range(self.steps_each):
                x = self._step(field, x, t, alpha, generator)
        t_end = ts[-1].expand(batch).clone()
        nfe = ts.numel() * self.steps_each
        if denoise:
            x = tweedie(field, x, t_end)
            nfe += 1
        ok = all_finite(x)
        status = torch.where(ok, Status.SUCCESS.value, Status.NONFINITE.value)
        n_steps = torch.full((batch,), ts.numel() * self.steps_each, dtype=torch.long,
                             device=x.device)
        stats = Stats(nfe=nfe, nfe_per_sample=torch.full_like(n_steps, nfe), steps=n_steps,
                      accepted=n_steps.clone(), rejected=torch.zeros_like(n_steps))
        return Solution(x=torch.where(bcast(ok, x), x, math.nan), t=t_end, stats=stats,
                        status=status, last_x=x, last_t=t_end.clone())

    def __repr__(self) -> str:
        return (f"AnnealedLangevin(sigmas={self.sigmas.tolist()!r}, "
                f"steps_each={self.steps_each!r}, eps={self.eps!r})")


def _empty_solution(x: torch.Tensor, t_end: torch.Tensor) -> Solution:
    zeros = torch.zeros(0, dtype=torch.long, device=x.device)
    t = t_end.expand(0).clone()
    stats = Stats(nfe=0, nfe_per_sample=zeros, steps=zeros.clone(), accepted=zeros.clone(),
                  rejected=zeros.clone())
    return Solution(x=x.clone(), t=t, stats=stats, status=zeros.clone(), last_x=x.clone(),
                    last_t=t.clone())


def annealed_langevin(field, shape, sigmas, steps_each: int = 100, eps: float = 2e-5,
                      generator=None, denoise: bool = True, device=None, dtype=None, *,
                      seeds=None, cond: dict | None = None):
    r"""Sample ``shape = (B, ...)`` with annealed Langevin dynamics (NCSN Algorithm 1).

    Starts from ``N(0, b_1^2 I)``, the process marginal of pure noise at the largest level
    ``sigma_1`` (``N(0, sigma_1^2 I)`` for VE and EDM), then runs
    :meth:`AnnealedLangevin.run`; see :class:`AnnealedLangevin` for the update and arguments.
    Returns a :class:`~difsolve.Solution` whose ``stats.nfe`` is ``L * steps_each`` (+1 when
    ``denoise``) and whose ``t`` is the time of ``sigma_L``. ``generator`` may be an int seed;
    ``seeds`` (one int per row) make every row's draw independent of its batch; ``cond`` is
    passed to the field.
    """
    sampler = AnnealedLangevin(sigmas, steps_each=steps_each, eps=eps)
    sampler._check_field(field)
    shape = check_shape(shape)
    dtype = dtype or torch.get_default_dtype()
    check(isinstance(dtype, torch.dtype) and dtype.is_floating_point, "dtype",
          "a floating-point torch.dtype", dtype)
    if device is None:
        device = generator.device if isinstance(generator, torch.Generator) else "cpu"
    stream = make_stream(generator, seeds, shape[0], device)
    z = stream.randn(torch.empty(shape, device=device, dtype=dtype))
    _, bs = sampler._levels(field.process, z)
    return sampler.run(field, bs[0] * z, generator=stream, denoise=denoise, cond=cond)

