r"""Conversions between the score, eps, x0, v and denoiser forms of one prediction.

For ``x = a x0 + b eps`` (``a``, ``b`` from the process at time ``t``, broadcast per sample):

* score: ``s = -eps / b = (a x0 - x) / b^2``;
* eps: ``eps = (x - a x0) / b``;
* x0 (data / denoiser prediction): ``x0 = (x + b^2 s) / a``;
* v (Salimans & Ho 2022): ``v = a eps - b x0``, hence ``x0 = (a x - b v) / (a^2 + b^2)``
  (``= a x - b v`` for variance-preserving processes);
* flow (flow matching, Lipman et al. 2022; Liu et al. 2022): the velocity ``u = eps - x0``
  of ``x = (1 - t) x0 + t eps``; with ``x = a x0 + b eps`` in general,
  ``eps = (x + a u) / (a + b)`` and ``x0 = (x - b u) / (a + b)``.

A k-diffusion / EDM denoiser ``D(y, sigma)`` acts on the unscaled state ``y = x / a``; its output
is ``x0``. This module is the one place where these identities live.
"""

from __future__ import annotations

import torch

from ._errors import check

__all__ = ["PREDICTIONS", "eps_from_score", "score_from", "v_from_score", "x0_from",
           "x0_from_score"]

PREDICTIONS = ("score", "eps", "x0", "v", "flow")


def score_from(kind: str, out: torch.Tensor, x: torch.Tensor, a: torch.Tensor,
               b: torch.Tensor) -> torch.Tensor:
    """Score from a prediction ``out`` of the given ``kind`` (``a``, ``b`` broadcast like ``x``)."""
    if kind == "score":
        return out
    if kind == "eps":
        return -out / b
    if kind == "x0":
        return (a * out - x) / b.square()
    if kind == "v":
        x0 = (a * x - b * out) / (a.square() + b.square())
        return (a * x0 - x) / b.square()
    if kind == "flow":
        return -(x + a * out) / ((a + b) * b)
    check(False, "predicts", f"one of {PREDICTIONS}", kind)
    raise AssertionError  # unreachable


def x0_from(kind: str, out: torch.Tensor, x: torch.Tensor, a: torch.Tensor,
            b: torch.Tensor) -> torch.Tensor:
    """Data prediction ``x0`` from a prediction ``out`` of the given ``kind``."""
    if kind == "x0":
        return out
    return x0_from_score(score_from(kind, out, x, a, b), x, a, b)


def x0_from_score(score: torch.Tensor, x: torch.Tensor, a: torch.Tensor,
                  b: torch.Tensor) -> torch.Tensor:
    """Tweedie's formula: posterior mean ``E[x0 | x_t] = (x + b^2 s) / a``."""
    return (x + b.square() * score) / a


def eps_from_score(score: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``eps = -b s``."""
    return -b * score


def v_from_score(score: torch.Tensor, x: torch.Tensor, a: torch.Tensor,
                 b: torch.Tensor) -> torch.Tensor:
    """``v = a eps - b x0``."""
    return a * eps_from_score(score, b) - b * x0_from_score(score, x, a, b)
