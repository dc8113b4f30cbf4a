"""Makes the diffusers fixtures that tests/test_interop.py compares kddpm with.

Run once, in a separate virtual environment that has torch and diffusers (kddpm itself never
imports either):

    python -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch==2.13.0 diffusers==0.42.1 safetensors numpy
    /tmp/torchenv/bin/python tools/make_diffusers_fixtures.py --out tests/fixtures/diffusers

It writes, with random weights (perturbed so that no norm scale is exactly 1 and no bias 0):
- ``cifar_pipeline/``: a ``DDPMPipeline.save_pretrained`` folder whose U-Net has the layout of
  google/ddpm-cifar10-32 (attention at 16x16 only, 2 blocks a level) with 4-8 channels;
- ``six_levels/``: a bare model folder (config.json, weights, scheduler_config.json) with the
  six-level pattern of the 256x256 google/ddpm-* models, at 64x64 with 4-8 channels;
- in each, ``eps.npz``: inputs x [B, C, H, W] (NCHW, PyTorch's layout), timesteps t [B] and
  the network's output eps [B, C, H, W];
- ``cifar_pipeline/dpm_solver.npz``: x_T and what DPMSolverMultistepScheduler (defaults) makes
  of it with that U-Net in 1, 2, 10 and 20 steps (ODE) and 1, 2 and 8 (SDE, with its noise);
- ``schedules.npz``: DDPMScheduler's float32 betas and alphas_cumprod for each beta_schedule,
  and its variance at a few timesteps;
- ``repaint_timesteps.npz``: RePaintScheduler.set_timesteps' sequences for a few (T, steps,
  jump_length, jump_n_sample), the resampling schedule kddpm's inpainting follows.

``--full-size DIR`` also writes the full google/ddpm-cifar10-32 architecture (35.7M random
weights, 143 MB: not committed) with its eps.npz; KDDPM_DIFFUSERS_FULL=DIR makes the tests
check it too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import DDPMPipeline, DDPMScheduler, RePaintScheduler, UNet2DModel

# (num_train_timesteps, steps, jump_length, jump_n_sample) of the RePaint fixture.
REPAINT_SETTINGS = ((1000, 250, 10, 10), (1000, 100, 5, 3), (1000, 50, 10, 1), (200, 40, 4, 2), (64, 64, 3, 4))

CIFAR10 = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    time_embedding_type="positional",
    freq_shift=1,
    flip_sin_to_cos=False,
    downsample_padding=0,
    norm_eps=1e-6,
    norm_num_groups=32,
    attention_head_dim=None,
    act_fn="silu",
    center_input_sample=False,
    mid_block_scale_factor=1,
)
SMALL_CIFAR10 = {**CIFAR10, "block_out_channels": (4, 8, 8, 8), "norm_num_groups": 4}
SIX_LEVELS = {
    **CIFAR10,
    "sample_size": 64,
    "block_out_channels": (4, 4, 4, 8, 8, 8),
    "norm_num_groups": 4,
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
}


def random_unet(config: dict, seed: int) -> UNet2DModel:
    torch.manual_seed(seed)
    unet = UNet2DModel(**config).eval()
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return unet


def write_eps(unet: UNet2DModel, folder: Path, seed: int) -> None:
    config = unet.config
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    t = torch.tensor([0, 999])
    with torch.no_grad():
        eps = unet(x, t).sample
    np.savez(folder / "eps.npz", x=x.numpy(), t=t.numpy().astype(np.int32), eps=eps.numpy())


def write_dpm_solver(unet: UNet2DModel, scheduler_config: dict, folder: Path, seed: int) -> None:
    """DPMSolverMultistepScheduler (its defaults: DPM-Solver++(2M), midpoint, linspace spacing,
    final sigma 0) run with the U-Net from a fixed x_T; the SDE variant with recorded noise."""
    from diffusers import DPMSolverMultistepScheduler

    generator = torch.Generator().manual_seed(seed)
    config = unet.config
    x_T = torch.randn(2, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    arrays = {"x_T": x_T.numpy()}
    for algorithm, key, step_counts in (("dpmsolver++", "ode", (1, 2, 10, 20)), ("sde-dpmsolver++", "sde", (1, 2, 8))):
        for steps in step_counts:
            scheduler = DPMSolverMultistepScheduler.from_config(scheduler_config, algorithm_type=algorithm)
            scheduler.set_timesteps(steps)
            x, noises = x_T.clone(), []
            with torch.no_grad():
                for t in scheduler.timesteps:
                    eps = unet(x, t).sample
                    noise = torch.randn(x.shape, generator=generator)
                    noises.append(noise.numpy())
                    x = scheduler.step(eps, t, x, variance_noise=noise).prev_sample
            arrays[f"{key}_{steps}"] = x.numpy()
            arrays[f"{key}_{steps}_timesteps"] = scheduler.timesteps.numpy()
            if key == "sde":
                arrays[f"{key}_{steps}_noise"] = np.stack(noises)
    np.savez(folder / "dpm_solver.npz", **arrays)


def write_schedules(path: Path) -> None:
    tables = {}
    trained = np.linspace(1e-4, 0.03, 1000) ** 1.5
    for name, kwargs in {
        "linear": dict(beta_schedule="linear"),
        "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
        "trained": dict(trained_betas=trained.tolist()),
    }.items():
        scheduler = DDPMScheduler(num_train_timesteps=1000, **kwargs)
        tables[f"{name}_betas"] = scheduler.betas.numpy()
        tables[f"{name}_alphas_cumprod"] = scheduler.alphas_cumprod.numpy()
        tables[f"{name}_variance"] = np.array([float(scheduler._get_variance(t)) for t in (0, 487, 999)])
    tables["trained_input"] = trained
    tables["variance_timesteps"] = np.array([0, 487, 999])
    np.savez(path, **tables)


def write_repaint(path: Path) -> None:
    arrays = {}
    for timesteps, steps, jump_length, jump_n_sample in REPAINT_SETTINGS:
        scheduler = RePaintScheduler(num_train_timesteps=timesteps)
        scheduler.set_timesteps(steps, jump_length=jump_length, jump_n_sample=jump_n_sample)
        arrays[f"{timesteps}_{steps}_{jump_length}_{jump_n_sample}"] = scheduler.timesteps.numpy()
    np.savez(path, **arrays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/fixtures/diffusers")
    parser.add_argument("--full-size", help="also write the full ddpm-cifar10-32 architecture here")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    unet = random_unet(SMALL_CIFAR10, seed=1)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_small")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out / "cifar_pipeline", safe_serialization=True)
    write_eps(unet, out / "cifar_pipeline", seed=2)
    write_dpm_solver(unet, scheduler.config, out / "cifar_pipeline", seed=7)

    unet = random_unet(SIX_LEVELS, seed=3)
    unet.save_pretrained(out / "six_levels", safe_serialization=True)
    DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", variance_type="fixed_large", clip_sample=False
    ).save_config(out / "six_levels")
    write_eps(unet, out / "six_levels", seed=4)

    write_schedules(out / "schedules.npz")
    write_repaint(out / "repaint_timesteps.npz")
    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__, "numpy": np.__version__}
    (out / "VERSIONS.json").write_text(json.dumps(versions, indent=2) + "\n")

    if args.full_size:
        full = Path(args.full_size)
        unet = random_unet(CIFAR10, seed=5)
        unet.save_pretrained(full, safe_serialization=True)
        DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True).save_config(full)
        write_eps(unet, full, seed=6)
        print(f"Full-size: {full} ({sum(p.numel() for p in unet.parameters()):,} parameters)")
    print(f"Fixtures: {out}")


if __name__ == "__main__":
    main()
