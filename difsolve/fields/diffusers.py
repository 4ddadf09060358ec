r"""diffusers models and schedulers as difsolve score fields (diffusers is optional).

``from_diffusers(model, scheduler)`` wraps a diffusers UNet / transformer trained on the
scheduler's DDPM table: the process is ``DiscreteVP.from_diffusers(scheduler)`` (time = the
timestep index, a float in ``[0, n - 1]``) and the prediction type is read from
``scheduler.config.prediction_type`` (``"epsilon"``, ``"v_prediction"``, ``"sample"``). The model
is called as ``model(x, timestep=t, **cond)`` with ``t`` a float tensor ``(B,)`` (diffusers' time
embeddings are continuous, so an integer ``t`` gives exactly what the scheduler's integer timestep
gives, and non-integer times from adaptive solvers are interpolated); ``cond`` carries e.g.
``encoder_hidden_states`` or ``class_labels``. Outputs (``UNet2DOutput``, ``Transformer2DModelOutput``
or ``return_dict=False`` tuples) are unwrapped to ``.sample``; a learned-variance output with
twice the channels of ``x`` keeps its first half (the prediction), as diffusers' schedulers do.

:func:`diffusers_timesteps` turns a scheduler's inference timesteps into a difsolve grid: with
``DDIMScheduler`` (``eta=0``) and ``DPMSolver(1)`` (DPM-Solver++(1) is DDIM) on that grid plus the
final Tweedie denoise, difsolve reproduces the scheduler's samples to round-off.

Nothing here imports diffusers: the objects are duck-typed (a scheduler needs ``alphas_cumprod``
and ``config.prediction_type``; install with ``pip install difsolve[diffusers]``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._errors import ArgumentTypeError, check
from ..processes import DiscreteVP, Process
from .network import DiscreteDenoiser

__all__ = ["PREDICTION_TYPES", "DiffusersModel", "diffusers_timesteps", "from_diffusers"]

#: diffusers' ``prediction_type`` -> difsolve's ``predicts``
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def _unwrap(out):
    """The tensor of a diffusers model output (``.sample`` / first tuple entry)."""
    if hasattr(out, "sample") and not isinstance(out, torch.Tensor):
        return out.sample
    if isinstance(out, (tuple, list)) and len(out) >= 1:
        return out[0]
    return out


class DiffusersModel:
    """A diffusers model as a plain ``(x, t, **cond) -> Tensor`` callable.

    Calls ``model(x, timestep=t, **cond)`` with ``x`` (and floating-point ``cond`` tensors) cast
    to the model's dtype and ``t`` as float32 (float64 when ``x`` is); unwraps ``.sample`` and
    tuples, drops the learned-variance half of a ``2C``-channel output, and returns the result in
    the dtype of ``x``.
    """

    def __init__(self, model: Callable):
        if not callable(model):
            raise ArgumentTypeError(
                f"argument `model` must be a callable diffusers model, got {type(model).__name__}")
        self.model = model

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        dtype = getattr(self.model, "dtype", x.dtype)
        dtype = dtype if isinstance(dtype, torch.dtype) else x.dtype
        cond = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                for k, v in cond.items()}
        ts = t.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        out = _unwrap(self.model(x.to(dtype), timestep=ts, **cond))
        if not isinstance(out, torch.Tensor):
            return out  # the shared output check names the problem
        if (out.ndim == x.ndim >= 2 and out.shape[1] == 2 * x.shape[1]
                and out.shape[2:] == x.shape[2:]):
            out = out[:, : x.shape[1]]  # learned variance: (prediction, variance) channels
        return out.to(x.dtype)

    def __repr__(self) -> str:
        return f"DiffusersModel({type(self.model).__name__})"


def _prediction_type(scheduler) -> str:
    config = getattr(scheduler, "config", None)
    kind = getattr(config, "prediction_type", None)
    if kind is None and isinstance(config, dict):
        kind = config.get("prediction_type")
    check(kind in PREDICTION_TYPES, "scheduler",
          f"a scheduler whose config.prediction_type is one of {tuple(PREDICTION_TYPES)}", kind)
    return PREDICTION_TYPES[kind]


def from_diffusers(model: Callable, scheduler, *, process: Process | None = None
                   ) -> DiscreteDenoiser:
    r"""The score field of a diffusers ``model`` trained on ``scheduler``'s table.

    ``process`` defaults to ``DiscreteVP.from_diffusers(scheduler)`` (time = timestep index);
    pass e.g. ``ds.EDM(field.schedule.sigma_min, field.schedule.sigma_max)`` to sample in sigma
    time with k-diffusion's input scaling (see :class:`~difsolve.DiscreteDenoiser`).
    The scheduler's ``clip_sample`` and ``thresholding`` options (modifications of the data
    prediction, not part of the ODE) are not applied.
    """
    predicts = _prediction_type(scheduler)
    table = DiscreteVP.from_diffusers(scheduler)
    field = DiscreteDenoiser(DiffusersModel(model), table, predicts,
                             process=table if process is None else process)
    field.scheduler = scheduler
    return field


def diffusers_timesteps(scheduler, num_inference_steps: int) -> torch.Tensor:
    r"""The difsolve grid (float64, descending) of ``scheduler.set_timesteps(num_inference_steps)``.

    diffusers decides which integer timesteps a run uses from ``config.timestep_spacing``:
    ``"leading"`` ``t_i = i * (n // N) + steps_offset`` (DDIM's default), ``"trailing"``
    ``t_i = round(n - i n / N) - 1``, ``"linspace"`` ``round(linspace(0, n - 1, N + 1))[1:]``
    (DPM-Solver's default); the grid is those timesteps, largest first. The scheduler's last
    step goes either to clean data (DDIM ``set_alpha_to_one=True``, DPM-Solver
    ``final_sigmas_type="zero"``: the data prediction at the last timestep, which is difsolve's
    final Tweedie ``denoise``) or to timestep 0 (``set_alpha_to_one=False`` /
    ``final_sigmas_type="sigma_min"``: then 0 is appended here, and no denoise follows).
    Exact for schedulers that step between consecutive timesteps (DPM-Solver multistep, UniPC,
    Euler); ``DDIMScheduler`` always steps from ``t`` to ``t - n // N``, which matches only when
    the gaps are ``n // N`` ("leading", or "trailing" with ``N`` dividing ``n``; not
    "linspace"). Calls ``scheduler.set_timesteps`` (which changes the scheduler's state, as a
    pipeline does).
    """
    set_timesteps = getattr(scheduler, "set_timesteps", None)
    if not callable(set_timesteps):
        raise ArgumentTypeError(
            f"argument `scheduler` must be a diffusers scheduler (with set_timesteps), got "
            f"{type(scheduler).__name__}")
    set_timesteps(num_inference_steps)
    grid = torch.as_tensor(scheduler.timesteps).detach().to("cpu", torch.float64)
    if not ends_at_data(scheduler) and float(grid[-1]) > 0:
        grid = torch.cat([grid, grid.new_zeros(1)])
    return grid


def ends_at_data(scheduler) -> bool:
    """Whether the scheduler's last step returns the data prediction (alpha = 1, sigma = 0)."""
    config = getattr(scheduler, "config", None)
    if getattr(config, "final_sigmas_type", "zero") == "sigma_min":
        return False
    final = getattr(scheduler, "final_alpha_cumprod", None)
    return final is None or float(final) == 1.0
