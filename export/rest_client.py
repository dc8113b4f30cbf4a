#!/usr/bin/env python3
"""Asks a TF Serving server for samples through the SavedModel's ``sample`` signature.

    python rest_client.py --url http://localhost:8501 --model kddpm --num 16   # DPM-Solver++(2M), 20 steps
    python rest_client.py --model kddpm-conditional --class sneaker --class bag --guidance 0.5 --num 16
    python rest_client.py --model kddpm --input photos/ --strength 0.5 --out edited.png    # img2img
    python rest_client.py --model kddpm --input photos/ --mask lower_half.png --out filled.png

The request is TF Serving's REST row format (columnar for class-conditional requests, whose
labels have one entry per image); the response holds uint8 images [B, H, W, C], written as one
PNG grid. Class names come from a conditional model's ``class_names`` signature. Needs numpy and
the standard library only (and Pillow to read --input images).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

import numpy as np
from client import (
    DEFAULT_SAMPLER,
    SAMPLERS,
    KddpmOnnxError,
    add_class_arguments,
    class_index,
    class_rows,
    write_png,
)
from grid import image_grid


def request_samples(
    url: str,
    model: str,
    num_images: int,
    sampler: str = DEFAULT_SAMPLER,
    steps: int = 0,
    seed: int = 0,
    timeout: float = 600,
    labels: list[int] | None = None,
    guidance_scale: float = 0.0,
) -> np.ndarray:
    """POSTs one ``sample`` request; returns uint8 images [num_images, H, W, C].

    steps 0 (and sampler "") ask the server for the sampler's default steps (kddpm's defaults).
    labels: one class index per image, for a class-conditional model, with the classifier-free
    guidance scale ``guidance_scale``.
    """
    options = {"num_images": num_images, "seed": seed, "sampler": sampler, "steps": steps}
    if labels is None:
        answer = _post(url, model, {"signature_name": "sample", "instances": [options]}, timeout)
        return np.asarray(answer["predictions"], dtype=np.uint8)
    # Columnar format, where inputs need not share a batch size (labels has one entry per image).
    inputs = {name: [value] for name, value in options.items()}
    inputs.update(labels=[int(label) for label in labels], guidance_scale=[guidance_scale])
    answer = _post(url, model, {"signature_name": "sample", "inputs": inputs}, timeout)
    return np.asarray(answer["outputs"], dtype=np.uint8)


def request_edit(
    url: str,
    model: str,
    images: np.ndarray,
    strength: float | None = None,
    mask: np.ndarray | None = None,
    sampler: str = DEFAULT_SAMPLER,
    steps: int = 0,
    seed: int = 0,
    timeout: float = 1800,
    labels: list[int] | None = None,
    guidance_scale: float = 0.0,
) -> np.ndarray:
    """POSTs one ``img2img`` (with ``strength``) or ``inpaint`` (with ``mask`` [B, H, W], 1 = fill)
    request for uint8 ``images`` [B, H, W, C]; returns the edited uint8 images [B, H, W, C]."""
    if (strength is None) == (mask is None):
        raise KddpmOnnxError("Give strength (img2img) or mask (inpainting), one of them.")
    inputs = {"images": np.asarray(images, np.uint8).tolist(), "seed": [seed]}
    if strength is not None:
        inputs.update(strength=[float(strength)], sampler=[sampler], steps=[steps])
    else:
        inputs["mask"] = np.asarray(mask, np.float32).tolist()
    if labels is not None:
        inputs.update(labels=[int(label) for label in labels], guidance_scale=[guidance_scale])
    signature = "img2img" if strength is not None else "inpaint"
    answer = _post(url, model, {"signature_name": signature, "inputs": inputs}, timeout)
    return np.asarray(answer["outputs"], dtype=np.uint8)


def class_names(url: str, model: str, timeout: float = 60) -> list[str]:
    """The class names a class-conditional model was exported with (its ``class_names`` signature)."""
    answer = _post(url, model, {"signature_name": "class_names", "inputs": {"index": [0]}}, timeout)
    return list(answer["outputs"])


def _post(url: str, model: str, body: dict, timeout: float) -> dict:
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
    return answer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Sample images from a kddpm model served by TF Serving.")
    parser.add_argument("--url", default="http://localhost:8501", help="the server's REST address")
    parser.add_argument("--model", default="kddpm", help="model name in models.config")
    parser.add_argument("--num", type=int, default=16, help="number of images (default 16)")
    parser.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER, help=f"default {DEFAULT_SAMPLER}")
    parser.add_argument(
        "--steps", type=int, default=0, help="steps (default 0: the sampler's default, 50 DDIM, 20 DPM-Solver++)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the server's sampler (default 0)")
    add_class_arguments(parser)
    parser.add_argument(
        "--input", nargs="+", help="edit these image files or folders (with --strength or --mask) instead of sampling"
    )
    parser.add_argument("--strength", type=float, help="with --input: img2img (SDEdit) strength in (0, 1]")
    parser.add_argument("--mask", help="with --input: inpaint (RePaint) where this mask image is white")
    parser.add_argument("--out", default="served_samples.png", help="PNG grid to write (default served_samples.png)")
    parser.add_argument(
        "--grid-scale", type=int, help="enlarge each image this many times (default: a grid >= 512 px wide; 1: raw)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if (args.strength is not None or args.mask) and not args.input:
            raise KddpmOnnxError("--strength and --mask edit images: give them with --input FILE_OR_FOLDER.")
        if args.input and (args.strength is None) == (args.mask is None):
            raise KddpmOnnxError("--input takes one edit: --strength S (img2img) or --mask MASK.png (inpainting).")
        if args.strength is not None and not 0 < args.strength <= 1:
            raise KddpmOnnxError(f"--strength must be in (0, 1], got {args.strength}.")
        labels, columns, guidance = None, None, 0.0
        if args.classes:
            names = class_names(args.url, args.model)
            metadata = {"num_classes": len(names), "class_names": names}
            labels, columns = class_rows([class_index(metadata, name) for name in args.classes], args.num)
            labels = [int(label) for label in labels]
            guidance = args.guidance
        if not args.input:
            num = args.num if labels is None else len(labels)
            images = request_samples(
                args.url, args.model, num, args.sampler, args.steps, args.seed, labels=labels, guidance_scale=guidance
            )
        else:
            images = _edit(args, labels, guidance)
    except KddpmOnnxError as error:
        raise SystemExit(f"error: {error}") from None
    path = write_png(args.out, image_grid(images, columns=None if args.input else columns, scale=args.grid_scale))
    print(f"{'Edited images' if args.input else 'Samples'}: {path}")
    return 0


def _edit(args: argparse.Namespace, labels: list[int] | None, guidance: float) -> np.ndarray:
    """The --input images edited on the server; the model's image shape comes from its answer to a
    one-image ``sample`` request, so that the inputs are resized to it here."""
    import onnx_edit  # reads image files with Pillow

    if labels is not None and len(set(labels)) > 1:
        raise KddpmOnnxError("Editing takes one --class for all the --input images.")
    probe = request_samples(args.url, args.model, 1, "ddim", 1, labels=labels[:1] if labels else None)
    images = onnx_edit.read_images(args.input, probe.shape[1:])
    labels = None if labels is None else [labels[0]] * len(images)
    mask = None if args.mask is None else onnx_edit.read_mask(args.mask, len(images), *probe.shape[1:3])
    return request_edit(
        args.url, args.model, images, args.strength, mask, args.sampler, args.steps, args.seed,
        labels=labels, guidance_scale=guidance,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
