r"""Randomness for the solve loop: random streams and Brownian noise sources behind one protocol.

**Random streams** say where the normals come from:

* :class:`GeneratorStream`: one ``torch.Generator`` (or the global one) for the whole batch; the
  fast path.
* :class:`SeededStream`: one generator per row, seeded from ``seeds[i]``; a row's normals are a
  function of its seed and of how many it has drawn, never of the batch it is in or of which other
  rows are still being integrated (as EDM's per-seed generators do for its prior and churn noise).

**Noise sources** (the :class:`NoiseSource` protocol) give the Brownian increment of an SDE step::

    state = noise.init(x, rows)
    dw, proposal = noise.propose(state, x, t, h, rows)   # increment over [t, t + h], var |h|
    state = noise.commit(state, proposal, accept)        # per-row accept/reject (None: all)

``rows`` are the global row indices of the rows of ``x`` (the adaptive loop evaluates subsets);
``state`` is a tuple of batch-first tensors that the loop selects with its rows.
:class:`FreshNoise` (independent increments), :class:`BridgedNoise` (adaptive stepping: rejected
increments are kept and retried steps sample them through the Brownian bridge) and
:class:`~difsolve.BrownianPath` (one path at every resolution) implement it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from ._errors import ArgumentTypeError, check, check_int
from ._tensor import bcast, host_reads_free

__all__ = [
    "BridgedNoise",
    "FreshNoise",
    "GeneratorStream",
    "NoiseSource",
    "RandomStream",
    "SeededStream",
    "make_stream",
    "randn_like",
]

State = tuple[torch.Tensor, ...]


# ----- random streams ----------------------------------------------------------------------------
class RandomStream(Protocol):
    """Where standard normals come from: ``randn(like, rows)`` returns ``like``-shaped normals for
    the rows ``rows`` (global indices, or None for all rows in order)."""

    def randn(self, like: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor: ...


class GeneratorStream:
    """Normals for the whole batch from one generator (``None``: torch's global generator)."""

    per_row = False

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def randn(self, like: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.normal(like, 1.0)

    def normal(self, like: torch.Tensor, std: float) -> torch.Tensor:
        """``like``-shaped normals of standard deviation ``std`` (``std`` times :meth:`randn`'s
        draws), scaled inside the sampler."""
        out = torch.empty(like.shape, device=like.device, dtype=like.dtype)
        return out.normal_(0.0, std, generator=self.generator)

    def rand_bits(self, shape, device, rows: torch.Tensor | None = None) -> torch.Tensor:
        return torch.randint(0, 2, shape, generator=self.generator, device=device)

    def rand(self, like: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return torch.rand(like.shape, generator=self.generator, device=like.device,
                          dtype=like.dtype)

    def prior(self, process, shape, device, dtype) -> torch.Tensor:
        """A draw of ``shape = (B, ...)`` from ``process``'s prior."""
        device = device if device is not None else (
            self.generator.device if self.generator is not None else None)
        return process.prior_sample(shape, generator=self.generator, device=device, dtype=dtype)


class SeededStream:
    """One generator per row, ``torch.Generator(device).manual_seed(seeds[i])``.

    Draws are made row by row (one call per row), so this costs a Python loop over the rows at
    every draw: the price of results that do not depend on the batch.
    """

    per_row = True

    def __init__(self, seeds: Sequence[int], device: torch.device | str):
        self.seeds = list(seeds)
        self.device = torch.device(device)
        gen_device = self.device if self.device.type != "mps" else torch.device("cpu")
        self.generators = [torch.Generator(gen_device).manual_seed(s) for s in self.seeds]
        self._gen_device = gen_device

    def __len__(self) -> int:
        return len(self.seeds)

    def _rows(self, like: torch.Tensor, rows: torch.Tensor | None) -> list[int]:
        if rows is None:
            check(like.shape[0] == len(self.seeds), "seeds",
                  f"one seed per row ({like.shape[0]} rows)", len(self.seeds))
            return list(range(like.shape[0]))
        return rows.tolist()

    def randn(self, like: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self._per_row(torch.randn, like, rows)

    def rand(self, like: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self._per_row(torch.rand, like, rows)

    def _per_row(self, draw, like, rows) -> torch.Tensor:
        out = [draw(like.shape[1:], generator=self.generators[r], device=self._gen_device,
                    dtype=like.dtype) for r in self._rows(like, rows)]
        if not out:
            return torch.empty_like(like)
        return torch.stack(out).to(like.device)

    def prior(self, process, shape, device, dtype) -> torch.Tensor:
        """Row ``i`` of a prior draw is drawn alone from generator ``i``."""
        rows = [process.prior_sample((1, *shape[1:]), generator=g, device=self._gen_device,
                                     dtype=dtype) for g in self.generators]
        if not rows:
            return torch.empty(shape, device=device, dtype=dtype)
        return torch.cat(rows).to(device if device is not None else self.device)

    def rand_bits(self, shape, device, rows: torch.Tensor | None = None) -> torch.Tensor:
        like = torch.empty(shape, device="meta")
        out = [torch.randint(0, 2, shape[1:], generator=self.generators[r],
                             device=self._gen_device) for r in self._rows(like, rows)]
        if not out:
            return torch.empty(shape, dtype=torch.long, device=device)
        return torch.stack(out).to(device)


def check_generator(generator, name: str = "generator") -> torch.Generator | None:
    """A ``torch.Generator``, or an int seed turned into a CPU generator, or None."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, bool) or not _is_integer(generator):
        raise ArgumentTypeError(
            f"argument `{name}` must be a torch.Generator or an int seed, got {generator!r}")
    check(-(2**63) <= int(generator) < 2**64, name, "an int seed in [-2^63, 2^64)", generator)
    return torch.Generator().manual_seed(int(generator))


def _is_integer(value) -> bool:
    return isinstance(value, (int, np.integer))


def check_seeds(seeds, batch: int) -> list[int]:
    """``seeds`` as a list of ``batch`` ints (a sequence or a 1-D integer tensor)."""
    if isinstance(seeds, torch.Tensor):
        check(seeds.ndim == 1 and not seeds.is_floating_point() and seeds.dtype != torch.bool,
              "seeds", "a 1-D integer tensor or a sequence of ints", seeds.dtype)
        values = seeds.tolist()
    else:
        try:
            values = list(seeds)
        except TypeError:
            raise ArgumentTypeError(
                f"argument `seeds` must be a sequence of ints, got {seeds!r}") from None
        if not all(_is_integer(s) and not isinstance(s, bool) for s in values):
            raise ArgumentTypeError("argument `seeds` must hold ints only")
    check(len(values) == batch, "seeds", f"one seed per sample ({batch})", len(values))
    check(all(0 <= int(s) < 2**63 for s in values), "seeds", "ints in [0, 2^63)")
    return [int(s) for s in values]


def make_stream(generator=None, seeds=None, batch: int | None = None,
                device=None) -> GeneratorStream | SeededStream:
    """The random stream of a solve: per-row seeds when given, else the (checked) generator
    (which may already be a stream, as when :func:`~difsolve.sample` hands its own on)."""
    if isinstance(generator, (GeneratorStream, SeededStream)) and seeds is None:
        return generator
    if seeds is not None:
        if generator is not None:
            raise ArgumentTypeError(
                "arguments `generator` and `seeds`: give at most one (seeds give every row its "
                "own generator)")
        return SeededStream(check_seeds(seeds, batch), device or "cpu")
    return GeneratorStream(check_generator(generator))


def as_stream(source) -> GeneratorStream | SeededStream:
    """A stream from a stream, a generator or None (what correctors receive)."""
    if isinstance(source, (GeneratorStream, SeededStream)):
        return source
    return GeneratorStream(check_generator(source))


def randn_like(x: torch.Tensor, source=None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Standard normals shaped like ``x`` from a stream, a generator or the global generator."""
    return as_stream(source).randn(x, rows)


# ----- noise sources -----------------------------------------------------------------------------
@runtime_checkable
class NoiseSource(Protocol):
    """Brownian increments for SDE steps (see the module docstring)."""

    def init(self, x: torch.Tensor, rows: torch.Tensor | None) -> State: ...

    def propose(self, state: State, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor,
                rows: torch.Tensor | None) -> tuple[torch.Tensor, object]: ...

    def commit(self, state: State, proposal, accept: torch.Tensor | None) -> State: ...


class FreshNoise:
    """Independent increments ``sqrt(|h|) z``, ``z`` from a random stream (no state)."""

    def __init__(self, stream=None):
        self.stream = as_stream(stream)

    def init(self, x, rows=None) -> State:
        return ()

    def propose(self, state, x, t, h, rows=None):
        step = bcast(h, x)
        if step.ndim == 0 and type(self.stream) is GeneratorStream and host_reads_free(step):
            # a step shared by the batch, read on the host for free: scaled inside the sampler
            return self.stream.normal(x, math.sqrt(abs(step.item()))), None
        return step.abs().sqrt() * self.stream.randn(x, rows), None

    def commit(self, state, proposal, accept) -> State:
        return state

    def increment(self, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``sqrt(|h|) z`` for every row."""
        return self.propose((), x, t, h)[0]


class BridgedNoise:
    """Per-sample Brownian increments that survive rejected steps, for adaptive SDE stepping.

    A rejected step's increment is kept as known future path; a retried, shorter step samples its
    part through the Brownian bridge ``W_s | W_L ~ N(s/L W_L, s (L - s)/L)``, so rejections do not
    bias the law of the path ("rejection sampling with memory", Rackauckas & Nie 2017). State
    (batch first): ``(durations (B, depth), increments (B, depth, ...))``; slot 0 is the piece
    nearest in the future, empty slots have duration 0. With more than ``depth`` consecutive
    rejections the farthest piece is forgotten (a fresh draw replaces it later); ``depth=0`` keeps
    no memory, which biases the path (only for demonstrating that bias).
    """

    def __init__(self, stream=None, depth: int = 8):
        self.stream = as_stream(stream)
        self.depth = check_int(depth, "depth", minimum=0)

    def init(self, x: torch.Tensor, rows=None) -> State:
        lengths = torch.zeros(x.shape[0], self.depth, device=x.device, dtype=x.dtype)
        return lengths, torch.zeros((x.shape[0], self.depth, *x.shape[1:]), device=x.device,
                                    dtype=x.dtype)

    def propose(self, state, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor, rows=None):
        """Increment over the next ``|h|`` and the stacks to keep on acceptance / rejection."""
        lengths, incs = state
        span = h.abs()
        if self.depth == 0:
            return bcast(span.sqrt(), x) * self.stream.randn(x, rows), (state, state)
        z_bridge, z_fresh = self.stream.randn(x, rows), self.stream.randn(x, rows)
        filled = torch.zeros_like(span)
        dw = torch.zeros_like(x)
        consumed = torch.zeros_like(span, dtype=torch.long)
        rest_len, rest_inc = [], []
        for k in range(self.depth):
            length, inc = lengths[:, k], incs[:, k]
            need = (span - filled).clamp(min=0)
            whole = (length > 0) & (length <= need)
            part = (length > need) & (need > 0)
            safe = torch.where(part, length, torch.ones_like(length))
            frac = torch.where(part, need / safe, torch.zeros_like(need))
            std = torch.where(part, (need * (length - need) / safe).clamp(min=0).sqrt(),
                              torch.zeros_like(need))
            piece = bcast(frac, x) * inc + bcast(std, x) * z_bridge
            taken = torch.where(bcast(whole, x), inc, torch.where(bcast(part, x), piece, 0.0))
            dw = dw + taken
            filled = filled + torch.where(whole, length, torch.where(part, need, 0.0))
            consumed = consumed + whole.long()
            rest_len.append(torch.where(whole, 0.0, torch.where(part, length - need, length)))
            rest_inc.append(inc - taken)
        dw = dw + bcast((span - filled).clamp(min=0).sqrt(), x) * z_fresh
        rest_len, rest_inc = torch.stack(rest_len, 1), torch.stack(rest_inc, 1)
        # drop the wholly consumed prefix: slot k <- slot k + consumed
        slots = torch.arange(self.depth, device=x.device)[None, :] + consumed[:, None]
        valid = slots < self.depth
        slots = slots.clamp(max=self.depth - 1)
        kept_len = torch.where(valid, rest_len.gather(1, slots), 0.0)
        trail = [1] * (x.ndim - 1)
        index = slots.reshape(*slots.shape, *trail).expand_as(rest_inc)
        kept_inc = torch.where(valid.reshape(*valid.shape, *trail), rest_inc.gather(1, index),
                               0.0)
        on_accept = (kept_len, kept_inc)
        on_reject = (torch.cat([span[:, None], kept_len[:, :-1]], 1),
                     torch.cat([dw[:, None], kept_inc[:, :-1]], 1))
        return dw, (on_accept, on_reject)

    def commit(self, state, proposal, accept) -> State:
        """The stack after a per-sample accept/reject decision (None: every row accepted)."""
        on_accept, on_reject = proposal
        if accept is None:
            return on_accept
        lengths = torch.where(accept[:, None], on_accept[0], on_reject[0])
        mask = accept.reshape(-1, 1, *([1] * (on_accept[1].ndim - 2)))
        return lengths, torch.where(mask, on_accept[1], on_reject[1])
