"""Train a tiny score network on 2-D data (denoising score matching), then sample it with difsolve.

Data: 8-mode ring, unequal weights. Model: a 3-layer MLP with EDM's preconditioning
(``D(x, sigma) = c_skip x + c_out F(c_in x, log(sigma) / 4)``), trained with EDM's loss and
log-normal noise levels (Karras et al. 2022) by Adam. The trained denoiser plugs in through
``ds.Denoiser(model, ds.EDM())`` (a network predicting eps, x0, v or the score would use
``ds.ScoreNetwork(model, process, predicts=...)``) and is sampled with DPM-Solver++ 3M (20
log-SNR steps) and the adaptive DPM-Solver++ 4 + corrector, next to the exact score of the same
mixture. Panels: the training loss, samples of each, and their mode-weight error.

Run:  python examples/train_tiny_score.py [--quick] [--out DIR]     (--quick: a few seconds)
"""

from __future__ import annotations

import math

import torch
from _common import nfe, parse_args, pyplot, ring, save, scatter
from torch import nn

import difsolve as ds


class TinyDenoiser(nn.Module):
    """EDM-preconditioned denoiser ``D(x, sigma) = c_skip x + c_out F(c_in x, log(sigma) / 4)``
    with ``F`` a 3-layer MLP (Karras et al. 2022, Table 1)."""

    def __init__(self, sigma_data: float, width: int = 128):
        super().__init__()
        self.sigma_data = sigma_data
        self.net = nn.Sequential(nn.Linear(3, width), nn.SiLU(), nn.Linear(width, width),
                                 nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, 2))

    def scalings(self, sigma: torch.Tensor):
        sd2, s2 = self.sigma_data**2, sigma.square()[:, None]
        return sd2 / (s2 + sd2), sigma[:, None] * self.sigma_data / (s2 + sd2).sqrt(), \
            1 / (s2 + sd2).sqrt()

    def raw(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        _, _, c_in = self.scalings(sigma)
        return self.net(torch.cat([c_in * x, sigma.log()[:, None] / 4], 1))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        c_skip, c_out, _ = self.scalings(sigma)
        return c_skip * x + c_out * self.raw(x, sigma)


def train(model: TinyDenoiser, data: ds.GaussianMixture, iters: int, batch: int,
          seed: int) -> list[float]:
    """EDM's loss: ``|F(c_in x, c_noise) - (x0 - c_skip x) / c_out|^2`` at ``x = x0 + sigma z``,
    ``log sigma ~ N(-1.2, 1.2^2)``, Adam; returns the loss per iteration."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    losses = []
    for _ in range(iters):
        x0 = data.sample(batch, gen).float()
        sigma = (-1.2 + 1.2 * torch.randn(batch, generator=gen)).exp()
        x = x0 + sigma[:, None] * torch.randn(x0.shape, generator=gen)
        c_skip, c_out, _ = model.scalings(sigma)
        loss = (model.raw(x, sigma) - (x0 - c_skip * x) / c_out).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def errors(x: torch.Tensor, mixture: ds.GaussianMixture) -> tuple[float, float]:
    """``(max_k |fraction_k - w_k|, RMS distance to the nearest mode mean)``; the exact mixture
    has distance ``0.1 sqrt(2) = 0.141``."""
    dist, nearest = torch.cdist(x.double(), mixture.means).min(1)
    frac = torch.bincount(nearest, minlength=len(mixture.weights)).double() / x.shape[0]
    return float((frac - mixture.weights).abs().max()), float(dist.square().mean().sqrt())


def main() -> None:
    args = parse_args(__doc__)
    torch.manual_seed(args.seed)
    data = ring(unequal=True)
    process = ds.EDM()
    model = TinyDenoiser(sigma_data=float(data.sample(4096).square().mean().sqrt()))
    iters = 1000 if args.quick else 5000
    losses = train(model, data, iters, 256 if args.quick else 512, args.seed)
    model.eval()
    n = 1000 if args.quick else 4000
    fields = {"trained network": ds.Denoiser(model, process),
              "exact score": data.score_field(process)}
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(12, 8.6))
    axes = axes.ravel()
    axes[0].semilogy(losses, lw=0.6, c="0.3")
    window = max(1, iters // 50)
    smooth = torch.tensor(losses).unfold(0, window, 1).mean(1)
    axes[0].semilogy(range(window - 1, iters), smooth, c="tab:red", label=f"mean of {window}")
    axes[0].set_title(f"training loss (EDM), {iters} Adam steps")
    axes[0].set_xlabel("iteration")
    axes[0].legend(fontsize=8)
    draws = data.sample(n, torch.Generator().manual_seed(1))
    scatter(axes[1], draws, data, c="0.35")
    axes[1].set_title(f"data: 8 modes, weights 1..8/36\n{n} exact draws\n"
                      f"distance to the nearest mode {errors(draws, data)[1]:.3f}", fontsize=8)
    samplers = {"DPM-Solver++ 3M, 20 log-SNR steps": dict(solver=ds.DPMSolver(3), steps=20,
                                                          schedule="logsnr"),
                "DPM-Solver++ 4 + corrector, adaptive": dict(
                    solver=ds.DPMSolver(4, corrector=True),
                    controller=ds.PIController(rtol=1e-3, atol=1e-3, pcoeff=0.3, icoeff=0.4,
                                               safety=0.8))}
    ax_iter = iter(axes[2:])
    with torch.no_grad():
        for fname, field in fields.items():
            for sname, kw in samplers.items():
                sol = ds.sample(field, (n, 2), generator=torch.Generator().manual_seed(2),
                                dtype=torch.float32, **kw)
                w, d = errors(sol.x, data)
                print(f"{fname:16s} {sname:38s} NFE/sample {nfe(sol):5.1f}  weight err {w:.3f}  "
                      f"distance {d:.3f}  status {sol.status.unique().tolist()}")
                ax = next(ax_iter)
                scatter(ax, sol.x, data, c="tab:blue" if fname.startswith("trained") else "0.35")
                ax.set_title(f"{fname}\n{sname}\nNFE {nfe(sol):.0f} | weight err {w:.3f} | "
                             f"distance {d:.3f}", fontsize=8)
    fig.suptitle(f"a {sum(p.numel() for p in model.parameters())}-parameter denoiser trained "
                 f"on EDM, sampled through ds.Denoiser (binomial noise of the weight error ~ "
                 f"{0.5 / math.sqrt(n):.3f})", fontsize=10)
    save(fig, args, "train_tiny_score.png")


if __name__ == "__main__":
    main()
