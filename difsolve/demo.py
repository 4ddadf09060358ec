"""``difsolve demo``: sample an exact 2-D Gaussian-mixture ring with several solvers.

The data are 8 Gaussian modes on a circle of radius 2 with unequal weights (``1..8 / 36``) and
small anisotropic covariances; the field is their exact score under :class:`~difsolve.EDM`
(``sigma`` from 80 to 0.002). Every solver starts from the same prior draws (same generator
seed). The table reports, per solver: NFE per sample; for ODE solvers the RMS endpoint error at
``sigma_min`` against a tight reference solve of the same draws (Dopri5, ``rtol = atol = 1e-8``);
for every solver the distribution errors against the exact mixture: the mode-weight error
``max_k |f_k - w_k|`` (``f_k``: fraction of samples nearest to mode ``k``) and the per-mode width
error (RMS over modes of ``sqrt(tr Cov_k^sample / tr Cov_k^exact) - 1``); and wall-clock seconds.
A PNG shows the samples (needs matplotlib).
"""

from __future__ import annotations

import math
import time

import torch

from . import problems
from .control import PIController
from .fields.gaussian_mixture import GaussianMixture
from .processes import EDM
from .sample import sample
from .solvers import (
    Dopri5,
    DPMSolver,
    EDMStochasticHeun,
    Euler,
    EulerMaruyama,
    Heun,
    StochasticHeun,
)

__all__ = ["distribution_errors", "ring_mixture", "run_demo"]


def ring_mixture(k: int = 8, radius: float = 2.0) -> GaussianMixture:
    """The demo's ring: :func:`difsolve.problems.ring_mixture` with ``anisotropic=True``."""
    return problems.ring_mixture(k, radius, anisotropic=True)


def distribution_errors(x: torch.Tensor, mixture: GaussianMixture,
                        noise_var: float = 0.0) -> tuple[float, float]:
    """``(mode-weight error, width error)`` of samples ``x`` against ``mixture`` (whose modes are
    broadened by ``noise_var`` I). Each sample goes to its nearest mode mean."""
    x = x.to(torch.float64).reshape(x.shape[0], -1)
    means = mixture.means.to(x.device)
    assign = torch.cdist(x, means).argmin(dim=1)
    k = means.shape[0]
    frac = torch.bincount(assign, minlength=k).to(torch.float64) / x.shape[0]
    weight_err = float((frac - mixture.weights.to(x.device)).abs().max())
    rel = []
    for j in range(k):
        xs = x[assign == j]
        if xs.shape[0] < 3:
            rel.append(1.0)
            continue
        exact = float(torch.trace(mixture.covs[j])) + noise_var * x.shape[1]
        got = float(torch.trace(torch.cov(xs.T)))
        rel.append(math.sqrt(got / exact) - 1.0)
    width_err = math.sqrt(sum(r * r for r in rel) / k)
    return weight_err, width_err


def run_demo(samples: int = 4000, seed: int = 0, png: str = "difsolve_demo.png") -> int:
    """Run the demo, print the table, write ``png``; return the exit status (0)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead (badly so under load)
    try:
        return _run(samples, seed, png)
    finally:
        torch.set_num_threads(threads)


def _run(samples: int, seed: int, png: str) -> int:
    mixture = ring_mixture()
    process = EDM()
    field = mixture.score_field(process)
    shape = (samples, 2)
    dtype = torch.float64

    def draw(**kw):
        t0 = time.perf_counter()
        sol = sample(field, shape, generator=torch.Generator().manual_seed(seed), dtype=dtype,
                     denoise=False, **kw)
        return sol, time.perf_counter() - t0

    ref, ref_s = draw(solver=Dopri5(), controller=PIController(rtol=1e-8, atol=1e-8))
    runs = [
        ("Euler (50 karras)", dict(solver=Euler(), steps=50, schedule="karras")),
        ("Heun (18 karras)", dict(solver=Heun(), steps=18, schedule="karras")),
        ("DPMSolver(2) (20 logsnr)", dict(solver=DPMSolver(2), steps=20, schedule="logsnr")),
        ("DPMSolver(3) (20 logsnr)", dict(solver=DPMSolver(3), steps=20, schedule="logsnr")),
        ("Dopri5 adaptive 1e-4", dict(solver=Dopri5(),
                                      controller=PIController(rtol=1e-4, atol=1e-4))),
        ("DPM++4+C adaptive 1e-4", dict(
            solver=DPMSolver(4, corrector=True),
            controller=PIController(rtol=1e-4, atol=1e-4, pcoeff=0.3, icoeff=0.4, safety=0.8))),
        ("EDMStochasticHeun churn=10", dict(solver=EDMStochasticHeun(churn=10.0), steps=40,
                                            schedule="karras")),
        ("EulerMaruyama (400 logsnr)", dict(solver=EulerMaruyama(), steps=400,
                                            schedule="logsnr")),
        ("StochasticHeun adaptive", dict(solver=StochasticHeun(),
                                         controller=PIController(rtol=0.02, atol=0.01))),
    ]
    noise_var = process.t_min**2
    header = (f"{'solver':<28} {'NFE/sample':>10} {'endpoint RMS':>13} {'weight err':>10} "
              f"{'width err':>10} {'seconds':>8}")
    print(f"difsolve demo: exact 8-mode ring mixture under EDM (sigma 80 -> 0.002), "
          f"{samples} samples, seed {seed}")
    print("endpoint RMS: against Dopri5 rtol=atol=1e-8 on the same prior draws "
          f"(NFE/sample {float(ref.stats.nfe_per_sample.double().mean()):.0f}, {ref_s:.1f} s)")
    print(f"weight err: max_k |fraction_k - w_k| (binomial noise ~ "
          f"{math.sqrt(0.25 / samples):.3f}); width err: RMS relative mode-width error")
    print(header)
    print("-" * len(header))
    shown = {"exact mixture": mixture.sample(samples, torch.Generator().manual_seed(seed))}
    w_ref, s_ref = distribution_errors(ref.x, mixture, noise_var)
    print(f"{'reference (Dopri5 1e-8)':<28} "
          f"{float(ref.stats.nfe_per_sample.double().mean()):>10.1f} {'0':>13} "
          f"{w_ref:>10.4f} {s_ref:>10.4f} {ref_s:>8.2f}")
    for name, kw in runs:
        sol, secs = draw(**kw)
        nfe = float(sol.stats.nfe_per_sample.double().mean())
        w_err, s_err = distribution_errors(sol.x, mixture, noise_var)
        solver = kw["solver"]
        deterministic = not (solver.sde or getattr(solver, "churn", 0.0) > 0)
        if deterministic:
            rms = float((sol.x - ref.x).square().sum(-1).mean().sqrt())
            end = f"{rms:>13.2e}"
        else:
            end = f"{'stochastic':>13}"
        ok = "" if sol.success else "  (not all samples succeeded)"
        print(f"{name:<28} {nfe:>10.1f} {end} {w_err:>10.4f} {s_err:>10.4f} {secs:>8.2f}{ok}")
        shown[name] = sol.x
    _plot(shown, mixture, png)
    return 0


def _plot(shown: dict, mixture: GaussianMixture, png: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the figure "
              "(pip install matplotlib to get it)")
        return
    n = len(shown)
    cols = 3
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
    means = mixture.means.numpy()
    for ax, (name, x) in zip(axes.flat, shown.items()):
        xy = x.detach().cpu().double().numpy()
        ax.scatter(xy[:, 0], xy[:, 1], s=1, alpha=0.4)
        ax.scatter(means[:, 0], means[:, 1], s=12, c="red", marker="x")
        ax.set_title(name, fontsize=9)
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
        ax.set_aspect("equal")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
    print(f"wrote {png}")
