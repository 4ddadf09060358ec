"""One rank of the multi-process tests of ``ds.distributed`` (tests/test_distributed.py).

Run as ``python tests/_distributed_worker.py RANK WORLD STORE OUTDIR`` (the test starts one
process per rank, as torchrun would, on a Gloo group rendezvousing through the file ``STORE``);
``scenarios`` runs the same jobs in any world size, including a single process without a group.
"""

from __future__ import annotations

import datetime
import sys

import torch
import torch.distributed as dist

import difsolve as ds

N = 7  # items per job: shares of 3/4 (2 ranks) and 2/2/3 (3 ranks)
TIMEOUT = 30.0  # seconds any collective may wait
BATCH_SIZES = (2, 5)


def mixture() -> ds.GaussianMixture:
    return ds.GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-1.0, 0.5], [1.5, -0.5]]),
                              torch.tensor([0.2, 0.5]))


def field():
    return mixture().score_field(ds.VP())


def data() -> torch.Tensor:
    return mixture().sample(N, generator=torch.Generator().manual_seed(0)).float()


def ode_paths(idx: torch.Tensor) -> ds.Solution:
    """A deterministic study path per index: x_T from the index's own generator, Heun to t_min."""
    f = field()
    x = torch.cat([torch.randn(1, 2, generator=torch.Generator().manual_seed(100 + int(i)))
                   for i in idx])
    return ds.solve(ds.ProbabilityFlowODE(f), x, f.process.t_max, f.process.t_min,
                    solver=ds.Heun(), steps=6)


def fail_on_last(idx: torch.Tensor) -> dict:
    if int(idx[-1]) == N - 1:
        raise RuntimeError("boom at the last index")
    return {"i": idx}


def scenarios(tmp: str, *, hang_guard: bool = False) -> dict:
    """Every job of the tests, in the same order on every rank."""
    dd, f = ds.distributed, field()
    out: dict = {}
    for b in BATCH_SIZES:
        out[f"ode_b{b}"] = dd.map_chunks(ode_paths, N, batch_size=b, timeout=TIMEOUT)
        out[f"sde_b{b}"] = dd.sample(f, N, batch_size=b, solver=ds.EulerMaruyama(), steps=20,
                                     timeout=TIMEOUT)
        out[f"ll_b{b}"] = dd.log_likelihood(
            f, data(), batch_size=b, trace=ds.Hutchinson(probes=4, noise="gaussian"),
            controller=ds.PIController(rtol=1e-3, atol=1e-3), timeout=TIMEOUT)
    out["sde_rank0"] = dd.sample(f, N, batch_size=3, solver=ds.EulerMaruyama(), steps=20,
                                 gather="rank0", timeout=TIMEOUT)
    out["tiny"] = dd.map_chunks(lambda idx: {"i": 10 * idx, "count": idx.numel()}, 2,
                                batch_size=1, timeout=TIMEOUT)  # fewer items than ranks
    out["file_local"] = dd.sample(f, N, batch_size=2, solver=ds.EulerMaruyama(), steps=20,
                                  gather=f"{tmp}/part-{{rank}}.pt", timeout=TIMEOUT)
    try:
        dd.map_chunks(fail_on_last, N, batch_size=2, timeout=TIMEOUT)
        out["error"] = None
    except dd.DistributedError as exc:
        cause = None if exc.__cause__ is None else type(exc.__cause__).__name__
        out["error"] = (str(exc), exc.failed_ranks, cause)
    out["after_error"] = dd.map_chunks(lambda idx: idx.double(), N, batch_size=4,
                                       timeout=TIMEOUT)
    share = dd.shard(N)
    mine = out["ll_b2"].bits_per_dim[share.start : share.stop]
    out["mean_across"] = dd.mean(mine, across_ranks=True, timeout=TIMEOUT)
    if hang_guard:  # rank 0 enters a job the others never join: a bounded wait, then an error
        if dist.get_rank() == 0:
            try:
                dd.map_chunks(lambda idx: idx, N, batch_size=N, timeout=2.0)
                out["hang_guard"] = None
            except dd.DistributedError as exc:
                out["hang_guard"] = str(exc)
    return out


def main() -> None:
    rank, world, store, outdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        out = scenarios(outdir, hang_guard=True)
        torch.save(out, f"{outdir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
