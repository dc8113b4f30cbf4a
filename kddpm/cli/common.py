"""What every verb of the command line shares: the --verbose flag, grid options, one-line errors."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

GRID_IMAGES = 64


def verbose_flag() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="show TensorFlow's logs and full tracebacks")
    return common


def positive(args: argparse.Namespace, *names: str) -> None:
    """Refuses a count option below 1, naming the flag (0 never means "the default")."""
    from kddpm.errors import KddpmError

    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise KddpmError(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")


def add_clip_x0(parser: argparse.ArgumentParser, what: str = "clip the predicted x0 to [-1, 1] at each step") -> None:
    """--clip-x0 [dynamic] / --no-clip-x0 -> args.clip_x0 in (None, True, False, 'dynamic')."""

    def mode(text: str):
        if text in ("on", "dynamic"):
            return True if text == "on" else "dynamic"
        raise argparse.ArgumentTypeError(f"--clip-x0 takes no value, 'on' or 'dynamic', not {text!r}")

    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--clip-x0",
        nargs="?",
        const=True,
        type=mode,
        metavar="dynamic",
        help=f"{what}; --clip-x0 dynamic: dynamic thresholding (Saharia et al. 2022); default: the model's own "
        "setting (on for models trained here)",
    )
    group.add_argument("--no-clip-x0", dest="clip_x0", action="store_const", const=False, help="do not clip x0")


def add_grid_scale(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--grid-scale",
        type=int,
        help="enlarge each image of a grid this many times (default: grids at least 512 px wide; 1: raw pixels)",
    )


def save_atomically(model, path: Path) -> None:
    """Saves beside ``path`` and renames, so that a crash never leaves a half-written model."""
    partial = path.with_name(path.stem + ".partial.keras")
    model.save(partial)
    os.replace(partial, path)
