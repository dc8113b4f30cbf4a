#!/usr/bin/env python3
"""Asks a TF Serving server for samples through the SavedModel's ``sample`` signature.

    python rest_client.py --url http://localhost:8501 --model kddpm --num 16 --sampler ddim --steps 50

The request is TF Serving's REST row format; the response's ``predictions`` are uint8 images
[B, H, W, C], written as one PNG grid. Needs numpy and the standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

import numpy as np
from grid import image_grid
from onnx_sample import write_png


def request_samples(
    url: str, model: str, num_images: int, sampler: str = "ddim", steps: int = 50, seed: int = 0, timeout: float = 600
) -> np.ndarray:
    """POSTs one ``sample`` request; returns uint8 images [num_images, H, W, C]."""
    body = {
        "signature_name": "sample",
        "instances": [{"num_images": num_images, "seed": seed, "sampler": sampler, "steps": steps}],
    }
    request = urllib.request.Request(
        f"{url.rstrip('/')}/v1/models/{model}:predict",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as error:
        # TF Serving puts the reason (wrong input, failed check) in the body's "error".
        detail = error.read().decode(errors="replace")
        raise SystemExit(f"error: the server answered {error.code}: {detail}") from None
    except urllib.error.URLError as error:
        raise SystemExit(f"error: cannot reach {url} ({error.reason}); is the server running?") from None
    return np.asarray(answer["predictions"], dtype=np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Sample images from a kddpm model served by TF Serving.")
    parser.add_argument("--url", default="http://localhost:8501", help="the server's REST address")
    parser.add_argument("--model", default="kddpm", help="model name in models.config")
    parser.add_argument("--num", type=int, default=16)
    parser.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddim")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (DDPM ignores it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="served_samples.png")
    parser.add_argument(
        "--grid-scale", type=int, help="enlarge each image this many times (default: a grid >= 512 px wide; 1: raw)"
    )
    args = parser.parse_args(argv)
    images = request_samples(args.url, args.model, args.num, args.sampler, args.steps, args.seed)
    print(f"Samples: {write_png(args.out, image_grid(images, scale=args.grid_scale))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
