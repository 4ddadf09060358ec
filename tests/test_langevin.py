"""Langevin correctors, predictor-corrector sampling and annealed Langevin dynamics.

Ground truth: an exact 2-D Gaussian-mixture ring with unequal weights (its score is exact at every
noise level), the closed-form moments of ``p_t = sum_k w_k N(a mu_k, (a^2 s^2 + b^2) I)``, and the
identity ``E_{p_t}[P(k | x)] = w_k`` for the exact responsibilities.
"""

from __future__ import annotations

import math

import pytest
import torch

import difsolve as ds

DT = torch.float64
N = 4000
K = 6
WEIGHTS = torch.tensor([0.30, 0.22, 0.17, 0.13, 0.10, 0.08], dtype=DT)
RADIUS, STD = 2.0, 0.15
_ANG = torch.arange(K, dtype=DT) * 2 * math.pi / K
MEANS = RADIUS * torch.stack([_ANG.cos(), _ANG.sin()], 1)
RING = ds.GaussianMixture(WEIGHTS, MEANS, torch.full((K,), STD**2, dtype=DT))
VE = ds.VE()
FIELD = RING.score_field(VE)
#: NCSN-style levels for the ring: sigma_1 ~ the largest distance between modes, down to 0.01
SIGMAS = torch.logspace(math.log10(5.0), -2.0, 20, dtype=DT)


def fractions(x: torch.Tensor) -> torch.Tensor:
    """Fraction of samples closest (in the data mixture's sense) to each mode."""
    return torch.bincount(RING.component(x), minlength=K).to(DT) / x.shape[0]


def responsibilities(x: torch.Tensor, process, t: float) -> torch.Tensor:
    """Exact ``P(k | x_t = x)`` under ``p_t``, shape ``(B, K)``."""
    a, b = process.marginal(torch.tensor(t, dtype=DT))
    var = a * a * STD**2 + b * b
    logits = WEIGHTS.log()[None] - ((x[:, None, :] - a * MEANS[None]) ** 2).sum(-1) / (2 * var)
    return torch.softmax(logits, dim=1)


def exact_moments(process, t: float):
    a, b = process.marginal(torch.tensor(t, dtype=DT))
    m0 = WEIGHTS @ MEANS
    second = (WEIGHTS[:, None, None] * (STD**2 * torch.eye(2, dtype=DT)
                                         + MEANS[:, :, None] * MEANS[:, None, :])).sum(0)
    return a * m0, a * a * (second - torch.outer(m0, m0)) + b * b * torch.eye(2, dtype=DT)


def exact_samples(process, t: float, n: int, generator) -> torch.Tensor:
    a, b = process.marginal(torch.tensor(t, dtype=DT))
    x0 = RING.sample(n, generator, dtype=DT)
    return a * x0 + b * torch.randn(n, 2, generator=generator, dtype=DT)


class CountingField:
    """Wraps a field and counts its batched calls."""

    def __init__(self, field, exact_score: bool = True):
        self.inner, self.process, self.exact_score = field, field.process, exact_score
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        return self.inner(x, t)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----- mode weights: predictor-corrector and annealed Langevin ---------------------------------


@pytest.mark.parametrize("norm", ["expected", "batch"])
def test_pc_sampling_recovers_mode_weights(norm):
    """VE reverse SDE, Euler-Maruyama predictor + Langevin corrector, through ds.sample."""
    sol = ds.sample(FIELD, (N, 2), solver=ds.EulerMaruyama(), steps=200,
                    corrector=ds.Langevin(snr=0.16, norm=norm), generator=gen(0), dtype=DT)
    assert sol.success
    err = (fractions(sol.x) - WEIGHTS).abs().max()
    assert err < 0.03, (norm, fractions(sol.x))


def test_annealed_langevin_recovers_mode_weights():
    sol = ds.annealed_langevin(FIELD, (N, 2), SIGMAS, steps_each=30, eps=5e-5, generator=gen(1),
                               dtype=DT)
    assert sol.success
    assert sol.stats.nfe == 20 * 30 + 1
    err = (fractions(sol.x) - WEIGHTS).abs().max()
    assert err < 0.03, fractions(sol.x)


def test_unannealed_langevin_misses_mode_weights():
    """The pitfall: Langevin at the smallest noise level only, from an isotropic start spread over
    the ring, ends in whichever basin each sample started in (fractions ~ 1/K whatever the
    weights; measured 0.005-0.015 from 1/K over 6 seeds); the annealed chain from the same start,
    with the same number of score evaluations, recovers the weights."""
    x = 2.0 * torch.randn(N, 2, generator=gen(2), dtype=DT)
    single = ds.AnnealedLangevin([0.01], steps_each=600, eps=5e-5).run(FIELD, x.clone(),
                                                                          generator=gen(3))
    annealed = ds.AnnealedLangevin(SIGMAS, steps_each=30, eps=5e-5).run(FIELD, x.clone(),
                                                                         generator=gen(3))
    assert single.stats.nfe == annealed.stats.nfe
    f_single, f_annealed = fractions(single.x), fractions(annealed.x)
    assert (f_single - WEIGHTS).abs().max() > 0.08, f_single
    assert (f_single - 1.0 / K).abs().max() < 0.03, f_single  # basin sizes, not weights
    assert (f_annealed - WEIGHTS).abs().max() < 0.03, f_annealed


def test_naive_per_sample_rule_biases_pc_weights():
    """The unguarded per-sample SNR rule (||s|| ~ 0 between modes -> huge steps) skews weights."""
    sol = ds.sample(FIELD, (N, 2), solver=ds.EulerMaruyama(), steps=200,
                    corrector=ds.Langevin(snr=0.16, norm="sample"), generator=gen(0), dtype=DT)
    err = (fractions(sol.x) - WEIGHTS).abs().max()
    assert err > 0.04, fractions(sol.x)


# ----- invariance of p_t ------------------------------------------------------------------------


def _invariance_run(norm: str, sigma: float = 0.5, steps: int = 200):
    t = float(VE.t_of_sigma(torch.tensor(sigma, dtype=DT)))
    x = exact_samples(VE, t, N, gen(4))
    corrector = ds.Langevin(snr=0.16, steps=steps, norm=norm)
    y, nfe = corrector.correct(ds.ReverseSDE(FIELD), x, torch.full((N,), t, dtype=DT), gen(5))
    assert nfe == steps
    return t, x, y


@pytest.mark.parametrize("norm", ["expected", "batch"])
def test_langevin_leaves_pt_invariant(norm):
    """Start from exact samples of p_t (sigma = 0.5: modes overlap, so the chain does mix between
    them), run 200 corrector steps at fixed t; mean, covariance and mode weights stay put within
    Monte-Carlo error (the ULA bias, eps/(4 var) <= snr^2/2 = 1.3% of the local variance, is
    below it)."""
    t, x, y = _invariance_run(norm)
    assert (y - x).abs().mean() > 0.3  # it did move
    mean, cov = exact_moments(VE, t)
    se_mean = (cov.diagonal() / N).sqrt()
    assert ((y.mean(0) - mean).abs() < 4 * se_mean).all(), (y.mean(0), mean)
    # covariance: standard error of each entry from the fourth moments of the sample
    yc = y - y.mean(0)
    prods = yc[:, :, None] * yc[:, None, :]
    se_cov = prods.reshape(N, -1).std(0).reshape(2, 2) / math.sqrt(N)
    assert ((torch.cov(y.T) - cov).abs() < 4 * se_cov).all(), (torch.cov(y.T), cov)
    # mode weights: E[P(k | x)] = w_k exactly
    r = responsibilities(y, VE, t)
    se_w = r.std(0) / math.sqrt(N)
    assert ((r.mean(0) - WEIGHTS).abs() < 4 * se_w + 1e-3).all(), r.mean(0)


def test_naive_per_sample_rule_breaks_invariance():
    t, _, y = _invariance_run("sample")
    _, cov = exact_moments(VE, t)
    # samples between the modes take huge steps and are thrown far out
    assert torch.cov(y.T).diagonal().max() > 2 * cov.diagonal().max()


# ----- the step rules themselves ------------------------------------------------------------------


def _score_sde_step(field, x, t, snr, alpha, z):
    """score_sde's LangevinCorrector.update_fn, one step, written out (batch-averaged norms)."""
    grad = field(x, t)
    grad_norm = grad.reshape(x.shape[0], -1).norm(dim=-1).mean()
    noise_norm = z.reshape(z.shape[0], -1).norm(dim=-1).mean()
    step = (snr * noise_norm / grad_norm) ** 2 * 2 * alpha
    x_mean = x + step[..., None] * grad if step.ndim else x + step * grad
    return x_mean + torch.sqrt(step * 2) * z


@pytest.mark.parametrize("process", [ds.VE(), ds.VP(), ds.SubVP()], ids=["VE", "VP", "SubVP"])
def test_batch_rule_is_score_sde(process):
    field = RING.score_field(process)
    t = 0.3
    x = exact_samples(process, t, 64, gen(6))
    tt = torch.full((64,), t, dtype=DT)
    y, nfe = ds.Langevin(snr=0.2, norm="batch").correct(ds.ReverseSDE(field), x, tt, gen(7))
    z = torch.randn(x.shape, generator=gen(7), dtype=DT)
    # score_sde: alpha = 1 - beta_i with beta_i = beta(t)/N (N = 1000) for VP/sub-VP, 1 for VE
    alpha = 1.0 - process.beta(tt[0]) / 1000 if isinstance(process, ds.VP) else 1.0
    ref = _score_sde_step(field, x, tt, 0.2, torch.as_tensor(alpha, dtype=DT), z)
    assert nfe == 1
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


def test_expected_rule_step_and_batch_independence():
    t = 0.4
    x = exact_samples(VE, t, 32, gen(8))
    tt = torch.full((32,), t, dtype=DT)
    dyn = ds.ReverseSDE(FIELD)
    y, _ = ds.Langevin(snr=0.1).correct(dyn, x, tt, gen(9))
    z = torch.randn(x.shape, generator=gen(9), dtype=DT)
    eps = 2 * (0.1 * VE.sigma(t)) ** 2
    torch.testing.assert_close(y, x + eps * FIELD(x, tt) + (2 * eps).sqrt() * z)
    # other rows of the batch do not change row 0 (they do under score_sde's batch rule)
    x2 = x.clone()
    x2[1:] = 3.0 * x2[1:]
    y2, _ = ds.Langevin(snr=0.1).correct(dyn, x2, tt, gen(9))
    assert torch.equal(y2[0], y[0])
    yb, _ = ds.Langevin(snr=0.1, norm="batch").correct(dyn, x, tt, gen(9))
    yb2, _ = ds.Langevin(snr=0.1, norm="batch").correct(dyn, x2, tt, gen(9))
    assert not torch.allclose(yb2[0], yb[0])


def test_batch_rule_with_per_sample_times_matches_shared_time_rows():
    """Rows at different t: norms are compared at a common scale, so a batch made of two halves at
    two times gives each half the step it would get from a batch at its own time when the
    rescaled score norms agree (here: the same points scaled, so ||s|| b is shared)."""
    x = torch.randn(16, 2, generator=gen(10), dtype=DT)
    t = torch.cat([torch.full((8,), 0.3, dtype=DT), torch.full((8,), 0.6, dtype=DT)])
    # a field whose score is -x / b^2: ||s|| b = ||x|| / b; scale x by b so it is the same per row
    _, b = VE.marginal(t)
    xb = x.clone()
    xb[8:] = x[:8]
    xb = xb * b[:, None]

    class Gaussian:
        process = VE
        exact_score = True

        def __call__(self, x, t):
            return -x / VE.marginal(t)[1][:, None] ** 2

    corr = ds.Langevin(norm="batch")
    eps = corr.step_size(VE, xb, t, Gaussian()(xb, t), torch.ones_like(xb))
    torch.testing.assert_close(eps[8:] / eps[:8], (b[8:] / b[:8]) ** 2)


def test_annealed_corrector_equals_expected_rule_on_ve():
    """AnnealedLangevin as a corrector with eps = 4 snr^2 b_L^2 is the 'expected' SNR rule."""
    t = torch.full((16,), 0.5, dtype=DT)
    x = exact_samples(VE, 0.5, 16, gen(11))
    dyn = ds.ReverseSDE(FIELD)
    sigma_l = 0.01
    ann = ds.AnnealedLangevin([sigma_l], steps_each=3, eps=4 * 0.16**2 * sigma_l**2)
    y1, n1 = ann.correct(dyn, x, t, gen(12))
    y2, n2 = ds.Langevin(snr=0.16, steps=3).correct(dyn, x, t, gen(12))
    assert n1 == n2 == 3
    torch.testing.assert_close(y1, y2)


def test_alpha_from_process():
    lang = ds.Langevin()
    t = torch.tensor([0.0, 0.5, 1.0], dtype=DT)
    torch.testing.assert_close(lang.alpha(ds.VE(), t), torch.ones(3, dtype=DT))
    torch.testing.assert_close(lang.alpha(ds.EDM(), t + 1.0), torch.ones(3, dtype=DT))
    vp = ds.VP()
    torch.testing.assert_close(lang.alpha(vp, t), 1.0 - vp.beta(t) / 1000)
    torch.testing.assert_close(ds.Langevin(ddpm_steps=50).alpha(ds.SubVP(), t),
                               1.0 - vp.beta(t) / 50)


# ----- NFE, stats, other processes ----------------------------------------------------------------


def test_nfe_counts_corrector_evaluations():
    field = CountingField(FIELD)
    sol = ds.sample(field, (8, 2), solver=ds.EulerMaruyama(), steps=10,
                    corrector=ds.Langevin(steps=3), generator=gen(13), dtype=DT)
    assert field.calls == 10 * (1 + 3) + 1  # predictor + corrector per step, + Tweedie denoise
    assert sol.stats.nfe == field.calls
    field.calls = 0
    sol = ds.sample(field, (8, 2), solver=ds.Heun(), steps=5,
                    corrector=ds.AnnealedLangevin([0.01], steps_each=2), generator=gen(13),
                    dtype=DT, denoise=False)
    assert sol.stats.nfe == field.calls


def test_annealed_langevin_solution():
    field = CountingField(FIELD)
    sigmas = [1.0, 0.3, 0.1]
    sol = ds.annealed_langevin(field, (5, 2), sigmas, steps_each=4, eps=1e-4, generator=gen(14),
                               denoise=False, dtype=DT)
    assert field.calls == sol.stats.nfe == 12
    assert sol.x.shape == (5, 2) and sol.x.dtype == DT
    assert torch.equal(sol.stats.steps, torch.full((5,), 12))
    assert (sol.status == ds.Status.SUCCESS).all()
    torch.testing.assert_close(sol.t, VE.t_of_sigma(torch.full((5,), 0.1, dtype=DT)))
    # reproducible from the generator
    again = ds.annealed_langevin(FIELD, (5, 2), sigmas, 4, 1e-4, generator=gen(14),
                                 denoise=False, dtype=DT)
    torch.testing.assert_close(again.x, sol.x)
    # a step far too large overflows: reported per sample, not raised
    bad = ds.annealed_langevin(FIELD, (5, 2), [0.01], steps_each=200, eps=1.0, generator=gen(14),
                               dtype=DT)
    assert (bad.status == ds.Status.NONFINITE).all()


def test_pc_vp_and_devices(device, dtype):
    """PC sampling on VP (alpha = 1 - beta/N) in every dtype/device gives the ring's weights."""
    field = RING.score_field(ds.VP())
    g = torch.Generator(device=device).manual_seed(15)
    sol = ds.sample(field, (2000, 2), solver=ds.EulerMaruyama(), steps=100,
                    corrector=ds.Langevin(), generator=g, device=device, dtype=dtype)
    assert sol.x.dtype == dtype and sol.x.device.type == device.type
    assert sol.success
    err = (fractions(sol.x.to("cpu", DT)) - WEIGHTS).abs().max()
    assert err < 0.04


# ----- refusals and bad input ---------------------------------------------------------------------


def test_refuses_pseudo_scores():
    pseudo = CountingField(FIELD, exact_score=False)
    with pytest.raises(ds.IncompatibleError, match="exact_score"):
        ds.sample(pseudo, (4, 2), solver=ds.Heun(), steps=4, corrector=ds.Langevin())
    with pytest.raises(ds.IncompatibleError, match="exact_score"):
        ds.sample(pseudo, (4, 2), solver=ds.Heun(), steps=4,
                  corrector=ds.AnnealedLangevin([0.1]))
    with pytest.raises(ds.DifsolveError, match="exact_score"):
        ds.annealed_langevin(pseudo, (4, 2), [1.0, 0.1], 2, 1e-4)
    with pytest.raises(ds.DifsolveError, match="exact_score"):
        ds.AnnealedLangevin([0.1]).run(pseudo, torch.zeros(4, 2))
    assert pseudo.calls == 0


def test_refuses_dynamics_without_a_field():
    class Plain:
        def drift(self, x, t):
            return -x

    with pytest.raises(ds.IncompatibleError, match="corrector"):
        ds.solve(Plain(), torch.zeros(3, 2), 1.0, 0.0, solver=ds.Euler(), steps=3,
                 corrector=ds.Langevin())


@pytest.mark.parametrize("kwargs, name", [
    ({"snr": 0.0}, "snr"), ({"snr": -1.0}, "snr"), ({"snr": math.nan}, "snr"),
    ({"snr": "big"}, "snr"), ({"steps": 0}, "steps"), ({"steps": 1.5}, "steps"),
    ({"norm": "median"}, "norm"), ({"norm": 3}, "norm"), ({"ddpm_steps": 0}, "ddpm_steps"),
])
def test_langevin_bad_arguments(kwargs, name):
    with pytest.raises(ds.DifsolveError, match=f"`{name}`"):
        ds.Langevin(**kwargs)


@pytest.mark.parametrize("kwargs, name", [
    ({"sigmas": [0.1, 1.0]}, "sigmas"), ({"sigmas": [1.0, 1.0]}, "sigmas"),
    ({"sigmas": [1.0, -0.1]}, "sigmas"), ({"sigmas": [1.0, 0.0]}, "sigmas"),
    ({"sigmas": []}, "sigmas"), ({"sigmas": [1.0, math.nan]}, "sigmas"),
    ({"sigmas": [math.inf, 1.0]}, "sigmas"), ({"sigmas": "abc"}, "sigmas"),
    ({"sigmas": [[1.0, 0.5], [0.2, 0.1]]}, "sigmas"),
    ({"sigmas": [1.0], "steps_each": 0}, "steps_each"),
    ({"sigmas": [1.0], "steps_each": 2.0}, "steps_each"),
    ({"sigmas": [1.0], "eps": 0.0}, "eps"), ({"sigmas": [1.0], "eps": -1e-5}, "eps"),
])
def test_annealed_bad_arguments(kwargs, name):
    with pytest.raises(ds.DifsolveError, match=f"`{name}`"):
        ds.AnnealedLangevin(**kwargs)


def test_annealed_langevin_bad_call_arguments():
    with pytest.raises(ds.DifsolveError, match="`field`"):
        ds.annealed_langevin(lambda x, t: x, (4, 2), [1.0], 2, 1e-4)
    with pytest.raises(ds.DifsolveError, match="`shape`"):
        ds.annealed_langevin(FIELD, (4, 0), [1.0], 2, 1e-4)
    with pytest.raises(ds.DifsolveError, match="`shape`"):
        ds.annealed_langevin(FIELD, "ab", [1.0], 2, 1e-4)
    with pytest.raises(ds.DifsolveError, match="`generator`"):
        ds.annealed_langevin(FIELD, (4, 2), [1.0], 2, 1e-4, generator="zero")
    empty = ds.annealed_langevin(FIELD, (0, 2), [1.0], 2, 1e-4)  # an empty batch is no error
    assert empty.x.shape == (0, 2) and empty.status.shape == (0,)
    with pytest.raises(ds.DifsolveError, match="`denoise`"):
        ds.AnnealedLangevin([1.0]).run(FIELD, torch.zeros(4, 2), denoise="yes")
    with pytest.raises(ds.DifsolveError, match="`x`"):
        ds.AnnealedLangevin([1.0]).run(FIELD, torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ds.DifsolveError, match="`sigmas`"):  # beyond what VP can represent
        ds.annealed_langevin(RING.score_field(ds.VP()), (4, 2), [1e200], 2, 1e-4)
    with pytest.raises(ds.IncompatibleError, match="`corrector`"):
        ds.sample(FIELD, (4, 2), solver=ds.Heun(), controller=ds.PIController(),
                  corrector=ds.Langevin())


# ----- the study behind the default norm rule (slow: pytest -m slow -s tests/test_langevin.py) ---


@pytest.mark.slow
def test_study_norm_rules():
    """Seed-pooled mode-weight bias of PC sampling and invariance z-scores for every norm rule."""
    seeds = range(6)
    pooled, per_seed = {}, {}
    for norm in [None, "expected", "batch", "sample"]:
        fs = []
        for seed in seeds:
            corrector = None if norm is None else ds.Langevin(norm=norm)
            sol = ds.sample(FIELD, (N, 2), solver=ds.EulerMaruyama(), steps=200,
                            corrector=corrector, generator=gen(seed), dtype=DT)
            fs.append(fractions(sol.x))
        fs = torch.stack(fs)
        pooled[norm] = float((fs.mean(0) - WEIGHTS).abs().max())
        per_seed[norm] = (fs - WEIGHTS).abs().max(1).values
    print("\nPC (EM 200 steps + Langevin snr 0.16): largest seed-pooled mode-weight bias")
    for norm, v in pooled.items():
        print(f"  {norm!s:9} {v:.4f}   per seed {per_seed[norm].min():.4f}-"
              f"{per_seed[norm].max():.4f}")
    t = float(VE.t_of_sigma(torch.tensor(0.5, dtype=DT)))
    mean, cov = exact_moments(VE, t)
    print("invariance at sigma=0.5, 200 steps: max z of mean / cov / weights, cov growth")
    zs = {}
    for norm in ["expected", "batch", "sample"]:
        rows = []
        for seed in seeds:
            x = exact_samples(VE, t, N, gen(seed + 200))
            y, _ = ds.Langevin(steps=200, norm=norm).correct(
                ds.ReverseSDE(FIELD), x, torch.full((N,), t, dtype=DT), gen(seed + 300))
            yc = y - y.mean(0)
            se_cov = (yc[:, :, None] * yc[:, None, :]).reshape(N, -1).std(0).reshape(2, 2)
            r = responsibilities(y, VE, t)
            rows.append([
                float(((y.mean(0) - mean).abs() / (cov.diagonal() / N).sqrt()).max()),
                float(((torch.cov(y.T) - cov).abs() / (se_cov / math.sqrt(N))).max()),
                float(((r.mean(0) - WEIGHTS).abs() / (r.std(0) / math.sqrt(N))).max()),
                float(torch.cov(y.T).diagonal().max() / cov.diagonal().max())])
        zs[norm] = torch.tensor(rows)
        lo, hi = zs[norm].min(0).values, zs[norm].max(0).values
        print(f"  {norm:9} " + "  ".join(f"{a:.2f}-{b:.2f}" for a, b in zip(lo, hi)))
    for norm in ["expected", "batch"]:
        assert pooled[norm] < 0.01
        assert (zs[norm][:, :3] < 4).all()
    assert pooled["sample"] > 0.04
    assert (zs["sample"][:, 3] > 2).all()
