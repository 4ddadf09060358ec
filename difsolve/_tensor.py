"""Small tensor helpers shared across difsolve (broadcasting per-sample time, norms)."""

from __future__ import annotations

import torch

from ._errors import ArgumentTypeError, check

TimeLike = float | int | torch.Tensor


def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View a per-sample ``(B,)`` tensor so that it broadcasts against ``x`` of shape ``(B, ...)``."""
    if v.ndim == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1)))


def as_time(t: TimeLike, x: torch.Tensor, name: str = "t") -> torch.Tensor:
    """Return ``t`` as a ``(B,)`` tensor on the device and dtype of ``x``.

    A Python number or a 0-d tensor is broadcast to every sample; a ``(B,)`` tensor is used as is.
    """
    batch = x.shape[0]
    if isinstance(t, bool):
        raise ArgumentTypeError(f"argument `{name}` must be a number or a tensor, got {t!r}")
    if isinstance(t, (int, float)):
        return torch.full((batch,), float(t), device=x.device, dtype=x.dtype)
    if not isinstance(t, torch.Tensor):
        raise ArgumentTypeError(f"argument `{name}` must be a number or a tensor, got {t!r}")
    t = t.to(device=x.device, dtype=x.dtype)
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
