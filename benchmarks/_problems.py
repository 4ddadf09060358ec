"""Benchmark problems shared by the scripts in this folder."""

from __future__ import annotations

import math

import torch

import difsolve as ds


def ring_mixture(n_modes: int = 8, radius: float = 2.0, std: float = 0.1, weights=None,
                 dtype=torch.float64) -> ds.GaussianMixture:
    """An ``n_modes``-component 2-D ring of isotropic Gaussians (equal weights by default)."""
    ang = torch.arange(n_modes, dtype=dtype) * (2 * math.pi / n_modes)
    means = radius * torch.stack([ang.cos(), ang.sin()], dim=1)
    w = torch.full((n_modes,), 1.0 / n_modes) if weights is None else torch.as_tensor(weights)
    return ds.GaussianMixture(w, means, torch.full((n_modes,), std**2))
