"""The paper's published architectures in kddpm: parameter counts and cost of a sampling step.

    python benchmarks/bench_pretrained.py [--steps 3] [--batch 1]

Builds, from the UNet2DModel configs of google/ddpm-cifar10-32 and the 256x256 google/ddpm-*
models (church, bedroom, cat, CelebA-HQ share one architecture), the network
``kddpm.interop.from_diffusers`` would build, with random weights (nothing is downloaded), and
times the compiled reverse loop per step (one network call) on this machine. Prints figures,
asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from kddpm import build_unet
from kddpm.interop import unet_kwargs_from_config
from kddpm.sampling import Sampler, ddim_plan
from kddpm.schedule import NoiseSchedule

DDPM_FAMILY = {
    "freq_shift": 1,
    "flip_sin_to_cos": False,
    "downsample_padding": 0,
    "norm_eps": 1e-6,
    "norm_num_groups": 32,
    "attention_head_dim": None,
    "layers_per_block": 2,
    "in_channels": 3,
    "out_channels": 3,
}
CONFIGS = {
    "google/ddpm-cifar10-32": {
        **DDPM_FAMILY,
        "sample_size": 32,
        "block_out_channels": [128, 256, 256, 256],
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    },
    "google/ddpm-{church,bedroom,cat,celebahq}-256": {
        **DDPM_FAMILY,
        "sample_size": 256,
        "block_out_channels": [128, 128, 256, 256, 512, 512],
        "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="reverse steps timed (after a compile run)")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    print("| checkpoint | parameters | sampling step, batch", args.batch, "|")
    for name, config in CONFIGS.items():
        kwargs = unet_kwargs_from_config(config)
        network = build_unet(**kwargs, seed=0)
        sampler = Sampler(network, kwargs["image_shape"])
        plan = ddim_plan(NoiseSchedule.linear(), args.steps)
        sampler.sample(plan, args.batch, seed=0).numpy()  # trace and compile
        start = time.perf_counter()
        sampler.sample(plan, args.batch, seed=1).numpy()
        seconds = (time.perf_counter() - start) / args.steps
        xla = "XLA" if sampler.uses_xla(args.batch) else "no XLA"
        print(f"| {name} | {network.count_params():,} | {seconds * 1000:.0f} ms ({xla}) |", flush=True)


if __name__ == "__main__":
    main()
