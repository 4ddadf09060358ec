"""Stochastic samplers at 10, 20 and 50 evaluations against k-diffusion and diffusers (issue 18).

Problem: the exact score of difsolve's demo ring (8 anisotropic Gaussian modes on a circle of
radius 2, weights ``1..8 / 36``, mode standard deviations 0.1-0.2) under EDM, sigma 80 -> 0.002,
float64. Every sampler starts from the same prior draws ``y_T = 80 z`` and returns a sample of
the data (``sigma = 0``: a final denoising step or a last step to sigma 0). Distribution error
against the exact mixture (:func:`difsolve.demo.distribution_errors`): the mode-weight error
``max_k |f_k - w_k|`` and the width error (RMS over modes of the relative error of the mode's
standard deviation). The Monte-Carlo floor is the mean error of exact draws of the same size.

Peers, in the same run and on the same Karras sigmas where they take sigmas: k-diffusion
``sample_euler_ancestral``, ``sample_dpmpp_2m_sde``, ``sample_dpmpp_3m_sde``, ``sample_dpmpp_sde``
(2 evaluations per step); diffusers ``EulerAncestralDiscreteScheduler``, ``DDIMScheduler``
(eta = 1), ``DPMSolverMultistepScheduler`` (``sde-dpmsolver++``, orders 2 and 3, Karras sigmas)
and ``SASolverScheduler`` (its defaults, and tau = 1 everywhere), on a 1000-step discrete schedule
whose noise levels are exactly ``0.002 .. 80`` geometric (``trained_betas``), fed the exact
epsilon at the scheduler's own noise level.

Run: ``python benchmarks/bench_stochastic.py [--quick] [--png PATH]`` (also
``difsolve bench stochastic``).

Expected time: full about 9 min (40000 samples, 27 samplers), --quick about 20 s (one CPU core).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _peers import CountingDenoiser, load_k_diffusion_sampling

import difsolve as ds
from difsolve.demo import distribution_errors, ring_mixture

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
BUDGETS = (10, 20, 50)


class Problem:
    def __init__(self, n: int, seed: int):
        self.mixture = ring_mixture()
        self.process = ds.EDM(SIGMA_MIN, SIGMA_MAX)
        self.field = self.mixture.score_field(self.process)
        self.n, self.seed = n, seed
        self.y_T = SIGMA_MAX * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed),
                                           dtype=torch.float64)

    def gen(self, k: int = 1) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + 1000 * k)

    def denoise(self, y, sigma):
        return ds.ProbabilityFlowODE(self.field).denoise(y, sigma)

    def errors(self, x):
        return distribution_errors(x, self.mixture)


def logsnr(n: int) -> torch.Tensor:
    """``n`` noise levels from 80 to 0.002, uniform in log sigma."""
    return torch.exp(torch.linspace(math.log(SIGMA_MAX), math.log(SIGMA_MIN), n,
                                    dtype=torch.float64))


def karras(n: int) -> torch.Tensor:
    """``n`` Karras noise levels from 80 to 0.002 (rho = 7), as k-diffusion builds them."""
    r = 1 / 7
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return (SIGMA_MAX**r + ramp * (SIGMA_MIN**r - SIGMA_MAX**r)) ** 7


# ----- difsolve ----------------------------------------------------------------------------------


def ds_sde(solver, levels=karras):
    """An SDE solver through ``ds.solve`` on the reverse SDE: ``n - 1`` steps on the ``n`` noise
    levels of ``levels`` (Karras by default) + the final denoise = n NFE."""

    def run(p: Problem, budget: int):
        grid = levels(budget)
        sol = ds.solve(ds.ReverseSDE(p.field), p.y_T.clone(), SIGMA_MAX, SIGMA_MIN,
                       solver=solver, steps=grid, generator=p.gen())
        return p.denoise(sol.x, sol.t), sol.stats.nfe + 1

    return run


def ds_churn(churn: float):
    def run(p: Problem, budget: int):
        n = (budget + 1) // 2  # Heun steps, the last one (to sigma = 0) an Euler step
        grid = torch.cat([karras(n), torch.zeros(1, dtype=torch.float64)])
        sol = ds.solve(ds.ProbabilityFlowODE(p.field), p.y_T.clone(), SIGMA_MAX, 0.0,
                       solver=ds.EDMStochasticHeun(churn=churn), steps=grid, generator=p.gen())
        return sol.x, sol.stats.nfe

    return run


def ds_restart(solver_fn, lo: float, hi: float, levels: str = "logsnr", steps: int = 3):
    """Restart with a multistep ODE solver inside (a segment of ``s`` steps costs ``s`` NFE):
    ``K = max(1, round(budget / 10))`` restarts of ``steps`` backward steps on ``[lo, hi]``, the
    rest of the budget (less 1 for the final denoise) on the main pass."""

    def run(p: Problem, budget: int):
        repeats = max(1, round(budget / 10))
        main = budget - 1 - steps * repeats
        sol = ds.restart_sample(p.field, (p.n, 2), solver=solver_fn(), steps=main,
                                schedule=levels, restarts=(ds.Restart(lo, hi, repeats, steps),),
                                generator=p.gen(), x_T=p.y_T.clone())
        return sol.x, sol.stats.nfe

    return run


# ----- k-diffusion --------------------------------------------------------------------------------


def kd_sampler(name: str, per_step: int = 1, levels=karras, **kw):
    def run(p: Problem, budget: int):
        kd = load_k_diffusion_sampling()
        n = budget if per_step == 1 else (budget + 1) // 2  # dpmpp_sde: 2 per step, 1 at the end
        sigmas = torch.cat([levels(n), torch.zeros(1, dtype=torch.float64)])
        model = CountingDenoiser(p.field)
        gen = p.gen()

        def noise(sigma, sigma_next):
            return torch.randn(p.y_T.shape, generator=gen, dtype=torch.float64)

        x = getattr(kd, name)(model, p.y_T.clone(), sigmas, disable=True, noise_sampler=noise,
                              **kw)
        return x, model.calls

    return run


# ----- diffusers ------------------------------------------------------------------------------------


def _geometric_betas(n: int = 1000) -> list[float]:
    """Betas whose ``alphas_cumprod`` give noise levels exactly geometric from 0.002 to 80."""
    sig = np.exp(np.linspace(np.log(SIGMA_MIN), np.log(SIGMA_MAX), n))
    acp = 1.0 / (1.0 + sig**2)
    prev = np.concatenate([[1.0], acp[:-1]])
    return (1.0 - acp / prev).tolist()


def df_scheduler(cls_name: str, vp_space: bool, eta: float | None = None, **config):
    def run(p: Problem, budget: int):
        import diffusers

        cls = getattr(diffusers, cls_name)
        sched = cls(num_train_timesteps=1000, trained_betas=_geometric_betas(),
                    prediction_type="epsilon", **config)
        sched.set_timesteps(budget)
        acp = sched.alphas_cumprod.double().numpy()
        log_sig = 0.5 * np.log((1 - acp) / acp)
        gen = p.gen()
        x = p.y_T.clone()
        if vp_space:
            x = x / math.sqrt(1 + SIGMA_MAX**2)
        calls = 0
        for t in sched.timesteps:
            sigma = float(np.exp(np.interp(float(t), np.arange(1000), log_sig)))
            inp = sched.scale_model_input(x, t) if not vp_space else x
            y = inp * math.sqrt(1 + sigma**2)
            s = torch.full((p.n,), sigma, dtype=torch.float64)
            eps = (y - p.denoise(y, s)) / sigma
            calls += 1
            kw = {"generator": gen}
            if eta is not None:
                kw["eta"] = eta
            x = sched.step(eps, t, x, **kw).prev_sample.to(torch.float64)
        return x, calls

    return run


def samplers(quick: bool):
    rows = [
        ("difsolve", "DDIM(eta=1) = EulerAncestral", ds_sde(ds.DDIM(1.0))),
        ("difsolve", "DPMSolverSDE(2) reference", ds_sde(ds.DPMSolverSDE(2))),
        ("difsolve", "DPMSolverSDE(2) exact", ds_sde(ds.DPMSolverSDE(2, variant="exact"))),
        ("difsolve", "DPMSolverSDE(3) reference", ds_sde(ds.DPMSolverSDE(3))),
        ("difsolve", "DPMSolverSDE(3) exact", ds_sde(ds.DPMSolverSDE(3, variant="exact"))),
        ("difsolve", "DPMSolverSDE(2, eta=0.5) reference",
         ds_sde(ds.DPMSolverSDE(2, eta=0.5))),
        ("difsolve", "SASolver(3, 3, tau=1)", ds_sde(ds.SASolver(3, 3))),
        ("difsolve", "SASolver(2, 2, tau=1)", ds_sde(ds.SASolver(2, 2))),
        ("difsolve", "EDMStochasticHeun(churn=10)", ds_churn(10.0)),
        ("difsolve", "DPMSolverSDE(1)", ds_sde(ds.DPMSolverSDE(1))),
        ("difsolve", "DPMSolverSDE(3) reference, logsnr", ds_sde(ds.DPMSolverSDE(3), logsnr)),
        ("difsolve", "SASolver(3, 3, tau=0.3), logsnr", ds_sde(ds.SASolver(3, 3, 0.3), logsnr)),
        ("difsolve", "SASolver(2, 2, tau=0.5), logsnr", ds_sde(ds.SASolver(2, 2, 0.5), logsnr)),
        ("difsolve", "Restart(DPMSolver(2), [0.05, 0.5]), logsnr",
         ds_restart(lambda: ds.DPMSolver(2), 0.05, 0.5)),
        ("difsolve", "Restart(DPMSolver(3), [0.05, 0.5]), logsnr",
         ds_restart(lambda: ds.DPMSolver(3), 0.05, 0.5)),
        ("difsolve", "Restart(DPMSolver(2), [0.05, 0.5]), karras",
         ds_restart(lambda: ds.DPMSolver(2), 0.05, 0.5, "karras")),
        ("k-diffusion", "euler_ancestral", kd_sampler("sample_euler_ancestral")),
        ("k-diffusion", "dpmpp_2m_sde", kd_sampler("sample_dpmpp_2m_sde")),
        ("k-diffusion", "dpmpp_3m_sde", kd_sampler("sample_dpmpp_3m_sde")),
        ("k-diffusion", "dpmpp_sde (2 NFE/step)", kd_sampler("sample_dpmpp_sde", per_step=2)),
        ("k-diffusion", "dpmpp_2m_sde, logsnr", kd_sampler("sample_dpmpp_2m_sde", levels=logsnr)),
        ("k-diffusion", "dpmpp_3m_sde, logsnr", kd_sampler("sample_dpmpp_3m_sde", levels=logsnr)),
        ("diffusers", "EulerAncestralDiscrete", df_scheduler("EulerAncestralDiscreteScheduler",
                                                             False)),
        ("diffusers", "DDIM eta=1 (trailing)", df_scheduler(
            "DDIMScheduler", True, eta=1.0, timestep_spacing="trailing", set_alpha_to_one=True,
            clip_sample=False)),
        ("diffusers", "DPMSolverMultistep sde-dpmsolver++ 2 karras", df_scheduler(
            "DPMSolverMultistepScheduler", True, algorithm_type="sde-dpmsolver++",
            solver_order=2, use_karras_sigmas=True)),
        ("diffusers", "DPMSolverMultistep sde-dpmsolver++ 3 karras", df_scheduler(
            "DPMSolverMultistepScheduler", True, algorithm_type="sde-dpmsolver++",
            solver_order=3, use_karras_sigmas=True)),
        ("diffusers", "SASolver defaults karras", df_scheduler(
            "SASolverScheduler", True, use_karras_sigmas=True)),
        ("diffusers", "SASolver tau=1 karras", df_scheduler(
            "SASolverScheduler", True, use_karras_sigmas=True, tau_func=lambda t: 1.0)),
    ]
    if quick:
        keep = {"DPMSolverSDE(2) reference", "Restart(DPMSolver(2), [0.05, 0.5]), logsnr",
                "dpmpp_2m_sde", "euler_ancestral", "DPMSolverMultistep sde-dpmsolver++ 2 karras"}
        rows = [r for r in rows if r[1] in keep]
    return rows


def floor(p: Problem, repeats: int):
    """Mean and standard deviation of the errors of exact draws of the same size."""
    errs = np.array([p.errors(p.mixture.sample(p.n, torch.Generator().manual_seed(10_000 + r)))
                     for r in range(repeats)])
    return tuple(errs.mean(0)), tuple(errs.std(0, ddof=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples and samplers")
    parser.add_argument("--png", default=None, help="write the figure here")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--seed", type=int, default=1,
                        help="prior and noise seed (the configurations were chosen on seed 0)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    n = args.samples or (4000 if args.quick else 40000)
    p = Problem(n, seed=args.seed)
    (fw, fs), (sw, ss) = floor(p, 4 if args.quick else 16)
    print(f"exact 8-mode ring under EDM (sigma 80 -> 0.002), {n} samples, float64")
    print(f"Monte-Carlo floor (mean error of exact draws of {n}, +- its standard deviation): "
          f"weight {fw:.4f} +- {sw:.4f}, width {fs:.4f} +- {ss:.4f}")
    header = (f"{'library':<12} {'sampler':<46} " +
              " ".join(f"{'NFE':>4} {'weight':>7} {'width':>7}" for _ in BUDGETS) + f" {'s':>6}")
    print(header)
    print("-" * len(header))
    results = {}
    for lib, name, run in samplers(args.quick):
        t0 = time.perf_counter()
        row = []
        for b in BUDGETS:
            x, nfe = run(p, b)
            ok = bool(torch.isfinite(x).all())
            w, s = p.errors(x) if ok else (math.inf, math.inf)
            row.append((nfe, w, s))
        results[(lib, name)] = row
        cells = " ".join(f"{nfe:>4} {w:>7.4f} {s:>7.4f}" for nfe, w, s in row)
        print(f"{lib:<12} {name:<46} {cells} {time.perf_counter() - t0:>6.1f}", flush=True)
    print()
    print("best above the floor (error - floor), difsolve against the best peer:")
    for k, b in enumerate(BUDGETS):
        for m, (label, fl, sd) in enumerate((("weight", fw, sw), ("width", fs, ss))):
            best = {}
            for side in ("difsolve", "peer"):
                cands = [(row[k][m + 1] - fl, name) for (lib, name), row in results.items()
                         if (lib == "difsolve") == (side == "difsolve")]
                best[side] = min(cands)
            (dv, dn), (pv, pn) = best["difsolve"], best["peer"]
            if pv <= 2 * sd:
                verdict = "peer within 2 sd of the floor: not resolved"
                ratio = "-"
            else:
                ratio = f"{max(dv, 0.0) / pv:.2f}"
                verdict = "target <= 0.5 met" if max(dv, 0.0) / pv <= 0.5 else "not met"
            print(f"  {b:>3} NFE {label:<6}: difsolve {dv:+.4f} ({dn}), peer {pv:+.4f} ({pn}), "
                  f"ratio {ratio} ({verdict})")
    if args.png:
        _plot(results, (fw, fs), (sw, ss), args.png)
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
