"""Results of a solve: :class:`Solution`, its work counters :class:`Stats` and the per-sample
:class:`Status` codes. This module imports nothing else from difsolve (bottom of the import graph)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

__all__ = ["Solution", "Stats", "Status"]


class Status(enum.IntEnum):
    """Per-sample outcome of a solve."""

    SUCCESS = 0
    MAX_STEPS = 1
    NONFINITE = 2
    DT_UNDERFLOW = 3


@dataclass
class Stats:
    """Work counters. ``nfe`` counts batched calls of the dynamics (or field); the ``(B,)``
    tensors count per sample."""

    nfe: int
    nfe_per_sample: torch.Tensor
    steps: torch.Tensor
    accepted: torch.Tensor
    rejected: torch.Tensor


@dataclass
class Solution:
    """Result of :func:`solve`: final state ``x`` at time ``t`` (``(B,)``), saved states
    ``xs`` (``(S, B, ...)``) at times ``ts`` when ``save_at`` was given, ``stats`` and ``status``."""

    x: torch.Tensor
    t: torch.Tensor
    stats: Stats
    status: torch.Tensor
    ts: torch.Tensor | None = None
    xs: torch.Tensor | None = None

    @property
    def success(self) -> bool:
        """Whether every sample finished with :attr:`Status.SUCCESS` (synchronises)."""
        return bool((self.status == Status.SUCCESS).all())
