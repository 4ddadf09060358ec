"""Errors raised by difsolve.

Every rejected input raises a subclass of :class:`DifsolveError`; the message names the offending
argument and what was expected.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class DifsolveError(ValueError):
    """Base class of every error difsolve raises on purpose (also a ``ValueError``)."""


class InvalidArgumentError(DifsolveError):
    """An argument has the wrong value (out of range, not finite, wrong shape...)."""


class ArgumentTypeError(DifsolveError, TypeError):
    """An argument has the wrong type (also a ``TypeError``)."""


class IncompatibleError(DifsolveError):
    """Two valid choices do not work together (e.g. an SDE solver on an ODE)."""


def check(condition: bool, name: str, expected: str, got: Any = None) -> None:
    """Raise :class:`InvalidArgumentError` naming ``name`` unless ``condition`` holds."""
    if not condition:
        suffix = "" if got is None else f", got {_short(got)}"
        raise InvalidArgumentError(f"argument `{name}` must be {expected}{suffix}")


def check_positive(value: float, name: str, *, allow_zero: bool = False) -> float:
    """Validate a finite positive real number and return it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = float(value)
        else:
            raise ArgumentTypeError(f"argument `{name}` must be a real number, got {_short(value)}")
    value = float(value)
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    check(ok, name, "a finite non-negative number" if allow_zero else "a finite positive number",
          value)
    return value


def check_int(value: Any, name: str, minimum: int = 1) -> int:
    """Validate an integer ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"argument `{name}` must be an int, got {_short(value)}")
    check(value >= minimum, name, f"an int >= {minimum}", value)
    return value


def check_tensor(value: Any, name: str) -> torch.Tensor:
    """Validate that ``value`` is a floating-point tensor with a batch dimension."""
    if not isinstance(value, torch.Tensor):
        raise ArgumentTypeError(f"argument `{name}` must be a torch.Tensor, got {_short(value)}")
    check(value.is_floating_point(), name, "a floating-point tensor", value.dtype)
    check(value.ndim >= 1, name, "a tensor of shape (B, ...)", tuple(value.shape))
    return value


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        if value.numel() <= 4:
            return f"tensor {value.tolist()}"
        return f"tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."
