"""Errors raised by difsolve.

Every rejected input raises a subclass of :class:`DifsolveError`; the message names the offending
argument and what was expected.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
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
    value = check_real(value, name, finite=False)
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    check(ok, name, "a finite non-negative number" if allow_zero else "a finite positive number",
          value)
    return value


def check_int(value: Any, name: str, minimum: int = 1) -> int:
    """Validate an integer ``>= minimum`` (Python or numpy)."""
    if isinstance(value, bool) or not (isinstance(value, int) or _is_numpy_int(value)):
        raise ArgumentTypeError(f"argument `{name}` must be an int, got {_short(value)}")
    value = int(value)
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


def check_shape(shape: Any, name: str = "shape") -> tuple[int, ...]:
    """A state shape ``(B, ...)``: a sequence of non-negative ints (``B = 0`` is an empty batch;
    the other sizes must be positive)."""
    if isinstance(shape, (int, torch.Tensor)) or not hasattr(shape, "__iter__"):
        raise ArgumentTypeError(
            f"argument `{name}` must be a tuple of ints (B, ...), got {_short(shape)}")
    values = tuple(shape)
    if not all(isinstance(s, int) or _is_numpy_int(s) for s in values) or any(
            isinstance(s, bool) for s in values):
        raise ArgumentTypeError(
            f"argument `{name}` must be a tuple of ints (B, ...), got {_short(shape)}")
    values = tuple(int(s) for s in values)
    check(len(values) >= 1 and values[0] >= 0 and all(s >= 1 for s in values[1:]), name,
          "a shape (B, ...) with B >= 0 and positive other sizes", values)
    return values


def check_real(value: Any, name: str, *, finite: bool = True) -> float:
    """A real number (Python, numpy or 1-element tensor) as a float."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = float(value)
    if isinstance(value, bool) or not (isinstance(value, (int, float)) or _is_numpy_real(value)):
        raise ArgumentTypeError(f"argument `{name}` must be a real number, got {_short(value)}")
    value = float(value)
    if finite:
        check(math.isfinite(value), name, "a finite real number", value)
    return value


def _is_numpy_int(value: Any) -> bool:
    return isinstance(value, np.integer)


def _is_numpy_real(value: Any) -> bool:
    return isinstance(value, (np.integer, np.floating))
