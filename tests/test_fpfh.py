"""FPFH features: planar vs curved behaviour, grid projection and foreground, real sample."""

import numpy as np
import pytest

from lsfa_jax.data import mvtec3d, resize
from lsfa_jax.features import fpfh
from lsfa_jax.features.patch_grid import adaptive_pool_matrix

SIZE = 64
SPACING = 0.001  # 1 mm, as MVTec 3D-AD at 224 px


def plane_with_bump(missing_block: bool = True) -> np.ndarray:
    """(64, 64, 3) organized cloud: plane at z = 0.65 m with a 6 mm bump, a missing block."""
    u = (np.arange(SIZE) - SIZE / 2) * SPACING
    x, y = np.meshgrid(u, u)
    r2 = (x - 0.01) ** 2 + (y - 0.01) ** 2
    z = 0.65 - 0.006 * np.exp(-r2 / (2 * 0.004**2))
    cloud = np.stack([x + 1e-4, y + 1e-4, z], axis=-1).astype(np.float32)
    if missing_block:
        cloud[:12, :20] = 0.0
    return cloud


def window_has_valid_point(valid: np.ndarray, grid: int) -> np.ndarray:
    """Brute force: patch (i, j) sees pixels [a_i, b_i + 2) x [a_j, b_j + 2)."""
    bins = adaptive_pool_matrix(valid.shape[0] - 2, grid) > 0
    out = np.zeros((grid, grid), bool)
    for i in range(grid):
        rows = np.flatnonzero(bins[i])
        for j in range(grid):
            cols = np.flatnonzero(bins[j])
            out[i, j] = valid[rows[0] : rows[-1] + 3, cols[0] : cols[-1] + 3].any()
    return out.reshape(-1)


def test_plane_points_share_a_peaked_histogram_and_bump_differs():
    cloud = plane_with_bump(missing_block=False)
    points = cloud.reshape(-1, 3)
    features = fpfh.fpfh_point_features(points)
    assert features.shape == (SIZE * SIZE, 33) and features.dtype == np.float32
    assert np.all(np.isfinite(features))
    rows, cols = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    # Flat interior: far from the bump (centre pixel 42, 42) and from the borders.
    flat = ((rows < 20) & (cols > 15) & (cols < 48)).reshape(-1)
    flat_features = features[flat]
    # On a plane every point pair gives the same angles: each 11-bin sub-histogram (sum 200,
    # see below) is a spike.
    histograms = flat_features.reshape(-1, 3, 11)
    np.testing.assert_allclose(histograms.sum(-1), 200.0, rtol=1e-4)
    assert np.all(histograms.max(-1) > 0.9 * 200.0)
    spread = np.abs(flat_features - flat_features.mean(0)).max()
    bump = (np.hypot(rows - 42, cols - 42) < 4).reshape(-1)
    gap = np.abs(features[bump].mean(0) - flat_features.mean(0)).max()
    assert gap > 5 * spread and gap > 10.0


@pytest.mark.slow
def test_patch_features_foreground_and_missing_pixels():
    cloud = plane_with_bump()
    patches, foreground = fpfh.fpfh_patch_features(cloud, name="synthetic")
    assert patches.shape == (56 * 56, 33) and patches.dtype == np.float32
    assert np.all(np.isfinite(patches))
    valid = np.all(cloud != 0, axis=-1)
    np.testing.assert_array_equal(foreground, window_has_valid_point(valid, 56))
    assert not foreground.all()
    np.testing.assert_array_equal(patches[~foreground], 0.0)
    # open3d normalises each of the three 11-bin histograms of a point to 200 (its SPFH, 100,
    # plus the weighted mean of its neighbours'), so a point's FPFH sums to 600. Pooling
    # averages pixels with missing ones counted as zeros: 600 on fully valid windows, less on
    # partial ones.
    full = window_has_valid_point(~valid, 56) == 0
    partial = foreground & ~full
    assert partial.any()
    np.testing.assert_allclose(patches[full].sum(-1), 600.0, rtol=1e-4)
    assert np.all((patches[partial].sum(-1) > 0) & (patches[partial].sum(-1) < 600.0 - 1e-3))


def test_voxel_downsampling_gives_one_feature_per_point():
    points = plane_with_bump(missing_block=False).reshape(-1, 3)
    params = fpfh.FpfhParams(voxel_size=0.002, normal_radius=0.006, feature_radius=0.015)
    features = fpfh.fpfh_point_features(points, params)
    assert features.shape == (points.shape[0], 33)
    assert np.all(np.isfinite(features))
    # 2 mm voxels over a 1 mm grid: about 4 points share each down-sampled feature.
    unique = np.unique(features, axis=0).shape[0]
    assert points.shape[0] / 6 < unique < points.shape[0] / 2


def test_errors_name_the_sample():
    with pytest.raises(ValueError, match="bagel/000: fpfh_patch_features: no valid points"):
        fpfh.fpfh_patch_features(np.zeros((64, 64, 3), np.float32), name="bagel/000")
    with pytest.raises(ValueError, match=r"x\.tiff: .*\(H, W, 3\)"):
        fpfh.fpfh_patch_features(np.zeros((64, 64), np.float32), name="x.tiff")
    with pytest.raises(ValueError, match="empty point cloud"):
        fpfh.fpfh_point_features(np.zeros((0, 3), np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        fpfh.fpfh_point_features(np.full((4, 3), np.nan, np.float32))


@pytest.mark.slow
def test_real_sample(mvtec_sample_root):
    path = mvtec_sample_root / "cable_gland/train/good/xyz/000.tiff"
    cloud = resize.resize_xyz(mvtec3d.read_xyz(path), 224)
    patches, foreground = fpfh.fpfh_patch_features(cloud, name=str(path))
    assert patches.shape == (3136, 33)
    assert np.all(np.isfinite(patches)) and np.all(patches >= 0)
    valid = np.all(cloud != 0, axis=-1)
    np.testing.assert_array_equal(foreground, window_has_valid_point(valid, 56))
    assert foreground.mean() > 0.5
    np.testing.assert_array_equal(patches[~foreground], 0.0)
    # A patch fully covered by valid points holds a convex mix of histograms summing to 600.
    full = window_has_valid_point(~valid, 56) == 0
    assert full.sum() > 100  # 255 on this sample (its cloud has many holes)
    np.testing.assert_allclose(patches[full].sum(-1), 600.0, rtol=1e-4)
