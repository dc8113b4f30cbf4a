"""Sample grids: enlarged with nearest-neighbour, a thin gap, one function for every writer."""

import filecmp
from pathlib import Path

import numpy as np
import pytest

from kddpm.grid import GAP_VALUE, MIN_GRID_WIDTH, image_grid

ROOT = Path(__file__).parents[1]


def test_tiles_are_enlarged_copies_separated_by_a_gap():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 3, 4, 1), dtype=np.uint8)
    grid = image_grid(images, columns=2, scale=3, gap=2)
    # 3 rows of 2 tiles, each 9x12, with 2-pixel gaps between them.
    assert grid.shape == (3 * 9 + 2 * 2, 2 * 12 + 2, 1)
    for index, image in enumerate(images):
        row, column = divmod(index, 2)
        tile = grid[row * 11 : row * 11 + 9, column * 14 : column * 14 + 12]
        np.testing.assert_array_equal(tile, np.kron(image[..., 0], np.ones((3, 3), np.uint8))[..., None])
    assert (grid[9:11] == GAP_VALUE).all() and (grid[:, 12:14] == GAP_VALUE).all()
    assert (grid[22:, 14:] == GAP_VALUE).all()  # the empty sixth cell


def test_default_scale_makes_grids_readable_and_scale_1_keeps_raw_pixels():
    images = np.zeros((64, 28, 28, 1), np.uint8)
    grid = image_grid(images)
    assert grid.shape[1] >= MIN_GRID_WIDTH and grid.shape[1] == 8 * 28 * 3 + 7 * 2
    raw = image_grid(images, scale=1, gap=0)
    assert raw.shape == (224, 224, 1)
    # Large images are not enlarged.
    assert image_grid(np.zeros((4, 256, 256, 3), np.uint8), gap=0).shape == (512, 512, 3)


def test_bad_grid_input():
    with pytest.raises(ValueError, match="uint8"):
        image_grid(np.zeros((2, 4, 4, 1), np.float32))
    with pytest.raises(ValueError, match="scale"):
        image_grid(np.zeros((2, 4, 4, 1), np.uint8), scale=0)


def test_the_deployment_clients_use_the_same_file():
    # export/grid.py is a copy of kddpm/grid.py (a plain file, so that `cp -r export/` works):
    # one implementation, kept identical here. After changing kddpm/grid.py: cp kddpm/grid.py export/
    assert not (ROOT / "export" / "grid.py").is_symlink()
    assert filecmp.cmp(ROOT / "export" / "grid.py", ROOT / "kddpm" / "grid.py", shallow=False)
