"""``kddpm export``: the EMA denoiser as a TF Serving SavedModel and/or ONNX, checked against Keras."""

from __future__ import annotations

import argparse
from pathlib import Path

from kddpm.cli.common import add_clip_x0, add_verb, writable_output
from kddpm.errors import KddpmError

FORMATS = ("saved_model", "onnx", "all")


def add_parser(verbs, common) -> None:
    export = add_verb(
        verbs,
        common,
        "export",
        "export the EMA denoiser for TF Serving and ONNX Runtime",
        "Export a trained model's EMA denoiser: a SavedModel in TF Serving's OUT/NAME/VERSION/ layout (with "
        "sample signatures) and/or OUT/NAME.onnx, each checked against the Keras model before it is written "
        "(docs/deployment.md).",
        [
            "kddpm export --model runs/demo                        # exported/kddpm/1/ and exported/kddpm.onnx",
            "kddpm export --model runs/demo --format onnx --name fashion --out deploy",
            "python export/onnx_sample.py --model exported/kddpm.onnx --num 16",
        ],
    )
    export.add_argument("--model", required=True, help="run folder or .keras file")
    export.add_argument("--format", choices=FORMATS, default="all", help="what to write (default all: both)")
    export.add_argument("--out", default="exported", help="base folder (default exported)")
    export.add_argument(
        "--name", default="kddpm", help="model name: the SavedModel folder and the ONNX file's name (default kddpm)"
    )
    export.add_argument("--version", type=int, help="SavedModel version (default: one more than the highest there)")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    add_clip_x0(export, "the SavedModel's sample signatures and the ONNX metadata clip x0")
    export.add_argument(
        "--overwrite", action="store_true", help="replace an existing ONNX file (default: refuse; versions never are)"
    )
    export.set_defaults(run=run, check=check_arguments)


def check_arguments(args: argparse.Namespace) -> None:
    if args.format == "onnx" and args.version is not None:
        raise KddpmError("--version numbers SavedModels; add --format saved_model (or all), or leave it out.")
    if args.format == "saved_model" and args.overwrite:
        raise KddpmError("--overwrite replaces an ONNX file; SavedModel versions are never replaced (use --version).")
    writable_output(Path(args.out) / args.name)


def run(args: argparse.Namespace) -> int:
    from kddpm.export import export_model

    results = export_model(
        args.model,
        args.out,
        args.format,
        model_name=args.name,
        version=args.version,
        opset=args.opset,
        clip_x0=args.clip_x0,
        overwrite=args.overwrite,
        log=print,
    )
    for result in results:
        print(f"  {result.path}: max |{result.label} - Keras| = {result.max_abs_diff:.2e}")
    names = {"saved_model": "SavedModel", "onnx": "ONNX"}
    print("Exported: " + "  ".join(f"{names[result.format]}: {result.path}" for result in results))
    return 0
