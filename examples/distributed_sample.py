"""Sample, evaluate bits/dim and a weak statistic on all ranks with ``ds.distributed``.

Runs on one process, or on several under torchrun (Gloo on CPU, NCCL on CUDA)::

    python examples/distributed_sample.py --quick
    torchrun --nproc_per_node=2 examples/distributed_sample.py --quick

The problem is a 2-D Gaussian mixture under VP with its exact score, so the figures have closed
forms to compare with: the mean squared norm of the samples against the mixture's
``sum_k w_k (|mu_k|^2 + tr S_k)``, and the bits/dim against the exact ``log p_{t_min}``. Every
sample has its own seed (``seed + index``), so the output is the same for any number of processes.
Rank 0 prints the table and writes ``OUT/samples.pt``; every rank writes its share of the
log-likelihoods to ``OUT/likelihood-RANK.pt`` (read back with ``ds.distributed.load``).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

import difsolve as ds


def problem() -> ds.GaussianMixture:
    return ds.GaussianMixture(torch.tensor([0.2, 0.3, 0.5]),
                              torch.tensor([[-2.0, 0.0], [1.0, 1.5], [1.5, -1.0]]),
                              torch.tensor([0.15, 0.3, 0.2]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small job (seconds on a CPU)")
    parser.add_argument("--out", type=Path, default=Path("distributed_out"),
                        help="directory for the samples and the per-rank likelihood files")
    parser.add_argument("--seed", type=int, default=0, help="base of the per-sample seeds")
    args = parser.parse_args()
    n, points, batch, steps = (256, 64, 64, 100) if args.quick else (8192, 2048, 1024, 500)

    # the user's script starts the process group (difsolve never does); torchrun sets the env
    launched = "WORLD_SIZE" in os.environ
    device = torch.device("cpu")
    if launched:
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=5))
    rank = dist.get_rank() if launched else 0
    world = dist.get_world_size() if launched else 1
    try:
        mixture = problem()
        field = mixture.score_field(ds.VP())
        sol = ds.distributed.sample(field, n, batch_size=batch, seed=args.seed,
                                    solver=ds.EulerMaruyama(), steps=steps, device=device,
                                    gather="rank0")
        data = mixture.sample(points, generator=torch.Generator().manual_seed(12345)).float()
        ll = ds.distributed.log_likelihood(
            field, data.to(device), batch_size=batch, seed=10**6 + args.seed,
            trace=ds.Hutchinson(probes=4, noise="gaussian"),
            controller=ds.PIController(rtol=1e-4, atol=1e-4),
            gather=str(args.out / "likelihood-{rank}.pt"))
        # summary over all ranks from each rank's share
        bpd = ds.distributed.bits_per_dim(ll, across_ranks=True)
        exact = ds.distributed.mean(-field.log_prob(data, field.process.t_min).double()
                                    / (2 * math.log(2.0)))
        if rank == 0:
            x = sol.x.double().cpu()
            second = ds.distributed.mean(x.pow(2).sum(dim=1))
            w, mu = mixture.weights, mixture.means
            true_second = float((w * (mu.pow(2).sum(1) + mixture.covs.diagonal(dim1=1,
                                                                              dim2=2).sum(1))).sum())
            ok = int((sol.status == ds.Status.SUCCESS.value).sum())
            print(f"world size {world}: {n} samples ({ok} succeeded), {sol.stats.nfe} batched "
                  f"field calls in all, {int(sol.stats.nfe_per_sample[0])} per sample")
            print(f"E|x|^2   samples {second}   exact {true_second:.6g}")
            print(f"bits/dim estimate {bpd}")
            print(f"bits/dim exact    {exact.mean.item():.6g} (same {points} points)")
            args.out.mkdir(parents=True, exist_ok=True)
            torch.save({"x": sol.x.cpu(), "status": sol.status.cpu(), "seed": args.seed},
                       args.out / "samples.pt")
            print(f"wrote {args.out / 'samples.pt'} and {args.out}/likelihood-RANK.pt")
    finally:
        if launched:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
