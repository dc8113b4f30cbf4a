"""``kddpm export``: the EMA denoiser as a TF Serving SavedModel and/or ONNX, checked against Keras."""

from __future__ import annotations

import argparse

from kddpm.cli.common import add_clip_x0


def add_parser(verbs, common) -> None:
    export = verbs.add_parser(
        "export",
        parents=[common],
        help="export the EMA denoiser for TF Serving and ONNX Runtime",
        description="Export a trained model's EMA denoiser: a SavedModel in TF Serving's OUT/NAME/VERSION/ "
        "layout and/or OUT/NAME.onnx, each checked against the Keras model before it is written.",
    )
    export.add_argument("--model", required=True, help="run folder or .keras file")
    export.add_argument("--format", choices=["saved_model", "onnx", "all"], default="all")
    export.add_argument("--out", default="exported", help="base folder (default: exported)")
    export.add_argument("--name", default="kddpm", help="model name: the SavedModel folder and ONNX file name")
    export.add_argument("--version", type=int, help="SavedModel version (default: one more than the highest there)")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    add_clip_x0(export, "the SavedModel's sample signatures and the ONNX metadata clip x0")
    export.add_argument("--overwrite", action="store_true", help="replace an existing ONNX file")
    export.set_defaults(run=run)


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
