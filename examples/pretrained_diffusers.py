"""A diffusers model through difsolve, on a small randomly initialised UNet2DModel (no downloads).

1. ``ds.from_diffusers(unet, DDIMScheduler)`` with ``ds.DPMSolver(1)`` on the scheduler's own
   timesteps reproduces diffusers' DDIM loop (eta = 0) from the same ``x_T``: the printed
   difference is float32 round-off.
2. The same model sampled with other difsolve solvers: DPM-Solver++(2) on 20 Karras steps in the
   timestep time of ``ds.DiscreteVP``, and k-diffusion's route (``process=ds.EDM(...)``: sigma
   time, input scaling ``c_in``) with Heun on 18 Karras steps.
3. Class conditioning through ``cond={"class_labels": ...}``.

A random network draws noise-like images, so the PNGs show that the pipeline runs (and that the
routes agree), not pretty pictures; swap in ``UNet2DModel.from_pretrained(...)`` for real ones.

Run:  python examples/pretrained_diffusers.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import difsolve as ds


def tiny_unet(num_class_embeds: int | None = None):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
                       num_class_embeds=num_class_embeds).eval()


def ddim_loop(unet, scheduler, x, steps: int, **cond) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t, **cond).sample, t, x).prev_sample
    return x


def save_grid(images: dict[str, torch.Tensor], path: Path) -> None:
    rows = len(images)
    cols = next(iter(images.values())).shape[0]
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.7 * rows), squeeze=False)
    for r, (title, batch) in enumerate(images.items()):
        for c in range(cols):
            img = batch[c].permute(1, 2, 0)
            img = (img - img.min()) / (img.max() - img.min() + 1e-12)  # per-image contrast
            axes[r, c].imshow(img.numpy())
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def main(quick: bool, out: Path) -> None:
    from diffusers import DDIMScheduler

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    batch = 2 if quick else 4
    ddim_steps = 10 if quick else 50
    unet = tiny_unet()
    scheduler = DDIMScheduler(clip_sample=False)
    field = ds.from_diffusers(unet, scheduler)
    print(f"process: {field.process}")
    x_T = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    # 1. DDIM parity
    ref = ddim_loop(unet, scheduler, x_T.clone(), ddim_steps)
    grid = ds.diffusers_timesteps(scheduler, ddim_steps)
    ddim = ds.sample(field, solver=ds.DPMSolver(1), steps=grid, x_T=x_T, t_start=float(grid[0]))
    diff = float((ddim.x - ref).abs().max() / ref.abs().max())
    print(f"DDIM {ddim_steps} steps: diffusers vs ds.DPMSolver(1): max |diff| / max |x| = "
          f"{diff:.1e} (nfe {ddim.stats.nfe})")

    # 2. other solvers on the same model and x_T
    dpm = ds.sample(field, solver=ds.DPMSolver(2), steps=20, x_T=x_T)
    edm = ds.EDM(field.process.sigma_min, field.process.sigma_max)
    kfield = ds.from_diffusers(unet, scheduler, process=edm)
    heun = ds.sample(kfield, solver=ds.Heun(), steps=8 if quick else 18,
                     x_T=x_T * edm.sigma_max)  # k-diffusion's prior is N(0, sigma_max^2)
    print(f"DPM-Solver++(2), 20 Karras steps: nfe {dpm.stats.nfe}; "
          f"Heun in sigma time: nfe {heun.stats.nfe}")

    # 3. class conditioning
    cunet = tiny_unet(num_class_embeds=4)
    cfield = ds.from_diffusers(cunet, scheduler)
    labels = torch.arange(batch) % 4
    cond = ds.sample(cfield, solver=ds.DPMSolver(2), steps=10 if quick else 20, x_T=x_T,
                     cond={"class_labels": labels})
    cref = ddim_loop(cunet, DDIMScheduler(clip_sample=False), x_T.clone(), ddim_steps,
                     class_labels=labels)
    print(f"class-conditional sample: labels {labels.tolist()}, nfe {cond.stats.nfe}")

    save_grid({"diffusers DDIM": ref, "ds.DPMSolver(1)": ddim.x, "ds.DPMSolver(2) 20": dpm.x,
               "Heun, sigma time": heun.x}, out / "pretrained_diffusers.png")
    save_grid({"DDIM, class": cref, "ds DPM2, class": cond.x}, out / "pretrained_conditional.png")
    print(f"wrote {out / 'pretrained_diffusers.png'} and {out / 'pretrained_conditional.png'} "
          f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and images")
    parser.add_argument("--out", type=Path, default=Path("."), help="output folder for PNGs")
    args = parser.parse_args()
    main(args.quick, args.out)
