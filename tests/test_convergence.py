"""The convergence toolkit itself: the order fit and its interval (checked against scipy), the
Study report (table, plot), self-convergence references, argument checks and the CLI study."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

import difsolve as ds
from difsolve.convergence import Study, fit_order


class Decay:
    """dx/dt = -x + sin(t): exact x(t) = c e^-t + (sin t - cos t)/2 (not a diffusion model)."""

    def drift(self, x, t):
        return -x + torch.sin(t)[:, None]

    @staticmethod
    def exact(x0, t0, t1):
        c = (x0 - (math.sin(t0) - math.cos(t0)) / 2) * math.exp(t0)
        return c * math.exp(-t1) + (math.sin(t1) - math.cos(t1)) / 2


X0 = torch.tensor([[1.0], [-0.5], [2.0]], dtype=torch.float64)


def test_fit_exact_power_law():
    steps = (8, 16, 32, 64)
    order, (lo, hi) = fit_order(steps, [3.0 * n**-2.0 for n in steps])
    assert order == pytest.approx(2.0, abs=1e-12)
    assert hi - lo < 1e-9


@given(st.lists(st.floats(-0.3, 0.3), min_size=5, max_size=5), st.floats(0.5, 4.0))
def test_fit_matches_scipy_linregress(noise, p):
    """Order and 95% interval equal scipy's regression slope +- t_{0.975, n-2} stderr."""
    steps = (4, 8, 16, 32, 64)
    errors = [n**-p * math.exp(e) for n, e in zip(steps, noise)]
    order, (lo, hi) = fit_order(steps, errors)
    ref = stats.linregress([math.log(n) for n in steps], [math.log(e) for e in errors])
    q = stats.t.ppf(0.975, len(steps) - 2)
    assert order == pytest.approx(-ref.slope, abs=1e-10)
    assert lo == pytest.approx(-ref.slope - q * ref.stderr, abs=1e-9)
    assert hi == pytest.approx(-ref.slope + q * ref.stderr, abs=1e-9)


def test_fit_edge_cases():
    assert fit_order((8, 16), (1e-2, 2.5e-3))[1] == (-math.inf, math.inf)
    order, _ = fit_order((8, 16, 32), (1e-2, 0.0, 6.25e-4))  # zero error left out
    assert order == pytest.approx(2.0)
    assert math.isnan(fit_order((8, 16), (0.0, math.nan))[0])


def test_ode_study_report(tmp_path):
    study = ds.convergence.ode_order(Decay(), X0, 0.0, 2.0, solver=ds.Heun(),
                                     steps=(8, 16, 32, 64), exact=Decay.exact, label="decay")
    assert isinstance(study, Study)
    assert study.steps == (8, 16, 32, 64) and len(study.errors) == 4
    assert study.expected == 2 and study.kind == "ode" and study.reference == "exact"
    assert abs(study.order - 2) < 0.1 and study.interval[0] < study.order < study.interval[1]
    text = study.table()
    assert "Heun on decay" in text and "observed order" in text
    assert text.count("\n") == 6 and f"{study.errors[-1]:.3e}" in text
    fig = study.plot(tmp_path / "heun.png")
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(f"order {study.order:.2f}" in t for t in legend)
    assert (tmp_path / "heun.png").stat().st_size > 1000
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_self_convergence_reference_agrees_with_exact():
    """Without an exact solution the reference is the same solver at 16x the finest steps: the
    observed order stays that of the exact reference."""
    kw = dict(solver=ds.RK4(), steps=(4, 8, 16, 32))
    exact = ds.convergence.ode_order(Decay(), X0, 0.0, 2.0, exact=Decay.exact, **kw)
    self_ref = ds.convergence.ode_order(Decay(), X0, 0.0, 2.0, **kw)
    assert self_ref.reference == "512 steps"
    assert abs(self_ref.order - exact.order) < 0.1 and abs(exact.order - 4) < 0.25


class OU:
    """dX = -X dt + 0.7 dW (additive)."""

    noise = "additive"

    def drift(self, x, t):
        return -x

    def diffusion(self, t):
        return torch.full_like(t, 0.7)


def test_weak_study_reports_floor_and_antithetic_cancels():
    """Weak errors come with the Monte-Carlo floor; with antithetic pairs the odd statistic of a
    linear SDE has no Monte-Carlo error left (floor at rounding level) and EM shows order 1."""
    x0 = torch.ones(8, 1, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    plain = ds.convergence.weak_order(OU(), x0, 0.0, 1.0, solver=ds.EulerMaruyama(),
                                      exact=math.exp(-1.0), generator=g)
    anti = ds.convergence.weak_order(OU(), x0, 0.0, 1.0, solver=ds.EulerMaruyama(),
                                     exact=math.exp(-1.0), generator=g, antithetic=True)
    assert plain.floor is not None and min(plain.floor) > 1e-3
    assert max(anti.floor) < 1e-12
    assert abs(anti.order - 1) < 0.1  # (1 - h)^N vs e^-1
    assert "MC floor" in anti.table()


def test_strong_study_shares_the_path():
    """The strong error of EM on OU against 16x steps along the same path is small and
    converges at order 1; along independent paths it would not decrease."""
    x0 = torch.zeros(16, 1, dtype=torch.float64)
    study = ds.convergence.strong_order(OU(), x0, 0.0, 1.0, solver=ds.EulerMaruyama(),
                                        generator=torch.Generator().manual_seed(1))
    assert study.reference == "1024 steps" and study.expected == 1.0
    assert abs(study.order - 1) < 0.3 and study.errors[-1] < 0.05


def test_bad_arguments():
    cv = ds.convergence
    with pytest.raises(ds.InvalidArgumentError, match="steps"):
        cv.ode_order(Decay(), X0, 0.0, 1.0, solver=ds.Euler(), steps=(16, 8))
    with pytest.raises(ds.InvalidArgumentError, match="steps"):
        cv.ode_order(Decay(), X0, 0.0, 1.0, solver=ds.Euler(), steps=(8,))
    with pytest.raises(ds.ArgumentTypeError, match="steps"):
        cv.ode_order(Decay(), X0, 0.0, 1.0, solver=ds.Euler(), steps=8)
    with pytest.raises(ds.ArgumentTypeError, match="solver"):
        cv.ode_order(Decay(), X0, 0.0, 1.0, solver="euler")
    with pytest.raises(ds.ArgumentTypeError, match="exact"):
        cv.ode_order(Decay(), X0, 0.0, 1.0, solver=ds.Euler(), exact=1.0)
    with pytest.raises(ds.InvalidArgumentError, match="solver"):
        cv.strong_order(OU(), X0, 0.0, 1.0, solver=ds.Heun())
    with pytest.raises(ds.InvalidArgumentError, match="statistic"):
        cv.weak_order(OU(), X0, 0.0, 1.0, solver=ds.EulerMaruyama(), steps=(2, 4),
                      statistic=lambda x: x.sum())
    with pytest.raises(ds.InvalidArgumentError, match="exact"):
        cv.weak_order(OU(), X0, 0.0, 1.0, solver=ds.EulerMaruyama(), steps=(2, 4),
                      exact=torch.zeros(3))
    with pytest.raises(ds.ArgumentTypeError, match="path"):
        cv.strong_order(OU(), X0, 0.0, 1.0, solver=ds.EulerMaruyama(), path=object())


def test_cli_converge_prints_every_solver(tmp_path, capsys):
    """``difsolve converge`` (small sizes): one row per study of every solver, and the figure."""
    from difsolve.cli import main

    png = tmp_path / "conv.png"
    assert ds.convergence.run_converge(str(png), paths=4, weak_paths=8, ode_samples=2, shrink=8) == 0
    out = capsys.readouterr().out
    for name in ("Euler", "Heun", "Midpoint", "Bosh3", "RK4", "Dopri5", "DPMSolver(2)",
                 "DPMSolver(3)", "EulerMaruyama (strong)", "EulerMaruyama (weak)",
                 "StochasticHeun (strong)", "StochasticHeun (weak)"):
        assert name in out, name
    assert "geometric Brownian motion" in out
    assert png.stat().st_size > 10_000
    assert callable(main)
