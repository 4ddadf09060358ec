"""Log-likelihood through the probability-flow ODE (difsolve.likelihood) against closed forms.

Ground truth (REFERENCE.md section 2): for Gaussian-mixture data every marginal ``p_t`` is a
mixture with a closed-form density, so

* ``log p_{t_min}(x)`` is known exactly (``GaussianMixture.marginal_log_prob``);
* the likelihood identity with the *exact* ``p_T`` in place of the prior,
  ``log p_T(x(T)) + int div``, must match it to solver tolerance;
* the prior-mismatch bias ``log prior(x(T)) - log p_T(x(T))`` has mean ``-KL(p_T || prior)``,
  estimated here by Monte Carlo from exact samples of ``p_T``;
* for a single Gaussian the flow is linear with Jacobian integral
  ``A = U diag(log(S_T / S_tmin)) U^T`` independent of ``x``: each Hutchinson probe ``e`` must give
  exactly ``e^T A e``, with variance ``2 ||A||_F^2`` (Gaussian) or
  ``2 (||A||_F^2 - sum A_ii^2)`` (Rademacher).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import difsolve as ds
from difsolve.problems import GaussianFlow, rotated_covs, rotated_mixture

F64 = torch.float64
PROCESSES = {"VP": ds.VP, "VE": ds.VE, "EDM": ds.EDM}


def sample_marginal(mix: ds.GaussianMixture, n: int, t: float, process, seed: int,
                    device="cpu", dtype=F64) -> torch.Tensor:
    """Exact samples of ``p_t``: ``a x0 + b z``."""
    gen = torch.Generator().manual_seed(seed)
    x0 = mix.sample(n, gen, dtype=F64)
    a, b = process.marginal(torch.tensor(float(t), dtype=F64))
    x = a * x0 + b * torch.randn(x0.shape, generator=gen, dtype=F64)
    return x.to(device=device, dtype=dtype)


def identity_with_exact_pT(res: ds.LogLikelihood, mix, process) -> torch.Tensor:
    """``log p_T(x(T)) + int div``: the likelihood identity without the prior substitution."""
    return res.log_prob - res.prior_log_prob + mix.marginal_log_prob(res.latent, process.t_max,
                                                                      process)


def kl_to_prior(mix, process, n: int = 4096, seed: int = 7) -> tuple[float, float]:
    """Monte-Carlo ``KL(p_T || prior)`` and the standard deviation of the log-ratio."""
    xt = sample_marginal(mix, n, process.t_max, process, seed)
    ratio = mix.marginal_log_prob(xt, process.t_max, process) - process.prior_log_prob(xt)
    return float(ratio.mean()), float(ratio.std())


# ----- exact trace against the closed form ---------------------------------------------------


@pytest.mark.parametrize("d", [2, 8, 32])
@pytest.mark.parametrize("name", ["VP", "VE", "EDM"])
def test_exact_trace_matches_closed_form(name, d):
    process = PROCESSES[name]()
    mix = rotated_mixture(d, 3, seed=d)
    x = sample_marginal(mix, 6, process.t_min, process, seed=100 + d)
    res = ds.log_likelihood(mix.score_field(process), x, trace=ds.ExactTrace())
    assert (res.status == ds.Status.SUCCESS).all()
    assert torch.equal(res.stderr, torch.zeros(6, dtype=F64))
    exact = mix.marginal_log_prob(x, process.t_min, process)
    # (1) with the exact p_T the identity holds to the solver tolerance (rtol = atol = 1e-5)
    solver_err = (identity_with_exact_pT(res, mix, process) - exact).abs().max()
    assert solver_err < 1e-4 + 3e-5 * d, float(solver_err)
    # (2) with the prior, the error is the prior-mismatch bias: mean -KL(p_T || prior)
    kl, spread = kl_to_prior(mix, process)
    err = res.log_prob - exact
    assert abs(float(err.mean()) + kl) < 4 * spread / math.sqrt(6) + 1e-3, (float(err.mean()), kl)
    if name == "VP" and d == 2:
        assert kl < 5e-3  # "about 1e-3 nats" for a 2-D mixture under VP
    assert err.abs().max() < 0.5


@pytest.mark.parametrize("name", ["VP", "VE"])
def test_prior_bias_is_minus_kl_2d(name):
    """Over many samples the mean error is -KL(p_T || prior): below 1e-3 nats under VP and a few
    1e-3 under VE for this 2-D mixture (means of scale 6), while single samples scatter more."""
    process = PROCESSES[name]()
    mix = rotated_mixture(2, 3, seed=11, spread=6.0)
    n = 256
    x = sample_marginal(mix, n, process.t_min, process, seed=12)
    res = ds.log_likelihood(mix.score_field(process), x, trace=ds.ExactTrace())
    err = res.log_prob - mix.marginal_log_prob(x, process.t_min, process)
    kl, _ = kl_to_prior(mix, process, n=200_000)  # MC error about 0.03 / 450 (VP)
    assert 0 < kl < (1e-3 if name == "VP" else 1e-2)
    assert abs(float(err.mean()) + kl) < 3 * float(err.std()) / math.sqrt(n) + 1e-4
    assert abs(float(err.mean())) < (3e-3 if name == "VP" else 1e-2)


@settings(max_examples=max(8, settings.default.max_examples // 2))  # ci: 8, thorough: 100
@given(d=st.sampled_from([2, 8]), k=st.integers(1, 3), seed=st.integers(0, 10_000),
       name=st.sampled_from(["VP", "VE", "EDM"]),
       time_variable=st.sampled_from(["log_sigma", "t"]))
def test_identity_random_mixtures(d, k, seed, name, time_variable):
    process = PROCESSES[name]()
    mix = rotated_mixture(d, k, seed)
    x = sample_marginal(mix, 3, process.t_min, process, seed + 1)
    ctl = ds.PIController(rtol=1e-7, atol=1e-7)
    res = ds.log_likelihood(mix.score_field(process), x, trace=ds.ExactTrace(), controller=ctl,
                            time_variable=time_variable)
    exact = mix.marginal_log_prob(x, process.t_min, process)
    err = (identity_with_exact_pT(res, mix, process) - exact).abs().max()
    assert err < 1e-5, float(err)
    # the prior substitution only changes the last term
    mismatch = res.prior_log_prob - mix.marginal_log_prob(res.latent, process.t_max, process)
    assert ((res.log_prob - exact) - mismatch).abs().max() < 1e-5


def test_device_float32(device):
    process = ds.EDM()
    mix = rotated_mixture(4, 2, seed=3)
    x = sample_marginal(mix, 5, process.t_min, process, seed=4, device=device,
                        dtype=torch.float32)
    gen = torch.Generator(device=device).manual_seed(0)
    res = ds.log_likelihood(mix.score_field(process), x, trace=ds.Hutchinson(probes=2),
                            generator=gen)
    assert res.log_prob.device == x.device and res.log_prob.dtype == torch.float32
    exact = ds.log_likelihood(mix.score_field(process), x, trace=ds.ExactTrace())
    ref = mix.marginal_log_prob(x.double(), process.t_min, process)
    ident = (exact.log_prob - exact.prior_log_prob).double() + mix.marginal_log_prob(
        exact.latent.double(), process.t_max, process)
    assert (ident - ref).abs().max() < 2e-3
    assert torch.isfinite(res.stderr).all() and (res.stderr > 0).all()


def test_fixed_steps_and_time_variables_agree():
    process = ds.VP()
    mix = rotated_mixture(2, 2, seed=5)
    x = sample_marginal(mix, 4, process.t_min, process, seed=6)
    field = mix.score_field(process)
    a = ds.log_likelihood(field, x, trace=ds.ExactTrace())
    b = ds.log_likelihood(field, x, trace=ds.ExactTrace(), time_variable="t")
    c = ds.log_likelihood(field, x, trace=ds.ExactTrace(), solver=ds.RK4(), steps=64,
                          schedule="logsnr")
    assert (a.log_prob - b.log_prob).abs().max() < 2e-4
    assert (a.log_prob - c.log_prob).abs().max() < 2e-3
    assert int(c.stats.nfe) == 4 * 64


# ----- Hutchinson -----------------------------------------------------------------------------


def _gaussian_case(d=8, seed=21):
    gen = torch.Generator().manual_seed(seed)
    cov = rotated_covs(d, 1, gen, lo=0.02, hi=3.0)[0]
    mean = torch.randn(d, generator=gen, dtype=F64)
    process = ds.VP()
    flow = GaussianFlow(mean, cov, process)
    evals, evecs = torch.linalg.eigh(cov)
    _, s_lo = flow._std(torch.tensor([process.t_min], dtype=F64), evals)
    _, s_hi = flow._std(torch.tensor([process.t_max], dtype=F64), evals)
    big_a = evecs @ torch.diag((s_hi[0] / s_lo[0]).log()) @ evecs.T  # A = int J dt
    return flow, process, big_a


@pytest.fixture(scope="module")
def hutchinson_runs():
    """Two-probe Hutchinson runs (Rademacher and Gaussian) on a rotated anisotropic Gaussian
    (d = 8), one eighth of the rows pushed far out so that rows finish at different steps."""
    flow, process, big_a = _gaussian_case()
    n, k = 256, 2
    x = flow.sample(n, process.t_min, torch.Generator().manual_seed(1))
    x[: n // 8] *= 6.0
    runs = {}
    for noise in ("rademacher", "gaussian"):
        trace = ds.Hutchinson(probes=k, noise=noise)
        res = ds.log_likelihood(flow.field, x, trace=trace,
                                generator=torch.Generator().manual_seed(2))
        probes = trace.draw((n, k * flow.dim), generator=torch.Generator().manual_seed(2),
                            device="cpu", dtype=F64).reshape(n, k, flow.dim)
        runs[noise] = (res, probes)
    return flow, process, big_a, x, k, runs


def _variance_formula(big_a, noise, k):
    fro2 = float(big_a.square().sum())
    diag2 = float(big_a.diagonal().square().sum()) if noise == "rademacher" else 0.0
    return 2 * (fro2 - diag2) / k


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_per_probe_exact_and_variance(hutchinson_runs, noise):
    """Each row's estimate is e^T A e for its own probe (even though the loop drops finished
    rows), the mean is unbiased, and the spread and the reported stderr match the formula."""
    flow, process, big_a, x, k, runs = hutchinson_runs
    res, probes = runs[noise]
    assert res.stats.steps.unique().numel() > 1  # rows finished at different steps
    quad = torch.einsum("nki,ij,nkj->nk", probes, big_a, probes)
    assert (res.delta_log_prob - quad).abs().max() < 2e-4
    # closed form log p_{t_min}(x) with the prior at the exact latent
    latent = flow.flow(x, process.t_min, process.t_max)
    assert (latent - res.latent).abs().max() < 1e-3
    exact = process.prior_log_prob(latent) + flow.log_det(x, process.t_min, process.t_max)
    err = res.log_prob - exact
    var = _variance_formula(big_a, noise, k)
    assert abs(float(err.mean())) < 3 * math.sqrt(var / x.shape[0])  # unbiased
    emp_var = float(err.var())
    assert 0.7 < emp_var / var < 1.4, (emp_var, var)
    # the reported stderr^2 (the probes' spread) estimates Var(log_prob)
    assert 0.65 < float(res.stderr.square().mean()) / emp_var < 1.5


def test_rademacher_beats_gaussian_on_rotated_data(hutchinson_runs):
    _, _, big_a, _, k, runs = hutchinson_runs
    # A does not depend on x here, so the spread of the integrated divergence is the estimator's
    spread = {noise: float(res.delta_log_prob.mean(dim=1).var()) for noise, (res, _) in runs.items()}
    assert _variance_formula(big_a, "rademacher", k) < 0.5 * _variance_formula(big_a,
                                                                              "gaussian", k)
    assert spread["rademacher"] < 0.6 * spread["gaussian"]


def test_single_probe_has_no_stderr():
    flow, process, _ = _gaussian_case(d=4, seed=5)
    x = flow.sample(6, process.t_min, torch.Generator().manual_seed(3))
    res = ds.log_likelihood(flow.field, x, trace=ds.Hutchinson(1, "gaussian"),
                            generator=torch.Generator().manual_seed(4))
    assert torch.isnan(res.stderr).all()  # one probe: no spread to report
    assert torch.isfinite(res.log_prob).all()
    assert torch.allclose(res.log_prob, res.prior_log_prob + res.delta_log_prob[:, 0])


def test_hutchinson_unbiased_on_mixture():
    """Mixture (x-dependent A): the mean over probes matches the exact trace within 3 se."""
    process = ds.EDM()
    mix = rotated_mixture(8, 3, seed=8)
    x1 = sample_marginal(mix, 2, process.t_min, process, seed=9)
    reps = 128
    x = x1.repeat_interleave(reps, dim=0)
    field = mix.score_field(process)
    exact = ds.log_likelihood(field, x1, trace=ds.ExactTrace()).log_prob
    res = ds.log_likelihood(field, x, trace=ds.Hutchinson(probes=2),
                            generator=torch.Generator().manual_seed(10))
    est = res.log_prob.reshape(2, reps)
    se = est.std(dim=1) / math.sqrt(reps)
    assert ((est.mean(dim=1) - exact).abs() < 3 * se + 1e-3).all(), (est.mean(1), exact, se)
    ratio = res.stderr.square().reshape(2, reps).mean(dim=1) / est.var(dim=1)
    assert ((ratio > 0.6) & (ratio < 1.6)).all(), ratio  # about 3 standard errors


# ----- bits per dimension and dequantisation ---------------------------------------------------


def test_bits_per_dim_and_offsets():
    process = ds.VP()
    mix = rotated_mixture(4, 2, seed=13, spread=0.3)
    field = mix.score_field(process)
    x = sample_marginal(mix, 3, process.t_min, process, seed=14).reshape(3, 1, 2, 2)
    flat_field = _ReshapedField(field)
    plain = ds.log_likelihood(flat_field, x, trace=ds.ExactTrace())
    by_hand = -plain.log_prob / (4 * math.log(2.0))
    assert torch.allclose(plain.bits_per_dim, by_hand, rtol=0, atol=1e-12)
    for rng, offset in (((0.0, 1.0), 8.0), ((-1.0, 1.0), 7.0), ((0.0, 255.0), 8 - math.log2(255))):
        r = ds.log_likelihood(flat_field, x, trace=ds.ExactTrace(), data_range=rng)
        assert torch.allclose(r.bits_per_dim, by_hand + offset, rtol=0, atol=1e-9)
    r = ds.log_likelihood(flat_field, x, trace=ds.ExactTrace(), data_range=(0, 1), bits=5)
    assert torch.allclose(r.bits_per_dim, by_hand + 5.0, rtol=0, atol=1e-9)


@pytest.mark.parametrize("rng", [(0.0, 1.0), (-1.0, 1.0)])
def test_dequantisation(rng):
    lo, hi = rng
    gen = torch.Generator().manual_seed(15)
    levels = torch.randint(0, 256, (4, 2), generator=gen)
    x = lo + levels.to(F64) / 255 * (hi - lo)  # ToTensor convention n / 255
    process = ds.VP()
    mix = ds.GaussianMixture([1.0], [[0.5 * (lo + hi)] * 2], [[[0.1, 0.03], [0.03, 0.05]]])
    field = mix.score_field(process)
    res = ds.log_likelihood(field, x, trace=ds.ExactTrace(), data_range=rng, dequantize=True,
                            generator=torch.Generator().manual_seed(16))
    # the evaluated point lies in its bin: score_sde's (255 x + u) / 256 (then scaled to [-1, 1])
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(16), dtype=F64)
    x01 = (x - lo) / (hi - lo)
    expect = lo + (hi - lo) * (255 * x01 + u) / 256
    assert torch.allclose(res.x, expect, atol=1e-12)
    bins = torch.floor((res.x - lo) / (hi - lo) * 256).long()
    assert torch.equal(bins, levels)
    exact = mix.marginal_log_prob(res.x, process.t_min, process)
    bpd_hand = -exact / (2 * math.log(2.0)) + 8 - math.log2(hi - lo)
    # closed form, after removing the prior-mismatch term (exact p_T in place of the prior)
    mismatch = res.prior_log_prob - mix.marginal_log_prob(res.latent, process.t_max, process)
    bpd_ident = res.bits_per_dim + mismatch / (2 * math.log(2.0))
    assert (bpd_ident - bpd_hand).abs().max() < 1e-4
    assert (res.bits_per_dim - bpd_hand).abs().max() < 0.02
    # without dequantisation the point is evaluated as given
    same = ds.log_likelihood(field, x, trace=ds.ExactTrace(), data_range=rng)
    assert torch.equal(same.x, x)


class _ReshapedField:
    """A 2-D mixture field seen on image-shaped ``(B, 1, 2, 2)`` tensors (flattened to 4-D)."""

    def __init__(self, field):
        self.inner, self.process = field, field.process

    def __call__(self, x, t):
        return self.inner(x.reshape(x.shape[0], -1), t).reshape(x.shape)


# ----- other processes and priors ------------------------------------------------------------


class _HeavyTailEDM(ds.EDM):
    """EDM with a Student-t prior: the likelihood must use process.prior_log_prob as given."""

    def prior_log_prob(self, x):
        nu, s = 3.0, self.t_max
        d = x[0].numel()
        q = x.reshape(x.shape[0], -1).square().sum(1) / s**2
        return (math.lgamma((nu + d) / 2) - math.lgamma(nu / 2) - d / 2 * math.log(nu * math.pi)
                - d * math.log(s) - (nu + d) / 2 * torch.log1p(q / nu))


def test_uses_process_prior():
    mix = rotated_mixture(2, 2, seed=17)
    x = sample_marginal(mix, 3, 0.002, ds.EDM(), seed=18)
    a = ds.log_likelihood(mix.score_field(ds.EDM()), x, trace=ds.ExactTrace())
    proc = _HeavyTailEDM()
    b = ds.log_likelihood(mix.score_field(proc), x, trace=ds.ExactTrace())
    assert torch.allclose(b.prior_log_prob, proc.prior_log_prob(b.latent))
    assert torch.allclose(b.log_prob, b.prior_log_prob + b.delta_log_prob[:, 0])
    assert torch.allclose(a.delta_log_prob, b.delta_log_prob, atol=1e-6)


@pytest.mark.parametrize("D", [1, 16])
def test_poisson_field_closed_form(D):
    """PFGM++ marginals are t-kernel mixtures: the ODE likelihood with the exact p_T matches
    ``field.log_prob`` at sigma_min, and with the heavy-tailed prior differs by its mismatch."""
    gen = torch.Generator().manual_seed(19)
    pts = torch.randn(5, 2, generator=gen, dtype=F64)
    field = ds.PoissonField.from_data(pts, D, sigma_min=0.05, sigma_max=20.0)
    proc = field.process
    x = pts[:3] + 0.1 * torch.randn(3, 2, generator=gen, dtype=F64)
    res = ds.log_likelihood(field, x, trace=ds.ExactTrace())
    exact = field.log_prob(x, proc.t_min)
    ident = res.log_prob - res.prior_log_prob + field.log_prob(res.latent, proc.t_max)
    assert (ident - exact).abs().max() < 2e-4
    assert torch.allclose(res.prior_log_prob, proc.prior_log_prob(res.latent))
    assert (res.log_prob - exact).abs().max() < 0.2  # heavy-tailed prior mismatch at r_max


# ----- argument checking ---------------------------------------------------------------------


def test_bad_arguments():
    mix = rotated_mixture(2, 1, seed=0)
    field = mix.score_field(ds.VP())
    x = mix.sample(2, dtype=F64)
    with pytest.raises(ds.ArgumentTypeError, match="trace"):
        ds.log_likelihood(field, x, trace="exact")
    with pytest.raises(ds.IncompatibleError, match="solver"):
        ds.log_likelihood(field, x, solver=ds.EulerMaruyama())
    with pytest.raises(ds.IncompatibleError, match="dequantize"):
        ds.log_likelihood(field, x, dequantize=True)
    with pytest.raises(ds.InvalidArgumentError, match="data_range"):
        ds.log_likelihood(field, x, data_range=(1.0, 0.0))
    with pytest.raises(ds.ArgumentTypeError, match="data_range"):
        ds.log_likelihood(field, x, data_range=3.0)
    with pytest.raises(ds.InvalidArgumentError, match="x"):
        ds.log_likelihood(field, 5 * x.abs() + 2, data_range=(0, 1), dequantize=True)
    with pytest.raises(ds.InvalidArgumentError, match="probes"):
        ds.Hutchinson(probes=0)
    with pytest.raises(ds.InvalidArgumentError, match="noise"):
        ds.Hutchinson(noise="uniform")
    with pytest.raises(ds.IncompatibleError, match="steps"):
        ds.log_likelihood(field, x, steps=10, controller=ds.PIController())
    with pytest.raises(ds.InvalidArgumentError, match="time_variable"):
        ds.log_likelihood(field, x, time_variable="snr")
    with pytest.raises(ds.ArgumentTypeError, match="field"):
        ds.log_likelihood(lambda x, t: x, x)
