"""What every verb of the command line shares: the --verbose flag, grid options, one-line errors."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

GRID_IMAGES = 64
# Classifier-free guidance scale w of kddpm sample and the training grids of conditional models
# (chosen from the figures of the guidance benchmark; see the README).
DEFAULT_GUIDANCE = 0.5
# kddpm sample's sampler (its steps are the sampler's default), chosen from the quality-per-call
# figures in the README.
DEFAULT_SAMPLER = "dpm++2m"


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
