"""Loop overhead per field evaluation, side by side with the peers in one run (issue 14).

The field is nearly free (a linear drift on a float32 batch), so what is measured is the cost of
the solve loop itself: per evaluation, wall time minus the cost of calling the field alone.

1. Fixed-step ODE (Euler): difsolve, torchdiffeq ``odeint(method="euler")``, k-diffusion
   ``sample_euler``, and a bare Python loop ``x = x + h * f(x)``.
2. Fixed-step SDE (Euler-Maruyama, fresh Gaussian increments): difsolve against torchsde
   ``sdeint(method="euler")``.
3. Adaptive: difsolve ``DPMSolver(3, corrector=True)`` under a PI controller in log-sigma time
   against torchode's Dopri5 integrating the same probability-flow ODE in the same time variable
   (log sigma), on an exact Gaussian field: time of the whole solve, per step and per evaluation.
4. A small random diffusers U-Net on a fixed grid: ``ds.sample`` against NFE x one network call
   (with ``--device cuda`` on a GPU, also the solve recorded as a CUDA graph, ``ds.CapturedSolve``).

Run: ``python benchmarks/bench_overhead.py [--quick] [--device cuda]`` (about 1 minute; ``--quick``
a few seconds).
Figures are ratios within one run; absolute microseconds depend on the machine and its load.

Expected time: full about 1 min, --quick a few seconds.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _peers import load_k_diffusion_sampling

import difsolve as ds


class Linear:
    """``dx/dt = -x``: one elementwise op per evaluation."""

    def drift(self, x, t):
        return -x


class LinearSDE(Linear):
    """``dx = -x dt + dw``."""

    noise = "additive"

    def diffusion(self, t):
        return torch.ones_like(t)


def race(fns: dict, repeats: int, device: str = "cpu") -> dict[str, float]:
    """Best time of each callable over ``repeats`` interleaved rounds (every contender runs once
    per round, so a change in the machine's load affects all of them alike). On the CPU the time
    is the process's CPU time (one thread: ``torch.set_num_threads(1)``), which other processes
    on the machine do not inflate; on CUDA it is wall time up to a device synchronisation."""
    clock = time.process_time
    if device == "cuda":
        def clock():
            torch.cuda.synchronize()
            return time.perf_counter()
    for fn in fns.values():
        fn()  # warm-up
    best = dict.fromkeys(fns, math.inf)
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            best[name] = min(best[name], clock() - start)
    return best


def fixed_ode(batch: int, n: int, repeats: int) -> dict[str, float]:
    x0 = torch.randn(batch, 2)
    dyn = Linear()
    ts = torch.linspace(1.0, 0.0, n + 1)
    hs = (ts[1:] - ts[:-1]).tolist()
    t_b = torch.ones(batch)

    def field_only():
        for _ in range(n):
            dyn.drift(x0, t_b)

    def bare():
        x = x0
        for h in hs:
            x = x + h * dyn.drift(x, t_b)

    def ours():
        ds.solve(dyn, x0, 1.0, 0.0, solver=ds.Euler(), steps=n)

    from torchdiffeq import odeint

    def torchdiffeq_euler():
        odeint(lambda t, x: dyn.drift(x, t), x0, ts, method="euler")

    kd = load_k_diffusion_sampling()
    sigmas = torch.linspace(1.0, 0.01, n + 1)

    def k_diffusion_euler():
        kd.sample_euler(lambda x, s: 0.5 * x, x0, sigmas, disable=True)

    times = race({"field": field_only, "bare loop": bare, "difsolve Euler": ours,
                  "torchdiffeq euler": torchdiffeq_euler,
                  "k-diffusion sample_euler": k_diffusion_euler}, repeats)
    base = times.pop("field")
    out = {name: (wall - base) / n * 1e6 for name, wall in times.items()}
    out["field"] = base / n * 1e6
    return out


def fixed_sde(batch: int, n: int, repeats: int) -> dict[str, float]:
    import torchsde

    x0 = torch.randn(batch, 2)
    dyn = LinearSDE()
    t_b = torch.ones(batch)

    class TorchsdeSDE(torch.nn.Module):
        noise_type, sde_type = "diagonal", "ito"

        def f(self, t, y):
            return -y

        def g(self, t, y):
            return torch.ones_like(y)

    sde = TorchsdeSDE()

    def field_only():
        for _ in range(n):
            dyn.drift(x0, t_b)

    def ours():
        ds.solve(dyn, x0, 0.0, 1.0, solver=ds.EulerMaruyama(), steps=n, generator=0)

    def torchsde_euler():
        torchsde.sdeint(sde, x0, torch.tensor([0.0, 1.0]), method="euler", dt=1.0 / n)

    times = race({"field": field_only, "difsolve EulerMaruyama": ours,
                  "torchsde euler": torchsde_euler}, repeats)
    base = times.pop("field")
    return {name: (wall - base) / n * 1e6 for name, wall in times.items()}


class StandardGaussianField:
    """Exact score of N(0, I) data under ``process``: ``-x / (a^2 + b^2)`` (nearly free)."""

    def __init__(self, process):
        self.process = process

    def __call__(self, x, t):
        a, b = self.process.marginal(t)
        return -x / (a * a + b * b)[:, None]


def _adaptive_problem(batch: int):
    process = ds.EDM()
    x0 = process.prior_sample((batch, 2), generator=torch.Generator().manual_seed(0))
    return process, StandardGaussianField(process), x0


def _adaptive_runs(batch: int, rtol: float) -> dict:
    """The two adaptive solves, as callables returning their results: difsolve's DPMSolver(3)
    with its corrector under a PI controller, and torchode's Dopri5 under its PID controller,
    both integrating the EDM probability-flow ODE of N(0, I) data in log sigma."""
    import torchode as to

    process, field, x0 = _adaptive_problem(batch)
    ctrl = ds.PIController(rtol=rtol, atol=rtol, pcoeff=0.3, icoeff=0.4, safety=0.8)

    def ours():
        return ds.sample(field, x_T=x0, solver=ds.DPMSolver(3, corrector=True),
                         controller=ctrl, denoise=False)

    ode = ds.dynamics.LogSigmaTime(ds.ProbabilityFlowODE(field))
    u0 = float(ode.to_u(torch.tensor(process.t_max)))
    u1 = float(ode.to_u(torch.tensor(process.t_min)))

    def f(u, x):
        return ode.drift(x, u)

    term = to.ODETerm(f)
    controller = to.PIDController(atol=rtol, rtol=rtol, pcoeff=0.3, icoeff=0.4, dcoeff=0.0,
                                  term=term)
    adjoint = to.AutoDiffAdjoint(to.Dopri5(term=term), controller)
    t_eval = torch.tensor([[u0, u1]]).expand(batch, 2)

    def torchode_run():
        return adjoint.solve(to.InitialValueProblem(y0=x0, t_eval=t_eval))

    return {"ours": ours, "torchode": torchode_run}


def adaptive(batch: int, repeats: int, rtol: float) -> dict[str, tuple]:
    runs = _adaptive_runs(batch, rtol)
    result = {}
    times = race({name: (lambda name=name, run=run: result.__setitem__(name, run()))
                  for name, run in runs.items()}, repeats)
    sol = result["ours"]
    nfe = float(sol.stats.nfe_per_sample.float().mean())
    steps = float(sol.stats.steps.float().mean())
    ref = result["torchode"].stats
    t_nfe = float(ref["n_f_evals"].float().mean())
    t_steps = float(ref["n_steps"].float().mean())
    # the exact end point: x(sigma) = x_T sqrt((1 + sigma^2) / (1 + sigma_T^2)) for N(0, I) data
    process, _, x0 = _adaptive_problem(batch)
    s0, s1 = process.sigma(torch.tensor(process.t_max)), process.sigma(torch.tensor(process.t_min))
    exact = x0 * torch.sqrt((1 + s1**2) / (1 + s0**2))

    def error(x):
        return float(((x - exact).norm(dim=1) / exact.norm(dim=1)).max())

    return {"difsolve DPMSolver(3)+C PI (log_sigma)": (times["ours"], nfe, steps,
                                                       error(sol.x)),
            "torchode Dopri5 PID (log_sigma)": (times["torchode"], t_nfe, t_steps,
                                                error(result["torchode"].ys[:, -1]))}


_VIEWS = {"aten.select.int", "aten.view.default", "aten.slice.Tensor", "aten.expand.default",
          "aten.unsqueeze.default", "aten.alias.default"}


def op_counts(batch: int, rtol: float) -> dict[str, float]:
    """Tensor operations (aten calls, views left out) per step of the adaptive solves of
    :func:`adaptive`, counted by a dispatch mode: the loop's bookkeeping in units that do not
    depend on the machine's load."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += str(func) not in _VIEWS
            return func(*args, **(kwargs or {}))

    out = {}
    for name, run in _adaptive_runs(batch, rtol).items():
        with Count() as count:
            result = run()
        steps = (float(result.stats.steps.float().max()) if name == "ours"
                 else float(result.stats["n_steps"].float().max()))
        out[name] = count.n / steps
    return out


def small_unet(steps: int, repeats: int, device: str = "cpu") -> dict[str, float]:
    """A small random diffusers U-Net (3 x 32 x 32, batch 8) sampled by DPM-Solver++(2M) on a
    fixed grid: time of ``ds.sample`` against ``NFE x`` the cost of one U-Net call, timed as NFE
    calls in a row (the best of several single calls would favour the calls; the issue's
    GPU criterion; on the CPU the U-Net dominates). On CUDA also the fixed-step solve recorded
    as a CUDA graph (:class:`ds.CapturedSolve`) and replayed."""
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8).eval().to(device)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    field = ds.from_diffusers(unet, scheduler)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    t = torch.full((8,), 500.0, device=device)
    result = {}

    def calls():  # NFE calls in a row: the same count of calls as the solve, timed as one
        with torch.no_grad():
            for _ in range(steps):
                unet(x, t)

    def ours():
        result["sol"] = ds.sample(field, x_T=x, solver=ds.DPMSolver(2), steps=steps,
                                  denoise=False)

    fns = {"calls": calls, "sample": ours}
    if device == "cuda":
        process = field.process
        captured = ds.CapturedSolve(ds.ProbabilityFlowODE(field), x, process.t_max,
                                    process.t_min, solver=ds.DPMSolver(2), steps=steps,
                                    schedule="karras")
        fns["captured"] = lambda: captured(x)
    times = race(fns, repeats, device)
    return {"nfe": result["sol"].stats.nfe, "call": times.pop("calls") / steps, **times}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="device of the U-Net section (the loop sections run on the CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    batch, n, repeats = (4096, 200, 5) if args.quick else (4096, 500, 15)
    print(f"== fixed-step ODE: batch {batch} x 2, float32, {n} Euler steps; overhead per "
          "evaluation (us), field cost subtracted")
    res = fixed_ode(batch, n, repeats)
    field_cost = res.pop("field")
    for name, us in res.items():
        print(f"  {name:28s} {us:8.2f} us")
    ours = res["difsolve Euler"]
    print(f"  field alone: {field_cost:.2f} us; difsolve / torchdiffeq = "
          f"{ours / res['torchdiffeq euler']:.2f}, difsolve / k-diffusion = "
          f"{ours / res['k-diffusion sample_euler']:.2f}")
    print(f"== fixed-step SDE: Euler-Maruyama, batch {batch} x 2, {n} steps; overhead per "
          "evaluation (us)")
    res = fixed_sde(batch, n, repeats)
    for name, us in res.items():
        print(f"  {name:28s} {us:8.2f} us")
    print(f"  difsolve / torchsde = {res['difsolve EulerMaruyama'] / res['torchsde euler']:.2f}")
    print("== adaptive, EDM PF-ODE of N(0, I) data, batch 512 x 2, float32, rtol = atol = 1e-4: "
          "whole solve, per step and per evaluation (us)")
    res = adaptive(512, repeats, 1e-4)
    for name, (wall, nfe, steps, err) in res.items():
        print(f"  {name:40s} {wall * 1e3:7.1f} ms  {nfe:6.1f} NFE  {steps:5.1f} steps  "
              f"{wall / steps * 1e6:7.1f} us/step  {wall / nfe * 1e6:7.1f} us/eval  "
              f"max rel. error {err:.1e}")
    (ours, o_nfe, o_steps, _), (peer, p_nfe, p_steps, _) = res.values()
    print(f"  difsolve / torchode: whole solve {ours / peer:.2f}, per step "
          f"{(ours / o_steps) / (peer / p_steps):.2f}, per evaluation "
          f"{(ours / o_nfe) / (peer / p_nfe):.2f}")
    ops = op_counts(512, 1e-4)
    print(f"  tensor operations per step (views left out): difsolve {ops['ours']:.0f}, "
          f"torchode {ops['torchode']:.0f}")
    print("== small U-Net (diffusers UNet2DModel, random weights, batch 8 x 3 x 32 x 32), "
          "DPMSolver(2) fixed grid: time of ds.sample against NFE x one network call")
    unet = small_unet(10 if args.quick else 20, 2 if args.quick else 5, args.device)
    budget = unet["nfe"] * unet["call"]
    print(f"  on {args.device}: {unet['nfe']} NFE x {unet['call'] * 1e3:.2f} ms = "
          f"{budget * 1e3:.1f} ms; ds.sample {unet['sample'] * 1e3:.1f} ms, ratio "
          f"{unet['sample'] / budget:.3f}")
    if "captured" in unet:
        print(f"  ds.CapturedSolve replay {unet['captured'] * 1e3:.1f} ms, ratio "
              f"{unet['captured'] / budget:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
