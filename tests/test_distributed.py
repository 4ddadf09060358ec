"""``ds.distributed``: sharded jobs give the same result per global index in any world size.

The same jobs (tests/_distributed_worker.py) run in this process without a process group and in
2 and 3 Gloo processes on CPU; per-index samples, statuses, counters and log-likelihoods must be
bitwise equal across world sizes and chunk sizes, because every item has its own seed.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _distributed_worker import BATCH_SIZES, N, data, field, mixture, ode_paths, scenarios

import difsolve as ds

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_distributed_worker.py"
WORLDS = (2, 3)
dd = ds.distributed


def _launch(world: int, tmp: Path) -> list[subprocess.Popen]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return [subprocess.Popen([sys.executable, str(WORKER), str(r), str(world),
                              str(tmp / "store"), str(tmp)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for r in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, list[dict]]:
    """``{world size: [per-rank results]}``; world size 1 is this process, without a group."""
    dirs = {w: tmp_path_factory.mktemp(f"world{w}") for w in WORLDS}
    procs = {w: _launch(w, dirs[w]) for w in WORLDS}  # both worlds at once
    example_dir = tmp_path_factory.mktemp("example")
    example = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "distributed_sample.py"), "--quick", "--out",
         str(example_dir)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    single = tmp_path_factory.mktemp("world1")
    out = {1: [scenarios(str(single))]}
    failures, logs = [], {}
    procs["example"] = [example]
    deadline = time.monotonic() + 240  # for all processes together
    for w, ps in procs.items():
        for r, p in enumerate(ps):
            try:
                logs[w, r], _ = p.communicate(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                p.kill()
                logs[w, r] = p.communicate()[0] + "\n(killed: past the deadline)"
            if p.returncode != 0:
                failures.append(f"world {w} rank {r} exited with {p.returncode}:\n{logs[w, r]}")
    assert not failures, "\n".join(failures)
    out["example"] = (example_dir, logs["example", 0])
    for w in WORLDS:
        out[w] = [torch.load(dirs[w] / f"rank{r}.pt", weights_only=False) for r in range(w)]
    out["dirs"] = {1: single, **dirs}
    return out


def _every_run(runs):
    for w in (1, *WORLDS):
        for r, res in enumerate(runs[w]):
            yield w, r, res


def _chunks(world: int, batch: int, n: int = N) -> int:
    return sum(math.ceil(((r + 1) * n // world - r * n // world) / batch) for r in range(world))


@pytest.mark.parametrize("job", ["ode", "sde", "ll"])
def test_each_index_is_bitwise_the_same_in_every_world_and_chunk_size(runs, job):
    ref = runs[1][0][f"{job}_b{BATCH_SIZES[0]}"]
    rows = ["status", "stats.nfe_per_sample", "stats.steps", "stats.accepted", "stats.rejected"]
    rows += ["x", "t"] if job != "ll" else ["log_prob", "stderr", "bits_per_dim", "latent",
                                            "delta_log_prob"]
    for w, r, res in _every_run(runs):
        for b in BATCH_SIZES:
            got = res[f"{job}_b{b}"]
            for name in rows:
                a, e = got, ref
                for part in name.split("."):
                    a, e = getattr(a, part), getattr(e, part)
                assert a.shape[0] == N
                assert torch.equal(a, e), f"{job} {name}: world {w} rank {r} batch {b}"
    assert bool((ref.status == ds.Status.SUCCESS).all())


def test_indices_have_their_own_randomness_and_match_a_lone_solve(runs):
    sde = runs[1][0]["sde_b2"]
    assert torch.unique(sde.x, dim=0).shape[0] == N  # seeds differ per item
    lone = ds.sample(field(), (1, 2), solver=ds.EulerMaruyama(), steps=20, seeds=[3])
    assert torch.equal(lone.x[0], sde.x[3])  # default seeds: seed + index
    ll = runs[1][0]["ll_b2"]
    assert torch.equal(ll.x, data())
    assert bool(torch.isfinite(ll.stderr).all()) and bool((ll.stderr > 0).all())
    est = dd.mean(ll.log_prob - mixture_log_prob(), stderr=ll.stderr)  # Hutchinson, 4 probes
    assert abs(float(est.mean)) < 4 * float(est.noise_stderr) + 1e-2
    paths = ode_paths(torch.arange(N))
    assert torch.equal(runs[1][0]["ode_b5"].x, paths.x)


def mixture_log_prob() -> torch.Tensor:
    f = field()
    return f.log_prob(data(), f.process.t_min).float()


def test_nfe_sums_the_batched_calls_of_every_chunk_on_every_rank(runs):
    for w, _, res in _every_run(runs):
        for b in BATCH_SIZES:
            sol = res[f"ode_b{b}"]
            per_chunk = int(sol.stats.nfe_per_sample[0])  # fixed steps: every row the same
            assert bool((sol.stats.nfe_per_sample == per_chunk).all())
            assert sol.stats.nfe == _chunks(w, b) * per_chunk
            ll = res[f"ll_b{b}"]
            assert ll.stats.nfe >= _chunks(w, b) * int(ll.stats.nfe_per_sample.min())
            assert ll.stats.nfe <= _chunks(w, b) * int(ll.stats.nfe_per_sample.max())


def test_rank0_gather_and_files_per_rank(runs):
    full = runs[1][0]["sde_b2"]
    for w, r, res in _every_run(runs):
        if r == 0:
            assert torch.equal(res["sde_rank0"].x, full.x)
        else:
            assert res["sde_rank0"] is None
        share = range(r * N // w, (r + 1) * N // w)
        local = res["file_local"]
        assert torch.equal(local.x, full.x[share.start : share.stop])
    for w in (1, *WORLDS):
        loaded = dd.load(str(runs["dirs"][w] / "part-{rank}.pt"))
        assert torch.equal(loaded.x, full.x) and torch.equal(loaded.status, full.status)
        assert loaded.stats.nfe == _chunks(w, 2) * 21


def test_fewer_items_than_ranks(runs):
    for _, _, res in _every_run(runs):
        assert torch.equal(res["tiny"]["i"], torch.tensor([0, 10]))
        assert res["tiny"]["count"] == 2


def test_a_failing_rank_stops_the_job_on_every_rank(runs):
    for w, r, res in _every_run(runs):
        message, failed, cause = res["error"]
        assert failed == [w - 1]
        assert f"rank {w - 1} failed on global indices" in message
        assert "RuntimeError: boom at the last index" in message
        assert cause == ("RuntimeError" if r == w - 1 else None)
        assert torch.equal(res["after_error"], torch.arange(N, dtype=torch.float64))


def test_a_rank_left_alone_in_a_collective_times_out_with_an_error(runs):
    for w in WORLDS:
        message = runs[w][0]["hang_guard"]
        assert message is not None and "rank 0" in message and "all_reduce" in message
        assert all("hang_guard" not in res for res in runs[w][1:])


def test_mean_across_ranks_equals_the_mean_of_the_gathered_values(runs):
    for _, _, res in _every_run(runs):
        gathered = dd.mean(res["ll_b2"].bits_per_dim)
        across = res["mean_across"]
        assert across.n == gathered.n == N
        assert torch.allclose(across.mean, gathered.mean, rtol=1e-12, atol=0)
        assert torch.allclose(across.stderr, gathered.stderr, rtol=1e-9, atol=0)


def test_mean_and_standard_errors_in_closed_form():
    v = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 2.0], [4.0, 2.0]])
    e = torch.tensor([[0.3, 0.1], [0.4, 0.1], [0.0, 0.1], [0.0, 0.1]])
    est = dd.mean(v, stderr=e)
    assert torch.allclose(est.mean, torch.tensor([2.5, 1.0], dtype=torch.float64))
    var = torch.tensor([5.0 / 3.0, 4.0 / 3.0], dtype=torch.float64)
    assert torch.allclose(est.stderr, (var / 4).sqrt())
    assert torch.allclose(est.noise_stderr, torch.tensor([0.125, 0.05], dtype=torch.float64))
    assert est.n == 4 and "n=4" in str(est)
    assert math.isnan(float(dd.mean(torch.tensor([1.0])).stderr))


def test_bits_per_dim_converts_the_hutchinson_error_to_bits(runs):
    ll = runs[1][0]["ll_b2"]
    est = dd.bits_per_dim(ll)
    assert torch.allclose(est.mean, ll.bits_per_dim.double().mean())
    expected = (ll.stderr.double() ** 2).sum().sqrt() / N / (2 * math.log(2.0))
    assert torch.allclose(est.noise_stderr, expected)


def test_bad_arguments_name_the_argument():
    f = field()
    with pytest.raises(ds.InvalidArgumentError, match="gather"):
        dd.map_chunks(lambda i: i, 4, batch_size=2, gather="out.pt")
    with pytest.raises(ds.ArgumentTypeError, match="gather"):
        dd.map_chunks(lambda i: i, 4, batch_size=2, gather=3)
    with pytest.raises(ds.ArgumentTypeError, match="batch_size"):
        dd.map_chunks(lambda i: i, 4, batch_size=2.0)
    with pytest.raises(ds.InvalidArgumentError, match="`n`"):
        dd.map_chunks(lambda i: i, 0, batch_size=2)
    with pytest.raises(ds.InvalidArgumentError, match="timeout"):
        dd.map_chunks(lambda i: i, 4, batch_size=2, timeout=-1.0)
    with pytest.raises(ds.IncompatibleError, match="generator"):
        dd.sample(f, 4, batch_size=2, generator=torch.Generator())
    with pytest.raises(ds.InvalidArgumentError, match="seeds"):
        dd.sample(f, 4, batch_size=2, seeds=[1, 2, 3])
    with pytest.raises(ds.ArgumentTypeError, match="shape"):
        dd.sample(object(), 4, batch_size=2)
    with pytest.raises(ds.IncompatibleError, match="group"):
        dd.map_chunks(lambda i: i, 4, batch_size=2, group=object())
    with pytest.raises(ds.ArgumentTypeError, match="data"):
        dd.log_likelihood(f, [1.0, 2.0], batch_size=2)


def test_results_must_have_one_row_per_index():
    with pytest.raises(dd.DistributedError, match=r"rank 0 failed .*2 rows along dimension 0"):
        dd.map_chunks(lambda i: i.sum(), 4, batch_size=2)
    with pytest.raises(dd.DistributedError, match=r"rank 0 failed .*str"):
        dd.map_chunks(lambda i: "text", 4, batch_size=2)
    err = None
    try:
        dd.map_chunks(lambda i: 1 / 0, 4, batch_size=2)
    except dd.DistributedError as exc:
        err = exc
    assert err is not None and isinstance(err.__cause__, ZeroDivisionError)
    assert err.failed_ranks == [0] and isinstance(err, ds.DifsolveError)


def test_x_T_and_cond_rows_follow_their_index():
    f = field()
    x_T = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    whole = dd.sample(f, 5, batch_size=5, x_T=x_T, solver=ds.Heun(), steps=4)
    parts = dd.sample(f, 5, batch_size=2, x_T=x_T, solver=ds.Heun(), steps=4)
    lone = ds.sample(f, (1, 2), x_T=x_T[3:4], solver=ds.Heun(), steps=4)
    assert torch.equal(whole.x, parts.x) and torch.equal(parts.x[3], lone.x[0])


@pytest.mark.parametrize("job", [
    "sde", "ode",
    "adaptive_ll"])
def test_chunks_wider_than_the_cpu_vector_width_give_the_same_rows(job):
    """Chunks of 3 and 32 rows put a row in the scalar tail or the vectorised body of the CPU
    kernels; its result must not change (the multi-process jobs above use small chunks)."""
    f, n = field(), 32
    x = mixture().sample(n, generator=torch.Generator().manual_seed(1)).float()

    def run(b):
        if job == "sde":
            return dd.sample(f, n, batch_size=b, solver=ds.EulerMaruyama(), steps=10).x
        if job == "ode":
            return dd.sample(f, n, batch_size=b, solver=ds.Heun(), steps=6).x
        return dd.log_likelihood(f, x, batch_size=b, trace=ds.Hutchinson(probes=2),
                                 controller=ds.PIController(rtol=1e-3, atol=1e-3)).log_prob

    assert torch.equal(run(3), run(n))


def test_saved_states_are_gathered_along_their_batch_dimension():
    f = field()
    save = torch.tensor([0.5, 0.1])
    whole = ds.sample(f, (5, 2), seeds=range(5), solver=ds.Heun(), steps=6, save_at=save)
    parts = dd.sample(f, 5, batch_size=2, solver=ds.Heun(), steps=6, save_at=save)
    assert parts.xs.shape == whole.xs.shape == (2, 5, 2)
    assert torch.equal(parts.xs, whole.xs) and torch.equal(parts.ts, whole.ts)
    assert torch.equal(parts.last_x, whole.last_x) and torch.equal(parts.x, whole.x)


def test_the_example_runs_single_process_and_writes_its_files(runs):
    out, log = runs["example"]
    assert "world size 1: 256 samples (256 succeeded)" in log
    assert torch.load(out / "samples.pt")["x"].shape == (256, 2)
    ll = dd.load(str(out / "likelihood-{rank}.pt"))
    assert ll.log_prob.shape == (64,) and bool(torch.isfinite(ll.log_prob).all())
