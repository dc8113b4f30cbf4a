"""What every verb of the command line shares: the --verbose flag, help layout, checks that run
before any slow work (counts, output paths, option combinations), grid options, saving.

Nothing here imports TensorFlow: ``kddpm VERB --help`` and every argument check answer at once.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import textwrap
from pathlib import Path

from kddpm.errors import KddpmError

GRID_IMAGES = 64


def add_verb(verbs, common, name: str, summary: str, description: str, examples: list[str]):
    """A verb's parser: a one-line summary for ``kddpm --help``, a description, and an examples
    section at the end of ``kddpm NAME --help``."""
    paragraphs = [part if "\n  " in part else textwrap.fill(part, width=100) for part in description.split("\n\n")]
    return verbs.add_parser(
        name,
        parents=[common],
        help=summary,
        description="\n\n".join(paragraphs),
        epilog="examples:\n" + "\n".join(f"  {line}" for line in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def plural(count: int, word: str) -> str:
    """'1 epoch', '2 epochs'."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def writable_output(path: Path, flag: str = "--out") -> Path:
    """``path``, after checking that a file can be written where it goes (its folder is made
    if missing); a one-line error naming ``flag`` otherwise. Run before any slow work."""
    folder = path if path.is_dir() else path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".kddpm-write-check-"):
            pass
    except OSError as error:
        raise KddpmError(
            f"{flag} {path}: cannot write to {folder} ({error.strerror or error}); choose another {flag}."
        ) from None
    return path


def refuse_unused(args: argparse.Namespace, defaults: dict, reason: str) -> None:
    """Refuses options given with a value other than their default when they would have no effect.

    defaults: {dest: default} of the options concerned; reason: what they go with, naming the flag
    that would make them count ("--steps-per-epoch goes with --steps").
    """
    given = [name for name, default in defaults.items() if getattr(args, name) != default]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise KddpmError(f"{flags} would have no effect here: {reason}.")


def verbose_flag() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="show TensorFlow's logs and full tracebacks")
    return common


def positive(args: argparse.Namespace, *names: str) -> None:
    """Refuses a count option below 1, naming the flag (0 never means "the default")."""
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
