"""The pixel-window DBSCAN against Open3D's `cluster_dbscan`: same labels, point for point.

Open3D's labels are fully determined by its sequential scan (clusters numbered by their first
core point, a border point kept by the first cluster that reaches it), so the labels must be
equal; the border points that DBSCAN could give to either of two clusters (the order ambiguity)
are counted, and the hard cases are built so that such points occur.
"""

from pathlib import Path

import hypothesis
import hypothesis.strategies as st
import numpy as np
import open3d as o3d
import pytest
from scipy import spatial

from lsfa_jax.data import mvtec3d, organized_dbscan, preprocess

SPACING = 2.0**-11  # ~0.49 mm, exact in float32 and float64
EPS = 12 * SPACING  # so lattice neighbours at exactly eps exist (12 spacings apart)
# Lattice points (itself included) strictly closer than eps / within eps of an inner point.
STRICT = sum(i * i + j * j < 144 for i in range(-12, 13) for j in range(-12, 13))
AT_EPS = STRICT + 4  # plus (+-12, 0) and (0, +-12)


def _open3d_labels(xyz: np.ndarray, valid: np.ndarray, eps: float, min_points: int):
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz[valid].astype(np.float64)))
    return np.asarray(cloud.cluster_dbscan(eps=eps, min_points=min_points))


def _ours(xyz: np.ndarray, valid: np.ndarray, eps: float, min_points: int):
    cloud = xyz.astype(np.float64)
    window = organized_dbscan.window_bound(cloud, valid, eps, max_window=200)
    assert not isinstance(window, str), window
    return organized_dbscan.dbscan_labels(cloud, valid, eps, min_points, window)


def _assert_same(xyz, valid, eps, min_points) -> organized_dbscan.DbscanResult:
    reference = _open3d_labels(xyz, valid, eps, min_points)
    result = _ours(xyz, valid, eps, min_points)
    np.testing.assert_array_equal(result.labels[valid], reference)
    assert np.all(result.labels[~valid] == -2)
    assert result.num_clusters == reference.max() + 1
    # The kept mask (largest cluster, lowest label on ties) follows from equal labels; checked
    # through the function the plane removal uses.
    params = preprocess.PlaneRemovalParams(dbscan_eps=eps, dbscan_min_points=min_points)
    kept = preprocess.largest_cluster(xyz, valid, params)
    assert kept.fallback is None
    np.testing.assert_array_equal(kept.keep[valid], preprocess._largest_label(reference)[0])
    return result


def _lattice(height: int, width: int, depth: float = 0.6) -> np.ndarray:
    """(H, W, 3) float32 orthographic grid at `depth`: x, y on exact multiples of SPACING."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack(
        [(cols - width // 2) * SPACING, (rows - height // 2) * SPACING, np.full(rows.shape, depth)],
        axis=-1,
    ).astype(np.float32)


def test_open3d_counts_the_point_itself_and_excludes_points_at_exactly_eps() -> None:
    # Inner points of a lattice have STRICT points (themselves included) closer than eps and
    # 4 more at exactly eps: Open3D makes them core for min_points = STRICT, not STRICT + 1.
    xyz = _lattice(60, 60)
    valid = np.ones((60, 60), bool)
    for min_points, clustered in ((STRICT, True), (STRICT + 1, False), (AT_EPS, False)):
        reference = _open3d_labels(xyz, valid, EPS, min_points)
        assert (reference.max() >= 0) == clustered
        _assert_same(xyz, valid, EPS, min_points)


def test_patches_exactly_eps_apart_stay_apart_and_one_spacing_closer_join() -> None:
    xyz = _lattice(40, 100)
    valid = np.ones((40, 100), bool)
    valid[:, 50:61] = False  # columns 49 and 61: exactly 12 spacings = eps apart
    result = _assert_same(xyz, valid, EPS, 30)
    assert result.num_clusters == 2
    valid[:, 60] = True  # now 11 spacings apart
    assert _assert_same(xyz, valid, EPS, 30).num_clusters == 1


def test_thin_bridges_and_equal_clusters() -> None:
    # Two equal squares (a tie: the first in row-major order is the largest) joined by a
    # one-pixel bridge too thin to hold core points: the bridge points near both squares are
    # border points of both, the DBSCAN order ambiguity; Open3D gives them to cluster 0.
    xyz = _lattice(50, 120)
    valid = np.zeros((50, 120), bool)
    valid[10:40, 5:45] = valid[10:40, 75:115] = True
    valid[25, 45:75] = True
    result = _assert_same(xyz, valid, EPS, 60)
    assert result.num_clusters == 2 and result.num_ambiguous_border > 0
    labels = result.labels[valid]
    assert np.sum(labels == 0) > np.sum(labels == 1)  # the shared bridge points went to 0
    # A three-pixel bridge holds core points and joins the squares.
    valid[24:27, 45:75] = True
    assert _assert_same(xyz, valid, EPS, 30).num_clusters == 1
    # Equal sizes: the first cluster in row-major order (the left square) is kept.
    valid[24:27, 45:75] = False
    left, right = np.zeros_like(valid), np.zeros_like(valid)
    left[10:40, 5:45] = right[10:40, 75:115] = True
    params = preprocess.PlaneRemovalParams(dbscan_eps=EPS, dbscan_min_points=30)
    _assert_same(xyz, valid, EPS, 30)
    np.testing.assert_array_equal(preprocess.largest_cluster(xyz, valid, params).keep, left)
    # One point more below the right square: it is larger by one and kept.
    valid[40, 80] = right[40, 80] = True
    _assert_same(xyz, valid, EPS, 30)
    np.testing.assert_array_equal(preprocess.largest_cluster(xyz, valid, params).keep, right)
    # The same point above it: a core point before any of the left square's, so the right
    # square becomes cluster 0 (numbered by the first core point) and is kept.
    valid[40, 80] = right[40, 80] = False
    valid[9, 80] = right[9, 80] = True
    result = _assert_same(xyz, valid, EPS, 30)
    assert result.labels[9, 80] == 0
    np.testing.assert_array_equal(preprocess.largest_cluster(xyz, valid, params).keep, right)


def _camera_cloud(seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A pinhole-camera organized cloud: a tilted plane with raised blocks at several heights,
    depth steps, holes and flying pixels (noise)."""
    rng = np.random.default_rng(seed)
    focal = 0.6 / 0.0004  # ~0.4 mm pixels at 0.6 m
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    depth = 0.6 + 0.02 * (rows / size) + 0.01 * (cols / size)
    for _ in range(12):
        (row, col), half = rng.integers(0, size, 2), rng.integers(3, size // 6)
        block = np.abs(rows - row) + np.abs(cols - col) < half
        depth = np.where(block, depth - rng.uniform(0.004, 0.03), depth)
    flying = rng.random((size, size)) < 0.02
    depth = np.where(flying, depth + rng.uniform(-0.05, 0.05, (size, size)), depth)
    xyz = np.stack(
        [(cols - size / 2) * depth / focal, (rows - size / 3) * depth / focal, depth], axis=-1
    ).astype(np.float32)
    valid = rng.random((size, size)) > 0.1
    valid[rng.integers(0, size, 5)[:, None], :] = False  # missing scan lines
    return xyz, valid


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_camera_clouds_with_noise(seed: int) -> None:
    xyz, valid = _camera_cloud(seed, 128)
    # Remove the "plane" so that the blocks and flying pixels remain: clusters and noise.
    valid &= xyz[..., 2] < 0.6 + 0.02 * np.mgrid[0:128, 0:128][0] / 128 - 0.002
    result = _assert_same(xyz, valid, 0.006, 30)
    assert result.num_clusters >= 2 and np.any(result.labels == -1)


def test_window_bound_holds_for_every_eps_pair() -> None:
    xyz, valid = _camera_cloud(3, 96)
    cloud = xyz.astype(np.float64)
    rows, cols = np.nonzero(valid)
    pairs = spatial.cKDTree(cloud[valid]).query_pairs(0.006, output_type="ndarray")
    window = organized_dbscan.window_bound(cloud, valid, 0.006, max_window=200)
    assert np.abs(rows[pairs[:, 0]] - rows[pairs[:, 1]]).max() <= window[0]
    assert np.abs(cols[pairs[:, 0]] - cols[pairs[:, 1]]).max() <= window[1]
    # Shuffled columns break the camera's order: the bound grows to the whole width, still valid.
    shuffled = cloud[:, np.random.default_rng(0).permutation(96)]
    assert organized_dbscan.window_bound(shuffled, valid, 0.006, max_window=200)[1] >= 90
    assert isinstance(organized_dbscan.window_bound(shuffled, valid, 0.006, max_window=50), str)


def test_unbounded_clouds_fall_back_to_open3d_and_say_so() -> None:
    xyz, valid = _camera_cloud(4, 64)
    behind = xyz * np.array([1, 1, -1], np.float32)  # z < 0: no camera bound
    params = preprocess.PlaneRemovalParams()
    result = preprocess.largest_cluster(behind, valid, params)
    assert result.fallback is not None and "z <= 0" in result.fallback
    np.testing.assert_array_equal(
        result.keep[valid], preprocess._largest_cluster(behind[valid], params)[0]
    )


@pytest.mark.slow
def test_real_samples_match_open3d(mvtec_sample_root: Path) -> None:
    # train/good/003 has two clusters; test/cut/000 the widest window of the samples.
    params = preprocess.PlaneRemovalParams()
    for split, kind, index in (("train", "good", 3), ("test", "cut", 0)):
        files = [
            f
            for f in mvtec3d.list_samples(mvtec_sample_root, "cable_gland", split)
            if f.defect_type == kind
        ][index]
        raw = mvtec3d.read_sample(files)
        out, _, info = preprocess.remove_support_plane(raw.xyz, raw.rgb, params, seed=0)
        assert info.dbscan_fallback is None
        a, b, c, d = info.plane
        valid = preprocess.valid_points(raw.xyz)
        distance = np.abs(raw.xyz.astype(np.float64) @ np.array([a, b, c]) + d)
        remaining = valid & (distance >= params.remove_distance)
        result = _assert_same(raw.xyz, remaining, params.dbscan_eps, params.dbscan_min_points)
        kept = preprocess._largest_label(result.labels[remaining])[0]  # == Open3D's, above
        np.testing.assert_array_equal(preprocess.valid_points(out)[remaining], kept)
        assert info.num_clusters == result.num_clusters
        assert info.num_ambiguous_border == result.num_ambiguous_border


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    size=st.integers(24, 48),
    eps=st.floats(0.002, 0.012),
    min_points=st.integers(1, 40),
    keep=st.floats(0.3, 1.0),
)
def test_any_camera_cloud_matches_open3d(seed, size, eps, min_points, keep) -> None:
    xyz, valid = _camera_cloud(seed, size)
    valid &= np.random.default_rng(seed + 1).random(valid.shape) < keep
    _assert_same(xyz, valid, eps, min_points)
