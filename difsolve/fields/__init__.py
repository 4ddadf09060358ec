"""Score fields: the ScoreField protocol and its adapters."""

from .base import ScoreField, check_field, denoise, is_exact
from .gaussian_mixture import GaussianMixture, GaussianMixtureField
from .guidance import ClassifierFreeGuidance
from .network import Denoiser, DiscreteDenoiser, ScoreNetwork

__all__ = [
    "ClassifierFreeGuidance",
    "Denoiser",
    "DiscreteDenoiser",
    "GaussianMixture",
    "GaussianMixtureField",
    "ScoreField",
    "ScoreNetwork",
    "check_field",
    "denoise",
    "is_exact",
]
