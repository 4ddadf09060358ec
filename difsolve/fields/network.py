"""Adapters that expose neural networks as score fields.

* :class:`ScoreNetwork` wraps ``model(x, t_in, **cond)`` predicting the score, eps, x0, v or the
  flow-matching velocity, on the process it was trained for;
* :class:`Denoiser` wraps a k-diffusion / EDM denoiser ``model(y, sigma, **cond) -> x0`` acting on
  the unscaled state ``y = x / a(t)`` (k-diffusion's wrapped models, as they are);
* :class:`DiscreteDenoiser` wraps an eps / v / x0 model trained on a discrete DDPM table
  (:class:`~difsolve.DiscreteVP`) for use under any process, by default EDM's sigma time: the
  route of k-diffusion's ``DiscreteEpsDDPMDenoiser`` (input scaling ``c_in = 1/sqrt(1 + sigma^2)``,
  timestep ``t = t_of_sigma(sigma)`` of the table).

Every adapter forwards conditioning: the library calls ``field(x, t, **cond)`` and the adapter
calls ``model(..., **cond)``. Outputs are checked by :func:`~difsolve.fields.base.check_model_output`.
The conversions are those of :mod:`difsolve.parametrization`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._errors import ArgumentTypeError, check
from .._tensor import TimeLike, as_time, bcast
from ..parametrization import PREDICTIONS, score_from, x0_from
from ..processes import EDM, Process
from .base import check_model_output

__all__ = ["Denoiser", "DiscreteDenoiser", "ScoreNetwork"]


def _check_common(model, process, name: str = "process"):
    if not callable(model):
        raise ArgumentTypeError(f"argument `model` must be callable, got {type(model).__name__}")
    check(isinstance(process, Process), name, "a difsolve Process", process)


def _check_predicts(predicts: str, allowed=PREDICTIONS) -> str:
    check(predicts in allowed, "predicts", f"one of {allowed}", predicts)
    return predicts


def _check_time_input(time_input):
    if time_input is not None and not callable(time_input):
        raise ArgumentTypeError("argument `time_input` must be callable or None")
    return time_input


class ScoreNetwork:
    """A network ``model(x, time_input(t), **cond)`` exposed as a score field.

    Args:
        model: callable ``(x, t_in, **cond) -> Tensor`` with the shape and dtype of ``x``.
        process: the noising process the model was trained for (its time is the model's time:
            with :class:`~difsolve.DiscreteVP` the timestep index, with
            :class:`~difsolve.RectifiedFlow` the interpolation time).
        predicts: ``"score"``, ``"eps"`` (``s = -eps/b``), ``"x0"`` (``s = (a x0 - x)/b^2``),
            ``"v"`` (``x0 = (a x - b v)/(a^2 + b^2)``) or ``"flow"`` (velocity ``eps - x0``; on
            :class:`~difsolve.RectifiedFlow` the probability-flow drift is this velocity).
        time_input: optional map from the per-sample time ``t`` to what the model expects
            (e.g. ``process.sigma``); identity by default.
    """

    exact_score = True

    def __init__(self, model: Callable, process: Process, predicts: str = "score",
                 time_input: Callable[[torch.Tensor], torch.Tensor] | None = None):
        _check_common(model, process)
        self.model, self.process = model, process
        self.predicts = _check_predicts(predicts)
        self.time_input = _check_time_input(time_input)

    def __call__(self, x: torch.Tensor, t: TimeLike, **cond) -> torch.Tensor:
        t = as_time(t, x)
        out = self.model(x, t if self.time_input is None else self.time_input(t), **cond)
        check_model_output(out, x)
        if self.predicts == "score":
            return out
        a, b = self.process.marginal(t)
        return score_from(self.predicts, out, x, bcast(a, x), bcast(b, x))

    def __repr__(self) -> str:
        return f"ScoreNetwork(predicts={self.predicts!r}, process={self.process!r})"


class Denoiser:
    """A k-diffusion / EDM denoiser ``model(y, sigma, **cond) -> x0`` exposed as a score field.

    For ``x_t = a (x0 + sigma z)`` the model sees ``y = x / a`` and ``sigma = b / a``; the score is
    ``s = (a D - x) / b^2``. With the EDM process (``a = 1``) this is ``(D - x) / sigma^2``.
    k-diffusion's wrapped models (``K.external.CompVisDenoiser(model)`` etc.) are such denoisers.
    """

    exact_score = True

    def __init__(self, model: Callable, process: Process):
        _check_common(model, process)
        self.model, self.process = model, process

    def denoise(self, x: torch.Tensor, t: TimeLike, **cond) -> torch.Tensor:
        """The model's ``x0`` prediction at ``(x, t)``."""
        t = as_time(t, x)
        a, b = self.process.marginal(t)
        return check_model_output(self.model(x / bcast(a, x), b / a, **cond), x)

    def __call__(self, x: torch.Tensor, t: TimeLike, **cond) -> torch.Tensor:
        t = as_time(t, x)
        a, b = self.process.marginal(t)
        return score_from("x0", self.denoise(x, t, **cond), x, bcast(a, x), bcast(b, x))

    def __repr__(self) -> str:
        return f"Denoiser(process={self.process!r})"


class DiscreteDenoiser:
    r"""A model trained on a table ``schedule`` (e.g. a :class:`~difsolve.DiscreteVP`), used under
    any ``process`` with the same noise levels.

    At ``(x, t)`` of ``process``: ``sigma = b/a``, the model's time is
    ``tau = schedule.t_of_sigma(sigma)`` and its input is the state of ``schedule`` at the same
    sigma, ``x_m = a_m x / a`` (``a_m = 1/sqrt(1 + sigma^2)``: k-diffusion's ``c_in`` when
    ``process`` is EDM); ``model(x_m, tau, **cond)`` predicts ``predicts`` (``"eps"``, ``"v"``,
    ``"x0"``, ``"flow"`` or ``"score"``) in the schedule's terms, converted to ``x0``, which is
    the same under both processes. With the default ``process = EDM(sigma_min, sigma_max)`` of the
    table this is k-diffusion's ``DiscreteEpsDDPMDenoiser`` / ``DiscreteVDDPMDenoiser``: sample
    it as k-diffusion does (Karras grid in sigma, Heun). With ``process=schedule`` the model is
    called on ``(x, t)`` directly (as :class:`ScoreNetwork`).

    Args:
        model: ``(x_m, tau, **cond) -> Tensor`` of the shape and dtype of ``x``.
        schedule: the process the model was trained on (its time is the model's timestep).
        predicts: what the model predicts (default ``"eps"``).
        process: the process to sample in; default ``EDM(schedule.sigma_min, schedule.sigma_max)``.
    """

    exact_score = True

    def __init__(self, model: Callable, schedule: Process, predicts: str = "eps",
                 process: Process | None = None):
        _check_common(model, schedule, "schedule")
        self.model, self.schedule = model, schedule
        self.predicts = _check_predicts(predicts)
        if process is None:
            process = EDM(schedule.sigma_min, schedule.sigma_max)
        check(isinstance(process, Process), "process", "a difsolve Process or None", process)
        self.process = process

    def _evaluate(self, x: torch.Tensor, t: TimeLike, cond):
        """``(out, x_m, a_m, b_m)``: the model's output at the schedule state ``x_m`` and the
        schedule's ``a_m, b_m`` (broadcast like ``x``)."""
        t = as_time(t, x)
        if self.process is self.schedule:
            tau, x_m = t, x
            a_m, b_m = self.schedule.marginal(t)
        else:
            a, b = self.process.marginal(t)
            tau = self.schedule.t_of_sigma(b / a)
            a_m, b_m = self.schedule.marginal(tau)
            x_m = x * bcast(a_m / a, x)
        out = check_model_output(self.model(x_m, tau, **cond), x)
        return out, x_m, bcast(a_m, x), bcast(b_m, x)

    def denoise(self, x: torch.Tensor, t: TimeLike, **cond) -> torch.Tensor:
        """The model's data prediction ``x0`` at ``(x, t)`` of :attr:`process`."""
        return x0_from(self.predicts, *self._evaluate(x, t, cond))

    def __call__(self, x: torch.Tensor, t: TimeLike, **cond) -> torch.Tensor:
        if self.process is self.schedule:  # direct conversion, no detour through x0
            return score_from(self.predicts, *self._evaluate(x, t, cond))
        t = as_time(t, x)
        a, b = self.process.marginal(t)
        return score_from("x0", self.denoise(x, t, **cond), x, bcast(a, x), bcast(b, x))

    def __repr__(self) -> str:
        return (f"DiscreteDenoiser(predicts={self.predicts!r}, schedule={self.schedule!r}, "
                f"process={self.process!r})")
