r"""CUDA-graph capture of fixed-step solves: the whole loop recorded once, replayed per batch.

On a GPU a step of a small network is a few dozen kernel launches, and with small batches
launching them costs more than running them. A CUDA graph (``torch.cuda.CUDAGraph``) records the
launches of one solve and replays them all with one call; the loop's Python does not run again.

:class:`CapturedSolve` prepares a fixed-step solve (argument checks, the grid, the solver's
per-grid weights: everything that reads values on the host), records its loop as one graph on
static input buffers, and at each call copies the new starting state (and condition) into those
buffers and replays. Each call returns a :class:`~difsolve.Solution` of its own tensors.

What can be recorded: deterministic solvers on a fixed grid (no noise, corrector, save points or
callback, no autograd graph), and a field that itself records (no host synchronisation, no
data-dependent shapes; most ``torch.nn`` networks, including diffusers U-Nets). difsolve's fixed
loop does not synchronise with the host on accelerators (it checks finiteness row by row every
``CHECK_EVERY`` steps without a host read), which ``tests/test_graphs.py`` checks on the CPU by
running the loop as on an accelerator and counting host reads.

References: PyTorch, *CUDA Graphs* (``torch.cuda.graph``, warm-up on a side stream).
"""

from __future__ import annotations

import dataclasses

import torch

from ._errors import ArgumentTypeError, IncompatibleError, InvalidArgumentError, check_int
from .integrate import FixedRun, _Problem
from .solution import Solution
from .solvers.base import Solver

__all__ = ["CapturedSolve"]


class CudaGraph:
    """The recording backend: ``capture(fn)`` runs ``fn`` once under capture and returns its
    outputs (which each :meth:`replay` overwrites in place)."""

    def __init__(self, warmup: int):
        self.warmup, self.graph = warmup, None

    def capture(self, fn):
        # warm-up and capture on one side stream: lazy initialisations (cuBLAS handles, which
        # are cached per stream) happen before the capture; the last warm-up fails loudly on a
        # synchronising operation, where the capture itself would fail obscurely
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(self.warmup):
                mode = torch.cuda.get_sync_debug_mode()
                torch.cuda.set_sync_debug_mode("error" if i == self.warmup - 1 else mode)
                try:
                    fn()
                finally:
                    torch.cuda.set_sync_debug_mode(mode)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=side):
            out = fn()
        torch.cuda.current_stream().wait_stream(side)
        return out

    def replay(self) -> None:
        self.graph.replay()


class CapturedSolve:
    """A fixed-step :func:`~difsolve.solve` recorded once as a CUDA graph and replayed.

    ``CapturedSolve(dynamics, x0, t0, t1, solver=..., steps=..., schedule=..., time_variable=...,
    cond=...)`` takes the arguments of :func:`~difsolve.solve` (a deterministic solver and fixed
    ``steps``); ``x0`` and the tensors of ``cond`` give the shapes and are copied into the graph's
    input buffers. ``captured(x0, cond=None)`` solves from a new ``x0`` of the same shape, dtype
    and device (and a new ``cond`` with the same keys and shapes; its non-tensor values must equal
    the recorded ones) by one replay, and returns the same :class:`~difsolve.Solution` as
    ``ds.solve`` would (status, last finite state and stats included).

    ``warmup`` eager runs on a side stream precede the capture (lazy initialisations must not be
    recorded). Raises :class:`~difsolve.IncompatibleError` off CUDA, for stochastic solvers, or
    where the field cannot be recorded (naming the cause).
    """

    def __init__(self, dynamics, x0: torch.Tensor, t0, t1, *, solver: Solver, steps,
                 schedule: str = "uniform", time_variable: str = "t", cond: dict | None = None,
                 warmup: int = 2, _backend=None):
        if not isinstance(x0, torch.Tensor):
            raise ArgumentTypeError(f"argument `x0` must be a torch.Tensor, got {x0!r}")
        if _backend is None and x0.device.type != "cuda":
            raise IncompatibleError(
                f"argument `x0`: CapturedSolve records a CUDA graph and needs a CUDA tensor, got "
                f"one on {x0.device} (use ds.solve)")
        if isinstance(solver, Solver) and solver.sde:
            raise IncompatibleError(
                f"argument `solver`: CapturedSolve records deterministic solves; "
                f"{type(solver).__name__} draws noise (use ds.solve)")
        if steps is None:
            raise IncompatibleError("argument `steps`: CapturedSolve needs a fixed grid")
        warmup = check_int(warmup, "warmup", minimum=1)
        self._x0 = x0.detach().clone()
        self._cond = None if cond is None else {k: _static(v) for k, v in cond.items()}
        problem = _Problem.build(
            dynamics, self._x0, t0, t1, solver=solver, steps=steps, schedule=schedule,
            controller=None, corrector=None, generator=None, seeds=None, brownian=None,
            save_at=None, max_steps=10_000, progress=False, time_variable=time_variable,
            cond=self._cond, grad=False, callback=None)
        self._run = FixedRun.setup(problem, steps, schedule)
        self._backend = CudaGraph(warmup) if _backend is None else _backend
        with torch.no_grad():
            try:
                self._out = self._backend.capture(lambda: self._run.loop(self._x0))
            except RuntimeError as err:  # e.g. a host synchronisation inside the field
                raise IncompatibleError(
                    f"argument `dynamics`: the solve could not be recorded as a CUDA graph "
                    f"({err}); the field must not synchronise with the host (use ds.solve)"
                ) from err

    def __call__(self, x0: torch.Tensor, cond: dict | None = None) -> Solution:
        _check_like(x0, self._x0, "x0")
        if (cond is None) != (self._cond is None) or (
                cond is not None and set(cond) != set(self._cond)):
            raise InvalidArgumentError(
                f"argument `cond`: the keys recorded, "
                f"{sorted(self._cond) if self._cond else None}, are needed, got "
                f"{sorted(cond) if cond else None}")
        with torch.no_grad():
            self._x0.copy_(x0)
            for key, value in (cond or {}).items():
                _refill(self._cond[key], value, key)
            self._backend.replay()
            x, good, nfe, _ = self._out
            x = x.clone()
            good = dataclasses.replace(
                good, alive=good.alive.clone(), x=good.x.clone(), t=good.t.clone(),
                steps=good.steps.clone() if isinstance(good.steps, torch.Tensor) else good.steps)
            return self._run.solution(x, good, nfe, [])


def _static(value):
    """A buffer for a condition value: tensors are copied (refilled at every call), other
    values are recorded as they are."""
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _refill(buffer, value, key: str) -> None:
    if isinstance(buffer, torch.Tensor):
        _check_like(value, buffer, f"cond[{key!r}]")
        buffer.copy_(value)
    elif not (value is buffer or value == buffer):
        raise InvalidArgumentError(
            f"argument `cond[{key!r}]`: a non-tensor value is part of the recording and must "
            f"equal the recorded {buffer!r}, got {value!r}")


def _check_like(value, like: torch.Tensor, name: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise ArgumentTypeError(f"argument `{name}` must be a torch.Tensor, got {value!r}")
    if value.shape != like.shape or value.dtype != like.dtype or value.device != like.device:
        raise InvalidArgumentError(
            f"argument `{name}` must have the recorded shape {tuple(like.shape)}, dtype "
            f"{like.dtype} and device {like.device}, got {tuple(value.shape)}, {value.dtype}, "
            f"{value.device}")
