"""Every difsolve solver on the same 2-D mixture, with its cost and error in the panel title.

An exact 8-mode ring (weights 1..8 / 36, mode std 0.1) under EDM (sigma 80 -> 0.002); every solver
starts from the same prior draws. Fixed-step ODE solvers get about the same budget (~34
evaluations per sample), adaptive ones a tolerance. Titles give the evaluations per sample, the
RMS endpoint error against a 1e-10 reference solve of the same draws (deterministic samplers
only) and the mode-weight error max_k |fraction_k - w_k| (every sampler; binomial noise ~
0.5 / sqrt(n)).

Run:  python examples/solvers_gallery.py [--quick] [--out DIR]
"""

from __future__ import annotations

import math

import torch
from _common import nfe, parse_args, pyplot, reference, ring, rms, sample_from, save, scatter

import difsolve as ds


def weight_error(x: torch.Tensor, mixture: ds.GaussianMixture) -> float:
    """max_k |fraction of samples nearest to mode k - w_k|."""
    nearest = torch.cdist(x.double(), mixture.means).argmin(1)
    frac = torch.bincount(nearest, minlength=len(mixture.weights)).double() / x.shape[0]
    return float((frac - mixture.weights).abs().max())


def runs(quick: bool) -> list[tuple[str, dict]]:
    pi = ds.PIController(rtol=1e-4, atol=1e-4, pcoeff=0.3, icoeff=0.4, safety=0.8)
    sde_steps = 100 if quick else 400
    return [
        ("Euler, 34 Karras steps", dict(solver=ds.Euler(), steps=34)),
        ("Heun, 17 Karras steps", dict(solver=ds.Heun(), steps=17)),
        ("Midpoint, 17 Karras steps", dict(solver=ds.Midpoint(), steps=17)),
        ("Bosh3, 11 Karras steps", dict(solver=ds.Bosh3(), steps=11)),
        ("RK4, 9 Karras steps", dict(solver=ds.RK4(), steps=9)),
        ("DPMSolver(2), 34 log-SNR steps", dict(solver=ds.DPMSolver(2), steps=34,
                                                schedule="logsnr")),
        ("DPMSolver(3), 34 log-SNR steps", dict(solver=ds.DPMSolver(3), steps=34,
                                                schedule="logsnr")),
        ("Dopri5, adaptive 1e-4", dict(solver=ds.Dopri5(),
                                       controller=ds.PIController(rtol=1e-4, atol=1e-4))),
        ("DPMSolver(4)+corrector, adaptive 1e-4",
         dict(solver=ds.DPMSolver(4, corrector=True), controller=pi)),
        (f"EulerMaruyama, {sde_steps} steps", dict(solver=ds.EulerMaruyama(), steps=sde_steps)),
        (f"EulerMaruyama + Langevin, {sde_steps // 2} steps",
         dict(solver=ds.EulerMaruyama(), steps=sde_steps // 2, corrector=ds.Langevin(snr=0.16))),
        ("StochasticHeun, adaptive 0.02", dict(solver=ds.StochasticHeun(),
                                               controller=ds.PIController(rtol=0.02, atol=0.01))),
        ("EDMStochasticHeun churn 10, 40 steps",
         dict(solver=ds.EDMStochasticHeun(churn=10.0, s_tmin=0.05, s_tmax=50.0), steps=40,
              schedule="karras")),
    ]


def main() -> None:
    args = parse_args(__doc__)
    n = 500 if args.quick else 4000
    mixture = ring(unequal=True)
    field = mixture.score_field(ds.EDM())
    gen = torch.Generator().manual_seed(args.seed)
    x_t = field.process.prior_sample((n, 2), generator=gen, dtype=torch.float64)
    ref = reference(field, x_t)
    panels = [("exact mixture", mixture.sample(n, torch.Generator().manual_seed(args.seed)),
               "independent draws", None)]
    print(f"{'solver':42s} {'NFE/sample':>10s} {'endpoint RMS':>12s} {'weight err':>10s}")
    for name, kw in runs(args.quick):
        # every sampler starts from x_t itself (so that the endpoint error is meaningful)
        sol = sample_from(field, x_t, seed=args.seed + 1, **kw)
        stochastic = kw["solver"].stochastic or "corrector" in kw
        end = math.nan if stochastic else rms(sol.x, ref)
        w = weight_error(sol.x, mixture)
        print(f"{name:42s} {nfe(sol):10.1f} {end:12.2e} {w:10.3f}")
        err = "stochastic" if stochastic else f"endpoint err {end:.1e}"
        per_sample = None if stochastic else (sol.x - ref).norm(dim=1).clamp_min(1e-12).log10()
        panels.append((name, sol.x, f"NFE {nfe(sol):.0f} | {err}\nweight err {w:.3f}", per_sample))
    plt = pyplot()
    cols = 5
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.9 * rows), squeeze=False)
    for ax, (name, x, note, colour) in zip(axes.flat, panels):
        if colour is None:
            scatter(ax, x, mixture, c="0.35")
        else:  # each sample coloured by its own endpoint error
            im = ax.scatter(x[:, 0], x[:, 1], c=colour, cmap="viridis", vmin=-6, vmax=0, s=2,
                            lw=0)
            scatter(ax, x[:0], mixture)
        ax.set_title(f"{name}\n{note}", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.5, label="log10 endpoint error of each sample")
    fig.suptitle(f"EDM, 8-mode ring with weights 1..8/36, {n} samples from the same prior draws; "
                 "grey: stochastic samplers", fontsize=11)
    save(fig, args, "solvers_gallery.png")


if __name__ == "__main__":
    main()
