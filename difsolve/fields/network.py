"""Adapters that expose neural networks as score fields.

:class:`ScoreNetwork` wraps ``model(x, t)`` predicting the score, eps, x0 or v;
:class:`Denoiser` wraps a k-diffusion / EDM denoiser ``model(y, sigma) -> x0`` acting on the unscaled
state ``y = x / a(t)``. The conversions are those of :mod:`difsolve.parametrization`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._errors import ArgumentTypeError, check
from .._tensor import TimeLike, as_time, bcast
from ..parametrization import PREDICTIONS, score_from
from ..processes import Process

__all__ = ["Denoiser", "ScoreNetwork"]


def _check_common(model, process):
    if not callable(model):
        raise ArgumentTypeError(f"argument `model` must be callable, got {type(model).__name__}")
    check(isinstance(process, Process), "process", "a difsolve Process", process)


def _check_output(out, x: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor):
        raise ArgumentTypeError(
            f"argument `model` must return a torch.Tensor, got {type(out).__name__}")
    check(out.shape == x.shape, "model", f"to return a tensor of the shape of x {tuple(x.shape)}",
          tuple(out.shape))


class ScoreNetwork:
    """A network ``model(x, time_input(t))`` exposed as a score field.

    Args:
        model: callable ``(x, t_in) -> Tensor`` with the shape of ``x``.
        process: the noising process the model was trained for.
        predicts: ``"score"``, ``"eps"`` (``s = -eps/b``), ``"x0"`` (``s = (a x0 - x)/b^2``) or
            ``"v"`` (``x0 = (a x - b v)/(a^2 + b^2)``).
        time_input: optional map from the per-sample time ``t`` to what the model expects
            (e.g. ``process.sigma`` or ``lambda t: 999 * t``); identity by default.
    """

    exact_score = True

    def __init__(self, model: Callable, process: Process, predicts: str = "score",
                 time_input: Callable[[torch.Tensor], torch.Tensor] | None = None):
        _check_common(model, process)
        check(predicts in PREDICTIONS, "predicts", f"one of {PREDICTIONS}", predicts)
        if time_input is not None and not callable(time_input):
            raise ArgumentTypeError("argument `time_input` must be callable or None")
        self.model, self.process, self.predicts, self.time_input = (
            model, process, predicts, time_input)

    def __call__(self, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        t = as_time(t, x)
        out = self.model(x, t if self.time_input is None else self.time_input(t))
        _check_output(out, x)
        if self.predicts == "score":
            return out
        a, b = self.process.marginal(t)
        return score_from(self.predicts, out, x, bcast(a, x), bcast(b, x))

    def __repr__(self) -> str:
        return f"ScoreNetwork(predicts={self.predicts!r}, process={self.process!r})"


class Denoiser:
    """A k-diffusion / EDM denoiser ``model(y, sigma) -> x0`` exposed as a score field.

    For ``x_t = a (x0 + sigma z)`` the model sees ``y = x / a`` and ``sigma = b / a``; the score is
    ``s = (a D - x) / b^2``. With the EDM process (``a = 1``) this is ``(D - x) / sigma^2``.
    """

    exact_score = True

    def __init__(self, model: Callable, process: Process):
        _check_common(model, process)
        self.model, self.process = model, process

    def denoise(self, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """The model's ``x0`` prediction at ``(x, t)``."""
        t = as_time(t, x)
        a, b = self.process.marginal(t)
        out = self.model(x / bcast(a, x), b / a)
        _check_output(out, x)
        return out

    def __call__(self, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        t = as_time(t, x)
        a, b = self.process.marginal(t)
        return score_from("x0", self.denoise(x, t), x, bcast(a, x), bcast(b, x))

    def __repr__(self) -> str:
        return f"Denoiser(process={self.process!r})"
