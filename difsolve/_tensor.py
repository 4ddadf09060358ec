"""Small tensor helpers shared across difsolve (broadcasting per-sample time, norms)."""

from __future__ import annotations

import numpy as np
import torch

from ._errors import ArgumentTypeError, check

TimeLike = float | int | torch.Tensor


def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View a per-sample ``(B,)`` tensor so that it broadcasts against ``x`` of shape ``(B, ...)``."""
    if v.ndim == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1)))


def time_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype times and step sizes are kept in for states of ``dtype``: at least float32
    (a bfloat16 grid cannot tell 0.97 from 0.969)."""
    return torch.promote_types(dtype, torch.float32)


def as_time(t: TimeLike, x: torch.Tensor, name: str = "t",
            dtype: torch.dtype | None = None) -> torch.Tensor:
    """Return ``t`` as a ``(B,)`` tensor on the device of ``x``, in ``dtype`` (default x's).

    A Python number or a 0-d tensor is broadcast to every sample; a ``(B,)`` tensor is used as is.
    """
    batch = x.shape[0]
    dtype = dtype or x.dtype
    if isinstance(t, bool):
        raise ArgumentTypeError(f"argument `{name}` must be a number or a tensor, got {t!r}")
    if isinstance(t, (int, float)) or _is_numpy_number(t):
        return torch.full((batch,), float(t), device=x.device, dtype=dtype)
    if not isinstance(t, torch.Tensor):
        raise ArgumentTypeError(f"argument `{name}` must be a number or a tensor, got {t!r}")
    t = t.to(device=x.device, dtype=dtype)
    if t.ndim == 0:
        return t.expand(batch).clone()
    check(t.shape == (batch,), name, f"a number or a tensor of shape ({batch},)", tuple(t.shape))
    return t


def rms(x: torch.Tensor) -> torch.Tensor:
    """Root-mean-square over every dimension but the first: shape ``(B,)``."""
    return x.reshape(x.shape[0], -1).square().mean(dim=1).sqrt()


def flat_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the first: shape ``(B,)``."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def all_finite(x: torch.Tensor) -> torch.Tensor:
    """Per-sample finiteness flag ``(B,)`` (no host synchronisation)."""
    return torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)


def _is_numpy_number(value) -> bool:
    return isinstance(value, (np.integer, np.floating)) and not isinstance(value, np.bool_)
