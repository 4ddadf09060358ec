"""The :class:`ScoreField` protocol: a process plus a score function of ``(x, t)``."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .._errors import ArgumentTypeError
from .._tensor import bcast, check_output
from ..parametrization import x0_from_score
from ..processes import Process

__all__ = ["ScoreField", "check_field", "check_model_output", "denoise"]


@runtime_checkable
class ScoreField(Protocol):
    """Anything with a ``process`` and ``__call__(x, t, **cond) -> score`` (same shape as ``x``).

    ``t`` is a per-sample ``(B,)`` tensor; ``cond`` holds conditioning values (per-row tensors
    already sliced to the rows of ``x``), empty for unconditional use. Rows must be treated
    independently: the library may call the field on any subset of rows. An optional attribute
    ``exact_score`` (default True) is False for pseudo-scores (finite-D PFGM++ fields), which SDE
    solvers and Langevin correctors refuse.
    """

    process: Process

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor: ...


def check_model_output(out, x: torch.Tensor, name: str = "model") -> torch.Tensor:
    """Return ``out`` if it is a tensor with the shape, dtype and device of ``x``; else raise
    naming ``name``'s output (:func:`difsolve._tensor.check_output` without the cast: a network
    adapter does not change the model's dtype behind its back)."""
    return check_output(out, x, name, cast=False)


def check_field(field, name: str = "field") -> None:
    """Raise unless ``field`` satisfies the :class:`ScoreField` protocol."""
    if not isinstance(field, ScoreField) or not isinstance(field.process, Process):
        raise ArgumentTypeError(
            f"argument `{name}` must be a ScoreField (an object with a `process` attribute that is "
            f"a difsolve Process and a `__call__(x, t)`), got {type(field).__name__}"
        )


def is_exact(field) -> bool:
    """Whether the field returns a true score (``exact_score`` attribute, default True)."""
    return bool(getattr(field, "exact_score", True))


def denoise(field, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
    """Posterior mean ``E[x0 | x_t = x]`` by Tweedie's formula (uses ``field.denoise`` if any);
    ``cond`` is passed to the field."""
    own = getattr(field, "denoise", None)
    if own is not None:
        return own(x, t, **cond)
    a, b = field.process.marginal(t)
    return x0_from_score(field(x, t, **cond), x, bcast(a, x), bcast(b, x))
