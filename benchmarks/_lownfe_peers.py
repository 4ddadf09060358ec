"""Peer samplers on the EDM probability-flow ODE of an exact field, for the low-NFE benchmark and
the multistep agreement tests: diffusers' multistep schedulers on an explicit sigma grid, and
k-diffusion's samplers.

diffusers works on the variance-preserving state ``x_vp = x / sqrt(1 + sigma^2)`` with
``alpha = 1 / sqrt(1 + sigma^2)``, ``sigma_t = sigma alpha``; its schedulers read the noise level of
step ``i`` from ``scheduler.sigmas[i]``, so overriding ``sigmas`` (and giving ``timesteps`` distinct
labels) makes them integrate exactly the EDM ODE on the given grid, with the model
``eps = (x - D(x, sigma)) / sigma``. The grid ends at ``sigma_min`` (no final jump to 0).
"""

from __future__ import annotations

import torch

DIFFUSERS = ("DPMSolverMultistepScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler")


def diffusers_sample(name: str, sigmas: torch.Tensor, x: torch.Tensor, denoiser, **config):
    """Integrate from ``x`` at ``sigmas[0]`` to ``sigmas[-1]`` with diffusers' scheduler ``name``
    (``config``: its constructor arguments, e.g. ``solver_order``); returns ``(x, nfe)``."""
    import diffusers

    cls = getattr(diffusers, name)
    n = sigmas.numel() - 1
    config.setdefault("lower_order_final", False)
    if name == "DPMSolverMultistepScheduler":  # else its last step is first order
        config.setdefault("final_sigmas_type", "sigma_min")
    sched = cls(num_train_timesteps=1000, prediction_type="epsilon", **config)
    sched.set_timesteps(n)
    sched.sigmas = sigmas.to(torch.float64).cpu().clone()
    sched.timesteps = torch.arange(n, 0, -1, dtype=torch.int64) * (1000 // (n + 1))
    sched.num_inference_steps = n
    scale = (1 + sched.sigmas.square()).rsqrt()
    sample, nfe = x * scale[0].to(x), 0
    for i, step_t in enumerate(sched.timesteps):
        s = sched.sigmas[i].to(x)
        xe = sample / scale[i].to(x)
        sig = s.expand(x.shape[0])
        eps = (xe - denoiser(xe, sig)) / s
        nfe += 1
        sample = sched.step(eps, step_t, sample).prev_sample
    return sample / scale[-1].to(x), nfe


def kdiffusion_sample(sampler, sigmas: torch.Tensor, x: torch.Tensor, denoiser, **kwargs):
    """Run a k-diffusion sampler on ``sigmas`` (ending at ``sigma_min``; returns ``(x, nfe)``)."""
    calls = [0]

    def model(xx, sigma):
        calls[0] += 1
        return denoiser(xx, sigma.reshape(-1).expand(xx.shape[0]).to(xx))

    out = sampler(model, x, sigmas.to(x), disable=True, **kwargs)
    return out, calls[0]
