"""Sample grids a person can look at: tiles enlarged with nearest-neighbour, a thin gap between.

numpy only, and importing nothing else from kddpm: the deployment clients in ``export/``
(which run without TensorFlow) carry an identical copy, ``export/grid.py`` (a test keeps the two
the same), so every grid kddpm writes looks alike and ``cp -r export/`` is all a deployer needs.
"""

from __future__ import annotations

import math

import numpy as np

# Grids are enlarged to at least this width unless a scale is given: 64 Fashion-MNIST
# images tile to 224 px, too small to judge by eye.
MIN_GRID_WIDTH = 512
GAP_VALUE = 128  # mid-grey: visible between black and between white backgrounds


def grid_scale_for(columns: int, tile_width: int, min_width: int = MIN_GRID_WIDTH) -> int:
    """The smallest integer enlargement that makes ``columns`` tiles at least ``min_width`` wide."""
    return max(1, math.ceil(min_width / max(1, columns * tile_width)))


def image_grid(
    images: np.ndarray,
    columns: int | None = None,
    scale: int | None = None,
    gap: int = 2,
) -> np.ndarray:
    """Tiles uint8 images [N, H, W, C] row by row into one uint8 [rows*(s*H+g)-g, cols*(s*W+g)-g, C] image.

    columns: tiles per row (default: a near-square grid). scale: integer nearest-neighbour
    enlargement s of every tile (default: the smallest that makes the grid at least
    ``MIN_GRID_WIDTH`` pixels wide; 1 keeps the raw pixels). gap: g pixels of mid-grey between
    tiles (0 for none). Unfilled cells of the last row stay mid-grey.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"image_grid takes images [N, H, W, C] with N >= 1, got shape {images.shape}.")
    if images.dtype != np.uint8:
        raise ValueError(f"image_grid takes uint8 images, got {images.dtype}; convert [-1, 1] floats first.")
    count, height, width, channels = images.shape
    columns = int(columns or math.ceil(math.sqrt(count)))
    rows = math.ceil(count / columns)
    scale = int(scale) if scale is not None else grid_scale_for(columns, width)
    if scale < 1 or columns < 1 or gap < 0:
        raise ValueError(f"scale and columns must be >= 1 and gap >= 0, got {scale}, {columns}, {gap}.")
    tiles = images.repeat(scale, axis=1).repeat(scale, axis=2)
    tile_h, tile_w = height * scale, width * scale
    grid = np.full((rows * (tile_h + gap) - gap, columns * (tile_w + gap) - gap, channels), GAP_VALUE, np.uint8)
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        top, left = row * (tile_h + gap), column * (tile_w + gap)
        grid[top : top + tile_h, left : left + tile_w] = tile
    return grid
