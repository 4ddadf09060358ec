r"""Log-likelihood of data under a score field, through the probability-flow ODE.

Instantaneous change of variables (Chen et al. 2018; Song et al. 2021, appendix D.2): along the
probability-flow ODE ``dx/dt = f_tilde(x, t) = f(t) x - g(t)^2 s(x, t) / 2``,

    log p_{t_min}(x) = log p_T(x(T)) + int_{t_min}^{T} div f_tilde(x(t), t) dt,

where ``x(t_min) = x``. :func:`log_likelihood` integrates the augmented state
``(x, accumulated divergence)`` from ``t_min`` to ``t_max`` with :func:`~difsolve.solve`
(per-sample adaptive steps) and replaces the unknown ``p_T`` by the process prior
``process.prior_log_prob`` (Gaussian for VE/VP/EDM, heavy-tailed for PFGM++). That substitution
biases the result by ``log prior(x(T)) - log p_T(x(T))``, whose mean is ``-KL(p_T || prior)``
(about ``1e-3`` nats for 2-D toy data under VP, up to ``0.1`` under VE). The value is
``log p_{t_min}``, not ``log p_0``.

Divergence estimators (the ``trace`` argument):

* :class:`ExactTrace`: ``div f = tr(df/dx)`` from ``d`` vector-Jacobian products (batched
  through ``torch.autograd.grad(..., is_grads_batched=True)``, i.e. ``vmap``): ``d`` times the
  cost of one backward pass; for small ``d``.
* :class:`Hutchinson`: ``div f ~ e^T (df/dx) e`` with ``k`` random probes per sample, each fixed
  along the whole trajectory (Hutchinson 1990; Grathwohl et al. 2019, FFJORD). Each probe has its
  own accumulator, so it estimates ``e^T A e`` with ``A = int J dt``, unbiased because
  ``E[e e^T] = I``. Its variance is ``2 ||A_s||_F^2`` for Gaussian probes and
  ``2 (||A_s||_F^2 - sum_i A_ii^2)`` for Rademacher probes (``A_s`` the symmetric part), divided by
  ``k``. The reported per-sample standard error is the spread of the ``k`` estimates,
  ``std_j / sqrt(k)``; with a single probe there is no spread and ``stderr`` is NaN.

Implementation: the state of one sample is one row ``[x (d) | probes (k d) | accumulators (m)]``
(``m = k`` for Hutchinson, 1 for the exact trace), so the solve loop may evaluate any subset of
rows and each row keeps its own probes. Probes have zero derivative; the step controller measures
the error of ``x`` and of the accumulators as two groups and takes the larger ratio (the constant
probe components would otherwise dilute the RMS norm, and the log-likelihood error would carry
weight ``1/d``). With ``time_variable="log_sigma"`` (default) the whole augmented drift is
time-changed to ``u = log sigma(t)`` by :class:`~difsolve.LogSigmaTime`, so the divergence
integral is transformed consistently (``d acc/du = div f_tilde dt/du``).

8-bit data: ``data_range=(lo, hi)`` declares ``2^bits``-level data (default 8 bits) on
``[lo, hi]``. Then ``bits_per_dim = -log p / (d ln 2) + bits - log2(hi - lo)``, the discrete
log-probability of the bin of width ``(hi - lo) / 2^bits``: the score_sde convention, ``+8`` for
data in ``[0, 1]`` and ``+7`` for data in ``[-1, 1]``. ``dequantize=True`` takes ``x`` on the
quantised grid ``lo + n (hi - lo) / (2^bits - 1)`` (what ``ToTensor`` gives), and evaluates
``x' = lo + (n + u) (hi - lo) / 2^bits`` with ``u ~ U[0, 1)^d`` (uniform dequantisation, as
score_sde's ``(255 x + u) / 256``); ``log_prob`` is then the continuous density at ``x'``, and
``bits_per_dim`` an upper bound (in expectation over ``u``) on the discrete code length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._errors import ArgumentTypeError, IncompatibleError, check, check_int, check_tensor
from ._tensor import rms
from .control import Controller, PIController
from .dynamics import ProbabilityFlowODE
from .fields.base import check_field
from .integrate import solve
from .noise import as_stream, make_stream
from .solution import Stats, Status
from .solvers.base import Solver
from .solvers.runge_kutta import Dopri5

__all__ = ["ExactTrace", "Hutchinson", "LogLikelihood", "log_likelihood"]

NOISES = ("rademacher", "gaussian")
#: time variables in which the augmented ODE may be integrated (both keep the state unchanged)
TIME_VARIABLES = ("log_sigma", "t")


class ExactTrace:
    """Exact divergence ``tr(df/dx)`` from ``d`` vector-Jacobian products per evaluation.

    Args:
        batched: compute the ``d`` products in one batched backward pass
            (``is_grads_batched=True``, needs a ``vmap``-compatible field); ``False`` loops over
            the ``d`` unit vectors (any autograd-compatible field, slower).

    Cost per drift evaluation: one forward pass and ``d`` backward passes; memory ``O(d)`` times
    one backward pass. Meant for small ``d`` (toy data, tests); use :class:`Hutchinson` otherwise.
    """

    probes = 1

    def __init__(self, batched: bool = True):
        if not isinstance(batched, bool):
            raise ArgumentTypeError(f"argument `batched` must be a bool, got {batched!r}")
        self.batched = batched

    def _divergence(self, v: torch.Tensor, x: torch.Tensor, probes) -> torch.Tensor:
        batch, d = x.shape[0], x[0].numel()
        if d == 1:
            return _vjp(v, x, torch.ones_like(x), batched=False).reshape(batch, 1)
        if self.batched:
            eye = torch.eye(d, device=x.device, dtype=x.dtype)
            grad_out = eye[:, None, :].expand(d, batch, d).reshape(d, *x.shape)
            grads = _vjp(v, x, grad_out, batched=True).reshape(d, batch, d)
            return torch.diagonal(grads, dim1=0, dim2=2).sum(-1, keepdim=True)
        total = torch.zeros(batch, 1, device=x.device, dtype=x.dtype)
        flat = torch.zeros(batch, d, device=x.device, dtype=x.dtype)
        for i in range(d):
            e = flat.clone()
            e[:, i] = 1.0
            g = _vjp(v, x, e.reshape(x.shape), batched=False, retain=i < d - 1)
            total = total + g.reshape(batch, d)[:, i : i + 1]
        return total

    def __repr__(self) -> str:
        return f"ExactTrace(batched={self.batched})"


class Hutchinson:
    """Hutchinson trace estimator with ``probes`` random vectors per sample, fixed along the path.

    Args:
        probes: ``k``, the number of probes (and divergence accumulators) per sample. The
            per-sample ``stderr`` is their spread, ``std / sqrt(k)``; NaN when ``k = 1``.
        noise: ``"rademacher"`` (entries +-1; variance ``2 (||A_s||_F^2 - sum A_ii^2) / k``, the
            lower one) or ``"gaussian"`` (variance ``2 ||A_s||_F^2 / k``).

    Cost per drift evaluation: one forward pass and ``k`` vector-Jacobian products (one batched
    backward pass when ``k > 1``).
    """

    def __init__(self, probes: int = 1, noise: str = "rademacher"):
        self.probes = check_int(probes, "probes")
        check(noise in NOISES, "noise", f"one of {NOISES}", noise)
        self.noise = noise

    def draw(self, shape: tuple[int, ...], *, generator=None, device=None, dtype=None
             ) -> torch.Tensor:
        """Probes of shape ``shape = (B, ...)`` with ``E[e e^T] = I`` from a generator or a random
        stream (per-row seeds: row ``i``'s probes come from its own generator)."""
        stream = as_stream(generator)
        if self.noise == "gaussian":
            return stream.randn(torch.empty(shape, device=device, dtype=dtype))
        bits = stream.rand_bits(shape, device)
        return (2 * bits - 1).to(dtype)

    def _divergence(self, v: torch.Tensor, x: torch.Tensor, probes) -> torch.Tensor:
        # probes: (B, k, d) -> (k, B, ...) as grad_outputs
        k = probes.shape[1]
        e = probes.transpose(0, 1).reshape(k, *x.shape)
        if k == 1:
            g = _vjp(v, x, e[0], batched=False)[None]
        else:
            g = _vjp(v, x, e, batched=True)
        return (e * g).reshape(k, x.shape[0], -1).sum(-1).T

    def __repr__(self) -> str:
        return f"Hutchinson(probes={self.probes}, noise={self.noise!r})"


def _vjp(v, x, grad_out, *, batched: bool, retain: bool = False) -> torch.Tensor:
    """``grad_out^T dv/dx``; with ``batched``, one product per leading slice of ``grad_out``
    (one vmapped backward pass, or a loop over the slices where the model does not support
    vmap, e.g. one that queries its input's memory format)."""
    if batched:
        try:
            (g,) = torch.autograd.grad(v, x, grad_outputs=grad_out, is_grads_batched=True,
                                       retain_graph=True, allow_unused=True)
        except RuntimeError:
            g = torch.stack([_vjp(v, x, e, batched=False, retain=True) for e in grad_out])
        return torch.zeros_like(grad_out) if g is None else g
    (g,) = torch.autograd.grad(v, x, grad_outputs=grad_out, retain_graph=retain,
                               allow_unused=True)
    if g is None:  # the drift does not depend on x
        g = torch.zeros_like(grad_out)
    return g


@dataclass
class LogLikelihood:
    """Result of :func:`log_likelihood` (every tensor ``(B,)`` unless stated).

    Attributes:
        log_prob: estimate of ``log p_{t_min}(x)`` in nats (NaN where the solve failed).
        bits_per_dim: ``-log_prob / (d ln 2)`` plus the 8-bit offset when ``data_range`` is given.
        stderr: Hutchinson standard error of ``log_prob`` (spread of the probes,
            ``std / sqrt(k)``); 0 for the exact trace; NaN for a single probe.
        stats: work counters of the solve (``nfe`` counts batched drift evaluations, each one
            forward and one (batched) backward pass of the field).
        status: per-sample :class:`~difsolve.Status` of the solve.
        prior_log_prob: ``log prior(x(T))``.
        delta_log_prob: ``(B, m)`` integrated divergence, one column per probe (``m = 1`` exact).
        latent: ``x(T)``, shape of ``x``.
        x: the point evaluated (the dequantised data when ``dequantize=True``).
    """

    log_prob: torch.Tensor
    bits_per_dim: torch.Tensor
    stderr: torch.Tensor
    stats: Stats
    status: torch.Tensor
    prior_log_prob: torch.Tensor
    delta_log_prob: torch.Tensor
    latent: torch.Tensor
    x: torch.Tensor


class _AugmentedFlow:
    """Probability-flow ODE of one row ``[x | probes | accumulators]`` in the time ``t``."""

    def __init__(self, field, trace, shape: tuple[int, ...], accumulators: int):
        self.ode = ProbabilityFlowODE(field)
        self.field, self.process = field, field.process
        self.trace, self.shape = trace, shape
        self.d = math.prod(shape)
        self.m = accumulators
        self.n_probes = accumulators if isinstance(trace, Hutchinson) else 0

    def split(self, z: torch.Tensor):
        b, d, k = z.shape[0], self.d, self.n_probes
        x = z[:, :d].reshape(b, *self.shape)
        probes = z[:, d : d + k * d].reshape(b, k, d) if k else None
        return x, probes, z[:, z.shape[1] - self.m :]

    def drift(self, z: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        x, probes, _ = self.split(z)
        # exactly the gradients the trace needs, even under no_grad() or inference_mode()
        with torch.inference_mode(False), torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)
            t = t.clone()
            if probes is not None:
                probes = probes.clone()
            v = self.ode.drift(x, t, **cond)
            div = self.trace._divergence(v, x, probes)
        parts = [v.detach().reshape(z.shape[0], self.d)]
        if self.n_probes:
            parts.append(torch.zeros_like(z[:, self.d : self.d * (1 + self.n_probes)]))
        parts.append(div.detach().to(z.dtype))
        return torch.cat(parts, dim=1)


def grouped_norm(d: int, m: int):
    """The likelihood's error norm of a scaled error ``[x | probes | accumulators]``: the larger
    of the RMS over ``x`` and over the ``m`` accumulators (the constant probes left out)."""

    def norm(scaled: torch.Tensor) -> torch.Tensor:
        n = scaled.shape[1]
        return torch.maximum(rms(scaled[:, :d]), rms(scaled[:, n - m:]))

    return norm


def _dequantize(x, lo, hi, levels, stream):
    width = hi - lo
    n = torch.round((x - lo) / width * (levels - 1))
    u = stream.rand(x)
    return lo + (n + u) * (width / levels)


def log_likelihood(field, x: torch.Tensor, *, trace: ExactTrace | Hutchinson | None = None,
                   solver: Solver | None = None, controller: Controller | None = None,
                   steps=None, schedule: str = "uniform",
                   generator: torch.Generator | int | None = None, seeds=None,
                   time_variable: str = "log_sigma", data_range: tuple[float, float] | None = None,
                   bits: int = 8, dequantize: bool = False, max_steps: int = 10_000,
                   cond: dict | None = None) -> LogLikelihood:
    r"""Log-likelihood ``log p_{t_min}(x)`` of ``x`` under ``field`` via the probability-flow ODE.

    Integrates ``(x, int div f_tilde dt)`` from ``process.t_min`` to ``process.t_max`` and adds
    ``process.prior_log_prob(x(T))`` (see the module docstring for the mathematics and the
    prior-mismatch bias). Runs on the device and dtype of ``x`` without host round trips per step;
    each sample has its own step size.

    Args:
        field: a :class:`~difsolve.ScoreField` (any process, including PFGM++ fields).
        x: data ``(B, ...)``.
        trace: :class:`Hutchinson` (default ``Hutchinson(probes=1, noise="rademacher")``) or
            :class:`ExactTrace`.
        solver: an ODE solver (default :class:`~difsolve.Dopri5`).
        controller: step controller (default ``PIController(rtol=1e-5, atol=1e-5)``); for a
            :class:`~difsolve.PIController` the error of ``x`` and of the log-density
            accumulators are measured separately and the larger ratio decides (probes
            excluded: :func:`grouped_norm`); any other :class:`~difsolve.Controller` sees the
            augmented state ``[x | probes | accumulators]`` as it is.
        steps, schedule: fixed steps instead of a controller (as in :func:`~difsolve.solve`).
        generator: a ``torch.Generator`` or an int seed: source of the probes and of the
            dequantisation noise.
        seeds: one int per row instead of ``generator`` (row ``i``'s probes and dequantisation
            noise from its own generator: its estimate does not depend on its batch).
        time_variable: ``"log_sigma"`` (default) or ``"t"``. ``"t"`` needs fewer evaluations
            on 8-D mixtures under VP and EDM (benchmarks/bench_likelihood.py), but its error is
            less well controlled by the tolerance: on the 32-D VP mixture of
            tests/test_likelihood.py at rtol = atol = 1e-5 it misses the closed form by 1.3e-3
            where ``"log_sigma"`` stays within 1e-3; the default is the reliable one. VE is the
            same in both (its ``log sigma`` is affine in ``t``).
        cond: keyword arguments for the field (see :mod:`difsolve.conditioning`).
        data_range: ``(lo, hi)`` of ``2^bits``-level data: adds ``bits - log2(hi - lo)`` to
            ``bits_per_dim`` (score_sde: +8 for ``[0, 1]``, +7 for ``[-1, 1]``). None: continuous
            data, no offset.
        bits: bits per value of quantised data (default 8).
        dequantize: add uniform noise within each bin first (needs ``data_range``; ``x`` must lie
            on the grid ``lo + n (hi - lo) / (2^bits - 1)``).
        max_steps: most steps per sample.

    Returns:
        :class:`LogLikelihood`. Samples whose solve failed have ``log_prob = NaN`` (see
        ``status``). Not differentiable (the divergence uses detached vector-Jacobian products);
        works under ``torch.no_grad()`` and ``torch.inference_mode()`` (it enables exactly the
        gradients the trace needs, one drift evaluation at a time). Half precision is refused:
        the divergence accumulators need at least float32.
    """
    check_field(field)
    x = check_tensor(x, "x")
    if x.dtype in (torch.float16, torch.bfloat16):
        raise IncompatibleError(
            f"argument `x`: log_likelihood needs float32 or float64 data, got {x.dtype} (the "
            "divergence integral is not accurate in half precision; pass x.float())")
    check(bool(torch.isfinite(x).all()), "x", "finite")
    trace = Hutchinson() if trace is None else trace
    if not isinstance(trace, (ExactTrace, Hutchinson)):
        raise ArgumentTypeError(
            f"argument `trace` must be ds.ExactTrace() or ds.Hutchinson(...), got {trace!r}")
    solver = Dopri5() if solver is None else solver
    if not isinstance(solver, Solver):
        raise ArgumentTypeError(
            f"argument `solver` must be a difsolve Solver instance (e.g. ds.Dopri5()), got "
            f"{solver!r}")
    if solver.sde or solver.native_time:
        raise IncompatibleError(
            f"argument `solver`: {type(solver).__name__} cannot integrate the augmented "
            "likelihood ODE; use a Runge-Kutta ODE solver such as Dopri5() or Heun()")
    check(time_variable in TIME_VARIABLES, "time_variable", f"one of {TIME_VARIABLES}",
          time_variable)
    if steps is not None and controller is not None:
        raise IncompatibleError(
            "arguments `steps` and `controller`: give at most one (fixed steps or a controller)")
    stream = make_stream(generator, seeds, x.shape[0], x.device)
    bits = check_int(bits, "bits")
    if not isinstance(dequantize, bool):
        raise ArgumentTypeError(f"argument `dequantize` must be a bool, got {dequantize!r}")
    offset = 0.0
    if data_range is not None:
        try:
            lo, hi = (float(v) for v in data_range)
        except (TypeError, ValueError) as exc:
            raise ArgumentTypeError(
                f"argument `data_range` must be a pair (lo, hi) of numbers, got {data_range!r}"
            ) from exc
        check(math.isfinite(lo) and math.isfinite(hi) and hi > lo, "data_range",
              "a finite pair (lo, hi) with lo < hi", data_range)
        offset = bits - math.log2(hi - lo)
        if dequantize:
            tol = 1e-4 * (hi - lo)
            check(bool(((x >= lo - tol) & (x <= hi + tol)).all()), "x",
                  f"within data_range {data_range} for dequantize=True")
            x = _dequantize(x, lo, hi, 2**bits, stream)
    elif dequantize:
        raise IncompatibleError("argument `dequantize`: needs `data_range=(lo, hi)` of the data")

    batch, shape = x.shape[0], tuple(x.shape[1:])
    d = math.prod(shape)
    m = trace.probes
    dyn = _AugmentedFlow(field, trace, shape, m)
    parts = [x.reshape(batch, d)]
    if isinstance(trace, Hutchinson):
        parts.append(trace.draw((batch, m * d), generator=stream, device=x.device,
                                dtype=x.dtype))
    parts.append(torch.zeros(batch, m, device=x.device, dtype=x.dtype))
    z0 = torch.cat(parts, dim=1)

    process = field.process
    if steps is None:
        controller = controller if controller is not None else PIController(rtol=1e-5,
                                                                             atol=1e-5)
        if isinstance(controller, PIController):
            controller = controller.with_norm(grouped_norm(d, m))
    sol = solve(dyn, z0, process.t_min, process.t_max, solver=solver, steps=steps,
                schedule=schedule, controller=controller, generator=stream,
                max_steps=max_steps, time_variable=time_variable, cond=cond)
    if batch == 0:
        empty = torch.zeros(0, device=x.device, dtype=x.dtype)
        return LogLikelihood(log_prob=empty, bits_per_dim=empty.clone(), stderr=empty.clone(),
                             stats=sol.stats, status=sol.status, prior_log_prob=empty.clone(),
                             delta_log_prob=x.new_zeros(0, m), latent=x.clone(), x=x)

    latent, _, delta = dyn.split(torch.where(torch.isfinite(sol.x), sol.x, sol.last_x))
    prior = process.prior_log_prob(latent)
    ok = sol.status == Status.SUCCESS.value
    estimates = prior[:, None] + delta
    log_prob = torch.where(ok, estimates.mean(dim=1), math.nan)
    if isinstance(trace, ExactTrace):
        stderr = torch.zeros_like(log_prob)
    elif m == 1:
        stderr = torch.full_like(log_prob, math.nan)
    else:
        stderr = delta.std(dim=1) / math.sqrt(m)
    stderr = torch.where(ok, stderr, math.nan)
    bpd = -log_prob / (d * math.log(2.0)) + offset
    return LogLikelihood(log_prob=log_prob, bits_per_dim=bpd, stderr=stderr, stats=sol.stats,
                         status=sol.status, prior_log_prob=prior, delta_log_prob=delta,
                         latent=latent, x=x)
