"""The seed-0 selection of the eta-window row of bench_stochastic (docs/stochastic.md).

DPM-Solver++(2M) SDE (reference) with noise only on the steps that start at sigma >= ``lo``,
on four grids, at eta 0.5 / 0.7 / 1: the distribution errors of bench_stochastic on seed 0 (the
report uses seed 1), and the number of samples with a squared Mahalanobis distance above 40 to
their nearest mode (stranded; exact draws: about 2 per million).

Run: ``python benchmarks/_stochastic_selection.py SAMPLES NFE SEED "pattern;pattern"``, the
patterns matched (fnmatch) against the setting names below, e.g.
``python benchmarks/_stochastic_selection.py 1000000 20 0 "w0.0[3-7]_exponential_e1.0"``.
"""

from __future__ import annotations

import fnmatch
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_stochastic as bench

import difsolve as ds


def settings() -> dict:
    grids = dict(bench.GRIDS)
    grids["polyexp 1.15"] = bench.poly(1.15)
    out = {"kd2m_p16": bench.kd_sampler("sample_dpmpp_2m_sde", grids["polyexp 1.6"], eta=1.0),
           "kd2m_p16_e.7": bench.kd_sampler("sample_dpmpp_2m_sde", grids["polyexp 1.6"],
                                            eta=0.7)}
    for lo in (0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.1):
        for grid in ("exponential", "polyexp 1.15", "polyexp 1.3", "polyexp 1.6"):
            for eta in (0.5, 0.7, 1.0):
                out[f"w{lo}_{grid}_e{eta}"] = bench.ds_sde(
                    ds.DPMSolverSDE(2, eta=eta, eta_range=(lo, bench.SIGMA_MAX)), grids[grid])
    return out


def main(argv: list[str]) -> int:
    samples, nfe, seed, patterns = int(argv[0]), int(argv[1]), int(argv[2]), argv[3].split(";")
    torch.set_num_threads(1)
    p = bench.Problem(samples, seed)
    table = settings()
    for name, run in table.items():
        if not any(fnmatch.fnmatch(name, pat) for pat in patterns):
            continue
        started = time.perf_counter()
        x, spent = run(p, nfe)
        weight, width = p.errors(p.moments(x))
        assign = torch.cdist(x, p.mixture.means).argmin(1)
        m2 = ((x - p.mixture.means[assign]).square() / p.field.vars[assign]).sum(1)
        print(f"{name:<32} NFE {spent:>3} weight {weight:.5f} width {width:.5f} "
              f"stranded {int((m2 > 40).sum()):>5} {time.perf_counter() - started:.1f} s",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
