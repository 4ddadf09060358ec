r"""Classifier-free guidance (Ho & Salimans, 2022) as a score field.

``s_w(x, t | c) = s(x, t | null) + w (s(x, t | c) - s(x, t | null))``. The combination is affine,
so it is the same in score, eps, x0 and v form (each is an affine function of the score at fixed
``x, t``). For ``w = 1`` it is the conditional field, for ``w = 0`` the unconditional one; for
Gaussian conditionals it is the score of the tilted density ``p_c^w p_null^(1 - w)`` (up to
normalisation) at every ``t``.
"""

from __future__ import annotations

import torch

from .._errors import ArgumentTypeError, check_real
from ..conditioning import RowCondition
from .base import check_field
from .base import denoise as tweedie

__all__ = ["ClassifierFreeGuidance"]


class ClassifierFreeGuidance:
    """A :class:`~difsolve.ScoreField` guiding ``field`` with ``scale`` (``w``).

    Args:
        field: a conditional field, called as ``field(x, t, **cond)``.
        scale: the guidance weight ``w`` (1: conditional, 0: unconditional; 3-8 is common).
        uncond: the null condition, a dict with the same keys as the condition (e.g.
            ``{"label": torch.tensor(num_classes)}`` or an empty-prompt embedding); a tensor value
            is broadcast to every row (a 0-d tensor or one with first dimension 1), or given per
            row (first dimension ``B``).

    Both predictions come from one batched call of ``2 B`` rows when every condition value is a
    per-row tensor; otherwise from two calls.
    """

    def __init__(self, field, scale: float, uncond: dict):
        check_field(field)
        self.inner = field
        self.process = field.process
        self.exact_score = getattr(field, "exact_score", True)
        self.scale = check_real(scale, "scale")
        if not isinstance(uncond, dict):
            raise ArgumentTypeError(
                f"argument `uncond` must be a dict of null-condition values, got "
                f"{type(uncond).__name__}")
        self.uncond = dict(uncond)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return self._guided(self.inner, x, t, cond)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """The guided data prediction (the same combination of the two predictions)."""
        return self._guided(lambda *a, **k: tweedie(self.inner, *a, **k), x, t, cond)

    def _guided(self, predict, x, t, cond) -> torch.Tensor:
        batch = x.shape[0]
        null = {k: _rows(v, batch) for k, v in self.uncond.items()}
        split = RowCondition.of(cond, batch)
        together = not split.shared and all(
            isinstance(v, torch.Tensor) and v.shape[0] == batch for v in null.values()) and \
            set(null) <= set(split.per_row)
        if together:
            both = {k: torch.cat([v, null.get(k, v)]) for k, v in split.per_row.items()}
            out = predict(torch.cat([x, x]), torch.cat([t, t]), **both)
            conditional, unconditional = out[:batch], out[batch:]
        else:
            conditional = predict(x, t, **cond)
            unconditional = predict(x, t, **{**cond, **null})
        return unconditional + self.scale * (conditional - unconditional)

    def __repr__(self) -> str:
        return f"ClassifierFreeGuidance({self.inner!r}, scale={self.scale!r})"


def _rows(value, batch: int):
    """A null-condition value for ``batch`` rows (tensors broadcast along the batch)."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.ndim == 0:
        return value.expand(batch)
    if value.shape[0] == 1 and batch != 1:
        return value.expand(batch, *value.shape[1:])
    return value
