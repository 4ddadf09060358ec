"""Network adapters forward conditioning (``field(x, t, **cond)`` -> ``model(..., **cond)``) and
check model outputs in one place (issues 11 and 12)."""

from __future__ import annotations

import pytest
import torch

import difsolve as ds


class Recorder:
    """A model returning ``x * scale[label]`` that records what it was called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, *, label, shift=0.0):
        self.calls.append((x, t, label, shift))
        scale = torch.tensor([0.5, 2.0], dtype=x.dtype)[label]
        return x * scale.reshape(-1, *([1] * (x.ndim - 1))) + shift


def _fields(model):
    vp = ds.DiscreteVP.linear()
    return {
        "ScoreNetwork": ds.ScoreNetwork(model, ds.VP(), predicts="eps"),
        "Denoiser": ds.Denoiser(model, ds.EDM()),
        "PoissonField": ds.PoissonField(model, D=128),
        "DiscreteDenoiser": ds.DiscreteDenoiser(model, vp),
        "DiscreteDenoiser-on-table": ds.DiscreteDenoiser(model, vp, process=vp),
    }


@pytest.mark.parametrize("name", list(_fields(Recorder())))
def test_conditioning_reaches_the_model(name):
    model = Recorder()
    field = _fields(model)[name]
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 0.5 if name in ("ScoreNetwork",) else 5.0)
    label = torch.tensor([0, 1])
    s = field(x, t, label=label, shift=0.25)
    d = ds.fields.denoise(field, x, t, label=label, shift=0.25)
    assert s.shape == x.shape and d.shape == x.shape
    assert all(c[2] is label and c[3] == 0.25 for c in model.calls)
    # the label changes the result (per row)
    s2 = field(x, t, label=torch.tensor([1, 1]), shift=0.25)
    assert not torch.allclose(s2[0], s[0]) and torch.allclose(s2[1], s[1])
    with pytest.raises(TypeError):
        field(x, t)  # the model needs its label


def test_empirical_poisson_field_refuses_conditioning():
    field = ds.PoissonField.from_data(torch.randn(5, 2), D=16)
    with pytest.raises(ds.DifsolveError, match="cond"):
        field(torch.randn(3, 2), torch.ones(3), label=torch.zeros(3))


def test_poisson_network_output_is_checked():
    field = ds.PoissonField(lambda x, s: x[:, :1], D=16)
    with pytest.raises(ds.DifsolveError, match=r"`denoiser`.*shape"):
        field(torch.randn(3, 2), torch.ones(3))
