"""CUDA-graph capture of fixed-step solves (difsolve.graphs).

On the CPU: the fixed loop, run as on an accelerator, reads nothing on the host (the condition
for recording it); CapturedSolve's buffers, replays and results, through a stand-in recorder
that replays by rerunning into the recorded outputs; its argument errors. On a GPU (when one is
present): the real recording against ds.solve.
"""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import difsolve as ds
from difsolve import _tensor
from difsolve.integrate import FixedRun, _Problem

# host reads (a synchronisation on a GPU) and tensors made from host data (a host-to-device copy)
HOST_READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.item.default",
              "aten.is_nonzero.default", "aten.equal.default", "aten.lift_fresh.default",
              "aten.lift_fresh_copy.default"}


class LabelledConv(torch.nn.Module):
    """A small conditional eps-model: convolutions over the image, the time and a class label
    as extra channels (trainable parameters, 4-D float32 input)."""

    def __init__(self, channels: int = 3, width: int = 8, classes: int = 4):
        super().__init__()
        self.embed = torch.nn.Embedding(classes, 1)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels + 2, width, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, x, t, labels, scale: float = 1.0):
        size = (-1, 1, *x.shape[2:])
        tt = t.reshape(-1, 1, 1, 1).expand(size).to(x.dtype)
        lab = self.embed(labels).reshape(-1, 1, 1, 1).expand(size)
        return scale * self.net(torch.cat([x, tt, lab], 1))


def _field():
    torch.manual_seed(0)
    return ds.ScoreNetwork(LabelledConv(), ds.VP(), predicts="eps")


def _inputs(seed: int, batch: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, 8, 8, generator=gen),
            {"labels": torch.randint(0, 4, (batch,), generator=gen)})


class _HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in HOST_READS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


SOLVERS = [ds.Euler(), ds.Heun(), ds.RK4(), ds.DPMSolver(2), ds.DPMSolver(3),
           ds.DPMSolver(3, corrector=True), ds.UniPC(2), ds.DEIS(3), ds.IPNDM(4)]


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: repr(s)[:40])
@pytest.mark.parametrize("time_variable", ["t", "log_sigma"])
@pytest.mark.parametrize("start", [1.0, (1.0, 0.9, 0.95)], ids=["shared grid", "per-row grids"])
def test_fixed_loop_reads_nothing_on_the_host_as_on_an_accelerator(monkeypatch, solver,
                                                                   time_variable, start):
    """Where host reads are not free (accelerators, torch.compile), the fixed loop, from the
    initial evaluation to the last finiteness check, performs no host read and makes no tensor
    from host data, on a shared grid (weights planned up front) and on per-row grids (weights
    per step) alike, so a CUDA graph can record it. The same loop run with the CPU's free host
    reads gives the same state."""
    t0 = start if isinstance(start, float) else torch.tensor(start)
    assert time_variable in solver.time_variables
    field = _field()
    x0, cond = _inputs(1)
    x0[1, 0, 0, 0] = math.nan  # a failing row takes the per-row attribution path

    def run():
        problem = _Problem.build(
            ds.ProbabilityFlowODE(field), x0, t0, 1e-3, solver=solver, steps=12,
            schedule="logsnr", controller=None, corrector=None, generator=None, seeds=None,
            brownian=None, save_at=None, max_steps=10_000, progress=False,
            time_variable=time_variable, cond=cond, grad=False, callback=None)
        fixed = FixedRun.setup(problem, 12, "logsnr")
        with torch.no_grad(), _HostReads() as reads:
            out = fixed.loop(x0)
        return fixed.solution(*out), reads.seen

    on_cpu, _ = run()
    monkeypatch.setattr(_tensor, "_compiling", lambda: True)  # host reads now cost a sync
    as_on_device, seen = run()
    assert seen == []
    assert torch.equal(as_on_device.status, on_cpu.status)
    assert as_on_device.status.tolist() == [0, ds.Status.NONFINITE.value, 0]
    torch.testing.assert_close(as_on_device.x, on_cpu.x, rtol=1e-6, atol=1e-6, equal_nan=True)


class ReplayByRerun:
    """A CPU stand-in for a CUDA graph: ``capture`` runs the loop and keeps its outputs;
    ``replay`` runs it again and writes the results into those same tensors (a graph's outputs
    live in fixed memory, overwritten by every replay)."""

    def capture(self, fn):
        self.fn, self.out = fn, fn()
        return self.out

    def replay(self) -> None:
        x, good, _, _ = self.fn()
        kept_x, kept_good, _, _ = self.out
        kept_x.copy_(x)
        for name in ("alive", "x", "t", "steps"):
            kept = getattr(kept_good, name)
            if isinstance(kept, torch.Tensor):
                kept.copy_(getattr(good, name))


def _as_on_an_accelerator():
    """Host reads cost a synchronisation (as on a GPU): the loop takes its recordable path."""
    return mock.patch.object(_tensor, "_compiling", lambda: True)


@pytest.mark.parametrize("solver", [ds.DPMSolver(3), ds.Heun()], ids=["DPMSolver3", "Heun"])
def test_captured_solve_replays_give_the_solve_results(solver):
    """Each call copies its inputs into the recorded buffers, replays, and returns a solution
    of its own tensors equal to ds.solve's on the CPU (a failed row included); later calls do
    not change earlier results."""
    field = _field()
    ode = ds.ProbabilityFlowODE(field)
    kw = dict(solver=solver, steps=10, schedule="logsnr", time_variable="log_sigma")
    first_x, first_cond = _inputs(2)
    with _as_on_an_accelerator():
        captured = ds.CapturedSolve(ode, first_x, 1.0, 1e-3, cond=first_cond,
                                    _backend=ReplayByRerun(), **kw)
    results = []
    for seed in (3, 4):
        x, cond = _inputs(seed)
        if seed == 4:
            x[2] = math.inf
        with _as_on_an_accelerator():
            got = captured(x, cond=cond)
        results.append((got, ds.solve(ode, x, 1.0, 1e-3, cond=cond, **kw)))
    for got, want in results:
        torch.testing.assert_close(got.x, want.x, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(got.last_x, want.last_x, rtol=0, atol=0)
        assert torch.equal(got.status, want.status) and torch.equal(got.last_t, want.last_t)
        assert got.stats.nfe == want.stats.nfe
        assert torch.equal(got.stats.steps, want.stats.steps)
    assert results[1][0].status.tolist() == [0, 0, ds.Status.NONFINITE.value]
    again = ds.solve(ode, *(_inputs(3)[:1]), 1.0, 1e-3, cond=_inputs(3)[1], **kw)
    assert torch.equal(results[0][0].x, again.x)  # the first result outlived the second replay


def test_captured_solve_refuses_what_it_cannot_record():
    field = _field()
    ode = ds.ProbabilityFlowODE(field)
    x, cond = _inputs(0)
    with pytest.raises(ds.IncompatibleError, match=r"x0.*CUDA"):
        ds.CapturedSolve(ode, x, 1.0, 1e-3, solver=ds.Euler(), steps=4, cond=cond)
    with pytest.raises(ds.IncompatibleError, match=r"solver.*noise"):
        ds.CapturedSolve(ds.ReverseSDE(field), x, 1.0, 1e-3, solver=ds.EulerMaruyama(), steps=4,
                         cond=cond, _backend=ReplayByRerun())
    with pytest.raises(ds.IncompatibleError, match="steps"):
        ds.CapturedSolve(ode, x, 1.0, 1e-3, solver=ds.Euler(), steps=None, cond=cond,
                         _backend=ReplayByRerun())
    with pytest.raises(ds.InvalidArgumentError, match="warmup"):
        ds.CapturedSolve(ode, x, 1.0, 1e-3, solver=ds.Euler(), steps=4, cond=cond, warmup=0,
                         _backend=ReplayByRerun())
    with _as_on_an_accelerator():
        captured = ds.CapturedSolve(ode, x, 1.0, 1e-3, solver=ds.Euler(), steps=4,
                                    cond={**cond, "scale": 2.0}, _backend=ReplayByRerun())
    with pytest.raises(ds.InvalidArgumentError, match=r"x0.*shape"):
        captured(x[:2], cond=cond)
    with pytest.raises(ds.InvalidArgumentError, match=r"x0.*dtype"):
        captured(x.double(), cond={**cond, "scale": 2.0})
    with pytest.raises(ds.InvalidArgumentError, match="cond"):
        captured(x, cond=cond)  # a recorded key missing
    with pytest.raises(ds.InvalidArgumentError, match=r"scale.*recorded"):
        captured(x, cond={**cond, "scale": 3.0})


def test_a_field_that_cannot_be_recorded_is_named():
    class FailingCapture(ReplayByRerun):
        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing")

    x, cond = _inputs(0)
    with pytest.raises(ds.IncompatibleError, match=r"dynamics.*CUDA graph.*host"):
        ds.CapturedSolve(ds.ProbabilityFlowODE(_field()), x, 1.0, 1e-3, solver=ds.Euler(),
                         steps=4, cond=cond, _backend=FailingCapture())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="records a CUDA graph: needs a GPU")
def test_cuda_graph_replays_match_the_eager_solve_and_memory_stays_flat():
    device = torch.device("cuda")
    torch.manual_seed(0)
    field = ds.ScoreNetwork(LabelledConv().to(device), ds.VP(), predicts="eps")
    ode = ds.ProbabilityFlowODE(field)
    kw = dict(solver=ds.DPMSolver(2), steps=20, schedule="logsnr", time_variable="log_sigma")
    x, cond = (v.to(device) for v in (_inputs(0)[0], _inputs(0)[1]["labels"]))
    captured = ds.CapturedSolve(ode, x, 1.0, 1e-3, cond={"labels": cond}, **kw)
    used = []
    for seed in range(5):
        xs, labels = _inputs(seed)
        xs, labels = xs.to(device), labels["labels"].to(device)
        got = captured(xs, cond={"labels": labels})
        want = ds.solve(ode, xs, 1.0, 1e-3, cond={"labels": labels}, **kw)
        torch.testing.assert_close(got.x, want.x, rtol=1e-5, atol=1e-5)
        assert torch.equal(got.status, want.status) and got.stats.nfe == want.stats.nfe
        torch.cuda.synchronize()
        used.append(torch.cuda.memory_allocated())
    assert max(used[1:]) <= used[1]  # replays allocate nothing that stays
