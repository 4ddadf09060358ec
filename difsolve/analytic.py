"""Closed-form ground truth (kept for imports of 0.1; the problems live in
:mod:`difsolve.problems`)."""

from .problems import GaussianFlow

__all__ = ["GaussianFlow"]
