"""Load peer libraries for benchmarks: k-diffusion's ``sampling`` module without its heavy package
``__init__`` (installed with ``pip install --no-deps k-diffusion``), and torchdiffeq."""

from __future__ import annotations

import importlib.util
import sys
import types

import torch


def _append_dims(x, target_dims):
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def load_k_diffusion_sampling():
    """Return ``k_diffusion.sampling`` (importing the package normally if it works)."""
    try:
        from k_diffusion import sampling  # type: ignore

        return sampling
    except Exception:  # the package __init__ needs optional heavy dependencies
        pass
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed: pip install --no-deps k-diffusion")
    root = spec.submodule_search_locations[0]
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = [root]
    pkg.__spec__ = spec  # so that a later importlib.util.find_spec("k_diffusion") still works
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = _append_dims
    pkg.utils = utils
    sys.modules.setdefault("k_diffusion", pkg)
    sys.modules.setdefault("k_diffusion.utils", utils)
    sspec = importlib.util.spec_from_file_location("k_diffusion.sampling", f"{root}/sampling.py")
    module = importlib.util.module_from_spec(sspec)
    sys.modules["k_diffusion.sampling"] = module
    sspec.loader.exec_module(module)
    return module


class CountingDenoiser:
    """``model(x, sigma) -> x0`` for k-diffusion, counting batched calls."""

    def __init__(self, field):
        self.field, self.calls = field, 0

    def __call__(self, x, sigma):
        self.calls += 1
        sigma = sigma.reshape(-1).expand(x.shape[0]) if sigma.numel() == 1 else sigma
        s = self.field(x, sigma)
        return x + sigma.reshape(-1, *([1] * (x.ndim - 1))).square() * s


class CountingODE(torch.nn.Module):
    """torchdiffeq right-hand side ``dx/dsigma = -sigma s(x, sigma)`` counting batched calls."""

    def __init__(self, field):
        super().__init__()
        self.field, self.calls = field, 0

    def forward(self, sigma, x):
        self.calls += 1
        s = sigma.expand(x.shape[0])
        return -sigma * self.field(x, s)
