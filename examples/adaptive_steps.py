"""Per-sample adaptive step control: how many steps each sample takes, and where.

The EDM probability-flow ODE of an 8-mode ring, solved with per-sample PI control by the adaptive
DPM-Solver++ 4 + corrector (one evaluation per step, log-sigma time) and by Dopri5 (snr time), at
rtol = atol = 1e-4. Left: histograms of the steps each sample took (accepted and rejected; every
sample has its own step size, so a sample that is easy stops early). Middle: accepted step sizes
``|Delta log sigma|`` along the trajectory for a few samples (recorded from the times at which the
field was evaluated: DPM-Solver++ evaluates once per step, at the step's end; an attempt is an
accepted step when no later evaluation falls before it). Right: where the samples that needed the
most steps started and ended.

Run:  python examples/adaptive_steps.py [--quick] [--out DIR]
"""

from __future__ import annotations

import torch
from _common import parse_args, pyplot, ring, save, scatter

import difsolve as ds

PI = dict(rtol=1e-4, atol=1e-4, pcoeff=0.3, icoeff=0.4, safety=0.8)


class RecordingField:
    """A score field that records the times at which it is evaluated (one sample per solve)."""

    def __init__(self, field):
        self.field, self.process, self.times = field, field.process, []
        self.exact_score = getattr(field, "exact_score", True)

    def __call__(self, x, t):
        self.times.append(t.reshape(-1)[0].item())
        return self.field(x, t)


def accepted_times(times: list[float], t0: float) -> list[float]:
    """The accepted step ends among one sample's evaluation times (integrating downwards): an
    attempt is accepted when every later evaluation lies below it (a rejected attempt is followed
    by a retry above it). The first evaluation is the solver's initial one, at ``t0``."""
    ends, highest = [], -float("inf")
    for t in reversed(times[1:]):
        if t > highest:
            ends.append(t)
            highest = t
    return [t0, *reversed(ends)]


def main() -> None:
    args = parse_args(__doc__)
    n = 1000 if args.quick else 8000
    traced = 6 if args.quick else 12
    mixture = ring(unequal=True)
    field = mixture.score_field(ds.EDM())
    p = field.process
    x_t = p.prior_sample((n, 2), generator=torch.Generator().manual_seed(args.seed),
                         dtype=torch.float64)
    ode = ds.ProbabilityFlowODE(field)
    runs = {"DPM-Solver++ 4 + corrector (log sigma)": dict(
                solver=ds.DPMSolver(4, corrector=True), time_variable="log_sigma",
                controller=ds.PIController(**PI)),
            "Dopri5 (snr)": dict(solver=ds.Dopri5(), time_variable="snr",
                                 controller=ds.PIController(rtol=1e-4, atol=1e-4))}
    sols = {name: ds.solve(ode, x_t, p.t_max, p.t_min, **kw) for name, kw in runs.items()}
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.6))
    for (name, sol), colour in zip(sols.items(), ("tab:blue", "tab:orange")):
        st = sol.stats
        print(f"{name:40s} steps per sample: mean {float(st.steps.double().mean()):.1f}, min "
              f"{int(st.steps.min())}, max {int(st.steps.max())}; rejected mean "
              f"{float(st.rejected.double().mean()):.2f}; batched evaluations {st.nfe}")
        axes[0].hist(st.accepted.numpy(), bins=range(int(st.accepted.max()) + 2), alpha=0.6,
                     color=colour, label=f"{name}: accepted "
                     f"({float(st.nfe_per_sample.double().mean()):.0f} NFE/sample)")
        axes[0].hist(st.rejected.numpy(), bins=range(int(st.rejected.max()) + 2), alpha=0.9,
                     histtype="step", lw=1.5, color=colour, label=f"{name}: rejected")
    axes[0].set_xlabel("steps of one sample")
    axes[0].set_ylabel("samples")
    axes[0].set_title(f"steps per sample, {n} samples,\nrtol = atol = 1e-4", fontsize=10)
    axes[0].legend(fontsize=7)

    # step sizes along time: re-solve a few samples one at a time, recording evaluation times
    dpm = runs["DPM-Solver++ 4 + corrector (log sigma)"]
    steps = sols["DPM-Solver++ 4 + corrector (log sigma)"].stats
    hardest = steps.steps.argsort(descending=True)
    chosen = torch.cat([hardest[: traced // 2], hardest[-(traced // 2):]])
    cmap = plt.get_cmap("coolwarm")
    for j, i in enumerate(chosen.tolist()):
        rec = RecordingField(field)
        sol = ds.solve(ds.ProbabilityFlowODE(rec), x_t[i:i + 1], p.t_max, p.t_min, **dpm)
        ends = torch.tensor(accepted_times(rec.times, p.t_max), dtype=torch.float64).log()
        assert len(ends) - 1 == int(sol.stats.accepted[0]), "one evaluation per accepted step"
        h = (ends[:-1] - ends[1:]).numpy()
        axes[1].semilogy(ends[1:].numpy(), h, "o-", ms=2.5, lw=1,
                         color=cmap(1 - j / max(1, len(chosen) - 1)),
                         label=f"sample {i}: {len(h)} steps" if j in (0, len(chosen) - 1) else None)
    axes[1].invert_xaxis()
    axes[1].set_xlabel("log sigma at the step's end (time runs to the right)")
    axes[1].set_ylabel("accepted step |Delta log sigma|")
    axes[1].set_title("DPM-Solver++ 4 + corrector: accepted steps of\nthe hardest (red) and "
                      "easiest (blue) samples", fontsize=10)
    axes[1].legend(fontsize=7)
    order = steps.steps.double()
    scatter(axes[2], x_t / p.t_max * 2.5, None, c=order.numpy(), cmap="plasma", alpha=0.9, s=3)
    axes[2].set_title("prior draws (scaled by 2.5 / sigma_max),\ncoloured by steps", fontsize=10)
    scatter(axes[3], sols["DPM-Solver++ 4 + corrector (log sigma)"].x, mixture, c=order.numpy(),
            cmap="plasma", alpha=0.9, s=3)
    axes[3].set_title("endpoints, coloured by the steps\ntheir sample took", fontsize=10)
    fig.colorbar(axes[3].collections[0], ax=axes[2:], shrink=0.8, label="steps (DPM-Solver++)")
    fig.suptitle("EDM probability-flow ODE of an 8-mode ring: every sample chooses its own steps",
                 y=1.04)
    save(fig, args, "adaptive_steps.png")


if __name__ == "__main__":
    main()
