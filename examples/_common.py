"""Shared pieces of the examples: the command line (``--quick``, ``--out DIR``), the 2-D test
mixture, errors against a reference solve, and figure output. Not part of the library."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

import difsolve as ds


def parse_args(doc: str, extra=None) -> argparse.Namespace:
    """The examples' command line: ``--quick`` (CI-sized), ``--out DIR``, ``--seed``; ``extra``
    adds script-specific options to the parser."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0],
                                     epilog="\n".join(doc.strip().splitlines()[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="CI-sized run: fewer samples and settings (seconds)")
    parser.add_argument("--out", default="figures", help="folder for the PNGs (default: figures)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # tiny tensors: intra-op threads only add overhead
    args.started = time.perf_counter()
    return args


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, args, name: str) -> Path:
    """Write ``fig`` to ``args.out/name`` and say so."""
    path = Path(args.out) / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    print(f"wrote {path} ({time.perf_counter() - args.started:.1f} s since start)")
    return path


def ring(k: int = 8, radius: float = 2.0, std: float = 0.1, unequal: bool = False
         ) -> ds.GaussianMixture:
    """``k`` isotropic 2-D Gaussians on a circle (weights ``1..k`` normalised if ``unequal``)."""
    ang = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    means = radius * torch.stack([ang.cos(), ang.sin()], 1)
    w = torch.arange(1, k + 1, dtype=torch.float64) if unequal else torch.ones(k, dtype=torch.float64)
    return ds.GaussianMixture(w / w.sum(), means, torch.full((k,), std**2, dtype=torch.float64))


def reference(field, x_t: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE solved from ``x_t`` at ``t_max`` to ``t_min`` to ~1e-10."""
    p = field.process
    return ds.solve(ds.ProbabilityFlowODE(field), x_t, p.t_max, p.t_min, solver=ds.Dopri5(),
                    controller=ds.PIController(rtol=1e-10, atol=1e-10), time_variable="snr").x


def rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    """RMS over samples of the Euclidean endpoint error."""
    return float((x - ref).flatten(1).square().sum(1).mean().sqrt())


def nfe(sol: ds.Solution) -> float:
    """Mean field evaluations per sample."""
    return float(sol.stats.nfe_per_sample.double().mean())


def scatter(ax, x: torch.Tensor, mixture: ds.GaussianMixture | None = None, lim: float = 3.0,
            **kw) -> None:
    """Samples as small dots (mode means as crosses), square axes without ticks."""
    xy = x.detach().double().cpu()
    ax.scatter(xy[:, 0], xy[:, 1], s=kw.pop("s", 1.5), alpha=kw.pop("alpha", 0.5), lw=0, **kw)
    if mixture is not None:
        m = mixture.means
        ax.scatter(m[:, 0], m[:, 1], s=25, c="k", marker="+", lw=0.8)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def sample_from(field, x_t: torch.Tensor, *, seed: int = 0, schedule: str | None = None,
                **kw) -> ds.Solution:
    """``ds.sample``'s recipe (same defaults, no final denoising step) from given prior draws
    ``x_t`` at ``t_max``: the probability-flow ODE for ODE solvers, the reverse SDE for SDE
    solvers; Karras grids for ODEs and log-SNR grids for SDEs on sigma-time processes; time
    variable ``"t"`` on fixed grids, ``"snr"`` / ``"log_sigma"`` under a controller."""
    p, solver = field.process, kw["solver"]
    dynamics = ds.ReverseSDE(field) if solver.sde else ds.ProbabilityFlowODE(field)
    if "controller" in kw:
        preferred = ("log_sigma", "t") if solver.sde else ("snr", "log_sigma", "t")
    else:
        preferred = ("t", "log_sigma")
        if schedule is None:
            schedule = "logsnr" if solver.sde else "karras"
    kw.setdefault("time_variable", next(v for v in preferred if v in solver.time_variables))
    return ds.solve(dynamics, x_t, p.t_max, p.t_min, schedule=schedule or "uniform",
                    generator=torch.Generator().manual_seed(seed), **kw)
