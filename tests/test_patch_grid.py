"""features.patch_grid against a torch reference of the reference code's projection (notes 3.7)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lsfa_jax.features import patch_grid


def torch_reference_projection(features, pixels, shape, grid):
    """Zeros (C, H*W), write each point's feature at its pixel, 3x3 avg pool, adaptive pool."""
    height, width = shape
    channels = features.shape[1]
    image = torch.zeros((channels, height * width), dtype=torch.float64)
    image[:, torch.from_numpy(pixels)] = torch.from_numpy(features.T.astype(np.float64))
    image = image.view(1, channels, height, width)
    pooled = F.avg_pool2d(image, kernel_size=3, stride=1)
    pooled = F.adaptive_avg_pool2d(pooled, (grid, grid))
    return pooled.reshape(channels, grid * grid).T.numpy()


def random_cloud(rng, size, missing=0.4):
    cloud = rng.normal(size=(size, size, 3)).astype(np.float32)
    cloud[..., 2] += 0.65
    cloud[rng.random((size, size)) < missing] = 0.0
    # A hole larger than a patch window, so some patches see no valid point.
    cloud[: size // 4, : size // 4] = 0.0
    return cloud


def test_valid_point_mask():
    cloud = np.array(
        [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [1.0, 0.0, 3.0], [np.nan, 1.0, 1.0], [1, 1, np.inf]],
        np.float32,
    )
    np.testing.assert_array_equal(
        np.asarray(patch_grid.valid_point_mask(jnp.asarray(cloud))), [1, 0, 0, 0, 0]
    )


def test_pack_valid_points_matches_numpy():
    rng = np.random.default_rng(0)
    cloud = random_cloud(rng, 20)
    cloud[3, 4] = [np.nan, 1.0, 1.0]
    points, pixel_index, point_mask = (
        np.asarray(a) for a in patch_grid.pack_valid_points(jnp.asarray(cloud))
    )
    flat = cloud.reshape(-1, 3)
    valid = np.all(np.isfinite(flat), -1) & np.all(flat != 0, -1)
    order = np.flatnonzero(valid)
    n = order.size
    assert points.shape == (400, 3) and pixel_index.shape == (400,) and point_mask.shape == (400,)
    np.testing.assert_array_equal(point_mask, np.arange(400) < n)
    np.testing.assert_array_equal(pixel_index[:n], order)
    np.testing.assert_array_equal(points[:n], flat[order])
    np.testing.assert_array_equal(points[n:], 0.0)
    # The padding entries point at the remaining (invalid) pixels: a permutation overall.
    np.testing.assert_array_equal(np.sort(pixel_index), np.arange(400))


@pytest.mark.parametrize(("size", "grid"), [(224, 56), (64, 56), (40, 8), (30, 28)])
def test_pool_matrices_match_torch(size, grid):
    rng = np.random.default_rng(1)
    image = rng.normal(size=(size, size, 5))
    ours = patch_grid.pixel_image_to_grid(jnp.asarray(image, jnp.float32), grid)
    t = torch.from_numpy(image.transpose(2, 0, 1))[None]
    ref = F.adaptive_avg_pool2d(F.avg_pool2d(t, 3, 1), grid)[0].reshape(5, -1).T.numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-5)


def test_adaptive_bins_reference_examples():
    # Notes 3.7: 222 -> 56 bins (0,4), (3,8), (7,12), ..., (218,222); 52 of width 5, 4 of 4.
    matrix = patch_grid.adaptive_pool_matrix(222, 56)
    spans = [(np.flatnonzero(r)[0], np.flatnonzero(r)[-1] + 1) for r in matrix]
    assert spans[:3] == [(0, 4), (3, 8), (7, 12)] and spans[-1] == (218, 222)
    widths = np.array([b - a for a, b in spans])
    assert (widths == 5).sum() == 52 and (widths == 4).sum() == 4
    np.testing.assert_allclose(matrix.sum(1), 1.0)


@pytest.mark.parametrize(("size", "grid"), [(224, 56), (64, 56)])
def test_project_points_to_grid_matches_torch(size, grid):
    rng = np.random.default_rng(2)
    cloud = random_cloud(rng, size)
    _, pixel_index, point_mask = patch_grid.pack_valid_points(jnp.asarray(cloud))
    n = int(point_mask.sum())
    features = rng.normal(size=(size * size, 7)).astype(np.float32)
    # Garbage in padding rows must be ignored.
    features[n:] = 1e6
    patches, foreground = patch_grid.project_points_to_grid(
        jnp.asarray(features), pixel_index, point_mask, (size, size), grid
    )
    pixels = np.array(pixel_index)[:n]
    ref = torch_reference_projection(features[:n], pixels, (size, size), grid)
    np.testing.assert_allclose(np.asarray(patches), ref, rtol=1e-4, atol=1e-5)
    # The reference's foreground rule ("every channel nonzero") on strictly positive features
    # coincides with "at least one valid point in the window".
    positive = np.abs(features[:n]) + 0.1
    ref_fg = np.all(torch_reference_projection(positive, pixels, (size, size), grid) != 0, -1)
    np.testing.assert_array_equal(np.asarray(foreground), ref_fg)
    assert 0 < ref_fg.sum() < grid * grid
