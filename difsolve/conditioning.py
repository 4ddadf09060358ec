"""Conditioning that travels with the rows.

A condition is a dict of keyword arguments for the field (class labels, text embeddings, masks,
guidance inputs). Every tensor whose first dimension is the batch size ``B`` is *per row*: it is
sliced with the rows the library evaluates (an adaptive solve drops finished rows, a likelihood
evaluates copies); every other value (scalars, strings, tensors of another first dimension) passes
unchanged. The field is called as ``field(x, t, **cond_rows)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ._errors import ArgumentTypeError

__all__ = ["Conditioned", "ConditionedField", "RowCondition", "as_condition"]


class RowCondition:
    """An immutable condition dict split into per-row tensors and shared values."""

    def __init__(self, per_row: dict[str, torch.Tensor], shared: dict[str, object]):
        self.per_row, self.shared = per_row, shared

    @classmethod
    def of(cls, cond: Mapping | None, batch: int) -> RowCondition:
        if cond is None:
            return cls({}, {})
        if not isinstance(cond, Mapping):
            raise ArgumentTypeError(
                f"argument `cond` must be a dict of keyword arguments for the field, got "
                f"{type(cond).__name__}")
        per_row, shared = {}, {}
        for key, value in cond.items():
            if not isinstance(key, str):
                raise ArgumentTypeError(f"argument `cond`: keys must be strings, got {key!r}")
            if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
                per_row[key] = value
            else:
                shared[key] = value
        return cls(per_row, shared)

    def __bool__(self) -> bool:
        return bool(self.per_row or self.shared)

    @property
    def values(self) -> dict[str, object]:
        """The keyword arguments for the current rows."""
        return {**self.shared, **self.per_row}

    def select(self, rows: torch.Tensor) -> RowCondition:
        """The condition of ``rows`` (an index or boolean mask over the current rows)."""
        return RowCondition({k: v[rows] for k, v in self.per_row.items()}, self.shared)

    def repeat(self, copies: int) -> RowCondition:
        """The condition of ``copies`` stacked copies of the batch (copy-major, as
        ``torch.cat([x] * copies)``)."""
        return RowCondition({k: v.repeat(copies, *([1] * (v.ndim - 1)))
                             for k, v in self.per_row.items()}, self.shared)


def as_condition(cond, batch: int) -> RowCondition:
    return cond if isinstance(cond, RowCondition) else RowCondition.of(cond, batch)


class ConditionedField:
    """``field`` with a condition bound: ``self(x, t) = field(x, t, **cond)``."""

    def __init__(self, field, cond: RowCondition):
        self.inner, self.cond = field, cond
        self.process = field.process
        self.exact_score = getattr(field, "exact_score", True)
        if callable(getattr(field, "denoise", None)):  # else Tweedie's formula on self
            self.denoise = self._denoise

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.inner(x, t, **self.cond.values)

    def _denoise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.inner.denoise(x, t, **self.cond.values)

    def __repr__(self) -> str:
        return f"ConditionedField({self.inner!r}, keys={sorted(self.cond.values)})"


class Conditioned:
    """Dynamics with a condition bound: ``drift(x, t) = dynamics.drift(x, t, **cond)`` (and
    ``denoise`` likewise); ``field`` is the bound field, so correctors see the condition too."""

    def __init__(self, dynamics, cond: RowCondition):
        self.inner, self.cond = dynamics, cond
        self.process = getattr(dynamics, "process", None)
        field = getattr(dynamics, "field", None)
        self.field = ConditionedField(field, cond) if field is not None else None
        if callable(getattr(dynamics, "diffusion", None)):
            self.noise = getattr(dynamics, "noise", "additive")
            self.diffusion = dynamics.diffusion
        if callable(getattr(dynamics, "denoise", None)):
            self.denoise = self._denoise

    def drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.inner.drift(x, t, **self.cond.values)

    def _denoise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.inner.denoise(x, t, **self.cond.values)

    def __repr__(self) -> str:
        return f"Conditioned({self.inner!r})"
