"""Bad inputs to the foundation raise DifsolveError subclasses whose message names the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import difsolve as ds
from difsolve import parametrization as par
from difsolve.fields import check_field

EYE2 = np.eye(2)


def _gm() -> ds.GaussianMixture:
    return ds.GaussianMixture([0.25, 0.75], [[0.0, 0.0], [1.0, 2.0]], [EYE2, 2 * EYE2])


def raises(exc: type[Exception], name: str):
    """``pytest.raises`` for ``exc`` (a DifsolveError subclass) naming `name` in backticks."""
    assert issubclass(exc, ds.DifsolveError)
    return pytest.raises(exc, match=f"`{name}`")


def test_error_hierarchy():
    assert issubclass(ds.DifsolveError, ValueError)
    assert issubclass(ds.InvalidArgumentError, ds.DifsolveError)
    assert issubclass(ds.ArgumentTypeError, ds.DifsolveError)
    assert issubclass(ds.ArgumentTypeError, TypeError)
    assert issubclass(ds.IncompatibleError, ds.DifsolveError)


# ----- processes ----------------------------------------------------------------------------
@pytest.mark.parametrize(("make", "name"), [
    (lambda: ds.VE(sigma_min=-0.1), "sigma_min"),
    (lambda: ds.VE(sigma_min=0.0), "sigma_min"),
    (lambda: ds.VE(sigma_min=float("nan")), "sigma_min"),
    (lambda: ds.VE(sigma_max=-1.0), "sigma_max"),
    (lambda: ds.VE(sigma_min=1.0, sigma_max=1.0), "sigma_max"),
    (lambda: ds.VE(sigma_min=2.0, sigma_max=1.0), "sigma_max"),
    (lambda: ds.VE(t_min=0.0), "t_min"),
    (lambda: ds.VE(t_min=-1e-3), "t_min"),
    (lambda: ds.VE(t_min=1.0), "t_min"),
    (lambda: ds.VE(t_min=1.5), "t_min"),
    (lambda: ds.VP(beta_min=0.0), "beta_min"),
    (lambda: ds.VP(beta_min=-0.1), "beta_min"),
    (lambda: ds.VP(beta_min=1.0, beta_max=0.5), "beta_max"),
    (lambda: ds.VP(beta_max=float("inf")), "beta_max"),
    (lambda: ds.VP(t_min=0.0), "t_min"),
    (lambda: ds.VP(t_min=1.0), "t_min"),
    (lambda: ds.SubVP(beta_min=-1.0), "beta_min"),
    (lambda: ds.SubVP(t_min=2.0), "t_min"),
    (lambda: ds.EDM(sigma_min=0.0), "sigma_min"),
    (lambda: ds.EDM(sigma_min=-0.002), "sigma_min"),
    (lambda: ds.EDM(sigma_max=0.001), "sigma_max"),
    (lambda: ds.EDM(sigma_min=1.0, sigma_max=1.0), "sigma_max"),
])
def test_process_bad_values(make, name):
    with raises(ds.InvalidArgumentError, name):
        make()


@pytest.mark.parametrize(("make", "name"), [
    (lambda: ds.VE(sigma_min="0.01"), "sigma_min"),
    (lambda: ds.VP(beta_max=None), "beta_max"),
    (lambda: ds.EDM(sigma_max=[80.0]), "sigma_max"),
    (lambda: ds.VE(t_min=True), "t_min"),
])
def test_process_bad_types(make, name):
    with raises(ds.ArgumentTypeError, name) as info:
        make()
    assert isinstance(info.value, TypeError)


def test_process_bad_state():
    with raises(ds.ArgumentTypeError, "x"):
        ds.VP().prior_log_prob([[0.0, 1.0]])
    with raises(ds.InvalidArgumentError, "x"):
        ds.VP().prior_log_prob(torch.zeros(3, 2, dtype=torch.int64))


# ----- Gaussian mixtures --------------------------------------------------------------------
@pytest.mark.parametrize(("args", "name", "what"), [
    # covariances
    (([1.0], [[0.0, 0.0]], [[[1.0, 0.0], [0.0, -1.0]]]), "covs", "positive definite"),
    (([1.0], [[0.0, 0.0]], [[[1.0, 2.0], [2.0, 1.0]]]), "covs", "positive definite"),
    (([1.0], [[0.0, 0.0]], [[[0.0, 0.0], [0.0, 0.0]]]), "covs", "positive definite"),
    (([1.0], [[0.0, 0.0, 0.0]], np.full((1, 3, 3), 0.1)), "covs", "positive definite"),
    (([1.0], [[0.0, 0.0]], [[[1.0, 1.0], [1.0, 1.0]]]), "covs", "positive definite"),
    (([1.0], [[0.0, 0.0]], [[1e-20, 1.0]]), "covs", "positive definite"),
    (([1.0], [[0.0, 0.0]], [[[1.0, 0.5], [0.0, 1.0]]]), "covs", "symmetric"),
    (([1.0], [[0.0, 0.0]], [[1.0, -1.0]]), "covs", "positive definite"),
    (([1.0], [[0.0, 0.0]], [-1.0]), "covs", "positive definite"),
    (([1.0], [[0.0, 0.0]], [[[1.0, float("nan")], [0.0, 1.0]]]), "covs", "finite"),
    # weights
    (([0.5, 0.6], [[0.0], [1.0]], [1.0, 1.0]), "weights", "summing to 1"),
    (([0.2, 0.2], [[0.0], [1.0]], [1.0, 1.0]), "weights", "summing to 1"),
    (([-0.5, 1.5], [[0.0], [1.0]], [1.0, 1.0]), "weights", "non-negative"),
    (([[0.5, 0.5]], [[0.0], [1.0]], [1.0, 1.0]), "weights", "1-D"),
    (([], [[0.0], [1.0]], [1.0, 1.0]), "weights", "1-D"),
    (("abc", [[0.0], [1.0]], [1.0, 1.0]), "weights", "real"),
    # shapes of means and covs against the weights
    (([0.5, 0.5], [[0.0, 0.0]], [EYE2, EYE2]), "means", "(K=2, d)"),
    (([0.5, 0.5], [0.0, 1.0], [1.0, 1.0]), "means", "(K=2, d)"),
    (([0.5, 0.5], [[0.0, 0.0], [1.0, 1.0]], [EYE2]), "covs", "shape"),
    (([0.5, 0.5], [[0.0, 0.0], [1.0, 1.0]], [1.0, 1.0, 1.0]), "covs", "shape"),
    (([0.5, 0.5], [[0.0, 0.0], [1.0, 1.0]], [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]), "covs",
     "shape"),
    (([0.5, 0.5], [[0.0, 0.0], [1.0, 1.0]], np.stack([np.eye(3)] * 2)), "covs", "shape"),
    (([1.0], [[float("inf"), 0.0]], [EYE2]), "means", "finite"),
])
def test_mixture_bad_construction(args, name, what):
    with raises(ds.InvalidArgumentError, name) as info:
        ds.GaussianMixture(*args)
    assert what in str(info.value)


def test_mixture_accepts_rounding_asymmetry_of_float32_covariances():
    a = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    cov = a @ a.T + torch.eye(6)  # float32: symmetric only to rounding
    gm = ds.GaussianMixture([1.0], torch.zeros(1, 6), cov[None])
    assert torch.equal(gm.covs[0], gm.covs[0].mT)


@pytest.mark.parametrize(("call", "exc", "name"), [
    (lambda gm: gm.log_prob(torch.zeros(4, 3)), ds.InvalidArgumentError, "x"),
    (lambda gm: gm.log_prob(torch.zeros(2)), ds.InvalidArgumentError, "x"),
    (lambda gm: gm.log_prob(torch.zeros(4, 2, dtype=torch.int64)), ds.InvalidArgumentError, "x"),
    (lambda gm: gm.log_prob(np.zeros((4, 2))), ds.ArgumentTypeError, "x"),
    (lambda gm: gm.marginal_score(torch.zeros(4, 3), 0.5, ds.VP()), ds.InvalidArgumentError, "x"),
    (lambda gm: gm.marginal_score([[0.0, 0.0]], 0.5, ds.VP()), ds.ArgumentTypeError, "x"),
    (lambda gm: gm.marginal_log_prob(torch.zeros(4, 1), 0.5, ds.VP()), ds.InvalidArgumentError,
     "x"),
    (lambda gm: gm.score_field(ds.VP())(torch.zeros(4, 5), 0.5), ds.InvalidArgumentError, "x"),
    (lambda gm: gm.score_field(ds.VP()).divergence(torch.zeros(4, 1, 3), 0.5),
     ds.InvalidArgumentError, "x"),
    (lambda gm: gm.marginal_score(torch.zeros(4, 2), torch.ones(3), ds.VP()),
     ds.InvalidArgumentError, "t"),
    (lambda gm: gm.marginal_score(torch.zeros(4, 2), "0.5", ds.VP()), ds.ArgumentTypeError, "t"),
    (lambda gm: gm.marginal_score(torch.zeros(4, 2), 0.5, "VP"), ds.InvalidArgumentError,
     "process"),
    (lambda gm: gm.score_field(None), ds.InvalidArgumentError, "process"),
    (lambda gm: ds.GaussianMixtureField("gm", ds.VP()), ds.InvalidArgumentError, "mixture"),
    (lambda gm: gm.sample(0), ds.InvalidArgumentError, "n"),
    (lambda gm: gm.sample(-3), ds.InvalidArgumentError, "n"),
    (lambda gm: gm.sample(2.5), ds.ArgumentTypeError, "n"),
])
def test_mixture_bad_calls(call, exc, name):
    with raises(exc, name):
        call(_gm())


# ----- network adapters ---------------------------------------------------------------------
@pytest.mark.parametrize(("call", "exc", "name"), [
    (lambda: ds.ScoreNetwork(lambda x, t: x, ds.VP(), predicts="noise"), ds.InvalidArgumentError,
     "predicts"),
    (lambda: ds.ScoreNetwork(lambda x, t: x, ds.VP(), predicts="X0"), ds.InvalidArgumentError,
     "predicts"),
    (lambda: ds.ScoreNetwork(lambda x, t: x, ds.VP(), predicts=None), ds.InvalidArgumentError,
     "predicts"),
    (lambda: ds.ScoreNetwork("model", ds.VP()), ds.ArgumentTypeError, "model"),
    (lambda: ds.ScoreNetwork(torch.zeros(3), ds.VP()), ds.ArgumentTypeError, "model"),
    (lambda: ds.ScoreNetwork(lambda x, t: x, "VP"), ds.InvalidArgumentError, "process"),
    (lambda: ds.ScoreNetwork(lambda x, t: x, ds.VP(), time_input=999), ds.ArgumentTypeError,
     "time_input"),
    (lambda: ds.Denoiser(None, ds.EDM()), ds.ArgumentTypeError, "model"),
    (lambda: ds.Denoiser(lambda x, s: x, ds.EDM), ds.InvalidArgumentError, "process"),
    (lambda: ds.ScoreNetwork(lambda x, t: x, ds.VP())(torch.zeros(2, 3), torch.ones(5)),
     ds.InvalidArgumentError, "t"),
    (lambda: par.score_from("noise", *([torch.ones(1)] * 4)), ds.InvalidArgumentError,
     "predicts"),
    (lambda: ds.ScoreNetwork(lambda x, t: x[:, :1], ds.VP())(torch.zeros(2, 3), 0.5),
     ds.InvalidArgumentError, "model"),
    (lambda: ds.ScoreNetwork(lambda x, t: x.numpy(), ds.VP(), "eps")(torch.zeros(2, 3), 0.5),
     ds.ArgumentTypeError, "model"),
    (lambda: ds.Denoiser(lambda x, s: s, ds.EDM())(torch.zeros(2, 3), 0.5),
     ds.InvalidArgumentError, "model"),
])
def test_network_bad_inputs(call, exc, name):
    with raises(exc, name):
        call()


# ----- dynamics ---------------------------------------------------------------------------
class _NoProcess:
    def __call__(self, x, t):
        return x


class _StrProcess(_NoProcess):
    process = "VP"


class _Pseudo(_NoProcess):
    process = ds.EDM()
    exact_score = False


@pytest.mark.parametrize("bad", [None, lambda x, t: x, _NoProcess(), _StrProcess(), _gm(),
                                 ds.VP()], ids=["None", "function", "no-process", "str-process",
                                                "mixture", "process"])
@pytest.mark.parametrize("cls", [ds.ProbabilityFlowODE, ds.ReverseSDE], ids=["ode", "sde"])
def test_dynamics_refuse_non_fields(cls, bad):
    with raises(ds.ArgumentTypeError, "field"):
        cls(bad)
    with raises(ds.ArgumentTypeError, "score"):
        check_field(bad, "score")


def test_reverse_sde_refuses_pseudo_score():
    with raises(ds.IncompatibleError, "field") as info:
        ds.ReverseSDE(_Pseudo())
    assert "exact_score" in str(info.value)
