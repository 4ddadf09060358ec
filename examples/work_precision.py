"""Error against work for difsolve and its peers on the EDM probability-flow ODE of a 2-D ring.

Left: fixed budgets (error vs evaluations per sample): difsolve's Heun on the Karras grid (EDM's
sampler) and DPM-Solver++ 2M / 3M on the log-SNR grid against k-diffusion's ``sample_heun``,
``sample_dpmpp_2m`` and ``sample_lms`` on its Karras grid. Right: adaptive solvers
(work-precision): difsolve's per-sample adaptive DPM-Solver++ 4 + corrector and Dopri5 against
k-diffusion ``sample_dpm_adaptive``, torchdiffeq ``dopri5`` and torchode ``Dopri5`` integrating
in the same time variables (log sigma and ``snr``: ``w = 1 / sigma``, ``z = x / sigma``; the
peers' right-hand sides are in benchmarks/_peers.py; torchdiffeq and torchode sweep
tolerances a decade tighter so that the curves span the same errors). Error: RMS endpoint error at
sigma_min = 0.002 against a 1e-10 reference solve of the same prior draws (float64). The numbers
behind the README's ratios are benchmarks/bench_adaptive.py (more tolerances, larger batch).

Run:  python examples/work_precision.py [--quick] [--out DIR]     (about a minute; --quick: s)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from _common import nfe, parse_args, pyplot, reference, ring, rms, save

import difsolve as ds

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from _peers import (  # the peers' adapters live with the benchmarks
    CountingDenoiser,
    load_k_diffusion_sampling,
    torchdiffeq_solve,
    torchode_solve,
)

PI = {"pcoeff": 0.3, "icoeff": 0.4, "safety": 0.8}


def fixed_budgets(field, x_t, ref, budgets, kd):
    """``{label: [(NFE per sample, error), ...]}`` for the fixed-step samplers."""
    p = field.process
    ode = ds.ProbabilityFlowODE(field)
    curves = {}
    for label, solver, schedule, per_step in [
            ("difsolve Heun, Karras (EDM)", ds.Heun(), "karras", 2),
            ("difsolve DPM-Solver++ 2M, log-SNR", ds.DPMSolver(2), "logsnr", 1),
            ("difsolve DPM-Solver++ 3M, log-SNR", ds.DPMSolver(3), "logsnr", 1)]:
        curves[label] = [(nfe(sol), rms(sol.x, ref)) for sol in (
            ds.solve(ode, x_t, p.t_max, p.t_min, solver=solver, steps=n // per_step,
                     schedule=schedule) for n in budgets)]
    if kd is None:
        return curves
    for label, sampler, per_step in [("k-diffusion heun, Karras", kd.sample_heun, 2),
                                     ("k-diffusion dpmpp_2m, Karras", kd.sample_dpmpp_2m, 1),
                                     ("k-diffusion lms, Karras", kd.sample_lms, 1)]:
        pts = []
        for n in budgets:
            model = CountingDenoiser(field)
            sigmas = kd.get_sigmas_karras(n // per_step + 1, p.t_min, p.t_max)[:-1]  # to sigma_min
            x = sampler(model, x_t.clone(), sigmas, disable=True)
            pts.append((float(model.calls), rms(x, ref)))
        curves[label] = pts
    return curves


def adaptive(field, x_t, ref, tols, kd):
    """``{label: [(NFE per sample, error), ...]}`` for the adaptive solvers."""
    p = field.process
    ode = ds.ProbabilityFlowODE(field)
    curves = {}
    peer_tols = [tol / 10 for tol in tols]
    for label, solver, tv, extra in [
            ("difsolve DPM-Solver++ 4 + corrector (log sigma)", ds.DPMSolver(4, corrector=True),
             "log_sigma", PI),
            ("difsolve Dopri5 (snr)", ds.Dopri5(), "snr", {})]:
        curves[label] = [(nfe(sol), rms(sol.x, ref)) for sol in (
            ds.solve(ode, x_t, p.t_max, p.t_min, solver=solver, time_variable=tv,
                     controller=ds.PIController(rtol=tol, atol=tol, **extra)) for tol in tols)]
    for tv in ("log_sigma", "snr"):
        curves[f"torchdiffeq dopri5 ({tv})"] = [
            (float(c), rms(x, ref)) for x, c in (torchdiffeq_solve(field, x_t, tv, tol)
                                                 for tol in peer_tols)]
        try:
            curves[f"torchode Dopri5, per sample ({tv})"] = [
                (per, rms(x, ref)) for x, per, _ in (torchode_solve(field, x_t, tv, tol)
                                                     for tol in peer_tols)]
        except ImportError:
            print("torchode is not installed (pip install torchode): left out")
    if kd is not None:
        pts = []
        for tol in tols:
            model = CountingDenoiser(field)
            x = kd.sample_dpm_adaptive(model, x_t.clone(), p.t_min, p.t_max, rtol=tol, atol=tol,
                                       disable=True)
            pts.append((float(model.calls), rms(x, ref)))
        curves["k-diffusion dpm_adaptive (sigma)"] = pts
    return curves


def main() -> None:
    args = parse_args(__doc__)
    torch.set_default_dtype(torch.float64)  # k-diffusion builds its grids in the default dtype
    try:
        kd = load_k_diffusion_sampling()
    except ImportError as e:
        print(f"{e}: k-diffusion's samplers are left out")
        kd = None
    batch = 64 if args.quick else 256
    budgets = (10, 20, 40) if args.quick else (8, 12, 16, 24, 32, 48, 64, 96)
    tols = (1e-2, 1e-4) if args.quick else (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6)
    field = ring().score_field(ds.EDM())
    x_t = field.process.prior_sample((batch, 2), generator=torch.Generator().manual_seed(args.seed))
    ref = reference(field, x_t)
    panels = {"fixed budgets": fixed_budgets(field, x_t, ref, budgets, kd),
              "adaptive (tolerance sweep)": adaptive(field, x_t, ref, tols, kd)}
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, (title, curves) in zip(axes, panels.items()):
        print(f"\n{title}: NFE per sample -> RMS endpoint error")
        for label, pts in curves.items():
            print(f"  {label:50s} " + "  ".join(f"{n:.0f}:{e:.1e}" for n, e in pts))
            mine = label.startswith("difsolve")
            ax.loglog(*zip(*sorted(pts)), marker="o" if mine else "s", ms=4,
                      lw=2.2 if mine else 1.0, ls="-" if mine else "--", label=label)
        ax.set_title(title)
        ax.set_xlabel("field evaluations per sample")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("RMS endpoint error at sigma_min")
    fig.suptitle(f"EDM probability-flow ODE, 8-mode ring, batch {batch} (solid: difsolve, "
                 "dashed: peers)")
    save(fig, args, "work_precision.png")


if __name__ == "__main__":
    main()
