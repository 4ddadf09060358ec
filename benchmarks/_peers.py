"""Load peer libraries for benchmarks: k-diffusion's ``sampling`` module without its heavy package
``__init__`` (installed with ``pip install --no-deps k-diffusion``), and torchdiffeq."""

from __future__ import annotations

import importlib.util
import math
import sys
import types

import torch


def _append_dims(x, target_dims):
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def load_k_diffusion_sampling():
    """Return ``k_diffusion.sampling`` (importing the package normally if it works)."""
    try:
        from k_diffusion import sampling  # type: ignore

        return sampling
    except Exception:  # the package __init__ needs optional heavy dependencies
        pass
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed: pip install --no-deps k-diffusion")
    root = spec.submodule_search_locations[0]
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = [root]
    pkg.__spec__ = spec  # so that a later importlib.util.find_spec("k_diffusion") still works
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = _append_dims
    pkg.utils = utils
    sys.modules.setdefault("k_diffusion", pkg)
    sys.modules.setdefault("k_diffusion.utils", utils)
    sspec = importlib.util.spec_from_file_location("k_diffusion.sampling", f"{root}/sampling.py")
    module = importlib.util.module_from_spec(sspec)
    sys.modules["k_diffusion.sampling"] = module
    sspec.loader.exec_module(module)
    return module


class CountingDenoiser:
    """``model(x, sigma) -> x0`` for k-diffusion, counting batched calls."""

    def __init__(self, field):
        self.field, self.calls = field, 0

    def __call__(self, x, sigma):
        self.calls += 1
        sigma = sigma.reshape(-1).expand(x.shape[0]) if sigma.numel() == 1 else sigma
        s = self.field(x, sigma)
        return x + sigma.reshape(-1, *([1] * (x.ndim - 1))).square() * s


def edm_ode_in(field, time_variable: str, sigma_max: float, sigma_min: float):
    """The EDM probability-flow ODE of ``field`` in ``time_variable`` (for peer integrators).

    Returns ``(rhs, u0, u1, encode, decode)`` with ``rhs(u, y)`` for a per-row time ``u`` of shape
    ``(B,)``: ``"t"`` is sigma itself (``dx/dsigma = (x - D) / sigma``), ``"log_sigma"`` is
    ``u = log sigma`` (``dx/du = x - D``) and ``"snr"`` is ``w = 1 / sigma``, ``z = x / sigma``
    (``dz/dw = D(z / w, 1 / w)``), the same coordinates as difsolve's ``time_variable``.
    """

    def denoise(x, sigma):
        return x + sigma[:, None].square() * field(x, sigma)

    if time_variable == "t":
        return ((lambda u, y: (y - denoise(y, u)) / u[:, None]), sigma_max, sigma_min,
                (lambda x: x), (lambda y: y))
    if time_variable == "log_sigma":
        return ((lambda u, y: y - denoise(y, u.exp())), math.log(sigma_max), math.log(sigma_min),
                (lambda x: x), (lambda y: y))
    if time_variable == "snr":
        return ((lambda w, z: denoise(z / w[:, None], 1.0 / w)), 1.0 / sigma_max, 1.0 / sigma_min,
                (lambda x: x / sigma_max), (lambda z: z * sigma_min))
    raise ValueError(f"unknown time variable {time_variable!r}")


def torchdiffeq_solve(field, x_t, time_variable, tol, sigma_max=80.0, sigma_min=0.002):
    """torchdiffeq ``dopri5`` (one step size for the batch) in ``time_variable``:
    ``(x at sigma_min, batched evaluations)``."""
    from torchdiffeq import odeint

    rhs, u0, u1, encode, decode = edm_ode_in(field, time_variable, sigma_max, sigma_min)
    calls = [0]

    def f(u, y):
        calls[0] += 1
        return rhs(u.expand(y.shape[0]), y)

    span = torch.tensor([u0, u1], dtype=x_t.dtype)
    y = odeint(f, encode(x_t), span, rtol=tol, atol=tol, method="dopri5")[-1]
    return decode(y), calls[0]


def torchode_solve(field, x_t, time_variable, tol, pi=None, sigma_max=80.0, sigma_min=0.002):
    """torchode ``Dopri5`` with per-sample step control in ``time_variable`` (``pi``: a
    ``(pcoeff, icoeff)`` PID controller, else torchode's integral controller):
    ``(x at sigma_min, mean evaluations per sample, batched evaluations)``.

    torchode evaluates every row at every call; the per-sample count is what each row's own steps
    cost (2 for the initial step size + 6 per step, FSAL), the work a solver that drops finished
    rows would do."""
    import torchode as to

    rhs, u0, u1, encode, decode = edm_ode_in(field, time_variable, sigma_max, sigma_min)
    term = to.ODETerm(rhs)
    step = to.Dopri5(term=term)
    if pi is None:
        ctrl = to.IntegralController(atol=tol, rtol=tol, term=term)
    else:
        ctrl = to.PIDController(atol=tol, rtol=tol, pcoeff=pi[0], icoeff=pi[1], dcoeff=0.0,
                                term=term)
    solver = to.AutoDiffAdjoint(step, ctrl, max_steps=100_000)
    b = x_t.shape[0]
    t_eval = torch.tensor([u0, u1], dtype=x_t.dtype).expand(b, 2)
    sol = solver.solve(to.InitialValueProblem(y0=encode(x_t), t_eval=t_eval))
    per_sample = (sol.stats["n_initialized"] + 6 * sol.stats["n_steps"]).double().mean()
    return decode(sol.ys[:, -1]), float(per_sample), int(sol.stats["n_f_evals"].max())
