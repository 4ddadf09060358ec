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
    """Result of :func:`~difsolve.solve` (and of the samplers built on it).

    Attributes:
        x: final state ``(B, ...)``; NaN in every row whose status is not ``SUCCESS``, so a
            failed row can never be mistaken for a sample.
        t: final time ``(B,)``.
        stats: work counters (:class:`Stats`).
        status: per-sample :class:`Status` codes ``(B,)``.
        ts, xs: save times ``(S,)`` and saved states ``(S, B, ...)`` when ``save_at`` was given
            (NaN for rows that failed, and for save points a row did not reach).
        last_x, last_t: each row's last finite state and its time (equal to ``x``, ``t`` for
            rows that succeeded): where a failed row broke down.
    """

    x: torch.Tensor
    t: torch.Tensor
    stats: Stats
    status: torch.Tensor
    ts: torch.Tensor | None = None
    xs: torch.Tensor | None = None
    last_x: torch.Tensor | None = None
    last_t: torch.Tensor | None = None

    @property
    def success(self) -> bool:
        """Whether every sample finished with :attr:`Status.SUCCESS` (synchronises)."""
        return bool((self.status == Status.SUCCESS).all())
