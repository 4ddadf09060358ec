r"""Dynamics built from a score field, and the time changes the solvers may integrate in.

* :class:`ProbabilityFlowODE`: ``dx/dt = f(t) x - g(t)^2 s(x, t) / 2`` (Song et al. 2021, eq. 13).
  With the EDM process this is ``dx/dsigma = (x - D(x, sigma)) / sigma``.
* :class:`ReverseSDE`: ``dx = [f(t) x - g(t)^2 s(x, t)] dt + g(t) dw_bar``, integrated backwards
  in time (``dt < 0``, the Brownian increment has variance ``|dt|``); additive noise.
* :class:`LogSigmaTime`: any of the above (or a user's dynamics with a ``process``) in the time
  variable ``u = log sigma(t)``, in which probability-flow trajectories are smooth at every noise
  level: ``dx/du = drift(x, t(u)) dt/du`` and, for SDEs, ``g_u = g sqrt(|dt/du|)``.
* :class:`SNRTime`: the probability-flow ODE in data-prediction coordinates: time
  ``w = a/b = 1/sigma = e^lambda`` and state ``z = x/b``, where it reads ``dz/dw = x0(b z, t(w))``
  (the field's data prediction). Far from the data (``x0`` nearly constant) and close to it
  (``x0`` converged) the solution is linear in ``w``, so explicit Runge-Kutta methods take large
  steps there; Euler in these coordinates is DDIM / DPM-Solver++(1).

Solvers integrate any object with ``drift(x, t)`` (and ``diffusion(t)`` plus ``noise`` for SDEs);
these classes are the ones difsolve builds for you.
"""

from __future__ import annotations

import torch

from ._errors import IncompatibleError, InvalidArgumentError, _short
from ._tensor import bcast, check_output
from .fields.base import check_field, denoise, is_exact

__all__ = ["TIME_VARIABLES", "CheckedDynamics", "CheckedField", "LogSigmaTime",
           "ProbabilityFlowODE", "ReverseSDE", "SNRTime", "TimeChange", "is_sde",
           "split_time_change", "time_change"]


def is_sde(dynamics) -> bool:
    """Whether ``dynamics`` has a diffusion term."""
    return callable(getattr(dynamics, "diffusion", None))


def score(field, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """``field(x, t, **cond)``, checked to be a floating-point tensor shaped like ``x``."""
    return check_output(field(x, t, **cond), x, "field")


class CheckedField:
    """``field`` with its outputs checked (score and, where it has one, its own ``denoise``):
    floating-point tensors shaped like ``x``, cast to ``x``'s dtype. Tweedie's formula on it
    (:func:`~difsolve.fields.base.denoise`) is then checked too."""

    def __init__(self, field):
        self.inner, self.process = field, field.process
        self.exact_score = getattr(field, "exact_score", True)
        if callable(getattr(field, "denoise", None)):
            self.denoise = self._denoise

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return score(self.inner, x, t, cond)

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return check_output(self.inner.denoise(x, t, **cond), x, "field", "have denoise return")

    def __repr__(self) -> str:
        return f"CheckedField({self.inner!r})"


class ProbabilityFlowODE:
    """Probability-flow ODE ``dx/dt = f(t) x - g(t)^2 s(x, t) / 2`` of a score field."""

    output_checked = True  # the field's output is checked here (the solve loop need not)

    def __init__(self, field):
        check_field(field)
        self.field = field
        self.process = field.process
        self._checked = CheckedField(field)

    def drift(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        f = self.process.drift_coef(t)
        g2 = self.process.g2(t)
        return bcast(f, x) * x - 0.5 * bcast(g2, x) * self._checked(x, t, **cond)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """Data prediction ``E[x0 | x_t]`` of the field (used by exponential integrators)."""
        return check_output(denoise(self._checked, x, t, **cond), x, "field")

    def __repr__(self) -> str:
        return f"ProbabilityFlowODE({self.field!r})"


class ReverseSDE:
    """Reverse-time SDE ``dx = [f x - g^2 s] dt + g dw_bar`` (Anderson 1982; Song et al. 2021).

    Refuses pseudo-score fields (``exact_score=False``): their reverse SDE does not have the data
    marginals.
    """

    noise = "additive"
    output_checked = True

    def __init__(self, field):
        check_field(field)
        if not is_exact(field):
            raise IncompatibleError(
                "argument `field` has exact_score=False (a pseudo-score, e.g. a finite-D PFGM++ "
                "field): the reverse SDE needs a true score; use an ODE solver instead")
        if not field.process.has_sde:
            raise IncompatibleError(
                f"argument `field`: its process {type(field.process).__name__} has no SDE")
        self.field = field
        self.process = field.process
        self._checked = CheckedField(field)

    def drift(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        f = self.process.drift_coef(t)
        g2 = self.process.g2(t)
        return bcast(f, x) * x - bcast(g2, x) * self._checked(x, t, **cond)

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        return self.process.g2(t).sqrt()

    def denoise(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return check_output(denoise(self._checked, x, t, **cond), x, "field")

    def __repr__(self) -> str:
        return f"ReverseSDE({self.field!r})"


class CheckedDynamics:
    """A user's dynamics with every ``drift`` (and ``diffusion``, ``denoise``) output checked:
    a floating-point tensor shaped like ``x`` (a diffusion may also be per row, ``(B,)``, or a
    scalar), cast to ``x``'s dtype. Other attributes are the dynamics' own. difsolve's own
    dynamics check their field's output themselves (``output_checked = True``) and are not
    wrapped."""

    def __init__(self, dynamics):
        self._inner = dynamics
        if is_sde(dynamics):
            self.noise = getattr(dynamics, "noise", "additive")
            self.diffusion = self._diffusion
        if callable(getattr(dynamics, "denoise", None)):
            self.denoise = self._denoise

    def __getattr__(self, name):
        if name == "_inner":
            raise AttributeError(name)
        return getattr(self._inner, name)

    def drift(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return check_output(self._inner.drift(x, t, **cond), x, "dynamics", "have drift return")

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return check_output(self._inner.denoise(x, t, **cond), x, "dynamics",
                            "have denoise return")

    def _diffusion(self, *args) -> torch.Tensor:
        g = self._inner.diffusion(*args)
        t = args[-1]
        if len(args) == 2 and isinstance(g, torch.Tensor) and g.ndim >= 2:
            return check_output(g, args[0], "dynamics", "have diffusion return")
        if not isinstance(g, torch.Tensor) or not g.is_floating_point() or not (
                g.ndim == 0 or g.shape[0] == t.shape[0]):
            raise InvalidArgumentError(
                f"argument `dynamics` must have diffusion return a floating-point tensor of "
                f"shape () or ({t.shape[0]}, ...) (per row), got {_short(g)}")
        return g

    def __repr__(self) -> str:
        return f"CheckedDynamics({self._inner!r})"


class TimeChange:
    """Base of the time changes: dynamics integrated in a new time ``u`` (and possibly new state
    coordinates). ``inner`` is the original dynamics, ``process`` its process; ``to_u``/``to_t``
    map times, ``encode``/``decode`` map states (the identity unless a subclass says otherwise)."""

    inner: object
    process: object

    def to_u(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_t(self, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """State in the new coordinates."""
        return x

    def decode(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """State back in the original coordinates."""
        return x


class LogSigmaTime(TimeChange):
    """``dynamics`` re-parametrised in ``u = log sigma(t)`` of its ``process``.

    ``drift_u(x, u) = drift(x, t(u)) / (d log sigma / dt)``; for SDEs
    ``diffusion_u(u) = diffusion(t(u)) / sqrt(|d log sigma / dt|)`` (a deterministic time change of
    an Ito SDE). :meth:`to_u` and :meth:`to_t` convert times.
    """

    def __init__(self, dynamics, process=None):
        process = process if process is not None else getattr(dynamics, "process", None)
        if process is None:
            raise IncompatibleError(
                "argument `time_variable`: 'log_sigma' needs dynamics with a `process` attribute")
        self.inner, self.process = dynamics, process
        self.field = getattr(dynamics, "field", None)
        if is_sde(dynamics):
            self.noise = getattr(dynamics, "noise", "additive")
            self.diffusion = self._diffusion

    def to_u(self, t: torch.Tensor) -> torch.Tensor:
        return torch.log(self.process.sigma(t))

    def to_t(self, u: torch.Tensor) -> torch.Tensor:
        return self.process.t_of_sigma(torch.exp(u))

    def _dudt(self, t: torch.Tensor) -> torch.Tensor:
        return self.process.dsigma_dt(t) / self.process.sigma(t)

    def drift(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        t = self.to_t(u)
        return self.inner.drift(x, t) / bcast(self._dudt(t), x)

    def _diffusion(self, u: torch.Tensor) -> torch.Tensor:
        t = self.to_t(u)
        return self.inner.diffusion(t) / self._dudt(t).abs().sqrt()


class SNRTime(TimeChange):
    """The probability-flow ODE of ``dynamics`` in data-prediction coordinates.

    Time ``w = a/b = 1/sigma`` (the square root of the signal-to-noise ratio), state ``z = x/b``:
    ``dz/dw = x0(b z, t(w))``, where ``x0`` is the dynamics' ``denoise`` (Tweedie) prediction.
    Exact for every process ``x_t = a x0 + b z`` (it is the EDM ODE ``dy/dsigma = (y - x0)/sigma``
    for ``y = x/a`` after the substitution ``w = 1/sigma``, ``z = y w``). Needs ``sigma > 0`` at
    both ends. Reference: Lu et al. (2022), DPM-Solver++, eq. (9) (the same integral form).
    """

    def __init__(self, dynamics):
        if is_sde(dynamics) or not callable(getattr(dynamics, "denoise", None)) or \
                getattr(dynamics, "process", None) is None:
            raise IncompatibleError(
                "argument `time_variable`: 'snr' integrates a ProbabilityFlowODE (dynamics with "
                "`denoise(x, t)` and a `process`, no diffusion); use 'log_sigma' or 't'")
        self.inner, self.process = dynamics, dynamics.process
        self.field = getattr(dynamics, "field", None)

    def to_u(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 / self.process.sigma(t)

    def to_t(self, w: torch.Tensor) -> torch.Tensor:
        return self.process.t_of_sigma(1.0 / w)

    def encode(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x / bcast(self.process.marginal(t)[1], x)

    def decode(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return z * bcast(self.process.marginal(t)[1], z)

    def drift(self, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        t = self.to_t(w)
        return self.inner.denoise(self.decode(z, t), t)


TIME_CHANGES = {"log_sigma": LogSigmaTime, "snr": SNRTime}
#: every ``time_variable`` of :func:`~difsolve.solve` (``"t"``: no change)
TIME_VARIABLES = ("t", *TIME_CHANGES)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def split_time_change(dynamics):
    """``(dynamics in t, map from the integration time to t)``: undoes a :class:`TimeChange`
    (the identity map for dynamics integrated in ``t``)."""
    if isinstance(dynamics, TimeChange):
        return dynamics.inner, dynamics.to_t
    return dynamics, _identity


def time_change(dynamics, name: str):
    """The dynamics re-parametrised in time variable ``name`` (``"t"``: unchanged, None)."""
    if name == "t":
        return None
    return TIME_CHANGES[name](dynamics)
