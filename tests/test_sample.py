"""``ds.sample`` and ``difsolve demo``: reproducibility, mode weights against an exact mixture,
capability checks before any work, NFE accounting, and the demo command."""

from __future__ import annotations

import math

import pytest
import torch

import difsolve as ds
from difsolve.demo import distribution_errors, ring_mixture, run_demo


@pytest.fixture(scope="module")
def ring():
    mix = ring_mixture()
    return mix, mix.score_field(ds.EDM())


class CountingField:
    """Wraps a field, counts calls; ``exact_score`` configurable (False: a pseudo-score)."""

    def __init__(self, field, exact_score=True):
        self.inner, self.process, self.exact_score = field, field.process, exact_score
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        return self.inner(x, t)


SEED_CASES = [
    ("Heun", dict(solver=ds.Heun(), steps=10)),
    ("Dopri5-adaptive", dict(solver=ds.Dopri5(), controller=ds.PIController(rtol=1e-4,
                                                                            atol=1e-4))),
    ("EulerMaruyama", dict(solver=ds.EulerMaruyama(), steps=30)),
    ("StochasticHeun-adaptive", dict(solver=ds.StochasticHeun(),
                                     controller=ds.PIController(rtol=0.05, atol=0.05))),
    ("EDMStochasticHeun-churn", dict(solver=ds.EDMStochasticHeun(churn=5.0), steps=10)),
]


@pytest.mark.parametrize("name,kw", SEED_CASES, ids=[c[0] for c in SEED_CASES])
def test_same_seed_same_result(ring, name, kw):
    _, field = ring

    def run(seed):
        return ds.sample(field, (64, 2), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.float64, **kw)

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a.x, b.x)
    assert torch.equal(a.stats.nfe_per_sample, b.stats.nfe_per_sample)
    assert not torch.allclose(a.x, c.x)
    assert a.success


MODE_CASES = [
    ("Heun-18-karras", dict(solver=ds.Heun(), steps=18, schedule="karras")),
    ("DPMSolver3-20", dict(solver=ds.DPMSolver(3), steps=20, schedule="logsnr")),
    ("EulerMaruyama-200", dict(solver=ds.EulerMaruyama(), steps=200)),
    ("StochasticHeun-adaptive", dict(solver=ds.StochasticHeun(),
                                     controller=ds.PIController(rtol=0.02, atol=0.01))),
    ("EDMStochasticHeun-churn", dict(solver=ds.EDMStochasticHeun(churn=10.0), steps=40)),
]


@pytest.mark.parametrize("name,kw", MODE_CASES, ids=[c[0] for c in MODE_CASES])
def test_mode_weights(ring, name, kw):
    """Samples assigned to the nearest mode land with the true (unequal) weights: every
    fraction within 4 binomial standard errors; the mode widths within 15%."""
    mix, field = ring
    n = 3000
    sol = ds.sample(field, (n, 2), generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64, denoise=False, **kw)
    assert sol.success
    assign = torch.cdist(sol.x, mix.means).argmin(1)
    frac = torch.bincount(assign, minlength=8).double() / n
    w = mix.weights
    se = (w * (1 - w) / n).sqrt()
    assert bool(((frac - w).abs() <= 4 * se).all()), (frac, w)
    _, width_err = distribution_errors(sol.x, mix, ds.EDM().t_min ** 2)
    assert width_err < 0.15, width_err


def test_mode_weights_detect_a_wrong_sampler(ring):
    """The check above has teeth: far too few Euler-Maruyama steps skews the modes."""
    mix, field = ring
    sol = ds.sample(field, (3000, 2), solver=ds.EulerMaruyama(), steps=8,
                    generator=torch.Generator().manual_seed(1), dtype=torch.float64,
                    denoise=False)
    weight_err, width_err = distribution_errors(sol.x, mix, 0.0)
    assert weight_err > 4 * math.sqrt(0.25 / 3000) or width_err > 0.15


def test_denoise_and_nfe(ring):
    _, field = ring
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    raw = ds.sample(field, (16, 2), solver=ds.Heun(), steps=12, generator=gen(),
                    dtype=torch.float64, denoise=False)
    den = ds.sample(field, (16, 2), solver=ds.Heun(), steps=12, generator=gen(),
                    dtype=torch.float64, denoise=True)
    assert raw.stats.nfe == 24 and den.stats.nfe == 25
    assert bool((den.stats.nfe_per_sample == 25).all())
    expect = ds.fields.base.denoise(field, raw.x, raw.t)
    torch.testing.assert_close(den.x, expect, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(raw.t, torch.full((16,), 0.002, dtype=torch.float64))


def test_edm_stochastic_heun_churn0_equals_heun_in_sample(ring):
    _, field = ring
    kw = dict(steps=15, schedule="karras", dtype=torch.float64, denoise=False)
    a = ds.sample(field, (32, 2), solver=ds.EDMStochasticHeun(), time_variable="t",
                  generator=torch.Generator().manual_seed(2), **kw)
    b = ds.sample(field, (32, 2), solver=ds.Heun(), time_variable="t",
                  generator=torch.Generator().manual_seed(2), **kw)
    torch.testing.assert_close(a.x, b.x, rtol=1e-13, atol=1e-13)
    # with its default time variable too (it only steps in t)
    c = ds.sample(field, (32, 2), solver=ds.EDMStochasticHeun(),
                  generator=torch.Generator().manual_seed(2), **kw)
    torch.testing.assert_close(c.x, b.x, rtol=1e-13, atol=1e-13)
    assert a.stats.nfe == 30


@pytest.mark.parametrize("solver", [ds.EulerMaruyama(), ds.StochasticHeun()])
def test_sde_solver_refuses_pseudo_score_before_work(ring, solver):
    _, field = ring
    pseudo = CountingField(field, exact_score=False)
    with pytest.raises(ds.DifsolveError, match="exact_score"):
        ds.sample(pseudo, (8, 2), solver=solver, steps=10)
    assert pseudo.calls == 0
    # the same pseudo-score field is fine for an ODE solver
    sol = ds.sample(pseudo, (8, 2), solver=ds.Heun(), steps=4, dtype=torch.float64)
    assert sol.success and pseudo.calls == 9


@pytest.mark.parametrize("kw,match", [
    (dict(solver=ds.Euler(), controller=ds.PIController()), "error estimate"),
    (dict(solver=ds.Heun(), steps=10, schedule="cosine"), "schedule"),
    (dict(solver=ds.Heun(), steps=10, controller=ds.PIController()), "steps"),
    (dict(solver=ds.Heun(), steps=torch.tensor([80.0, 1.0, 5.0, 0.002])), "monotone"),
    (dict(solver="heun", steps=10), "solver"),
])
def test_sample_checks_before_work(ring, kw, match):
    _, field = ring
    counting = CountingField(field)
    with pytest.raises(ds.DifsolveError, match=match):
        ds.sample(counting, (8, 2), dtype=torch.float64, **kw)
    assert counting.calls == 0


def test_demo_runs(tmp_path, capsys):
    """``difsolve demo`` (``run_demo``, what the CLI calls) prints the table, writes the PNG."""
    png = tmp_path / "demo.png"
    assert run_demo(samples=200, seed=0, png=str(png)) == 0
    out = capsys.readouterr().out
    for name in ("Euler", "Heun", "DPMSolver(2)", "DPMSolver(3)", "Dopri5", "EulerMaruyama",
                 "StochasticHeun", "EDMStochasticHeun", "NFE/sample", "seconds"):
        assert name in out
    assert png.exists() and png.stat().st_size > 1000


@pytest.mark.parametrize("solver,steps", [(ds.Heun(), 18), (ds.EulerMaruyama(), 100)],
                         ids=["Heun", "EulerMaruyama"])
def test_sample_on_device(device, solver, steps):
    """Everything runs on the device of the generator / ``device=`` (CPU always, CUDA when
    present): reproducible per seed, right mode weights."""
    mix = ring_mixture()
    field = mix.score_field(ds.EDM())
    n = 2000

    def run():
        return ds.sample(field, (n, 2), solver=solver, steps=steps, device=device,
                         dtype=torch.float64, denoise=False,
                         generator=torch.Generator(device=device).manual_seed(0))

    sol = run()
    assert sol.x.device.type == device.type and sol.status.device.type == device.type
    assert sol.success
    assert torch.equal(sol.x, run().x)
    frac = torch.bincount(torch.cdist(sol.x.cpu(), mix.means).argmin(1), minlength=8).double()
    w = mix.weights
    assert bool(((frac / n - w).abs() <= 4 * (w * (1 - w) / n).sqrt()).all())
