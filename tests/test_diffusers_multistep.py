"""diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint) at 20 steps is
``ds.DPMSolver(2, variant="midpoint")`` on the scheduler's own timesteps (issues 12 and 13).

diffusers' default ``final_sigmas_type="zero"`` makes its last step first order to sigma = 0,
i.e. the data prediction at the last timestep: difsolve's final Tweedie denoise. Its first step is
first order (no history yet), as difsolve's multistep warm start.
"""

from __future__ import annotations

import pytest
import torch
from test_diffusers import ROUNDOFF, assert_roundoff, difsolve_run, scheduler_loop, tiny_unet, x_T

import difsolve as ds

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is the optional extra difsolve[diffusers]; "
    "pip install diffusers to run the parity tests")


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@torch.no_grad()
def test_dpmsolver_multistep_2m_midpoint_20_steps(unet, prediction_type):
    sched = diffusers.DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
        prediction_type=prediction_type)
    x = x_T()
    ref = scheduler_loop(unet, sched, x.clone(), 20)
    grid = ds.diffusers_timesteps(sched, 20)
    assert grid.numel() == 20 and float(grid[0]) == 999.0
    got, sol = difsolve_run(ds.from_diffusers(unet, sched), grid, x,
                            ds.DPMSolver(2, variant="midpoint"), denoise=True)
    assert sol.stats.nfe + 1 == 20
    assert_roundoff(got, ref)
    # the other 2M variant is a different method: the comparison can fail
    other, _ = difsolve_run(ds.from_diffusers(unet, sched), grid, x,
                            ds.DPMSolver(2, variant="heun"), denoise=True)
    assert float((other - ref).abs().max()) > 100 * ROUNDOFF * float(ref.abs().max())
