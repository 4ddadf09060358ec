r"""Brownian increments for SDE solvers.

* :class:`FreshNoise` (the fast path): independent ``N(0, |h|)`` increments from a generator.
* :class:`BridgedNoise`: per-sample increments for *adaptive* stepping. A rejected step's
  increment is never thrown away: it is kept as known future path and a retried, shorter step
  samples its part of it through the Brownian bridge (``W_s | W_L ~ N(s/L W_L, s (L - s)/L)``), so
  rejections do not bias the law of the path (the "rejection sampling with memory" idea of
  Rackauckas & Nie, 2017). The known future is a small per-sample stack of ``(duration,
  increment)`` pieces; with more than ``depth`` consecutive rejections the farthest piece is
  forgotten (a fresh draw replaces it later).
* :class:`BrownianPath`: one Brownian path queried at any resolution and in any order, built on
  torchsde's ``BrownianInterval``; for convergence studies (same path at every step count).
"""

from __future__ import annotations

import torch

from ._errors import check, check_int
from ._tensor import bcast

__all__ = ["BridgedNoise", "BrownianPath", "FreshNoise"]


class FreshNoise:
    """Independent Gaussian increments ``sqrt(|h|) z`` drawn from ``generator``."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def increment(self, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        z = torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        return bcast(h.abs().sqrt(), x) * z


class BridgedNoise:
    """Per-sample Brownian increments that survive rejected steps (see module docstring).

    State (explicit, batch second for the stack): ``(durations (depth, B), increments (depth, B,
    ...))``; slot 0 is the piece nearest in the future, empty slots have duration 0.
    """

    def __init__(self, generator: torch.Generator | None = None, depth: int = 8):
        self.generator, self.depth = generator, check_int(depth, "depth")

    def init(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.zeros(self.depth, x.shape[0], device=x.device, dtype=x.dtype)
        return lengths, torch.zeros((self.depth, *x.shape), device=x.device, dtype=x.dtype)

    def _randn(self, x):
        return torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)

    def propose(self, state, x: torch.Tensor, h: torch.Tensor):
        """Increment over the next ``|h|`` and the stacks to keep on acceptance / rejection."""
        lengths, incs = state
        span = h.abs()
        z_bridge, z_fresh = self._randn(x), self._randn(x)
        filled = torch.zeros_like(span)
        dw = torch.zeros_like(x)
        consumed = torch.zeros_like(span, dtype=torch.long)
        rest_len, rest_inc = [], []
        for k in range(self.depth):
            length, inc = lengths[k], incs[k]
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
        rest_len, rest_inc = torch.stack(rest_len), torch.stack(rest_inc)
        # drop the wholly consumed prefix: slot k <- slot k + consumed
        slots = torch.arange(self.depth, device=x.device)[:, None] + consumed[None]
        valid = slots < self.depth
        slots = slots.clamp(max=self.depth - 1)
        kept_len = torch.where(valid, rest_len.gather(0, slots), 0.0)
        trail = [1] * (x.ndim - 1)
        idx = slots.reshape(*slots.shape, *trail).expand_as(rest_inc)
        kept_inc = torch.where(valid.reshape(*valid.shape, *trail), rest_inc.gather(0, idx), 0.0)
        on_accept = (kept_len, kept_inc)
        on_reject = (torch.cat([span[None], kept_len[:-1]]), torch.cat([dw[None], kept_inc[:-1]]))
        return dw, on_accept, on_reject

    @staticmethod
    def commit(accept: torch.Tensor, on_accept, on_reject):
        """The stack after a per-sample accept/reject decision."""
        lengths = torch.where(accept[None], on_accept[0], on_reject[0])
        mask = accept.reshape(1, -1, *([1] * (on_accept[1].ndim - 2)))
        return lengths, torch.where(mask, on_accept[1], on_reject[1])


class BrownianPath:
    """One Brownian path on ``[min(t0, t1), max(t0, t1)]`` with states of shape ``shape``.

    ``path(ta, tb)`` returns ``W(tb) - W(ta)``; queries at any resolution and in any order give the
    same path (torchsde ``BrownianInterval`` with ``halfway_tree=True``), and increments add up:
    ``W(a, c) = W(a, b) + W(b, c)``. Pass it to :func:`difsolve.solve` as ``brownian=`` to
    integrate an SDE along this path (the times may differ per sample; rows with different times
    are then queried one by one).
    """

    def __init__(self, t0: float, t1: float, shape, *, generator: torch.Generator | None = None,
                 device=None, dtype=None):
        import torchsde

        t0, t1 = float(t0), float(t1)
        check(t0 != t1, "t1", f"different from t0={t0}", t1)
        self.t_lo, self.t_hi = min(t0, t1), max(t0, t1)
        self.shape = tuple(int(s) for s in shape)
        check(len(self.shape) >= 1, "shape", "a shape (B, ...)", shape)
        self.dtype = dtype or torch.get_default_dtype()
        self.device = torch.device(device or "cpu")
        entropy = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        self._bm = torchsde.BrownianInterval(
            t0=self.t_lo, t1=self.t_hi, size=self.shape, dtype=self.dtype, device=self.device,
            entropy=entropy, halfway_tree=True)
        self._span = self.t_hi - self.t_lo

    def _clip(self, t: float) -> float:
        return min(max(t, self.t_lo), self.t_hi)

    def __call__(self, ta: float, tb: float) -> torch.Tensor:
        """``W(tb) - W(ta)`` (either order)."""
        ta, tb = self._clip(float(ta)), self._clip(float(tb))
        if ta == tb:
            return torch.zeros(self.shape, device=self.device, dtype=self.dtype)
        if ta < tb:
            return self._bm(ta, tb)
        return -self._bm(tb, ta)

    def increment(self, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
        """Increment over ``[t, t + h]`` per sample, oriented to have variance ``|h|``:
        ``W(t + h) - W(t)`` forwards, ``W(t) - W(t + h)`` backwards. ``rows`` are the rows of the
        path that the rows of ``x`` stand for (all rows when None)."""
        if rows is None:
            check(tuple(x.shape) == self.shape, "brownian",
                  f"a BrownianPath of shape {tuple(x.shape)}", self.shape)
            rows = torch.arange(self.shape[0])
        rows = rows.detach().cpu()
        ts, hs = t.detach().cpu().double(), h.detach().cpu().double()
        if bool((ts == ts[0]).all() and (hs == hs[0]).all()):
            a, b = float(ts[0]), float(ts[0] + hs[0])
            w = self(min(a, b), max(a, b))[rows]
        else:
            w = torch.stack([
                self(min(float(ts[i]), float(ts[i] + hs[i])),
                     max(float(ts[i]), float(ts[i] + hs[i])))[int(rows[i])]
                for i in range(x.shape[0])])
        return w.to(device=x.device, dtype=x.dtype)
