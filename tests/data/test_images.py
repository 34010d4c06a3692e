"""Pictures people look at: grids lay out near-square and their tiles are large enough to see."""

import numpy as np
import pytest
import torch

from pipeline.data.images import images_to_tensor, tensor_to_images, tile


def test_pixels_survive_the_round_trip_through_tensors():
    pixels = np.random.default_rng(0).integers(0, 256, (3, 8, 6, 3), dtype=np.uint8)
    x = images_to_tensor(pixels)
    assert x.shape == (3, 3, 8, 6) and float(x.min()) >= -1 and float(x.max()) <= 1
    assert np.array_equal(tensor_to_images(x), pixels)
    assert tensor_to_images(torch.full((1, 3, 2, 2), 5.0)).max() == 255  # clamped, not wrapped


def test_a_hundred_images_make_a_ten_by_ten_grid_of_visible_tiles():
    images = [np.full((32, 32, 3), i, dtype=np.uint8) for i in range(100)]
    grid = tile(images, pad=2, min_side=128)
    assert grid.shape == (10 * 130 + 2, 10 * 130 + 2, 3)  # not a 1-image-wide strip
    assert grid[2 + 130 * 3 + 64, 2 + 130 * 7 + 64, 0] == 37  # row 3, column 7: image 37, upscaled 4x
    assert tile(images[:4], ncol=4).shape[:2] == (132, 4 * 130 + 2)  # one row per prompt when asked


def test_tiles_of_another_size_are_refused_with_their_sizes():
    with pytest.raises(ValueError, match="image 1 is 16x32, the first 32x32"):
        tile([np.zeros((32, 32, 3), np.uint8), np.zeros((32, 16, 3), np.uint8)])
