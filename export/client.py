"""What the deployment scripts share: kddpm's defaults, the error type, class and clipping
arguments, progress lines and PNG output (numpy and the standard library only)."""

from __future__ import annotations

import argparse
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np

SAMPLERS = ("ddpm", "ddim", "dpm++2m", "dpm++2m_sde")
# kddpm's defaults (kddpm/defaults.py; a test keeps them equal).
DEFAULT_SAMPLER = "dpm++2m"
DEFAULT_STEPS = {"ddim": 50, "dpm++2m": 20, "dpm++2m_sde": 20}
DEFAULT_GUIDANCE = 1.0
DYNAMIC_THRESHOLD_QUANTILE = 0.995
REPAINT_STEPS = 250
REPAINT_JUMP_LENGTH = 10
REPAINT_JUMP_N_SAMPLE = 10


class KddpmOnnxError(ValueError):
    """Bad input: the message names the problem and the fix."""


class Progress:
    """A step counter on stderr: redrawn in place on a terminal, a line at each tenth otherwise."""

    def __init__(self, total: int):
        self.total, self.started, self.shown = total, time.perf_counter(), -1

    def update(self, done: int) -> None:
        elapsed = time.perf_counter() - self.started
        text = f"step {done}/{self.total}, {elapsed:.0f} s"
        if sys.stderr.isatty():
            filled = round(30 * done / self.total)
            print(f"\r[{'=' * filled}{' ' * (30 - filled)}] {text}", end="\n" if done == self.total else "",
                  file=sys.stderr, flush=True)  # fmt: skip
        elif done * 10 // self.total > self.shown:
            self.shown = done * 10 // self.total
            print(text, file=sys.stderr, flush=True)


def class_index(metadata: dict, name_or_index: str) -> int:
    """A class given by name (case-insensitive) or index, checked against the model's classes
    (``metadata``: ``num_classes`` and ``class_names``, as ``read_metadata`` gives them)."""
    classes, names = metadata["num_classes"], metadata["class_names"]
    if not classes:
        raise KddpmOnnxError("This model is unconditional; --class needs a class-conditional model.")
    if name_or_index.strip().isdigit():
        index = int(name_or_index)
        if index > classes:
            raise KddpmOnnxError(f"Class {index} is outside [0, {classes - 1}] ({classes}: unconditional).")
        return index
    folded = {name.lower(): i for i, name in enumerate(names)}
    if name_or_index.lower() not in folded:
        raise KddpmOnnxError(f"Unknown class {name_or_index!r}; this model's classes are {', '.join(names)}.")
    return folded[name_or_index.lower()]


# --- Output ----------------------------------------------------------------------------------


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 0..255."""
    return np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """Writes a uint8 [H, W, 1|3] image as an 8-bit PNG (zlib only, so no imaging library)."""
    height, width, channels = image.shape
    color_type = {1: 0, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\x00" + image[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    path = Path(path)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    )
    return path


def add_class_arguments(parser: argparse.ArgumentParser) -> None:
    """--class and --guidance, as both deployment clients take them."""
    parser.add_argument(
        "--class",
        dest="classes",
        action="append",
        metavar="NAME_OR_INDEX",
        help="class-conditional models: draw this class; repeat for several (one row each, --num images in all)",
    )
    parser.add_argument(
        "--guidance",
        type=float,
        default=DEFAULT_GUIDANCE,
        help=f"guidance scale w with --class (default {DEFAULT_GUIDANCE})",
    )


def add_clip_arguments(parser: argparse.ArgumentParser) -> None:
    """--clip-x0 [dynamic] and --no-clip-x0 (default: the model's own setting), as kddpm sample takes them."""

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
        help="clip the predicted x0 to [-1, 1] at each step; --clip-x0 dynamic: dynamic thresholding "
        "(default: the model's own setting)",
    )
    group.add_argument("--no-clip-x0", dest="clip_x0", action="store_const", const=False, help="do not clip x0")


def class_rows(indices: list[int], num: int) -> tuple[np.ndarray, int | None]:
    """(labels, images per row): one class for all ``num`` images, or one row per class."""
    if len(indices) == 1:
        return np.full(num, indices[0], np.int32), None
    per_row = max(1, num // len(indices))
    return np.repeat(np.asarray(indices, np.int32), per_row), per_row
