"""BrownianPath: one path at any resolution and in any order, additive increments with variance
|h|, the same on every device, and integrable through ds.solve."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

import difsolve as ds
from difsolve.brownian import _mix64, _normals, _normals_range


def make(seed=0, shape=(4, 3), t0=0.0, t1=1.0, **kw):
    return ds.BrownianPath(t0, t1, shape, generator=torch.Generator().manual_seed(seed),
                           dtype=torch.float64, **kw)


def test_mix64_is_splitmix64():
    """The counter hash wraps modulo 2^64 exactly as the reference SplitMix64 finaliser."""
    def ref(z):
        m = 2**64 - 1
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)

    xs = [0, 1, 12345, 2**63 + 7, 2**64 - 1]
    got = _mix64(np.array(xs, dtype=np.uint64))
    assert [int(v) for v in got] == [ref(x) for x in xs]


def test_normals_are_standard_and_counter_based():
    z = _normals_range(7, np.array([3, 4]), 40001)
    assert np.array_equal(z[:, :11], _normals(7, np.array([3, 4]), np.arange(11)[None, None, :])[0])
    assert np.array_equal(z[:1, 100:200], _normals_range(7, np.array([3]), 200)[:, 100:200])
    for row in z:
        assert stats.kstest(row, "norm").pvalue > 1e-3
    assert abs(np.corrcoef(z[0], z[1])[0, 1]) < 4 / math.sqrt(z.shape[1])


@pytest.mark.parametrize("backend", ["levy", "torchsde"])
def test_query_order_independence(backend):
    """Two paths from the same seed, one queried coarse-to-fine, the other fine-to-coarse in a
    shuffled order, agree exactly at every query."""
    kw = dict(backend=backend, levels=20 if backend == "torchsde" else 32)
    a, b = make(3, **kw), make(3, **kw)
    pts = [i / 10 for i in range(11)] + [0.123, 0.5 + 1e-7, 0.77777]
    pairs = [(s, t) for s in pts for t in pts if s < t]
    first = {p: a(*p) for p in pairs}
    rng = np.random.default_rng(0)
    for i in rng.permutation(len(pairs)):
        p = pairs[i]
        assert torch.equal(b(*p), first[p]), p


@given(st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3, unique=True),
       st.integers(0, 2**31))
def test_additivity(points, seed):
    """W(a, c) = W(a, b) + W(b, c) (to rounding), and W(b, a) = -W(a, b)."""
    a, b, c = sorted(points)
    path = make(seed, t0=-1.0, t1=2.0)
    assert torch.allclose(path(a, c), path(a, b) + path(b, c), atol=1e-12, rtol=0)
    assert torch.equal(path(c, a), -path(a, c))


def test_increment_law():
    """W(b) - W(a) ~ N(0, |b - a|); disjoint increments are independent; Cov(W(a,b), W(a,c)) =
    b - a (the bridge at work)."""
    n = 40000
    path = make(1, shape=(n,), t0=0.5, t1=3.0)
    w1, w2, w3 = path(0.5, 0.9), path(0.9, 2.2), path(0.5, 2.2)
    for w, var in ((w1, 0.4), (w2, 1.3), (w3, 1.7)):
        assert abs(float(w.var()) / var - 1) < 5 * math.sqrt(2 / n)
        assert stats.kstest((w / math.sqrt(var)).numpy(), "norm").pvalue > 1e-3
    assert abs(float((w1 * w2).mean()) / math.sqrt(0.4 * 1.3)) < 5 / math.sqrt(n)
    assert abs(float((w1 * w3).mean()) / 0.4 - 1) < 5 * math.sqrt(2 / n) * 2


def test_same_seed_same_path_other_seed_other_path():
    assert torch.equal(make(5)(0.1, 0.6), make(5)(0.1, 0.6))
    assert not torch.equal(make(5)(0.1, 0.6), make(6)(0.1, 0.6))


def test_resolution_is_dyadic():
    """Times are resolved on the grid span * 2^-levels."""
    path = make(0, levels=4)
    assert torch.equal(path(0.0, 0.26), path(0.0, 0.25))
    assert not torch.equal(path(0.0, 0.3125), path(0.0, 0.25))


def test_rows_and_per_row_times_match_full_queries():
    """increment() with per-sample times (the adaptive loop) equals row-wise full queries; the
    series construction and the memoised tree agree."""
    path = make(2, shape=(6, 2))
    x = torch.zeros(6, 2, dtype=torch.float64)
    t = torch.tensor([0.1, 0.2, 0.3, 0.9, 0.5, 0.5], dtype=torch.float64)
    h = torch.tensor([0.05, -0.1, 0.2, -0.4, 0.01, 0.01], dtype=torch.float64)
    inc = path.increment(x, t, h)
    for i in range(6):
        lo, hi = sorted((float(t[i]), float(t[i] + h[i])))
        assert torch.allclose(inc[i], path(lo, hi)[i], atol=1e-14)
    rows = torch.tensor([4, 1])
    sub = path.increment(x[:2], torch.full((2,), 0.3, dtype=torch.float64),
                         torch.full((2,), 0.25, dtype=torch.float64), rows=rows)
    assert torch.allclose(sub, path(0.3, 0.55)[rows], atol=1e-14)


def test_negated_path():
    path = make(4)
    assert torch.equal(path.negated()(0.2, 0.7), -path(0.2, 0.7))


class _Noise:
    """dX = dW (additive, unit diffusion): the solution is x0 + W."""

    noise = "additive"

    def drift(self, x, t):
        return torch.zeros_like(x)

    def diffusion(self, t):
        return torch.ones_like(t)


@pytest.mark.parametrize("solver", [ds.EulerMaruyama(), ds.StochasticHeun()],
                         ids=["EM", "SHeun"])
@pytest.mark.parametrize("steps", [1, 7, 64])
@pytest.mark.parametrize("forward", [True, False])
def test_solve_along_path(solver, steps, forward):
    """Through ds.solve the increments telescope to the path's increment at every step count,
    in either time direction."""
    path = make(8, shape=(5, 2), t0=0.2, t1=1.7)
    x0 = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t0, t1 = (0.2, 1.7) if forward else (1.7, 0.2)
    sol = ds.solve(_Noise(), x0, t0, t1, solver=solver, steps=steps, brownian=path)
    expected = x0 + path(0.2, 1.7)  # backwards, dW = W(t) - W(t + h): also sums to W(1.7) - W(0.2)
    assert torch.allclose(sol.x, expected, atol=1e-12)


def test_adaptive_solve_along_path_converges_to_path_solution():
    """With a controller (per-sample steps and rejections) the solution follows the given path:
    it matches a fine fixed-step solve along the same path, not one along another path."""
    class Cubic:
        noise = "additive"

        def drift(self, x, t):
            return -2.0 * x**3

        def diffusion(self, t):
            return torch.full_like(t, 0.5)

    x0 = torch.tensor([[0.2], [1.0], [2.0], [3.0]], dtype=torch.float64)
    path = make(9, shape=(4, 1))
    fine = ds.solve(Cubic(), x0, 0.0, 1.0, solver=ds.StochasticHeun(), steps=2048, brownian=path)
    ada = ds.solve(Cubic(), x0, 0.0, 1.0, solver=ds.StochasticHeun(),
                   controller=ds.PIController(rtol=1e-4, atol=1e-4), brownian=path)
    other = ds.solve(Cubic(), x0, 0.0, 1.0, solver=ds.StochasticHeun(), steps=2048,
                     brownian=make(10, shape=(4, 1)))
    assert ada.success
    assert bool((ada.stats.steps != ada.stats.steps[0]).any())  # per-sample step sizes
    err = float((ada.x - fine.x).abs().max())
    assert err < 5e-3, err
    assert float((other.x - fine.x).abs().max()) > 10 * err


def test_device_and_dtype_independent(device):
    """The path is the same on every device and dtype (to the dtype's rounding)."""
    ref = make(11, shape=(3, 2))(0.25, 0.8)
    for dtype in (torch.float32, torch.float64):
        p = ds.BrownianPath(0.0, 1.0, (3, 2), generator=torch.Generator().manual_seed(11),
                            device=device, dtype=dtype)
        w = p(0.25, 0.8)
        assert w.device.type == device.type and w.dtype == dtype
        assert torch.allclose(w.cpu().double(), ref, atol=1e-6 if dtype == torch.float32 else 0)
        x = torch.zeros(3, 2, device=device, dtype=dtype)
        inc = p.increment(x, torch.full((3,), 0.25, device=device, dtype=dtype),
                          torch.full((3,), 0.55, device=device, dtype=dtype))
        assert inc.device.type == device.type and inc.dtype == dtype


def test_bad_arguments():
    with pytest.raises(ds.InvalidArgumentError, match="t1"):
        ds.BrownianPath(1.0, 1.0, (2,))
    with pytest.raises(ds.InvalidArgumentError, match="shape"):
        ds.BrownianPath(0.0, 1.0, ())
    with pytest.raises(ds.ArgumentTypeError, match="shape"):
        ds.BrownianPath(0.0, 1.0, 3)
    with pytest.raises(ds.ArgumentTypeError, match="generator"):
        ds.BrownianPath(0.0, 1.0, (2,), generator="0")
    # an int seed is a generator, as everywhere else in difsolve
    assert torch.equal(ds.BrownianPath(0.0, 1.0, (2,), generator=5)(0.0, 1.0),
                       ds.BrownianPath(0.0, 1.0, (2,), generator=torch.Generator().manual_seed(5))(
                           0.0, 1.0))
    with pytest.raises(ds.InvalidArgumentError, match="backend"):
        ds.BrownianPath(0.0, 1.0, (2,), backend="tree")
    with pytest.raises(ds.InvalidArgumentError, match="levels"):
        ds.BrownianPath(0.0, 1.0, (2,), levels=61)
    with pytest.raises(ds.ArgumentTypeError, match="t0"):
        ds.BrownianPath("a", 1.0, (2,))
    path = make(0, shape=(3, 2))
    with pytest.raises(ds.InvalidArgumentError, match="brownian"):
        ds.solve(_Noise(), torch.zeros(4, 2, dtype=torch.float64), 0.0, 1.0,
                 solver=ds.EulerMaruyama(), steps=4, brownian=path)
