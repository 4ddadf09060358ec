"""diffusers models and schedulers through ds.from_diffusers (issue 12).

Ground truth: diffusers' own schedulers and k-diffusion's own DiscreteEpsDDPMDenoiser, run on a
tiny randomly initialised ``UNet2DModel`` (float32, 4-D) from the same ``x_T``. DDIM with
``eta = 0`` is first-order DPM-Solver++ in data prediction (REFERENCE.md), so
``ds.DPMSolver(1)`` on the scheduler's own timesteps, followed by the final Tweedie denoise (the
scheduler's last step to ``alpha = 1``), must reproduce it to float32 round-off.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import difsolve as ds

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is the optional extra difsolve[diffusers]; "
    "pip install diffusers to run the parity tests")

#: float32 round-off accumulated over 50 steps, relative to the largest value of the result
ROUNDOFF = 2e-5


def tiny_unet(seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                  layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    config.update(kwargs)
    return diffusers.UNet2DModel(**config).eval()


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def x_T(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def scheduler_loop(unet, scheduler, x, steps: int, **cond) -> torch.Tensor:
    """diffusers' sampling loop, as its pipelines write it."""
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        out = unet(x, t, **cond).sample
        x = scheduler.step(out, t, x).prev_sample
    return x


def difsolve_run(field, grid, x, solver, denoise: bool, cond=None
                 ) -> tuple[torch.Tensor, ds.Solution]:
    """``ds.solve`` on an explicit grid, then (optionally) the final Tweedie denoise."""
    sol = ds.solve(ds.ProbabilityFlowODE(field), x, grid[0], grid[-1], solver=solver, steps=grid,
                   cond=cond)
    return (ds.fields.denoise(field, sol.x, sol.t, **(cond or {})) if denoise else sol.x), sol


def assert_roundoff(got, ref, rel=ROUNDOFF):
    err = float((got - ref).abs().max())
    assert err <= rel * float(ref.abs().max()), (err, float(ref.abs().max()))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@torch.no_grad()
def test_ddim_50_steps_is_dpm_solver_1(unet, prediction_type):
    sched = diffusers.DDIMScheduler(clip_sample=False, prediction_type=prediction_type)
    x = x_T()
    ref = scheduler_loop(unet, sched, x.clone(), 50)
    field = ds.from_diffusers(unet, sched)
    assert isinstance(field.process, ds.DiscreteVP) and field.process.n == 1000
    grid = ds.diffusers_timesteps(sched, 50)
    torch.testing.assert_close(grid, torch.arange(980, -1, -20, dtype=torch.float64))
    got, sol = difsolve_run(field, grid, x, ds.DPMSolver(1), denoise=True)
    assert sol.stats.nfe + 1 == 50  # the same 50 network evaluations
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert_roundoff(got, ref)
    # the same through ds.sample: this grid ends at t_min = 0, where sample's denoise happens
    sol = ds.sample(field, solver=ds.DPMSolver(1), steps=grid, x_T=x, t_start=float(grid[0]))
    assert sol.stats.nfe == 50
    assert_roundoff(sol.x, ref)


@pytest.mark.parametrize("spacing, offset, alpha_one", [
    ("trailing", 0, True), ("trailing", 0, False), ("leading", 1, False), ("leading", 1, True)])
@torch.no_grad()
def test_ddim_timestep_spacings_map_to_explicit_grids(unet, spacing, offset, alpha_one):
    """``timestep_spacing``, ``steps_offset`` and ``set_alpha_to_one`` decide the grid and whether
    the last step is the denoise (alpha = 1) or a step to timestep 0. (DDIM always steps from
    ``t`` to ``t - n // N``, so only spacings whose gaps are ``n // N`` are consistent there.)"""
    sched = diffusers.DDIMScheduler(clip_sample=False, timestep_spacing=spacing,
                                    steps_offset=offset, set_alpha_to_one=alpha_one)
    x = x_T()
    ref = scheduler_loop(unet, sched, x.clone(), 10)
    grid = ds.diffusers_timesteps(sched, 10)
    torch.testing.assert_close(grid[:10], sched.timesteps.double())
    assert grid.numel() == (10 if alpha_one or float(grid[9]) == 0 else 11)
    got, _ = difsolve_run(ds.from_diffusers(unet, sched), grid, x, ds.DPMSolver(1),
                          denoise=alpha_one)
    assert_roundoff(got, ref)


@torch.no_grad()
def test_class_conditioning_is_forwarded():
    unet = tiny_unet(num_class_embeds=4)
    sched = diffusers.DDIMScheduler(clip_sample=False)
    labels = torch.tensor([1, 3])
    x = x_T()
    ref = scheduler_loop(unet, sched, x.clone(), 10, class_labels=labels)
    field = ds.from_diffusers(unet, sched)
    grid = ds.diffusers_timesteps(sched, 10)
    got, _ = difsolve_run(field, grid, x, ds.DPMSolver(1), True, cond={"class_labels": labels})
    assert_roundoff(got, ref)
    other, _ = difsolve_run(field, grid, x, ds.DPMSolver(1), True,
                            cond={"class_labels": torch.tensor([0, 2])})
    assert float((other - got).abs().max()) > 1e-3 * float(got.abs().max())


@torch.no_grad()
def test_outputs_are_unwrapped_and_learned_variance_is_dropped(unet):
    sched = diffusers.DDIMScheduler()
    x, t = x_T(), torch.tensor([500.0, 21.5])
    plain = ds.from_diffusers(unet, sched)(x, t)

    def as_tuple(sample, timestep, **cond):
        return unet(sample, timestep, return_dict=False, **cond)

    torch.testing.assert_close(ds.from_diffusers(as_tuple, sched)(x, t), plain, rtol=0, atol=0)
    wide = tiny_unet(out_channels=6)

    def first_half(sample, timestep):
        return wide(sample, timestep).sample[:, :3]

    torch.testing.assert_close(ds.from_diffusers(wide, sched)(x, t),
                               ds.from_diffusers(first_half, sched)(x, t), rtol=0, atol=0)


@torch.no_grad()
def test_non_integer_times_reach_the_model_as_floats(unet):
    """Adaptive solvers evaluate between timesteps: the model sees the float timestep."""
    seen = []

    def spy(sample, timestep):
        seen.append(timestep)
        return unet(sample, timestep)

    sched = diffusers.DDIMScheduler()
    ds.from_diffusers(spy, sched)(x_T(), torch.tensor([10.25, 998.5]))
    assert seen[0].dtype == torch.float32
    torch.testing.assert_close(seen[0], torch.tensor([10.25, 998.5]))


def test_bad_models_and_schedulers_are_refused(unet):
    sched = diffusers.DDIMScheduler()
    x, t = x_T(), torch.tensor([10.0, 20.0])
    flow = diffusers.DDIMScheduler()
    flow.register_to_config(prediction_type="flow")
    with pytest.raises(ds.DifsolveError, match=r"scheduler.*prediction_type"):
        ds.from_diffusers(unet, flow)
    with pytest.raises(ds.DifsolveError, match="scheduler"):
        ds.from_diffusers(unet, object())
    with pytest.raises(ds.DifsolveError, match=r"model.*shape of x \(2, 3, 16, 16\).*\(2, 1\)"):
        ds.from_diffusers(lambda sample, timestep: torch.zeros(2, 1), sched)(x, t)
    process = ds.DiscreteVP.from_diffusers(sched)
    bad_outputs = [
        (lambda x, t: (x,), ds.ArgumentTypeError, "tuple"),
        (lambda x, t: unet(x, t), ds.ArgumentTypeError, "sample"),
        (lambda x, t: x[:, :1], ds.InvalidArgumentError, "shape"),
        (lambda x, t: x.double(), ds.InvalidArgumentError, "dtype"),
    ]
    for model, error, match in bad_outputs:
        for field in (ds.ScoreNetwork(model, process, predicts="eps"),
                      ds.DiscreteDenoiser(model, process),
                      ds.Denoiser(lambda y, s, m=model: m(y, s), process)):
            with pytest.raises(error, match=f"`model`.*{match}"):
                field(x, t)


# ----- the k-diffusion route: the same model, sampled in sigma time -------------------------
def load_kdiffusion_external():
    from test_kdiffusion import load_kdiffusion_sampling

    sampling = load_kdiffusion_sampling()
    package = sampling.__name__.rsplit(".", 1)[0]
    name = f"{package}.external"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(sampling.__file__).with_name("external.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sampling, sys.modules[name]


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@torch.no_grad()
def test_discrete_denoiser_on_edm_is_kdiffusions_discrete_eps_denoiser(unet, sampler):
    sampling, external = load_kdiffusion_external()
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                    beta_end=0.012)
    kmodel = external.DiscreteEpsDDPMDenoiser(lambda x, t: unet(x, t).sample,
                                              sched.alphas_cumprod, quantize=False)
    field = ds.from_diffusers(unet, sched, process=ds.EDM(float(kmodel.sigma_min),
                                                          float(kmodel.sigma_max)))
    sigmas = sampling.get_sigmas_karras(12, float(kmodel.sigma_min), float(kmodel.sigma_max))
    x = x_T() * sigmas[0]
    ref = getattr(sampling, f"sample_{sampler}")(kmodel, x.clone(), sigmas, disable=True)
    solver = ds.Euler() if sampler == "euler" else ds.Heun()
    # k-diffusion's last step to sigma = 0 is Euler to the data prediction: difsolve's denoise
    got, _ = difsolve_run(field, sigmas[:-1].double(), x, solver, denoise=True)
    assert_roundoff(got, ref)


def test_the_example_runs_and_agrees_with_ddim(tmp_path, capsys):
    path = Path(__file__).resolve().parent.parent / "examples" / "pretrained_diffusers.py"
    spec = importlib.util.spec_from_file_location("pretrained_diffusers_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(quick=True, out=tmp_path)
    text = capsys.readouterr().out
    diff = float(text.split("max |diff| / max |x| = ")[1].split()[0])
    assert diff < ROUNDOFF
    assert (tmp_path / "pretrained_diffusers.png").stat().st_size > 1000
    assert (tmp_path / "pretrained_conditional.png").stat().st_size > 1000


@torch.no_grad()
def test_state_dtype_differs_from_the_model_dtype(unet):
    """A float64 state with a float32 model: inputs cast to the model, output back to float64."""
    sched = diffusers.DDIMScheduler()
    field = ds.from_diffusers(unet, sched)
    x, t = x_T(), torch.tensor([500.0, 21.0])
    s32 = field(x, t)
    s64 = field(x.double(), t.double())
    assert s64.dtype == torch.float64
    torch.testing.assert_close(s64, s32.double(), rtol=1e-5, atol=1e-5)
