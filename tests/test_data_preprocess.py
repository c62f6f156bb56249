"""Support-plane removal on real and synthetic samples: rules, determinism, purity."""

from pathlib import Path

import numpy as np
import pytest
from scipy import spatial
from scipy.sparse import csgraph

from lsfa_jax.data import mvtec3d, preprocess, synthetic, tfds_builders

PARAMS = preprocess.PlaneRemovalParams()


@pytest.fixture(scope="module")
def real_sample(mvtec_sample_root: Path) -> mvtec3d.RawSample:
    files = mvtec3d.list_samples(mvtec_sample_root, "cable_gland", "train")[0]
    return mvtec3d.read_sample(files)


@pytest.fixture(scope="module")
def real_result(real_sample):
    return preprocess.remove_support_plane(real_sample.xyz, real_sample.rgb, PARAMS, seed=0)


@pytest.mark.slow
def test_plane_is_removed_and_object_kept(real_sample, real_result) -> None:
    xyz, rgb, info = real_result
    assert info.skipped is None and info.num_border_points >= PARAMS.ransac_n
    a, b, c, d = info.plane
    assert abs(np.linalg.norm([a, b, c]) - 1.0) < 1e-6
    kept = np.all(xyz != 0, axis=-1)
    distance = np.abs(xyz[kept].astype(np.float64) @ np.array([a, b, c]) + d)
    assert distance.min() >= PARAMS.remove_distance  # nothing within 5 mm of the plane
    # The plane fits the border: most valid border points lie within the RANSAC threshold.
    valid = np.all(real_sample.xyz != 0, axis=-1)
    border = preprocess.border_mask(valid.shape, PARAMS.border) & valid
    border_distance = np.abs(real_sample.xyz[border] @ np.array([a, b, c]) + d)
    assert np.mean(border_distance < PARAMS.ransac_distance) > 0.9
    # Most of the object (points well above the plane) is kept, as one connected blob.
    raw_distance = np.abs(real_sample.xyz.astype(np.float64) @ np.array([a, b, c]) + d)
    object_points = valid & (raw_distance > 0.01)
    assert object_points.sum() > 5000
    assert (kept & object_points).sum() / object_points.sum() > 0.95
    # One DBSCAN cluster is connected in the eps-neighbour graph of its points (scipy, not Open3D).
    graph = spatial.cKDTree(xyz[kept]).sparse_distance_matrix(
        spatial.cKDTree(xyz[kept]), PARAMS.dbscan_eps, output_type="coo_matrix"
    )
    assert csgraph.connected_components(graph, directed=False)[0] == 1
    # Removed pixels are black in rgb; kept pixels keep their colour; missing ones are untouched.
    removed = valid & ~kept
    assert not rgb[removed].any()
    np.testing.assert_array_equal(rgb[kept], real_sample.rgb[kept])
    np.testing.assert_array_equal(xyz[kept], real_sample.xyz[kept])
    assert info.num_kept == kept.sum()
    assert info.num_plane_removed + info.num_cluster_removed == removed.sum()


def test_missing_points_stay_exactly_zero(real_sample, real_result) -> None:
    missing = np.all(real_sample.xyz == 0, axis=-1)
    assert missing.any()
    assert np.all(real_result[0][missing] == 0.0)


def test_seeded_runs_are_identical_and_inputs_untouched(real_sample, real_result) -> None:
    xyz_before, rgb_before = real_sample.xyz.copy(), real_sample.rgb.copy()
    xyz, rgb, info = preprocess.remove_support_plane(real_sample.xyz, real_sample.rgb, PARAMS, 0)
    np.testing.assert_array_equal(xyz, real_result[0])
    np.testing.assert_array_equal(rgb, real_result[1])
    assert info == real_result[2]
    np.testing.assert_array_equal(real_sample.xyz, xyz_before)
    np.testing.assert_array_equal(real_sample.rgb, rgb_before)


def test_already_preprocessed_input_is_kept_and_reported(real_result) -> None:
    xyz, rgb, _ = real_result
    again_xyz, again_rgb, info = preprocess.remove_support_plane(xyz, rgb, PARAMS, seed=0)
    assert info.skipped is not None and "already preprocessed" in info.skipped
    np.testing.assert_array_equal(again_xyz, xyz)
    np.testing.assert_array_equal(again_rgb, rgb)


def test_prepare_sample_preprocesses_then_resizes(mvtec_sample_root: Path, real_result) -> None:
    files = mvtec3d.list_samples(mvtec_sample_root, "cable_gland", "train")[0]
    prepared = preprocess.prepare_sample(files, 224, PARAMS, seed=7)
    rows = (np.arange(224) * 400) // 224
    # Same plane removal (per-sample seed), then legacy-nearest resize.
    xyz, _, _ = preprocess.remove_support_plane(
        mvtec3d.read_xyz(files.xyz_path),
        mvtec3d.read_rgb(files.rgb_path),
        PARAMS,
        preprocess.sample_seed(7, files.file_id),
    )
    np.testing.assert_array_equal(prepared.xyz, xyz[rows[:, None], rows[None, :]])
    assert prepared.rgb.shape == (224, 224, 3) and prepared.mask.dtype == np.uint8
    assert prepared.plane_info is not None and prepared.plane_info.skipped is None
    raw = preprocess.prepare_sample(files, 224, None, seed=7)
    assert (
        raw.plane_info is None
        and np.all(raw.xyz != 0, axis=-1).sum() > 2 * np.all(prepared.xyz != 0, axis=-1).sum()
    )


@pytest.mark.parametrize(("size", "clustered"), [(256, True), (64, False)])
def test_synthetic_plane_removal_keeps_the_object(size: int, clustered: bool) -> None:
    # At 256 px the points are dense enough for the reference DBSCAN thresholds; at 64 px
    # (3.4 mm spacing) DBSCAN finds no cluster and the cluster step is left out.
    cfg = synthetic.SyntheticConfig(image_size=size, missing_fraction=0.0)
    sample = synthetic.render_sample(cfg, "box", "train", "good", 0)
    xyz, _, info = preprocess.remove_support_plane(sample["xyz"], sample["rgb"], PARAMS, 0)
    assert info.skipped is None and (info.num_clusters > 0) == clustered
    kept = np.all(xyz != 0, axis=-1)
    # The box top stands 16-20 mm above the plane: it is kept, the plane is gone.
    height = np.abs(sample["xyz"].astype(np.float64) @ np.array(info.plane[:3]) + info.plane[3])
    assert np.all(kept[height > 0.008])
    assert not kept[height < PARAMS.remove_distance].any()
    assert 0.05 < kept.mean() < 0.5


def test_largest_cluster_ignores_noise_and_smaller_clusters() -> None:
    rng = np.random.default_rng(0)
    big = rng.normal(0, 0.002, size=(300, 3)) + np.array([0, 0, 0.6])
    small = rng.normal(0, 0.002, size=(100, 3)) + np.array([0.1, 0, 0.6])
    lonely = rng.uniform(-0.5, 0.5, size=(20, 3)) + np.array([0, 0, 2.0])
    keep, num_clusters = preprocess._largest_cluster(np.concatenate([small, lonely, big]), PARAMS)
    assert num_clusters == 2
    np.testing.assert_array_equal(keep, np.r_[np.zeros(120, bool), np.ones(300, bool)])


def test_no_cluster_keeps_the_points() -> None:
    sparse = np.random.default_rng(0).uniform(-1, 1, size=(50, 3))
    keep, num_clusters = preprocess._largest_cluster(sparse, PARAMS)
    assert num_clusters == 0 and keep.all()


def _thread_limits() -> tuple[int, list[int]]:
    import open3d as o3d
    import threadpoolctl

    return o3d.utility.get_max_threads(), [
        p["num_threads"] for p in threadpoolctl.threadpool_info()
    ]


@pytest.mark.slow
def test_pool_workers_are_single_threaded() -> None:
    # One level of parallelism: the pool's processes, each on one thread (Open3D, BLAS).
    with tfds_builders.make_pool(2) as pool:
        open3d_threads, blas_threads = pool.apply(_thread_limits)
    assert open3d_threads == 1 and blas_threads and set(blas_threads) == {1}
