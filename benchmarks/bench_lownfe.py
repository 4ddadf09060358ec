"""Low-NFE fixed-grid sampling against the peers, in one run (issue 13).

EDM probability-flow ODE (sigma 80 -> 0.002, float64) of exact Gaussian mixtures. Development
problems (difsolve's recipe was chosen on these): ``ring2d`` (8 equal modes on a circle of radius
4, std 0.3) and ``gmm16`` (16-D, 5 rotated anisotropic components). Held-out problems (fixed
before any measurement on them and never used to choose anything): ``demo`` (difsolve's demo
ring: radius 2, weights 1..8, anisotropic modes) and ``gmm8`` (``rotated_mixture(8, 6, seed=8)``:
8-D, 6 components, random unequal weights and rotated covariances). Error: RMS over 4096 prior
draws (seed 0) of the endpoint error at ``sigma_min`` against a tight Dopri5 reference (tolerance
1e-10) from the same draws. Every configuration spends exactly the budget (``NFE in {10, 15, 20,
30, 50}``; asserted).

Peers on the same draws and the same ODE (see ``_lownfe_peers.py``): every diffusers multistep
scheduler (DPMSolverMultistep dpmsolver++ midpoint / heun order 2-3, DEIS 2-3, UniPC bh1 / bh2
order 2-3, each with ``lower_order_final`` on and off) and k-diffusion's ``dpmpp_2m``, ``lms``,
``heun``, ``dpm_2``, on Karras (rho 7) and exponential sigmas. difsolve: the multistep family on
the named schedules, and on grids from :func:`difsolve.tune_candidates` (UniPC(2, bh2), UniPC(3,
bh2), IPNDM(4)), tuned per problem (held-out ones included: tuning is part of the method) with one
recipe: 16384 pilot draws of that problem (seed 1, independent of the evaluation draws; asserted
disjoint), 4096 of them held back to choose the solver (``tune_method``'s choice, reported
separately), each grid fitted on a focus of 4096 of the other 12288 (``tune_schedule(focus=)``),
40 L-BFGS iterations.

Run: ``python benchmarks/bench_lownfe.py [--quick] [--png lownfe.png]`` (or
``difsolve bench lownfe``). Parts can run as separate processes (``--problems``, ``--nfe``,
``--json``) and be combined with ``--merge a.json b.json ...``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _lownfe_peers import diffusers_sample, kdiffusion_sample
from _peers import load_k_diffusion_sampling
from _problems import ring_mixture, rotated_mixture

import difsolve as ds
from difsolve.demo import ring_mixture as demo_ring
from difsolve.tuning import steps_for_nfe

NFES = (10, 15, 20, 30, 50)
EVAL_SEED, PILOT_SEED = 0, 1
N_EVAL, N_PILOTS, FOCUS = 4096, 16384, 4096
DEVELOPMENT, HELD_OUT = ("ring2d", "gmm16"), ("demo", "gmm8")


def gmm16() -> ds.GaussianMixture:
    """5 components in 16-D: means ~ 2 N(0, I), rotated covariances with variances in
    [0.02, 0.5], weights proportional to 1..5 (fixed seed)."""
    g = torch.Generator().manual_seed(16)
    d, k = 16, 5
    means = 2.0 * torch.randn(k, d, generator=g, dtype=torch.float64)
    covs = []
    for _ in range(k):
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        var = torch.exp(torch.empty(d, dtype=torch.float64).uniform_(math.log(0.02), math.log(0.5),
                                                                     generator=g))
        covs.append(q @ torch.diag(var) @ q.T)
    w = torch.arange(1, k + 1, dtype=torch.float64)
    return ds.GaussianMixture(w / w.sum(), means, torch.stack(covs))


def problems():
    proc = ds.EDM()
    return {"ring2d": ring_mixture(radius=4.0, std=0.3).score_field(proc),
            "gmm16": gmm16().score_field(proc),
            "demo": demo_ring().score_field(proc),
            "gmm8": rotated_mixture(8, 6, seed=8).score_field(proc)}


def sigma_grid(name: str, steps: int) -> torch.Tensor:
    proc = ds.EDM()
    t0 = torch.full((1,), proc.t_max, dtype=torch.float64)
    t1 = torch.full((1,), proc.t_min, dtype=torch.float64)
    return ds.control.make_grid(name, steps, t0, t1, proc)[:, 0]


def peer_configs():
    """(label, runner(nfe, grid_name, x, denoiser) -> (x, nfe) or None)."""
    kd = load_k_diffusion_sampling()
    out = []
    diff = [("DPMSolverMultistepScheduler", f"DPM++{o}M {st}", dict(solver_order=o,
                                                                    solver_type=st))
            for o in (2, 3) for st in (("midpoint", "heun") if o == 2 else ("midpoint",))]
    diff += [("DEISMultistepScheduler", f"DEIS{o}", dict(solver_order=o)) for o in (2, 3)]
    diff += [("UniPCMultistepScheduler", f"UniPC{o} {bh}", dict(solver_order=o, solver_type=bh))
             for o in (2, 3) for bh in ("bh1", "bh2")]
    for cls, label, cfg in diff:
        for lof in (True, False):
            def run(nfe, grid, x, den, cls=cls, cfg=cfg, lof=lof):
                return diffusers_sample(cls, sigma_grid(grid, nfe), x, den,
                                        lower_order_final=lof, **cfg)
            out.append((f"diffusers {label}{' lof' if lof else ''}", run))
    for name, per_step, kw in (("dpmpp_2m", 1, {}), ("lms", 1, {}), ("heun", 2, {}),
                               ("dpm_2", 2, {})):
        def run(nfe, grid, x, den, name=name, per_step=per_step, kw=kw):
            if nfe % per_step:
                return None
            return kdiffusion_sample(getattr(kd, f"sample_{name}"),
                                     sigma_grid(grid, nfe // per_step), x, den, **kw)
        out.append((f"k-diffusion {name}", run))
    return out


OURS = {
    "DPMSolver(2)": lambda: ds.DPMSolver(2),
    "DPMSolver(3)": lambda: ds.DPMSolver(3),
    "DPMSolver(3,midpoint)": lambda: ds.DPMSolver(3, "midpoint"),
    "DPMSolver(4)": lambda: ds.DPMSolver(4),
    "UniPC(2,bh1)": lambda: ds.UniPC(2, "bh1"),
    "UniPC(2,bh2)": lambda: ds.UniPC(2, "bh2"),
    "UniPC(3,bh1)": lambda: ds.UniPC(3, "bh1"),
    "UniPC(3,bh2)": lambda: ds.UniPC(3, "bh2"),
    "DEIS(3)": lambda: ds.DEIS(3),
    "IPNDM(4)": lambda: ds.IPNDM(4),
}
TUNED = ("UniPC(2,bh2)", "UniPC(3,bh2)", "IPNDM(4)")  # = tuning.default_candidates()
TUNE_ITERATIONS, HOLDOUT = 40, 0.25
QUICK_TUNED = ("UniPC(2,bh2)", "IPNDM(4)")
PICKED = "difsolve tune_method [tuned, solver chosen on pilots]"


def run(quick: bool, png: str | None, names=None, nfes=None, out_json=None) -> int:
    torch.set_default_dtype(torch.float64)
    nfes = nfes or ((10, 20) if quick else NFES)
    n_eval = 512 if quick else N_EVAL
    every = problems()
    names = names or list(every)
    fields = {k: every[k] for k in names}
    ctx = {}
    for pname, field in fields.items():
        ode = ds.ProbabilityFlowODE(field)
        d = field.mixture.means.shape[1]
        x = field.process.prior_sample((n_eval, d), generator=torch.Generator().manual_seed(
            EVAL_SEED))
        ref = ds.solve(ode, x, 80.0, 0.002, solver=ds.Dopri5(), time_variable="snr",
                       controller=ds.PIController(rtol=1e-10, atol=1e-10)).x
        ctx[pname] = (ode, x, ref)

    medians = {}  # (problem, label, nfe) -> median endpoint error (robust to rare mode flips)

    def err(pname, y, label=None, nfe=None):
        e = (y - ctx[pname][2]).square().sum(1)
        medians[pname, label, nfe] = float(e.median().sqrt())
        return float(e.mean().sqrt())

    results = {p: {} for p in fields}  # problem -> label -> {nfe: error}
    t_start = time.perf_counter()
    peers = peer_configs()
    if quick:
        peers = [pc for pc in peers if "lof" not in pc[0]]
    for pname in fields:
        ode, x, _ = ctx[pname]
        for label, runner in peers:
            for grid in ("karras", "logsnr"):
                row = results[pname].setdefault(f"{label} [{grid}]", {})
                for nfe in nfes:
                    got = runner(nfe, grid, x, ode.denoise)
                    if got is None:
                        continue
                    y, spent = got
                    assert spent == nfe, (label, spent, nfe)
                    row[nfe] = err(pname, y, f"{label} [{grid}]", nfe)
    t_peers = time.perf_counter() - t_start
    ours = dict(OURS)
    schedules = ("karras", "logsnr", "polyexponential", "time_uniform")
    if quick:
        ours = {k: v for k, v in ours.items() if k in ("DPMSolver(2)", "UniPC(2,bh2)",
                                                       "UniPC(3,bh2)", "DEIS(3)")}
    for pname in fields:
        ode, x, _ = ctx[pname]
        for label, make in ours.items():
            for sched in schedules:
                row = results[pname].setdefault(f"difsolve {label} [{sched}]", {})
                for nfe in nfes:
                    solver = make()
                    steps = steps_for_nfe(solver, nfe)
                    sol = ds.solve(ode, x, 80.0, 0.002, solver=solver, steps=steps,
                                   schedule=sched)
                    assert sol.stats.nfe == nfe
                    row[nfe] = err(pname, sol.x, f"difsolve {label} [{sched}]", nfe)
    # tuned grids: each problem tuned on its own pilots (drawn once, reused for every budget)
    tuning_log, picks = [], {}
    n_pilots, focus = (2048, 1024) if quick else (N_PILOTS, FOCUS)
    for pname in fields:
        ode, x, _ = ctx[pname]
        t0 = time.perf_counter()
        pilots = ds.draw_pilots(fields[pname], n_pilots, generator=PILOT_SEED)
        t_pilots = time.perf_counter() - t0
        # the pilots are not evaluation draws (different seeds, and no row in common)
        assert not torch.isin(pilots.x[:, 0], x[:, 0]).any()
        labels = QUICK_TUNED if quick else TUNED
        for nfe in nfes:
            t0 = time.perf_counter()
            tried = ds.tune_candidates(fields[pname], nfe, candidates=[OURS[lab]() for lab in labels],
                                       pilots=pilots, iterations=TUNE_ITERATIONS, holdout=HOLDOUT,
                                       focus=focus)
            seconds = (time.perf_counter() - t0 + t_pilots) / len(labels)
            for label, (_, solver, grid, info) in zip(labels, tried):
                tuning_log.append((label, pname, nfe, seconds, info))
                grid = torch.tensor(grid.tolist(), dtype=torch.float64)  # as saved and loaded
                sol = ds.solve(ode, x, 80.0, 0.002, solver=solver, steps=grid)
                assert sol.stats.nfe == nfe
                key = f"difsolve {label} [tuned]"
                results[pname].setdefault(key, {})[nfe] = err(pname, sol.x, key, nfe)
            # what tune_method returns: the candidate with the lowest held-back pilot error
            chosen = labels[min(range(len(tried)), key=lambda i: tried[i][0])]
            picks[pname, nfe] = chosen
            key = PICKED
            results[pname].setdefault(key, {})[nfe] = results[pname][
                f"difsolve {chosen} [tuned]"][nfe]
    print(f"peers: {t_peers:.0f} s; total {time.perf_counter() - t_start:.0f} s\n")
    print(f"tuning cost (seconds on this CPU incl. the pilots' reference solves; batched forward "
          f"field calls on {n_pilots} pilots: reference + search; gradient evaluations):")
    for label, on, nfe, sec, info in tuning_log:
        print(f"  {label:<14} on {on:<6} NFE {nfe:>2}: {sec:5.1f} s, {info.nfe_reference} + "
              f"{info.nfe_search} NFE, {info.gradients} gradients; pilot RMS "
              f"{info.start_error:.2e} ({info.start_schedule}) -> {info.error:.2e}"
              f"{'  <- chosen' if picks.get((on, nfe)) == label else ''}")
    if out_json:
        Path(out_json).write_text(json.dumps({"nfes": list(nfes), "results": results, "medians": [
            [k[0], k[1], k[2], v] for k, v in medians.items()]}))
    return report(results, medians, nfes, png)


def report(results, medians, nfes, png) -> int:
    summary = _summarise(results, nfes, medians)
    if png:
        _plot(results, summary, nfes, png)
    return 0


def merge(paths, png) -> int:
    """Print the tables and the figure of several ``--json`` runs together."""
    results, medians, nfes = {}, {}, set()
    for path in paths:
        data = json.loads(Path(path).read_text())
        nfes |= set(data["nfes"])
        for pname, rows in data["results"].items():
            for label, row in rows.items():
                results.setdefault(pname, {}).setdefault(label, {}).update(
                    {int(n): e for n, e in row.items()})
        medians.update({(p, lab, int(n)): v for p, lab, n, v in data["medians"]})
    return report(results, medians, tuple(sorted(nfes)), png)


def _best(rows, nfe, pick):
    cands = [(r[nfe], label) for label, r in rows.items() if nfe in r and pick(label)
             and math.isfinite(r[nfe])]
    return min(cands) if cands else (math.inf, "-")


def _summarise(results, nfes, medians):
    summary = {}
    for pname, rows in results.items():
        print(f"\n=== {pname}: RMS endpoint error at sigma_min (best per budget) ===")
        print(f"{'NFE':>4} | {'best peer':<44} {'error':>9} | {'difsolve, named schedule':<44} "
              f"{'error':>9} | {'difsolve, any grid (tuned incl.)':<48} {'error':>9} | "
              f"{'ratio':>5}")
        for nfe in nfes:
            peer = _best(rows, nfe, lambda lab: not lab.startswith("difsolve"))
            named = _best(rows, nfe, lambda lab: lab.startswith("difsolve") and "tuned" not in lab)
            tuned_here = _best(rows, nfe, lambda lab: lab.startswith("difsolve"))
            summary.setdefault(pname, {})[nfe] = (peer, named, tuned_here)
            print(f"{nfe:>4} | {peer[1]:<44} {peer[0]:9.2e} | {named[1]:<44} {named[0]:9.2e} | "
                  f"{tuned_here[1]:<48} {tuned_here[0]:9.2e} | {tuned_here[0] / peer[0]:5.2f}")
        print("median endpoint error of the same three configurations:")
        for nfe in nfes:
            peer, named, best = summary[pname][nfe]
            print(f"{nfe:>4} | " + " | ".join(f"{medians[pname, c[1], nfe]:9.2e}"
                                              for c in (peer, named, best)))

    print("\n=== ratio difsolve's best / best peer (target <= 0.5); held-out: "
          f"{', '.join(HELD_OUT)} ===")
    print(f"{'problem':<8} " + " ".join(f"{n:>6}" for n in nfes))
    for pname in summary:
        tag = "*" if pname in HELD_OUT else " "
        print(f"{pname + tag:<8} " + " ".join(
            f"{summary[pname][n][2][0] / summary[pname][n][0][0]:6.2f}" for n in nfes))
    print("ratio of tune_method's choice (solver chosen on held-back pilots, not on the "
          "evaluation draws) / best peer:")
    for pname in summary:
        tag = "*" if pname in HELD_OUT else " "
        print(f"{pname + tag:<8} " + " ".join(
            f"{results[pname].get(PICKED, {}).get(n, math.nan) / summary[pname][n][0][0]:6.2f}"
            for n in nfes))
    print("(* held out: never used to choose the recipe; tuned on its own independent pilots)")
    return summary


def _plot(results, summary, nfes, png):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no figure")
        return
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4))
    for ax, (pname, rows) in zip(axes, results.items()):
        series = {
            "best peer": [summary[pname][n][0][0] for n in nfes],
            "difsolve best named schedule": [summary[pname][n][1][0] for n in nfes],
            "difsolve best incl. tuned": [summary[pname][n][2][0] for n in nfes],
        }
        for key in ("diffusers UniPC2 bh2 [karras]", "diffusers DEIS3 [karras]",
                    "k-diffusion dpmpp_2m [karras]"):
            if key in rows:
                series[key] = [rows[key].get(n, math.nan) for n in nfes]
        for label, ys in series.items():
            style = "-o" if label.startswith("difsolve") or label == "best peer" else ":"
            ax.loglog(nfes, ys, style, label=label)
        ax.set_title(pname)
        ax.set_xlabel("NFE")
        ax.set_ylabel("RMS endpoint error")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="NFE 10 and 20, fewer configs")
    parser.add_argument("--png", default="lownfe.png", help="error-vs-NFE figure ('' for none)")
    parser.add_argument("--problems", default="", help="comma-separated subset of "
                        "ring2d,gmm16,demo (grids are tuned on ring2d and gmm16 when present)")
    parser.add_argument("--nfe", default="", help="comma-separated budgets (default all)")
    parser.add_argument("--json", default="", help="also write the results to this file")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--merge", nargs="+", default=None,
                        help="only print the tables and figure of these --json files")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.png or None)
    torch.set_num_threads(args.threads)
    names = [p for p in args.problems.split(",") if p] or None
    nfes = tuple(int(n) for n in args.nfe.split(",") if n) or None
    return run(args.quick, args.png or None, names, nfes, args.json or None)


if __name__ == "__main__":
    sys.exit(main())
