"""Benchmark problems: the shared closed-form problems of :mod:`difsolve.problems`."""

from difsolve.problems import ring_mixture, rotated_mixture

__all__ = ["ring_mixture", "rotated_mixture"]
