"""Per-sample adaptive stepping against the peers, in one run (issue 4).

1. Work-precision on the EDM probability-flow ODE of an exact 8-component 2-D ring mixture
   (sigma 80 -> 0.002, float64): evaluations per sample against RMS endpoint error (tight
   reference), difsolve against k-diffusion ``sample_dpm_adaptive`` / ``sample_lms`` (in sigma)
   and torchdiffeq ``dopri5`` and torchode ``Dopri5`` (integral and PI control) integrating in
   sigma, in log sigma and in difsolve's ``snr`` coordinates (``w = 1/sigma``, ``z = x/sigma``):
   the same time variables difsolve uses. torchode's count per sample is what each row's own steps
   cost (it evaluates every row at every call). For each difsolve point, the best peer's work at
   the same error is read off each peer's Pareto front by log-log interpolation; the ratio is
   printed against every peer and against the peers integrating in sigma only.
2. Batch independence: one stiff sample among easy ones (torchdiffeq shares one step size).
3. Adaptive SDE (StochasticHeun + PIController, "Gotta Go Fast") against fixed-step
   Euler-Maruyama on a 4-mode ring with unequal weights under VP: mode-weight and mode-width errors
   against the closed form, and the work needed to match Euler-Maruyama with 1000 steps.

Run: ``python benchmarks/bench_adaptive.py [--quick]``.

Expected time: full about 17 min (most of it section 3), --quick about 2 min (one CPU core).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _peers import (
    CountingDenoiser,
    load_k_diffusion_sampling,
    torchdiffeq_solve,
    torchode_solve,
)
from _problems import ring_mixture

import difsolve as ds

HEADLINE = "difsolve DPM++4+C PI (log_sigma)"


def pareto(points):
    """Lower-left envelope of (work, error) points, sorted by work."""
    front, best = [], math.inf
    for w, e in sorted(points):
        if e < best:
            front.append((w, e))
            best = e
    return front


def work_at(front, err):
    """Work needed on ``front`` to reach ``err`` (log-log interpolation; None if out of range)."""
    for (w0, e0), (w1, e1) in itertools.pairwise(front):
        if e1 <= err <= e0:
            f = (math.log(err) - math.log(e0)) / (math.log(e1) - math.log(e0))
            return math.exp(math.log(w0) + f * (math.log(w1) - math.log(w0)))
    return None


def work_precision(batch: int, quick: bool):
    torch.set_default_dtype(torch.float64)
    kd = load_k_diffusion_sampling()
    process = ds.EDM()
    field = ring_mixture().score_field(process)
    dyn = ds.ProbabilityFlowODE(field)
    x_t = process.prior_sample((batch, 2), generator=torch.Generator().manual_seed(0))
    ref = ds.solve(dyn, x_t, 80.0, 0.002, solver=ds.Dopri5(),
                   controller=ds.PIController(rtol=1e-11, atol=1e-11), time_variable="snr").x

    def err(x):
        return float((x - ref).square().sum(1).mean().sqrt())

    rows = []
    tols = [3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5] if not quick else [1e-3, 1e-4, 1e-5]
    # the PI coefficients diffrax recommends (pcoeff 0.3, icoeff 0.4), safety 0.8 (k-diffusion
    # uses 0.81); also tried: (0.2, 0.7) and safety 0.7 or 0.9, 5-30% more work at equal error
    pi = {"pcoeff": 0.3, "icoeff": 0.4, "safety": 0.8}
    configs = [(HEADLINE, ds.DPMSolver(4, corrector=True), "log_sigma", pi),
               ("difsolve DPM++4+C I-ctrl (log_sigma)", ds.DPMSolver(4, corrector=True),
                "log_sigma", {}),
               ("difsolve DPM++3+C PI (log_sigma)", ds.DPMSolver(3, corrector=True),
                "log_sigma", pi),
               ("difsolve Dopri5 (snr)", ds.Dopri5(), "snr", {}),
               ("difsolve Bosh3 (snr)", ds.Bosh3(), "snr", {}),
               ("difsolve Dopri5 (log_sigma)", ds.Dopri5(), "log_sigma", {}),
               ("difsolve Dopri5 (t)", ds.Dopri5(), "t", {})]
    for name, solver, tv, extra in configs:
        for tol in tols:
            t0 = time.perf_counter()
            sol = ds.solve(dyn, x_t, 80.0, 0.002, solver=solver, time_variable=tv,
                           controller=ds.PIController(rtol=tol, atol=tol, **extra))
            rows.append((name, f"rtol=atol={tol:g}", float(sol.stats.nfe_per_sample.double().mean()),
                         sol.stats.nfe, err(sol.x), time.perf_counter() - t0))
    for tol in ([1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5] if not quick else [1e-2, 1e-3, 1e-4]):
        for atol_ratio in (1.0, 0.1):
            model = CountingDenoiser(field)
            t0 = time.perf_counter()
            x = kd.sample_dpm_adaptive(model, x_t.clone(), 0.002, 80.0, rtol=tol,
                                       atol=tol * atol_ratio, disable=True)
            rows.append(("k-diffusion dpm_adaptive", f"rtol={tol:g} atol={tol * atol_ratio:g}",
                         float(model.calls), model.calls, err(x), time.perf_counter() - t0))
    for n in ([10, 20, 30, 50, 80] if not quick else [20, 50]):
        model = CountingDenoiser(field)
        sig = kd.get_sigmas_karras(n + 1, 0.002, 80.0)[:-1]  # n steps ending at sigma_min
        t0 = time.perf_counter()
        x = kd.sample_lms(model, x_t.clone(), sig, disable=True)
        rows.append(("k-diffusion lms (karras)", f"steps={n}", float(model.calls), model.calls,
                     err(x), time.perf_counter() - t0))
    peer_tols = [1e-3, 1e-4, 1e-5, 1e-6, 1e-7] if not quick else [1e-4, 1e-6]
    has_torchode = importlib.util.find_spec("torchode") is not None
    if not has_torchode:
        print("torchode is not installed (pip install torchode): its rows are left out")
    for tv in ("t", "log_sigma", "snr"):  # "t" is sigma itself for EDM
        for tol in peer_tols:
            t0 = time.perf_counter()
            x, calls = torchdiffeq_solve(field, x_t, tv, tol)
            rows.append((f"torchdiffeq dopri5 ({tv})", f"rtol=atol={tol:g}", float(calls), calls,
                         err(x), time.perf_counter() - t0))
            for label, pi_coeffs in (("I", None), ("PI", (0.3, 0.4))) if has_torchode else ():
                t0 = time.perf_counter()
                x, per_sample, calls = torchode_solve(field, x_t, tv, tol, pi=pi_coeffs)
                rows.append((f"torchode dopri5 {label} ({tv})", f"rtol=atol={tol:g}", per_sample,
                             calls, err(x), time.perf_counter() - t0))

    print(f"\n## 1. Work-precision, EDM PF-ODE, 8-mode ring, batch {batch}, float64")
    print(f"{'method':30s} {'setting':26s} {'NFE/sample':>10s} {'batched':>8s} {'RMS error':>10s}"
          f" {'seconds':>8s}")
    for r in rows:
        print(f"{r[0]:30s} {r[1]:26s} {r[2]:10.1f} {r[3]:8d} {r[4]:10.2e} {r[5]:8.3f}")
    peers = {}
    for r in rows:
        if not r[0].startswith("difsolve"):
            peers.setdefault(r[0], []).append((r[2], r[4]))
    fronts = {k: pareto(v) for k, v in peers.items()}
    in_sigma = {k: f for k, f in fronts.items() if k.startswith("k-diffusion") or k.endswith("(t)")}
    for mine in (HEADLINE, "difsolve Dopri5 (snr)"):
        _ratios(rows, fronts, mine, "every peer, every time variable")
        _ratios(rows, in_sigma, mine, "peers integrating in sigma only")
    return rows


def _ratios(rows, fronts, mine, which):
    print(f"\nwork ratio (best peer's NFE per sample / {mine}'s) at equal error, {which}:")
    for r in rows:
        if r[0] != mine:
            continue
        cands = [(work_at(f, r[4]), k) for k, f in fronts.items()]
        cands = [(w, k) for w, k in cands if w is not None]
        if not cands:
            print(f"  error {r[4]:.2e}: no peer reaches this range")
            continue
        w, k = min(cands)
        print(f"  error {r[4]:.2e}: difsolve {r[2]:6.1f}  best peer {w:6.1f} ({k})  "
              f"ratio {w / r[2]:.2f}")


class StiffRelaxation:
    """``dx/dt = -k (x - cos t)``, rate ``k`` per row carried as a constant state column."""

    def drift(self, y, t):
        x, k = y[:, :1], y[:, 1:]
        t = t if t.ndim else t.expand(y.shape[0])
        return torch.cat([-k * (x - torch.cos(t)[:, None]), torch.zeros_like(k)], dim=1)


def batch_independence():
    from torchdiffeq import odeint

    easy = torch.stack([torch.linspace(0, 1, 63), torch.ones(63)], 1).double()
    hard = torch.tensor([[0.5, 1000.0]], dtype=torch.float64)
    mixed = torch.cat([easy, hard])
    print("\n## 2. Batch independence: 63 easy samples (k=1) + 1 stiff sample (k=1000), t in [0, 3]")
    for label, y in (("easy alone", easy), ("easy + stiff", mixed)):
        f = StiffRelaxation()
        calls = [0]

        def rhs(t, y, f=f, calls=calls):
            calls[0] += 1
            return f.drift(y, t)

        odeint(rhs, y, torch.tensor([0.0, 3.0], dtype=torch.float64), rtol=1e-5, atol=1e-5,
               method="dopri5")
        sol = ds.solve(f, y, 0.0, 3.0, solver=ds.Dopri5(),
                       controller=ds.PIController(rtol=1e-5, atol=1e-5))
        e = sol.stats.nfe_per_sample[:63].double()
        print(f"  {label:14s} torchdiffeq NFE (every sample) {calls[0]:5d} | difsolve NFE per easy "
              f"sample {e.mean():6.1f} (max {int(e.max())}), batched {sol.stats.nfe}")


def adaptive_sde(n: int, quick: bool):
    weights = torch.tensor([0.4, 0.1, 0.2, 0.3], dtype=torch.float64)
    k = weights.numel()
    ang = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    means = 2.0 * torch.stack([ang.cos(), ang.sin()], 1)
    std = 0.15
    gm = ds.GaussianMixture(weights, means, torch.full((k,), std**2, dtype=torch.float64))
    process = ds.VP()
    field = gm.score_field(process)
    a, b = (float(v) for v in process.marginal(torch.tensor(process.t_min, dtype=torch.float64)))
    width_exact = math.sqrt(a * a * std * std + b * b)

    def quality(x):
        """L1 mode-weight error and the signed relative error of the pooled mode width."""
        comp = gm.component(x)
        frac = torch.bincount(comp, minlength=k).double() / x.shape[0]
        width = (x - a * means[comp]).square().sum(1).mean().div(2).sqrt()
        return float((frac - weights).abs().sum()), float(width / width_exact - 1)

    print(f"\n## 3. Adaptive SDE vs Euler-Maruyama, 4-mode ring (weights {weights.tolist()}), VP, "
          f"{n} samples, float64")
    print("   quality: L1 mode-weight error (MC noise ~ "
          f"{math.sqrt(2 / math.pi) * float(torch.sqrt(weights * (1 - weights) / n).sum()):.3f})"
          f", signed relative error of the pooled mode width (MC noise ~ "
          f"{1 / math.sqrt(4 * n):.4f})")
    print(f"{'method':34s} {'NFE/sample':>10s} {'weight L1':>10s} {'width err':>10s} {'seconds':>8s}")
    results = []
    for steps in ([100, 200, 500, 1000, 2000] if not quick else [100, 1000]):
        t0 = time.perf_counter()
        sol = ds.sample(field, (n, 2), solver=ds.EulerMaruyama(), steps=steps, denoise=False,
                        generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        q = quality(sol.x)
        results.append((f"EulerMaruyama steps={steps}", float(sol.stats.nfe_per_sample.double()
                                                                .mean()), *q,
                        time.perf_counter() - t0))
    for tol in ([0.1, 0.05, 0.02, 0.01] if not quick else [0.05, 0.02]):
        t0 = time.perf_counter()
        sol = ds.sample(field, (n, 2), solver=ds.StochasticHeun(), denoise=False,
                        controller=ds.PIController(rtol=tol, atol=tol / 2),
                        generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        q = quality(sol.x)
        results.append((f"StochasticHeun rtol={tol:g} atol={tol / 2:g}",
                        float(sol.stats.nfe_per_sample.double().mean()), *q,
                        time.perf_counter() - t0))
    for r in results:
        print(f"{r[0]:34s} {r[1]:10.1f} {r[2]:10.4f} {r[3]:+10.4f} {r[4]:8.2f}")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer settings, smaller batches")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work_precision(128 if args.quick else 512, args.quick)
    batch_independence()
    adaptive_sde(4000 if args.quick else 40000, args.quick)


if __name__ == "__main__":
    main()
