"""Log-likelihood benchmark: difsolve against score_sde's recipe and k-diffusion, same run.

Field: the exact EDM score field of a Gaussian mixture with rotated anisotropic covariances
(``--dim``, ``--components``), so ``log p_{sigma_min}(x)`` is known in closed form. Data: exact
samples of ``p_{sigma_min}``. Every method integrates the probability-flow ODE from
``sigma_min = 0.002`` to ``sigma_max = 80`` and adds the Gaussian prior ``N(0, 80^2 I)``.

Methods:

* ``difsolve exact``: ``ds.log_likelihood(trace=ds.ExactTrace())``, Dopri5, per-sample PI
  control (rtol = atol = 1e-5 and 1e-4), in ``log sigma`` time (the default) and in ``t``.
* ``difsolve hutch k``: the same with ``ds.Hutchinson(probes=k)`` (Rademacher).
* ``score_sde recipe``: a re-implementation of score_sde's ``likelihood.py``: the whole batch
  flattened into one ODE for ``scipy.integrate.solve_ivp(method="RK45", rtol=atol=1e-5)`` on the
  CPU, numpy round trips at every evaluation, one Rademacher probe, integration in ``t``
  (``= sigma`` for EDM).
* ``k-diffusion``: ``k_diffusion.sampling.log_likelihood`` (torchdiffeq dopri5, one Rademacher
  probe, one step size for the whole batch) on the denoiser ``D = x + sigma^2 s``, at its default
  tolerance (1e-4) and at 1e-5.

All one-probe methods use the *same* Rademacher probe per sample (k-diffusion's own draw), so
their differences are solver differences only. Columns: ``NFE`` batched field evaluations
(each with one backward pass; difsolve evaluates only the unfinished rows, its mean per sample is
in the note); ``mean err`` and ``rms err`` of
``log_prob - log p_{sigma_min}(x)`` in nats against the closed form (they include the
prior-mismatch term ``log prior(x(T)) - log p_T(x(T))`` common to all methods, printed as a floor,
and for one-probe estimators the Hutchinson noise); ``solver err``: max over samples of
``|log_prob - reference|`` where the reference is the same estimator (exact trace, or the same
probe) integrated by difsolve in float64 at rtol = atol = 1e-10. Timings include no warm-up (each
method is run once on 2 samples first). Run::

    python benchmarks/bench_likelihood.py            # d = 8, 64 samples, float32
    python benchmarks/bench_likelihood.py --dim 2 --dtype float64
    python benchmarks/bench_likelihood.py --quick    # smoke run: 8 samples, d = 4

Expected time: full about 20 s, --quick about 15 s (one CPU core; mostly start-up).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import integrate

import difsolve as ds

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peers import load_k_diffusion_sampling


# ----- score_sde's recipe (re-implemented): scipy RK45 on the CPU, numpy round trips -------------
def score_sde_recipe(field, x: torch.Tensor, *, rtol=1e-5, atol=1e-5, probe=None, seed=0):
    """score_sde ``likelihood.get_likelihood_fn``: one flattened ODE, one Rademacher probe
    (``probe``, or drawn from ``seed``)."""
    process = field.process
    shape, device, dtype = x.shape, x.device, x.dtype
    if probe is None:
        gen = torch.Generator(device=device).manual_seed(seed)
        probe = torch.randint(0, 2, shape, generator=gen, device=device) * 2 - 1
    eps = probe.to(dtype)
    nfe = 0

    def drift(xt, t):
        f = process.drift_coef(t).reshape(-1, *([1] * (xt.ndim - 1)))
        g2 = process.g2(t).reshape(-1, *([1] * (xt.ndim - 1)))
        return f * xt - 0.5 * g2 * field(xt, t)

    def ode_func(t, y):
        nonlocal nfe
        nfe += 1
        sample = torch.from_numpy(y[: -shape[0]].reshape(shape)).to(device=device, dtype=dtype)
        vec_t = torch.full((shape[0],), t, device=device, dtype=dtype)
        with torch.enable_grad():
            sample.requires_grad_(True)
            v = drift(sample, vec_t)
            grad = torch.autograd.grad((v * eps).sum(), sample)[0]
        div = (grad * eps).reshape(shape[0], -1).sum(1)
        return np.concatenate([v.detach().cpu().numpy().reshape(-1),
                               div.detach().cpu().numpy().reshape(-1)])

    init = np.concatenate([x.detach().cpu().numpy().reshape(-1), np.zeros(shape[0])])
    sol = integrate.solve_ivp(ode_func, (process.t_min, process.t_max), init, rtol=rtol,
                              atol=atol, method="RK45")
    zp = sol.y[:, -1]
    z = torch.from_numpy(zp[: -shape[0]].reshape(shape)).to(device=device, dtype=dtype)
    delta = torch.from_numpy(zp[-shape[0]:]).to(device=device, dtype=dtype)
    return process.prior_log_prob(z) + delta, nfe


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--components", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: at most 8 samples in at most 4 dimensions")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.dim = min(args.batch, 8), min(args.dim, 4)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)

    process = ds.EDM()
    mix = ds.problems.rotated_mixture(args.dim, args.components, args.seed)
    field = mix.score_field(process)
    gen = torch.Generator().manual_seed(args.seed + 1)
    x64 = mix.sample(args.batch, gen, dtype=torch.float64)
    x64 = x64 + process.t_min * torch.randn(x64.shape, generator=gen, dtype=torch.float64)
    x = x64.to(device=device, dtype=dtype)
    exact = mix.marginal_log_prob(x64, process.t_min, process)
    ks = load_k_diffusion_sampling()

    def denoiser(xs, sigma):  # k-diffusion model contract: D(x, sigma) = x + sigma^2 s
        return xs + sigma.reshape(-1, 1).square() * field(xs, sigma)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # one Rademacher probe shared by every one-probe method: k-diffusion draws it with
    # torch.randint_like(x, 2) * 2 - 1 as the first random call after torch.manual_seed(5)
    torch.manual_seed(5)
    probe = torch.randint_like(x, 2) * 2 - 1

    class SharedProbe(ds.Hutchinson):
        def draw(self, shape, *, generator, device, dtype):
            return probe[: shape[0]].reshape(shape).to(device=device, dtype=dtype)

    # tight references (float64, rtol = atol = 1e-10) to isolate the solver error: the exact
    # trace, and the shared-probe estimate (whose expectation over probes is the exact trace)
    tight = ds.PIController(rtol=1e-10, atol=1e-10)
    ref_exact = ds.log_likelihood(field, x64, trace=ds.ExactTrace(), controller=tight)
    probe64 = probe.double().cpu()

    class SharedProbe64(ds.Hutchinson):
        def draw(self, shape, *, generator, device, dtype):
            return probe64.reshape(shape)

    ref_probe = ds.log_likelihood(field, x64, trace=SharedProbe64(1), controller=tight)
    floor = ref_exact.prior_log_prob - mix.marginal_log_prob(ref_exact.latent, process.t_max,
                                                             process)
    rows = []

    def record(name, fn, ref):
        fn(warmup=True)
        sync()
        t0 = time.perf_counter()
        ll, nfe, extra = fn()
        sync()
        wall = time.perf_counter() - t0
        ll = ll.detach().double().cpu()
        err = ll - exact
        serr = math.nan if ref is None else float((ll - ref.log_prob).abs().max())
        rows.append((name, nfe, wall, float(err.mean()), float(err.square().mean().sqrt()),
                     serr, extra))

    def difsolve_run(trace, tol=1e-5, time_variable="log_sigma"):
        def fn(warmup=False):
            xs = x[:2] if warmup else x
            r = ds.log_likelihood(field, xs, trace=trace,
                                  controller=ds.PIController(rtol=tol, atol=tol),
                                  generator=torch.Generator(device=device).manual_seed(3),
                                  time_variable=time_variable)
            note = f"NFE/sample {float(r.stats.nfe_per_sample.float().mean()):.0f}"
            if trace.probes > 1:
                note += f", mean stderr {float(r.stderr.mean()):.3g}"
            return r.log_prob, int(r.stats.nfe), note
        return fn

    for tv in ("log_sigma", "t"):
        for tol in (1e-5, 1e-4):
            record(f"difsolve exact ({tv}, PI {tol:g})", difsolve_run(ds.ExactTrace(), tol, tv),
                   ref_exact)
    for tv in ("log_sigma", "t"):
        for tol in (1e-5, 1e-4):
            record(f"difsolve hutch k=1 ({tv}, PI {tol:g})",
                   difsolve_run(SharedProbe(1), tol, tv), ref_probe)
    record("difsolve hutch k=4 (log_sigma, PI 1e-5)", difsolve_run(ds.Hutchinson(4)), None)

    def score_sde_run(warmup=False):
        ll, nfe = score_sde_recipe(field, x[:2] if warmup else x, probe=probe[:2] if warmup
                                   else probe)
        return ll, nfe, "scipy RK45, CPU round trips"

    record("score_sde recipe (RK45 1e-5, 1 probe)", score_sde_run, ref_probe)

    for tol in (1e-4, 1e-5):
        def kd_run(warmup=False, tol=tol):
            torch.manual_seed(5)  # the shared probe
            xs = x[:2] if warmup else x
            ll, info = ks.log_likelihood(denoiser, xs, process.t_min, process.t_max, atol=tol,
                                         rtol=tol)
            return ll, int(info["fevals"]), "torchdiffeq dopri5"
        record(f"k-diffusion log_likelihood ({tol:g}, 1 probe)", kd_run, ref_probe)

    print(f"EDM field of a {args.components}-component rotated mixture, d={args.dim}, "
          f"batch {args.batch}, {args.dtype} on {device}, torch threads {args.threads}")
    print(f"closed form: log p_sigma_min(x), mean {float(exact.mean()):.4f} nats")
    print(f"prior-mismatch floor (log prior - log p_T at the exact latent): mean "
          f"{float(floor.mean()):+.2e}, rms {float(floor.square().mean().sqrt()):.2e}")
    noise = float((ref_probe.log_prob - ref_exact.log_prob).square().mean().sqrt())
    print(f"one-probe trace noise: rms {noise:.3g} nats (shared probe vs exact trace, tight "
          "references)")
    head = f"{'method':44s} {'NFE':>6s} {'wall s':>8s} {'mean err':>10s} {'rms err':>9s} " \
           f"{'solver err':>10s}  note"
    print(head)
    print("-" * len(head))
    for name, nfe, wall, mean, rmse, mx, extra in rows:
        print(f"{name:44s} {nfe:6d} {wall:8.3f} {mean:+10.2e} {rmse:9.2e} {mx:10.2e}  {extra}")


if __name__ == "__main__":
    main()
