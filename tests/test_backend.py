"""difsolve as the solver backend of real networks: no autograd graph unless asked, conditioning
that travels with the rows, classifier-free guidance, per-sample seeds, sample() options."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

import difsolve as ds

F64 = torch.float64


# ----- a label-dependent exact field -------------------------------------------------------------
def _ring(k: int, radius: float, phase: float, weights=None) -> ds.GaussianMixture:
    angles = phase + torch.arange(k, dtype=F64) * 2 * math.pi / k
    means = radius * torch.stack([angles.cos(), angles.sin()], 1)
    w = torch.full((k,), 1.0 / k, dtype=F64) if weights is None else torch.as_tensor(weights)
    return ds.GaussianMixture(w, means, torch.full((k,), 0.05, dtype=F64))


class LabelField:
    """Exact score of a different Gaussian mixture per class label: ``field(x, t, label)``.

    Rows are evaluated with their own label's mixture, so any row subset is exact.
    """

    def __init__(self, process, mixtures):
        self.process = process
        self.fields = [m.score_field(process) for m in mixtures]
        self.calls = []

    def __call__(self, x, t, label):
        assert label.shape == (x.shape[0],), (label.shape, x.shape)
        self.calls.append(x.shape[0])
        out = torch.empty_like(x)
        for k, field in enumerate(self.fields):
            rows = (label == k).nonzero().squeeze(1)
            if rows.numel():
                out[rows] = field(x[rows], t[rows])
        return out


MIXTURES = [_ring(3, 2.0, 0.0), _ring(4, 1.0, 0.3), _ring(2, 3.0, 1.0)]


def _labels(n: int) -> torch.Tensor:
    return torch.tensor([(5 * i + 1) % 3 for i in range(n)])


CASES = {
    "dopri5": dict(solver=ds.Dopri5(), controller=ds.PIController(rtol=1e-6, atol=1e-6)),
    "dpm_corrector": dict(solver=ds.DPMSolver(3, corrector=True),
                          controller=ds.PIController(rtol=1e-5, atol=1e-5)),
    "sde_adaptive": dict(solver=ds.StochasticHeun(),
                         controller=ds.PIController(rtol=0.05, atol=0.02)),
    "langevin_pc": dict(solver=ds.EulerMaruyama(), steps=30, corrector=ds.Langevin(steps=1)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rows_of_a_mixed_label_batch_equal_per_label_batches(case):
    process = ds.VP()
    field = LabelField(process, MIXTURES)
    n = 12
    labels = _labels(n)
    seeds = list(range(100, 100 + n))
    mixed = ds.sample(field, (n, 2), seeds=seeds, cond={"label": labels}, dtype=F64,
                      **CASES[case])
    assert bool((mixed.status == ds.Status.SUCCESS).all())
    if "controller" in CASES[case]:  # the adaptive loop evaluated row subsets
        assert min(field.calls) < n
    for k in range(3):
        rows = (labels == k).nonzero().squeeze(1)
        alone = ds.sample(field, (rows.numel(), 2), seeds=[seeds[i] for i in rows],
                          cond={"label": labels[rows]}, dtype=F64, **CASES[case])
        torch.testing.assert_close(mixed.x[rows], alone.x, rtol=1e-12, atol=1e-12)
        assert torch.equal(mixed.stats.nfe_per_sample[rows] if "controller" in CASES[case]
                           else alone.stats.nfe_per_sample, alone.stats.nfe_per_sample)


def test_conditioned_log_likelihood_rows_equal_per_label_batches():
    process = ds.EDM()
    field = LabelField(process, MIXTURES)
    n = 9
    labels = _labels(n)
    x = torch.cat([MIXTURES[int(lab)].sample(1, generator=torch.Generator().manual_seed(i))
                   for i, lab in enumerate(labels)])
    seeds = list(range(n))
    trace = ds.Hutchinson(probes=2)
    mixed = ds.log_likelihood(field, x, cond={"label": labels}, seeds=seeds, trace=trace)
    for k in range(3):
        rows = (labels == k).nonzero().squeeze(1)
        alone = ds.log_likelihood(field, x[rows], cond={"label": labels[rows]},
                                  seeds=[seeds[i] for i in rows], trace=trace)
        torch.testing.assert_close(mixed.log_prob[rows], alone.log_prob, rtol=1e-10, atol=1e-10)
    # and the exact trace agrees with each label's closed-form marginal density
    exact = ds.log_likelihood(field, x, cond={"label": labels}, trace=ds.ExactTrace())
    for i, lab in enumerate(labels.tolist()):
        ref = MIXTURES[lab].marginal_log_prob(x[i:i + 1], process.t_min, process)
        assert abs(float(exact.log_prob[i] - ref[0])) < 0.05


def test_shared_cond_values_pass_unchanged():
    seen = []

    class Scaled:
        process = ds.EDM()

        def __init__(self):
            self.inner = MIXTURES[0].score_field(self.process)

        def __call__(self, x, t, scale, note):
            seen.append(note)
            return scale * self.inner(x, t)

    sol = ds.sample(Scaled(), (5, 2), steps=4, generator=0, dtype=F64,
                    cond={"scale": 1.0, "note": "hello"})
    ref = ds.sample(MIXTURES[0].score_field(ds.EDM()), (5, 2), steps=4, generator=0, dtype=F64)
    torch.testing.assert_close(sol.x, ref.x, rtol=0, atol=0)
    assert set(seen) == {"hello"}


def test_cond_must_be_a_dict():
    field = MIXTURES[0].score_field(ds.EDM())
    with pytest.raises(ds.ArgumentTypeError, match="cond"):
        ds.sample(field, (4, 2), steps=2, cond=[1, 2])


# ----- classifier-free guidance -------------------------------------------------------------
def _gauss(mean, cov) -> ds.GaussianMixture:
    return ds.GaussianMixture(torch.ones(1, dtype=F64), torch.tensor([mean], dtype=F64),
                              torch.tensor([cov], dtype=F64))


COND_GAUSS = [_gauss([1.0, -0.5], [[0.5, 0.1], [0.1, 0.3]]),
              _gauss([-1.0, 2.0], [[0.2, 0.0], [0.0, 0.8]])]
NULL_GAUSS = _gauss([0.0, 0.3], [[1.5, 0.2], [0.2, 1.0]])


class GaussClassField:
    """Label 0, 1: conditional Gaussians; label 2: the unconditional Gaussian."""

    def __init__(self, process):
        self.process = process
        self.inner = LabelField(process, [*COND_GAUSS, NULL_GAUSS])

    def __call__(self, x, t, label):
        return self.inner(x, t, label)


def _tilted_score(x, t, process, mix_c, mix_u, w):
    """Closed form: the score of N(m_c, S_c)^w N(m_u, S_u)^(1-w) at time t (Gaussian)."""
    a, b = (float(v) for v in process.marginal(torch.tensor(t, dtype=F64)))
    def marg(m):
        return a * m.means[0], a * a * m.covs[0] + b * b * torch.eye(2, dtype=F64)
    mc, sc = marg(mix_c)
    mu, su = marg(mix_u)
    pc, pu = torch.linalg.inv(sc), torch.linalg.inv(su)
    p = w * pc + (1 - w) * pu
    m = torch.linalg.solve(p, w * pc @ mc + (1 - w) * pu @ mu)
    return -(x - m) @ p.T


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5, 7.0])
def test_guidance_equals_the_tilted_gaussian_score(scale):
    process = ds.VP()
    field = GaussClassField(process)
    guided = ds.ClassifierFreeGuidance(field, scale, uncond={"label": torch.tensor(2)})
    x = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    for t in (0.05, 0.4, 0.9):
        tt = torch.full((6,), t, dtype=F64)
        s = guided(x, tt, label=labels)
        for lab in (0, 1):
            rows = labels == lab
            ref = _tilted_score(x[rows], t, process, COND_GAUSS[lab], NULL_GAUSS, scale)
            torch.testing.assert_close(s[rows], ref, rtol=1e-10, atol=1e-10)
    if scale == 1.0:  # the conditional field itself
        torch.testing.assert_close(s, field(x, tt, label=labels), rtol=0, atol=1e-14)
    if scale == 0.0:  # the unconditional field
        torch.testing.assert_close(s, field(x, tt, label=torch.full((6,), 2)), rtol=0,
                                   atol=1e-14)


def test_guidance_batches_both_predictions_in_one_call():
    field = GaussClassField(ds.EDM())
    guided = ds.ClassifierFreeGuidance(field, 3.0, uncond={"label": torch.tensor([2])})
    sol = ds.sample(guided, (8, 2), steps=5, dtype=F64, generator=1,
                    cond={"label": torch.arange(8) % 2})
    calls = field.inner.calls
    assert set(calls) == {16}  # every evaluation: 8 conditional + 8 unconditional rows
    assert len(calls) == sol.stats.nfe
    # a guided sample sits farther along the conditional-minus-unconditional direction
    assert bool((sol.status == ds.Status.SUCCESS).all())


# ----- per-sample seeds ----------------------------------------------------------------------
SEED_CASES = {
    "ode": dict(solver=ds.Heun(), steps=8),
    "sde_fixed": dict(solver=ds.EulerMaruyama(), steps=40),
    "sde_adaptive": dict(solver=ds.StochasticHeun(),
                         controller=ds.PIController(rtol=0.05, atol=0.02)),
    "pc": dict(solver=ds.EulerMaruyama(), steps=20, corrector=ds.Langevin()),
}


@pytest.mark.parametrize("case", list(SEED_CASES))
def test_a_row_does_not_depend_on_its_batch(case):
    field = MIXTURES[1].score_field(ds.VP())
    seeds = [7, 123, 99, 4, 2**40, 5]
    batch = ds.sample(field, (6, 2), seeds=seeds, dtype=F64, **SEED_CASES[case])
    for i in (0, 3, 4):
        alone = ds.sample(field, (1, 2), seeds=[seeds[i]], dtype=F64, **SEED_CASES[case])
        assert torch.equal(batch.x[i], alone.x[0]), (case, i)
    # a different batch size and order: still the same rows
    other = ds.sample(field, (3, 2), seeds=[seeds[4], seeds[1], seeds[0]], dtype=F64,
                      **SEED_CASES[case])
    assert torch.equal(other.x[0], batch.x[4]) and torch.equal(other.x[2], batch.x[0])


def test_hutchinson_probes_follow_the_row_seeds():
    field = MIXTURES[0].score_field(ds.EDM())
    x = MIXTURES[0].sample(5, generator=torch.Generator().manual_seed(3))
    seeds = [11, 12, 13, 14, 15]
    batch = ds.log_likelihood(field, x, seeds=seeds, trace=ds.Hutchinson(probes=3))
    alone = ds.log_likelihood(field, x[2:3], seeds=[13], trace=ds.Hutchinson(probes=3))
    torch.testing.assert_close(batch.log_prob[2:3], alone.log_prob, rtol=1e-12, atol=1e-12)
    assert torch.equal(batch.delta_log_prob[2], alone.delta_log_prob[0]) or torch.allclose(
        batch.delta_log_prob[2], alone.delta_log_prob[0], rtol=1e-12, atol=1e-12)


def test_int_generator_is_a_seed():
    field = MIXTURES[0].score_field(ds.EDM())
    a = ds.sample(field, (4, 2), steps=3, generator=5)
    b = ds.sample(field, (4, 2), steps=3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.x, b.x)
    with pytest.raises(ds.ArgumentTypeError, match="generator"):
        ds.sample(field, (4, 2), steps=3, generator="five")
    with pytest.raises(ds.ArgumentTypeError, match="seeds"):
        ds.sample(field, (4, 2), steps=3, generator=5, seeds=[1, 2, 3, 4])
    with pytest.raises(ds.InvalidArgumentError, match="seeds"):
        ds.sample(field, (4, 2), steps=3, seeds=[1, 2, 3])


# ----- sample() options ---------------------------------------------------------------------
def test_sdedit_from_exact_marginal_samples_recovers_the_data_law():
    weights = [0.5, 0.3, 0.2]
    mix = _ring(3, 3.0, 0.2, weights)
    process = ds.VP()
    t_start = 0.5
    n = 4000
    x0 = mix.sample(n, generator=torch.Generator().manual_seed(0))
    x_t = process.perturb(x0, t_start, generator=torch.Generator().manual_seed(1))
    sol = ds.sample(mix.score_field(process), x_T=x_t, t_start=t_start, solver=ds.Heun(),
                    steps=30, schedule="karras")
    assert bool((sol.status == ds.Status.SUCCESS).all())
    nearest = torch.cdist(sol.x.double(), mix.means.double()).argmin(1)
    freq = torch.bincount(nearest, minlength=3).to(F64) / n
    se = torch.sqrt(torch.tensor(weights) * (1 - torch.tensor(weights)) / n)
    assert bool(((freq - torch.tensor(weights, dtype=F64)).abs() < 4 * se).all()), freq


def test_x_T_replaces_the_prior_draw():
    field = MIXTURES[0].score_field(ds.EDM())
    g = torch.Generator().manual_seed(2)
    x_T = ds.EDM().prior_sample((6, 2), generator=g, dtype=F64)
    a = ds.sample(field, x_T=x_T, steps=5)
    b = ds.sample(field, (6, 2), steps=5, generator=2, dtype=F64)
    assert torch.equal(a.x, b.x)
    with pytest.raises(ds.IncompatibleError, match="t_start"):
        ds.sample(field, (6, 2), t_start=1.0)


def test_callback_sees_every_step_and_save_at_records_states():
    field = MIXTURES[0].score_field(ds.EDM())
    infos = []
    sol = ds.sample(field, (4, 2), solver=ds.DPMSolver(2), steps=6, dtype=F64, generator=0,
                    callback=infos.append, save_at=torch.tensor([80.0, 1.0, 0.002]))
    assert [i["step"] for i in infos] == list(range(1, 8))  # 6 steps + the save point 1.0
    assert all(i["x"].shape == (4, 2) and i["t"].shape == (4,) for i in infos)
    assert sol.xs.shape == (3, 4, 2) and torch.equal(sol.ts, torch.tensor([80.0, 1.0, 0.002],
                                                                          dtype=torch.float32))
    adaptive = []
    ds.sample(field, (4, 2), solver=ds.Dopri5(), controller=ds.PIController(rtol=1e-4),
              dtype=F64, callback=adaptive.append)
    assert adaptive and all("rows" in i and "accepted" in i for i in adaptive)


# ----- gradients and memory -----------------------------------------------------------------
class TinyConv(torch.nn.Module):
    def __init__(self, channels=3, width=16):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels + 1, width, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, x, t):
        tt = t.reshape(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:]).to(x.dtype)
        return self.net(torch.cat([x, tt], 1))


def test_no_graph_by_default_and_grad_true_keeps_it():
    torch.manual_seed(0)
    model = TinyConv()
    field = ds.ScoreNetwork(model, ds.VP(), predicts="eps")
    sol = ds.sample(field, (2, 3, 16, 16), steps=3, generator=0)
    assert not sol.x.requires_grad and sol.x.grad_fn is None
    x0 = torch.randn(2, 3, 16, 16)
    plain = ds.solve(ds.ProbabilityFlowODE(field), x0, 1.0, 0.5, solver=ds.Heun(), steps=2)
    assert not plain.x.requires_grad
    with_graph = ds.solve(ds.ProbabilityFlowODE(field), x0, 1.0, 0.5, solver=ds.Heun(),
                          steps=2, grad=True)
    assert with_graph.x.requires_grad
    torch.testing.assert_close(with_graph.x.detach(), plain.x)


def _mlp_field(seed: int):
    """A float64 MLP eps-model ``model([x, t])`` with trainable parameters, and its field."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 2)).double()
    field = ds.ScoreNetwork(lambda x, t: model(torch.cat([x, t[:, None]], 1)), ds.VP(),
                            predicts="eps")
    return model, field


def test_grad_true_matches_finite_differences():
    model, field = _mlp_field(1)
    x0 = torch.randn(4, 2, dtype=F64)
    weight = model[2].weight

    def loss():
        sol = ds.solve(ds.ProbabilityFlowODE(field), x0, 1.0, 0.1, solver=ds.RK4(), steps=4,
                       grad=True)
        return sol.x.square().sum()

    (grad,) = torch.autograd.grad(loss(), weight)
    eps = 1e-6
    for idx in [(0, 0), (1, 5), (0, 11)]:
        with torch.no_grad():
            weight[idx] += eps
            up = float(loss())
            weight[idx] -= 2 * eps
            down = float(loss())
            weight[idx] += eps
        fd = (up - down) / (2 * eps)
        assert abs(fd - float(grad[idx])) < 1e-6 * max(1.0, abs(fd)), (idx, fd, float(grad[idx]))


def test_log_likelihood_under_no_grad_and_inference_mode():
    _, field = _mlp_field(2)
    x = torch.randn(5, 2, dtype=F64)
    ref = ds.log_likelihood(field, x, trace=ds.ExactTrace(), seeds=range(5))
    with torch.no_grad():
        a = ds.log_likelihood(field, x, trace=ds.ExactTrace(), seeds=range(5))
    with torch.inference_mode():
        b = ds.log_likelihood(field, x, trace=ds.Hutchinson(2), seeds=range(5))
    torch.testing.assert_close(a.log_prob, ref.log_prob, rtol=0, atol=0)
    assert bool(torch.isfinite(b.log_prob).all())
    assert not ref.log_prob.requires_grad


_MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    import difsolve as ds
    sys.path.insert(0, {tests!r})
    from test_backend import TinyConv
    torch.manual_seed(0)
    torch.set_num_threads(1)
    field = ds.ScoreNetwork(TinyConv(width=32), ds.VP(), predicts="eps")
    ds.sample(field, (16, 3, 16, 16), solver=ds.EulerMaruyama(), steps=int(sys.argv[1]),
              generator=0)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def _peak_kb(steps: int) -> int:
    import os

    script = _MEMORY_SCRIPT.format(tests=os.path.dirname(__file__))
    out = subprocess.run([sys.executable, "-c", script, str(steps)], capture_output=True,
                         text=True, timeout=300, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_peak_memory_is_flat_in_the_number_of_steps():
    """A conv net with trainable parameters on (16, 3, 16, 16): keeping the graph would add about
    3 MB per step (over 300 MB at 100 steps); the peak stays within 10% of the 10-step peak."""
    short, long = _peak_kb(10), _peak_kb(100)
    assert long <= 1.1 * short, (short, long)


# ----- an NFE budget ------------------------------------------------------------------------
@pytest.mark.parametrize("nfe", [10, 15, 20])
def test_an_nfe_budget_is_spent_exactly(nfe):
    field = ds.problems.ring_mixture(anisotropic=True).score_field(ds.EDM())
    sol = ds.sample(field, (32, 2), nfe=nfe, generator=0, dtype=F64)
    assert sol.stats.nfe == nfe and bool((sol.status == ds.Status.SUCCESS).all())
    raw = ds.sample(field, (32, 2), nfe=nfe, generator=0, dtype=F64, denoise=False)
    assert raw.stats.nfe == nfe
    heun = ds.sample(field, (32, 2), nfe=21, solver=ds.Heun(), generator=0, dtype=F64)
    assert heun.stats.nfe == 21 and heun.stats.steps.tolist() == [10] * 32
    with pytest.raises(ds.IncompatibleError, match="nfe"):
        ds.sample(field, (4, 2), nfe=20, solver=ds.Heun())  # Heun spends 2 per step (+1)
    with pytest.raises(ds.IncompatibleError, match="nfe"):
        ds.sample(field, (4, 2), nfe=20, steps=10)
