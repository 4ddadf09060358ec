"""Stochastic samplers at 10, 20 and 50 evaluations against k-diffusion and diffusers (issue 18).

Problem: the exact field of an 8-dimensional mixture of 16 narrow Gaussian modes with unequal
weights (``8^(-i/15)``, largest / smallest = 8), means ``2 u_i`` (random unit vectors, seed 5),
diagonal covariances with standard deviations log-uniform in ``[0.02, 0.08]`` per axis, under
EDM (sigma 80 -> 0.002), float64. Every sampler starts from the same prior draws ``y_T = 80 z``
and returns a sample of the data (``sigma = 0``: a final denoising step or a last step to sigma 0).
Distribution error against the exact mixture (:func:`difsolve.demo.distribution_errors`): the
mode-weight error ``max_k |f_k - w_k|`` (nearest mode mean) and the width error (RMS over modes
of ``sqrt(tr Cov_k^sample / tr Cov_k) - 1``). The Monte-Carlo floor is the mean (and standard
deviation) of the errors of exact draws of the same size, computed the same way.

Evaluations are counted as batched calls of the field, final denoising included, the same way
for every library. Peers, in the same run and all counted: k-diffusion ``sample_euler_ancestral``,
``sample_dpmpp_2m_sde`` and ``sample_dpmpp_3m_sde`` at eta 0.3, 0.5, 0.7 and 1, and
``sample_dpmpp_2m_sde`` heun and ``sample_dpmpp_sde`` (2 evaluations per step) at eta 1, each on
Karras (rho 7), exponential and polyexponential (rho 1.3 and 1.6) sigmas; diffusers
``DDIMScheduler`` (eta 1), ``DPMSolverMultistepScheduler`` (``sde-dpmsolver++`` 2 and 3),
``SASolverScheduler`` (its default tau window, a constant tau 0.3 / 0.5, and tau 1 on sigma >= 10,
the window of difsolve's 50-NFE weight row), each with default and Karras sigmas, and
``KDPM2AncestralDiscreteScheduler`` (Karras), on a 1000-step discrete schedule whose noise
levels are exactly 0.002 .. 80 geometric, each fed the exact prediction at the scheduler's own
noise level. difsolve's rows include samplers on grids tuned for an ODE solver
of the same cost per step (:class:`TunedGrid`: pilots drawn with their own seed, computed in the
run, cost reported apart). The difsolve rows were chosen on seed 0; the report uses seed 1.

Run: ``python benchmarks/bench_stochastic.py [--quick] [--png PATH]`` (also
``difsolve bench stochastic``); ``--samples N --budgets 20,50 --only "row;row"`` for the larger
partial comparisons of docs/stochastic.md. Runs of more than ``--chunk`` samples (default 1000000)
are evaluated chunk by chunk (chunk ``c``: seed ``seed + 7919 c``), their per-mode moments merged.

Expected time: full about 15 min (200000 samples, 81 samplers), --quick about 40 s (one CPU core).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from functools import reduce
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _peers import load_k_diffusion_sampling

import difsolve as ds
from difsolve.demo import ModeMoments, errors_of_moments, mode_moments

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
BUDGETS = (10, 20, 50)  # --budgets replaces it
PEERS = ("k-diffusion", "diffusers")
F64 = torch.float64


# ----- the problem: an exact mixture field, evaluated fast -----------------------------------------


class DiagonalMixtureField:
    """The exact EDM score of a Gaussian mixture with diagonal covariances, for large batches.

    ``D(y, sigma) = y - sigma^2 sum_k gamma_k (y - mu_k) / (v_k + sigma^2)`` with responsibilities
    ``gamma = softmax(log w_k - |y - mu_k|^2_{(v_k + sigma^2)^-1} / 2 - log det / 2)``; the
    quadratic form is expanded into two matrix products (float64), so an evaluation costs about
    as much as a small dense layer. Checked against :class:`difsolve.GaussianMixture` at start.
    """

    exact_score = True

    def __init__(self, weights, means, variances, process):
        self.weights, self.means, self.vars = weights, means, variances
        self.mixture = ds.GaussianMixture(weights, means, variances)
        self.process = process
        self.calls = 0

    def denoise(self, y: torch.Tensor, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=y.dtype).reshape(-1).expand(y.shape[0])
        if not bool((sigma == sigma[0]).all()):
            return self._denoise_per_row(y, sigma)
        s2 = sigma[0].square()  # a tensor: differentiable in the noise level (grid tuning)
        var = self.vars + s2
        inv = 1.0 / var
        mat = torch.cat([-0.5 * inv, self.means * inv], 1).T
        const = self.weights.log() - 0.5 * (self.means.square() * inv + var.log()).sum(1)
        gamma = torch.softmax(torch.addmm(const, torch.cat([y.square(), y], 1), mat), 1)
        return y - s2 * (y * (gamma @ inv) - gamma @ (self.means * inv))

    def _denoise_per_row(self, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The same with a noise level per row (adaptive reference solves), by broadcasting."""
        var = self.vars + sigma.square()[:, None, None]  # (n, K, d)
        diff = y[:, None, :] - self.means
        logits = self.weights.log() - 0.5 * (diff.square() / var + var.log()).sum(2)
        gamma = torch.softmax(logits, 1)
        return y - sigma.square()[:, None] * (gamma[:, :, None] * diff / var).sum(1)

    def __call__(self, x: torch.Tensor, t, **cond) -> torch.Tensor:
        self.calls += 1
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1).expand(x.shape[0])
        a, b = self.process.marginal(t)
        sigma = b / a
        y = x / a[:, None]
        return (self.denoise(y, sigma) - y) / (a * sigma.square())[:, None]


def mixture_field(seed: int = 5, dim: int = 8, modes: int = 16) -> DiagonalMixtureField:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(modes, dim, generator=g, dtype=F64)
    means = 2.0 * means / means.norm(dim=1, keepdim=True)
    w = 8.0 ** (-torch.arange(modes, dtype=F64) / (modes - 1))
    std = torch.exp(math.log(0.02) + math.log(4.0) * torch.rand(modes, dim, generator=g,
                                                                  dtype=F64))
    return DiagonalMixtureField(w / w.sum(), means, std.square(), ds.EDM(SIGMA_MIN, SIGMA_MAX))


def check_field(field: DiagonalMixtureField) -> float:
    """Largest relative difference to difsolve's GaussianMixture score (should be ~1e-10)."""
    ref = field.mixture.score_field(field.process)
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for s in (0.002, 0.03, 0.5, 5.0, 80.0):
        x = field.mixture.sample(500, g, dtype=F64) + s * torch.randn(500, field.mixture.dim,
                                                                      generator=g, dtype=F64)
        t = torch.full((500,), s, dtype=F64)
        a, b = field(x, t), ref(x, t)
        worst = max(worst, float(((a - b).abs() / (b.abs() + 1.0 / s)).max()))
    return worst


class Problem:
    """``n`` prior draws ``y_T = 80 z`` (seed ``seed``) and the noise seed ``seed + 1000`` of
    one evaluation (or one chunk of it), on ``field`` (default: a new :func:`mixture_field`)."""

    def __init__(self, n: int, seed: int, field: DiagonalMixtureField | None = None):
        self.field = field if field is not None else mixture_field()
        self.mixture = self.field.mixture
        self.dim = self.mixture.dim
        self.n, self.seed = n, seed
        self.y_T = SIGMA_MAX * torch.randn(n, self.dim, generator=torch.Generator().manual_seed(
            seed), dtype=F64)

    def gen(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + 1000)

    def denoise(self, y, sigma):
        return self.field.denoise(y, sigma)

    def moments(self, x):
        return mode_moments(x, self.mixture)

    def errors(self, moments):
        return errors_of_moments(moments, self.mixture)


CHUNK_SEED_STRIDE = 7919  # chunk c > 0 of seed s uses seed s + c * stride (c = 0: seed s itself)


def chunks(n: int, size: int, seed: int) -> list[tuple[int, int]]:
    """``(samples, seed)`` of each chunk of an evaluation of ``n`` samples in chunks of ``size``
    (memory stays bounded; a run of at most ``size`` samples is one chunk with ``seed``)."""
    count = -(-n // size)
    return [(min(size, n - c * size), seed + c * CHUNK_SEED_STRIDE) for c in range(count)]


# ----- noise-level grids (n levels from 80 to 0.002) ------------------------------------------------


def karras(n: int) -> torch.Tensor:
    """Karras et al. (rho = 7), as k-diffusion's ``get_sigmas_karras``."""
    r = 1 / 7
    ramp = torch.linspace(0, 1, n, dtype=F64)
    return (SIGMA_MAX**r + ramp * (SIGMA_MIN**r - SIGMA_MAX**r)) ** 7


def poly(rho: float):
    """``log sigma`` a power ``rho`` of the ramp, as k-diffusion's ``get_sigmas_polyexponential``
    (rho = 1: uniform in log sigma, k-diffusion's ``get_sigmas_exponential``)."""

    def levels(n: int) -> torch.Tensor:
        ramp = torch.linspace(1, 0, n, dtype=F64) ** rho
        return torch.exp(ramp * (math.log(SIGMA_MAX) - math.log(SIGMA_MIN)) + math.log(SIGMA_MIN))

    levels.__name__ = "exponential" if rho == 1 else f"polyexponential(rho={rho})"
    return levels


exponential = poly(1.0)
GRIDS = {"karras": karras, "exponential": exponential, "polyexp 1.3": poly(1.3),
         "polyexp 1.6": poly(1.6)}
PEER_ETAS = (0.3, 0.5, 0.7, 1.0)  # k-diffusion's eta (1: its default), every grid
# the tuned grids' pilots: their seed (not an evaluation seed), number and focus (--quick: fewer)
PILOT_SEED, PILOTS, FOCUS = 123, 16384, 4096


class TunedGrid:
    """Noise levels tuned by :func:`difsolve.tuning.tune_schedule` for the ODE solver ``tuner``
    at each budget, reused by a stochastic sampler of the same cost per step.

    ``levels(n)`` is the grid of ``n - 1`` steps (``n`` levels, 80 -> 0.002) that minimises the
    mean squared endpoint error of ``tuner`` on the probability-flow ODE against tight reference
    solves from ``PILOTS`` prior draws with seed ``PILOT_SEED`` (independent of the evaluation
    draws), 40 L-BFGS iterations on a focus of ``FOCUS`` of them. It is deterministic, computed
    inside the run and cached; ``cost`` collects the seconds and field evaluations spent tuning.
    """

    def __init__(self, name: str, make_tuner, field: DiagonalMixtureField):
        self.name, self.make_tuner, self.field = name, make_tuner, field
        self.grids, self.cost = {}, {}

    def __call__(self, n: int) -> torch.Tensor:
        if n not in self.grids:
            pilots = _pilots(self.field)
            started = time.perf_counter()
            grid, info = ds.tune_schedule(self.field, self.make_tuner(), n - 1,
                                          pilots=pilots, iterations=40,
                                          focus=FOCUS, return_info=True)
            self.grids[n] = grid.detach()
            self.cost[n] = (time.perf_counter() - started, info.nfe_search, info.gradients)
        return self.grids[n]


_PILOTS: dict = {}


def _pilots(field) -> ds.tuning.Pilots:
    """The pilots of the tuned grids, drawn once per run (their cost is reported apart)."""
    if id(field) not in _PILOTS:
        started = time.perf_counter()
        pilots = ds.tuning.draw_pilots(field, PILOTS, generator=PILOT_SEED)
        _PILOTS[id(field)] = (pilots, time.perf_counter() - started)
    return _PILOTS[id(field)][0]


# ----- difsolve -------------------------------------------------------------------------------------


def ds_sde(solver, levels):
    """An SDE solver on the reverse SDE: ``n - 1`` steps on the ``n`` levels (1 NFE each, none
    at the last point) + the final denoise = ``n`` NFE."""

    def run(p: Problem, budget: int):
        sol = ds.solve(ds.ReverseSDE(p.field), p.y_T.clone(), SIGMA_MAX, SIGMA_MIN,
                       solver=solver, steps=levels(budget), generator=p.gen())
        return p.denoise(sol.x, sol.t), sol.stats.nfe + 1

    return run


def ds_churn(solver, levels):
    """A 2-stage ODE sampler with churn (EDM Algorithm 2) on ``n`` levels and a last Euler step
    to sigma 0: ``2 n - 1`` NFE, the largest ``n`` within the budget."""

    def run(p: Problem, budget: int):
        steps = torch.cat([levels((budget + 1) // 2), torch.zeros(1, dtype=F64)])
        sol = ds.solve(ds.ProbabilityFlowODE(p.field), p.y_T.clone(), SIGMA_MAX, 0.0,
                       solver=solver, steps=steps, generator=p.gen())
        return sol.x, sol.stats.nfe

    return run


def ds_restart(solver_fn, lo: float, hi: float, repeats: int, steps: int,
               schedule: str = "logsnr"):
    """Restart with a multistep ODE solver (a segment of ``s`` steps costs ``s`` NFE):
    ``repeats`` restarts of ``steps`` steps on ``[lo, hi]``, the rest of the budget (less 1 for
    the final denoise) on the main pass."""

    def run(p: Problem, budget: int):
        main = budget - 1 - steps * repeats
        sol = ds.restart_sample(p.field, (p.n, p.dim), solver=solver_fn(), steps=main,
                                schedule=schedule,
                                restarts=(ds.Restart(lo, hi, repeats, steps),),
                                generator=p.gen(), x_T=p.y_T.clone())
        return sol.x, sol.stats.nfe

    return run


# ----- k-diffusion ------------------------------------------------------------------------------------


class _Denoiser:
    def __init__(self, p: Problem):
        self.p, self.calls = p, 0

    def __call__(self, x, sigma):
        self.calls += 1
        return self.p.denoise(x, sigma)


def kd_sampler(name: str, levels, per_step: int = 1, **kw):
    def run(p: Problem, budget: int):
        kd = load_k_diffusion_sampling()
        n = budget if per_step == 1 else (budget + 1) // 2  # dpmpp_sde: 2 per step, 1 at the end
        sigmas = torch.cat([levels(n), torch.zeros(1, dtype=F64)])
        model, gen = _Denoiser(p), p.gen()

        def noise(sigma, sigma_next):
            return torch.randn(p.y_T.shape, generator=gen, dtype=F64)

        x = getattr(kd, name)(model, p.y_T.clone(), sigmas, disable=True, noise_sampler=noise,
                              **kw)
        return x, model.calls

    return run


# ----- diffusers --------------------------------------------------------------------------------


# the noise levels of the diffusers peers' 1000 discrete timesteps: exactly geometric, 0.002 .. 80
DISCRETE_SIGMAS = np.exp(np.linspace(np.log(SIGMA_MIN), np.log(SIGMA_MAX), 1000))


def _geometric_betas() -> list[float]:
    """Betas whose ``alphas_cumprod`` give the noise levels ``DISCRETE_SIGMAS``."""
    acp = 1.0 / (1.0 + DISCRETE_SIGMAS**2)
    prev = np.concatenate([[1.0], acp[:-1]])
    return (1.0 - acp / prev).tolist()


def df_scheduler(cls_name: str, vp_space: bool, per_step: int = 1, eta: float | None = None,
                 own_noise: bool = False, **config):
    """A discrete-time diffusers scheduler fed the exact epsilon at its own noise level
    (``own_noise``: the scheduler draws its noise itself, e.g. a seeded Brownian tree)."""

    def run(p: Problem, budget: int):
        import diffusers

        sched = getattr(diffusers, cls_name)(num_train_timesteps=1000,
                                             trained_betas=_geometric_betas(),
                                             prediction_type="epsilon", **config)
        sched.set_timesteps(budget if per_step == 1 else (budget + 1) // 2)
        acp = sched.alphas_cumprod.double().numpy()
        log_sig = 0.5 * np.log((1 - acp) / acp)
        gen = p.gen()
        x = p.y_T.clone()
        if vp_space:
            x = x / math.sqrt(1 + SIGMA_MAX**2)
        else:
            x = x * float(sched.init_noise_sigma) / SIGMA_MAX
        calls = 0
        for t in sched.timesteps:
            sigma = float(np.exp(np.interp(float(t), np.arange(1000), log_sig)))
            inp = x if vp_space else sched.scale_model_input(x, t)
            y = inp.to(F64) * math.sqrt(1 + sigma**2)
            eps = (y - p.denoise(y, sigma)) / sigma
            calls += 1
            kw = {} if own_noise else {"generator": gen}  # own_noise: the scheduler's seeded tree
            if eta is not None:
                kw["eta"] = eta
            x = sched.step(eps, t, x, **kw).prev_sample.to(F64)
        return x, calls

    return run


def df_edm(order: int):
    """diffusers ``EDMDPMSolverMultistepScheduler`` (sde-dpmsolver++, continuous EDM sigmas,
    last step to sigma 0), fed the exact denoiser through its output preconditioning."""

    def run(p: Problem, budget: int):
        import diffusers

        sched = diffusers.EDMDPMSolverMultistepScheduler(
            sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, algorithm_type="sde-dpmsolver++",
            solver_order=order, final_sigmas_type="zero")
        sched.set_timesteps(budget)
        gen, x, calls = p.gen(), p.y_T.clone(), 0
        for t in sched.timesteps:
            sched.scale_model_input(x, t)  # sets the step index
            sigma = sched.sigmas[sched.step_index].to(F64)
            skip = sched.precondition_outputs(x, torch.zeros_like(x), sigma)
            out = sched.precondition_outputs(torch.zeros_like(x), torch.ones_like(x), sigma)
            model_output = (p.denoise(x, float(sigma)) - skip) / out
            calls += 1
            x = sched.step(model_output, t, x, generator=gen).prev_sample.to(F64)
        return x, calls

    return run


# ----- the rows ---------------------------------------------------------------------------------


_TUNED: dict = {}  # name -> TunedGrid, of the field of this run


def tuned(name: str, make_tuner, field) -> TunedGrid:
    """The tuned grid of ``make_tuner()`` for ``field``, one per run (shared by rows)."""
    if name not in _TUNED or _TUNED[name].field is not field:
        _TUNED[name] = TunedGrid(name, make_tuner, field)
    return _TUNED[name]


def difsolve_rows(field) -> list:
    """difsolve's rows, every stochastic sampler; the settings were chosen on seed 0 (see
    docs/stochastic.md). "tuned UniPC(3) grid": :class:`TunedGrid` for ``UniPC(3, "bh2")``."""
    uni3 = tuned("UniPC(3)", lambda: ds.UniPC(3, "bh2"), field)
    return [
        ("difsolve", "SASolver(2, 2, tau=0.3), exponential",
         ds_sde(ds.SASolver(2, 2, 0.3), exponential)),
        ("difsolve", "SASolver(3, 3, tau=0.3), exponential",
         ds_sde(ds.SASolver(3, 3, 0.3), exponential)),
        ("difsolve", "SASolver(2, 2, tau=0.3, tau_range=(0.002, 1)), tuned UniPC(3) grid",
         ds_sde(ds.SASolver(2, 2, 0.3, tau_range=(0.002, 1.0)), uni3)),
        ("difsolve", "SASolver(3, 3, tau=0.2), tuned UniPC(3) grid",
         ds_sde(ds.SASolver(3, 3, 0.2), uni3)),
        ("difsolve", "SASolver(3, 3, tau=1, tau_range=(10, 80)), tuned UniPC(3) grid",
         ds_sde(ds.SASolver(3, 3, 1.0, tau_range=(10.0, SIGMA_MAX)), uni3)),
        ("difsolve", "SASolver(2, 2, tau=0.5), polyexp 1.3",
         ds_sde(ds.SASolver(2, 2, 0.5), GRIDS["polyexp 1.3"])),
        ("difsolve", "DPMSolverSDE(2, eta=0.5), polyexp 1.6",
         ds_sde(ds.DPMSolverSDE(2, eta=0.5), GRIDS["polyexp 1.6"])),
        ("difsolve", "DPMSolverSDE(2, eta=1, eta_range=(0.05, 80)), exponential",
         ds_sde(ds.DPMSolverSDE(2, eta=1.0, eta_range=(0.05, 80.0)), exponential)),
        ("difsolve", "DDIM(eta=0.3), exponential", ds_sde(ds.DDIM(0.3), exponential)),
        ("difsolve", "EDMStochasticHeun(churn=10, 0.05..50), karras (2 NFE/step)",
         ds_churn(ds.EDMStochasticHeun(churn=10.0, s_tmin=0.05, s_tmax=50.0), karras)),
        ("difsolve", "Restart(DPMSolver(2), [0.1, 1], 1 x 5), logsnr",
         ds_restart(lambda: ds.DPMSolver(2), 0.1, 1.0, 1, 5)),
    ]


def kdiffusion_rows() -> list:
    """k-diffusion's stochastic samplers: euler_ancestral, dpmpp_2m_sde and dpmpp_3m_sde at every
    eta of ``PEER_ETAS`` on every grid; dpmpp_2m_sde heun and dpmpp_sde (2 NFE per step) at
    eta 1 on every grid (both are behind the midpoint 2M at eta 1 everywhere; not swept)."""
    rows = []
    for grid, levels in GRIDS.items():
        for eta in PEER_ETAS:
            tag = "" if eta == 1 else f" eta={eta}"
            rows += [("k-diffusion", f"{name}{tag}, {grid}",
                      kd_sampler(f"sample_{name}", levels, eta=eta))
                     for name in ("euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde")]
        rows += [
            ("k-diffusion", f"dpmpp_2m_sde heun, {grid}", kd_sampler(
                "sample_dpmpp_2m_sde", levels, solver_type="heun")),
            ("k-diffusion", f"dpmpp_sde (2 NFE/step), {grid}", kd_sampler(
                "sample_dpmpp_sde", levels, per_step=2)),
        ]
    return rows


def diffusers_rows(slow_peers: bool) -> list:
    """diffusers' stochastic schedulers. Left out as exact duplicates of rows that run (equal to
    4 digits in earlier full runs): EulerAncestralDiscrete (= k-diffusion euler_ancestral,
    exponential), DDPM trailing (= DDIM eta 1 trailing), EDMDPMSolverMultistep sde-dpmsolver++ 2
    (= k-diffusion dpmpp_2m_sde, karras)."""
    rows = [
        ("diffusers", "DDIM eta=1 (trailing)", df_scheduler(
            "DDIMScheduler", True, eta=1.0, timestep_spacing="trailing", set_alpha_to_one=True,
            clip_sample=False)),
        ("diffusers", "KDPM2AncestralDiscrete karras (2 NFE/step)", df_scheduler(
            "KDPM2AncestralDiscreteScheduler", False, per_step=2, use_karras_sigmas=True)),
    ]
    for order in (2, 3):
        for karras_sigmas in (False, True):
            label = ", karras" if karras_sigmas else ""
            rows.append(("diffusers", f"DPMSolverMultistep sde-dpmsolver++ {order}{label}",
                         df_scheduler("DPMSolverMultistepScheduler", True,
                                      algorithm_type="sde-dpmsolver++", solver_order=order,
                                      use_karras_sigmas=karras_sigmas)))
    for karras_sigmas in (False, True):
        label = ", karras" if karras_sigmas else ""
        rows.append(("diffusers", f"SASolver defaults{label}", df_scheduler(
            "SASolverScheduler", True, use_karras_sigmas=karras_sigmas)))
        for tau in (0.3, 0.5):  # a constant tau (the default is 1 on t in [200, 800], else 0)
            rows.append(("diffusers", f"SASolver tau={tau}{label}", df_scheduler(
                "SASolverScheduler", True, use_karras_sigmas=karras_sigmas,
                tau_func=lambda t, tau=tau: tau)))
        # difsolve's 50-NFE weight row's window: tau 1 on the steps that start at sigma >= 10
        rows.append(("diffusers", f"SASolver tau=1 for sigma >= 10{label}", df_scheduler(
            "SASolverScheduler", True, use_karras_sigmas=karras_sigmas,
            tau_func=lambda t: 1.0 if DISCRETE_SIGMAS[int(t)] >= 10.0 else 0.0)))
    if slow_peers:  # its torchsde Brownian tree costs ~5 s per 1000 steps x 20000 samples
        rows += [("diffusers", f"DPMSolverSDE{label} (2 NFE/step)", df_scheduler(
            "DPMSolverSDEScheduler", False, per_step=2, own_noise=True, noise_sampler_seed=1,
            use_karras_sigmas=k)) for label, k in (("", False), (" karras", True))]
    return rows


QUICK = ("SASolver(2, 2, tau=0.3), exponential", "SASolver(3, 3, tau=0.2), tuned UniPC(3) grid",
         "SASolver(3, 3, tau=1, tau_range=(10, 80)), tuned UniPC(3) grid",
         "DPMSolverSDE(2, eta=1, eta_range=(0.05, 80)), exponential",
         "dpmpp_2m_sde eta=0.3, exponential", "dpmpp_2m_sde, polyexp 1.6",
         "dpmpp_3m_sde eta=0.3, exponential", "dpmpp_2m_sde, polyexp 1.3",
         "euler_ancestral, karras", "SASolver tau=0.3")


def samplers(quick: bool, slow_peers: bool = False, field=None):
    field = field if field is not None else mixture_field()
    rows = difsolve_rows(field) + kdiffusion_rows() + diffusers_rows(slow_peers)
    if quick:
        rows = [r for r in rows if r[1] in QUICK]
    return rows


def floor(p: Problem, repeats: int, parts: list[tuple[int, int]]):
    """Mean and standard deviation of the errors of exact draws of the same size (in the same
    chunks as the samplers)."""
    errs = np.array([p.errors(reduce(ModeMoments.merge, (
        p.moments(p.mixture.sample(size, torch.Generator().manual_seed(10_000 + r + 100_000 * c),
                                   dtype=F64)) for c, (size, _) in enumerate(parts))))
        for r in range(repeats)])
    return errs.mean(0), errs.std(0, ddof=1)


def evaluate(run, problems: list[Problem], budget: int):
    """``(nfe, weight error, width error)`` of one sampler over the chunks ``problems``."""
    parts, nfe = [], 0
    for p in problems:
        x, nfe = run(p, budget)
        if not bool(torch.isfinite(x).all()):
            return nfe, math.inf, math.inf
        parts.append(p.moments(x))
    return (nfe, *problems[0].errors(reduce(ModeMoments.merge, parts)))


def compare(results, floors, spreads, peers=PEERS):
    """Per budget and metric: the best difsolve and the best peer row (libraries ``peers``)
    above the floor, their ratio, and whether the comparison is resolved (the best peer more than
    2 sd above it)."""
    out = []
    for k, b in enumerate(BUDGETS):
        for m, label in enumerate(("weight", "width")):
            fl, sd = floors[m], spreads[m]
            best = {}
            for side in ("difsolve", "peer"):
                libs = ("difsolve",) if side == "difsolve" else peers
                best[side] = min(((row[k][m + 1], name) for (lib, name), row in results.items()
                                  if lib in libs), default=None)
            if None in best.values():  # a partial run (--only) without one of the sides
                continue
            (dv, dn), (pv, pn) = best["difsolve"], best["peer"]
            d_above, p_above = max(dv - fl, 0.0), max(pv - fl, 0.0)
            resolved = p_above > 2 * sd
            ratio = d_above / p_above if p_above > 0 else math.inf
            out.append(dict(nfe=b, metric=label, ds=dv, ds_name=dn, peer=pv, peer_name=pn,
                            ds_above=d_above, peer_above=p_above, ratio=ratio,
                            resolved=resolved, met=resolved and ratio <= 0.5))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples and samplers")
    parser.add_argument("--png", default=None, help="write the figure here")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--seed", type=int, default=1,
                        help="prior and noise seed (the difsolve rows were chosen on seed 0)")
    parser.add_argument("--slow-peers", action="store_true",
                        help="also diffusers' DPMSolverSDEScheduler (slow: a torchsde tree)")
    parser.add_argument("--chunk", type=int, default=1_000_000,
                        help="samples per chunk (larger runs are evaluated chunk by chunk)")
    parser.add_argument("--floor-repeats", type=int, default=None,
                        help="exact-draw repeats of the Monte-Carlo floor (default 12, --quick 4; "
                             "repeat r is the same in every run of the same size and chunks)")
    parser.add_argument("--digits", type=int, default=5,
                        help="decimals of the printed errors and floor (separate runs of a "
                             "comparison are combined from these)")
    parser.add_argument("--budgets", default=None, help="comma-separated NFE budgets")
    parser.add_argument("--only", default=None,
                        help="run only the rows whose name contains one of these "
                             "';'-separated strings (a partial comparison)")
    args = parser.parse_args(argv)
    if args.chunk < 1 or (args.samples is not None and args.samples < 1):
        parser.error("--chunk and --samples must be positive")
    repeats = args.floor_repeats if args.floor_repeats is not None else 4 if args.quick else 12
    if repeats < 2:
        parser.error("--floor-repeats must be at least 2 (the floor's sd)")
    dg = args.digits
    if dg < 1:
        parser.error("--digits must be positive")
    global BUDGETS, PILOTS, FOCUS
    if args.quick:
        PILOTS, FOCUS = 4096, 1024
    if args.budgets:
        BUDGETS = tuple(int(b) for b in args.budgets.split(","))
    torch.set_num_threads(1)
    started = time.perf_counter()
    n = args.samples or (20_000 if args.quick else 200_000)
    parts = chunks(n, args.chunk, args.seed)
    field = mixture_field()
    problems = [Problem(size, seed, field) for size, seed in parts]
    p = problems[0]
    print(f"exact {p.dim}-D mixture of {p.mixture.n_components} narrow modes (weights "
          f"{float(p.mixture.weights.max()):.3f} .. {float(p.mixture.weights.min()):.3f}, "
          f"std 0.02 .. 0.08) under EDM (sigma 80 -> 0.002), {n} samples"
          f"{f' in {len(parts)} chunks' if len(parts) > 1 else ''}, float64, seed "
          f"{args.seed}; fast field vs difsolve.GaussianMixture: max rel. diff "
          f"{check_field(p.field):.1e}")
    (fw, fs), (sw, ss) = floor(p, repeats, parts)
    print(f"Monte-Carlo floor (errors of {repeats} x {n} exact draws: mean +- sd): "
          f"weight {fw:.{dg}f} +- {sw:.{dg}f}, width {fs:.{dg}f} +- {ss:.{dg}f}")
    cell = dg + 3  # width of a printed error
    header = (f"{'library':<12} {'sampler':<58} " + " ".join(
        f"{'NFE':>4} {'weight':>{cell}} {'width':>{cell}}" for _ in BUDGETS) + f" {'s':>6}")
    print(header)
    print("-" * len(header))
    results = {}
    rows = samplers(args.quick, args.slow_peers, field)
    if args.only:
        rows = [r for r in rows if any(part in r[1] for part in args.only.split(";"))]
        print(f"PARTIAL comparison: only the {len(rows)} rows matching {args.only!r}")
    for lib, name, run in rows:
        t0 = time.perf_counter()
        row = []
        for b in BUDGETS:
            nfe, w, s = evaluate(run, problems, b)
            if nfe > b:
                raise RuntimeError(f"{name} spent {nfe} > {b} evaluations")
            row.append((nfe, w, s))
        results[(lib, name)] = row
        cells = " ".join(f"{nfe:>4} {w:>{cell}.{dg}f} {s:>{cell}.{dg}f}" for nfe, w, s in row)
        print(f"{lib:<12} {name:<58} {cells} {time.perf_counter() - t0:>6.1f}", flush=True)
    print()
    print("best difsolve against the best peer, error above the floor (max(error - floor mean, 0)):")
    for c in compare(results, (fw, fs), (sw, ss)):
        verdict = ("met (<= 0.5)" if c["met"] else "NOT met" if c["resolved"]
                   else "not resolved: the best peer is within 2 sd of the floor")
        ratio = f"{c['ratio']:.2f}" if math.isfinite(c["ratio"]) else "-"
        print(f"  {c['nfe']:>3} NFE {c['metric']:<6}: difsolve {c['ds']:.{dg}f} "
              f"(+{c['ds_above']:.{dg}f}, {c['ds_name']}) | peer {c['peer']:.{dg}f} "
              f"(+{c['peer_above']:.{dg}f}, {c['peer_name']}) | ratio {ratio}: {verdict}")
    for grid in _TUNED.values():
        for n, (secs, nfe, grads) in sorted(grid.cost.items()):
            print(f"tuning cost, {grid.name} grid of {n} levels: {secs:.1f} s, {nfe} batched "
                  f"evaluations (of at most {FOCUS} pilots) and {grads} gradients")
    if _PILOTS:
        pilots, secs = next(iter(_PILOTS.values()))
        print(f"tuning cost, pilot reference solves (once): {secs:.1f} s, "
              f"{pilots.nfe_reference} batched evaluations")
    if args.png:
        _plot(results, (fw, fs), (sw, ss), args.png)
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


def _plot(results, floors, spreads, png):
    """Every sampler in thin grey; the best of each library at each budget in colour; the
    Monte-Carlo floor as a band (mean +- 2 sd of exact draws)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"difsolve": "tab:red", "k-diffusion": "tab:blue", "diffusers": "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for m, (ax, label) in enumerate(zip(axes, ("mode-weight error", "width error"))):
        for row in results.values():
            ax.plot([r[0] for r in row], [r[m + 1] for r in row], "-", color="0.8", lw=0.7)
        for lib, colour in colours.items():
            rows = [row for (name, _), row in results.items() if name == lib]
            best = [min(row[k][m + 1] for row in rows) for k in range(len(BUDGETS))]
            ax.plot(BUDGETS, best, "-o", color=colour, lw=2, label=f"best {lib}")
        lo, hi = floors[m] - 2 * spreads[m], floors[m] + 2 * spreads[m]
        ax.axhspan(max(lo, 1e-4), hi, color="k", alpha=0.12, label="Monte-Carlo floor +- 2 sd")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(BUDGETS, [str(b) for b in BUDGETS])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("evaluations per sample")
        ax.set_title(f"{label} (grey: every sampler)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    print(f"wrote {png}")


if __name__ == "__main__":
    sys.exit(main())
