"""Support-plane removal (docs/method.md#support-plane-removal), seeded, and the per-sample preparation step.

Per sample, at full resolution:
  1. fit a plane (Open3D RANSAC, `ransac_n` points per hypothesis) to the valid points of the
     `border`-pixel frame of the image;
  2. zero xyz and black out rgb where |plane distance| < `remove_distance`;
  3. keep the largest DBSCAN cluster of the remaining points (noise, label -1, never wins; on
     equal sizes the lowest label, as the reference's argmax) and zero / black out every other
     valid point. When DBSCAN finds no cluster at all (points sparser than the thresholds
     assume, e.g. low-resolution input), the step is left out and reported (`num_clusters=0`)
     instead of wiping the cloud.
Then resize (preprocess first, resize second, as the reference does offline before loading).

DBSCAN gives Open3D's labels exactly but searches neighbours in a pixel window of the organized
cloud (`organized_dbscan`, docs/plane_removal.md), tens of times faster than Open3D's k-d tree;
a cloud whose pixel window cannot be bounded goes to Open3D instead and says so
(`dbscan_fallback`).

Differences from the reference script: RANSAC is seeded, so runs are reproducible; the square
zero-padding step is left out (it is a no-op on MVTec 3D-AD, whose images are square multiples
of 100 px); an input whose border has fewer than `ransac_n` valid points (already preprocessed)
is kept as is and reported instead of crashing.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import open3d as o3d
import threadpoolctl

from lsfa_jax.data import mvtec3d, organized_dbscan, resize

# Wider pixel windows go to Open3D: the window search costs grow with its area.
MAX_WINDOW = 128


@dataclasses.dataclass(frozen=True)
class PlaneRemovalParams:
    border: int = 10
    ransac_distance: float = 0.004
    ransac_n: int = 50
    ransac_iterations: int = 1000
    remove_distance: float = 0.005
    dbscan_eps: float = 0.006
    dbscan_min_points: int = 30


@dataclasses.dataclass(frozen=True)
class PlaneRemovalInfo:
    """What `remove_support_plane` did. `skipped` is a reason string when nothing was done."""

    skipped: str | None
    plane: tuple[float, float, float, float] | None  # (a, b, c, d), unit normal
    num_border_points: int
    num_plane_removed: int  # valid points zeroed as plane
    num_clusters: int  # DBSCAN clusters found (0: cluster step left out)
    num_cluster_removed: int  # valid points zeroed as outside the largest cluster
    num_kept: int
    dbscan_fallback: str | None = None  # why Open3D's DBSCAN ran instead of the window search
    num_ambiguous_border: int = 0  # border points within eps of 2+ clusters (lowest label won)


def valid_points(xyz: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (H, W) bool: all three coordinates nonzero (the reference rule)."""
    return np.all(xyz != 0, axis=-1)


def border_mask(shape: tuple[int, int], border: int) -> np.ndarray:
    """(H, W) bool: True on the outer `border` pixels of every side."""
    mask = np.zeros(shape, bool)
    mask[:border] = mask[-border:] = True
    mask[:, :border] = mask[:, -border:] = True
    return mask


def _largest_cluster(points: np.ndarray, params: PlaneRemovalParams) -> tuple[np.ndarray, int]:
    """Open3D's DBSCAN: (N, 3) -> ((N,) bool membership of the largest cluster, clusters).

    With no cluster, every point is kept.
    """
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points.astype(np.float64)))
    labels = np.asarray(
        cloud.cluster_dbscan(eps=params.dbscan_eps, min_points=params.dbscan_min_points)
    )
    return _largest_label(labels)


def _largest_label(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels -> (membership of the most frequent cluster, lowest label on ties; clusters)."""
    clustered = labels[labels >= 0]
    if clustered.size == 0:
        return np.ones(labels.shape, bool), 0
    counts = np.bincount(clustered)
    return labels == np.argmax(counts), len(counts)


@dataclasses.dataclass(frozen=True)
class ClusterResult:
    keep: np.ndarray  # (H, W) bool, the largest cluster (all points when there is none)
    num_clusters: int
    fallback: str | None  # why Open3D ran instead of the window search
    num_ambiguous_border: int


def largest_cluster(
    xyz: np.ndarray, points: np.ndarray, params: PlaneRemovalParams
) -> ClusterResult:
    """The largest DBSCAN cluster of the organized cloud's `points`, as Open3D finds it.

    Args:
      xyz: (H, W, 3) organized cloud.
      points: (H, W) bool, the points to cluster (in row-major order, as Open3D is given them).
      params: `dbscan_eps`, `dbscan_min_points`.
    """
    cloud = xyz.astype(np.float64)
    window = organized_dbscan.window_bound(cloud, points, params.dbscan_eps, MAX_WINDOW)
    if isinstance(window, str):
        keep = np.zeros(points.shape, bool)
        keep[points], num_clusters = _largest_cluster(cloud[points], params)
        return ClusterResult(keep, num_clusters, window, 0)
    result = organized_dbscan.dbscan_labels(
        cloud, points, params.dbscan_eps, params.dbscan_min_points, window
    )
    keep, num_clusters = _largest_label(result.labels[points])
    keep_image = np.zeros(points.shape, bool)
    keep_image[points] = keep
    return ClusterResult(keep_image, num_clusters, None, result.num_ambiguous_border)


def remove_support_plane(
    xyz: np.ndarray, rgb: np.ndarray, params: PlaneRemovalParams, seed: int
) -> tuple[np.ndarray, np.ndarray, PlaneRemovalInfo]:
    """Removes the support plane and small outliers. Inputs are not modified.

    Args:
      xyz: (H, W, 3) float32 organized cloud, (0, 0, 0) = missing.
      rgb: (H, W, 3) uint8, pixel-registered with xyz.
      params: thresholds (metres) and sizes.
      seed: seeds Open3D's RANSAC so the result is reproducible.

    Returns:
      xyz (H, W, 3) float32 and rgb (H, W, 3) uint8 with removed pixels zeroed, and the info.
    """
    xyz = np.array(xyz, np.float32)
    rgb = np.array(rgb, np.uint8)
    valid = valid_points(xyz)
    border_points = xyz[border_mask(valid.shape, params.border) & valid]
    if len(border_points) < params.ransac_n:
        info = PlaneRemovalInfo(
            skipped=(
                f"only {len(border_points)} valid border points (< ransac_n={params.ransac_n}); "
                "input looks already preprocessed, kept as is"
            ),
            plane=None,
            num_border_points=len(border_points),
            num_plane_removed=0,
            num_clusters=0,
            num_cluster_removed=0,
            num_kept=int(valid.sum()),
        )
        return xyz, rgb, info

    o3d.utility.random.seed(seed)
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(border_points.astype(np.float64)))
    plane, _ = cloud.segment_plane(
        distance_threshold=params.ransac_distance,
        ransac_n=params.ransac_n,
        num_iterations=params.ransac_iterations,
    )
    plane = np.asarray(plane, np.float64)
    distance = np.abs(xyz.astype(np.float64) @ plane[:3] + plane[3])
    on_plane = distance < params.remove_distance
    num_plane_removed = int((on_plane & valid).sum())
    xyz[on_plane] = 0.0
    rgb[on_plane] = 0

    remaining = valid_points(xyz)
    clusters = largest_cluster(xyz, remaining, params)
    outliers = remaining & ~clusters.keep
    xyz[outliers] = 0.0
    rgb[outliers] = 0
    info = PlaneRemovalInfo(
        skipped=None,
        plane=tuple(float(v) for v in plane),
        num_border_points=len(border_points),
        num_plane_removed=num_plane_removed,
        num_clusters=clusters.num_clusters,
        num_cluster_removed=int(outliers.sum()),
        num_kept=int(clusters.keep.sum()),
        dbscan_fallback=clusters.fallback,
        num_ambiguous_border=clusters.num_ambiguous_border,
    )
    return xyz, rgb, info


def use_one_thread() -> None:
    """Runs this process's steps on one thread: BLAS, OpenMP and Open3D's TBB pool. For the
    workers of a process pool, so that N workers keep N cores busy and no more."""
    threadpoolctl.threadpool_limits(1)
    if hasattr(o3d.utility, "set_max_threads"):  # Open3D >= 0.20 (TBB); older use OpenMP
        o3d.utility.set_max_threads(1)


def sample_seed(seed: int, file_id: str) -> int:
    """Per-sample seed from the run seed and the file id, independent of processing order."""
    return (seed * 1_000_003 + zlib.crc32(file_id.encode())) % (2**31)


@dataclasses.dataclass(frozen=True)
class PreparedSample:
    """One sample ready to be written: resized (and preprocessed if asked)."""

    files: mvtec3d.SampleFiles
    rgb: np.ndarray  # uint8 (S, S, 3)
    xyz: np.ndarray  # float32 (S, S, 3)
    mask: np.ndarray  # uint8 (S, S) in {0, 1}
    num_nonfinite: int
    plane_info: PlaneRemovalInfo | None


def prepare_sample(
    files: mvtec3d.SampleFiles,
    image_size: int,
    params: PlaneRemovalParams | None,
    seed: int,
    *,
    xyz_scale: float = 1.0,
) -> PreparedSample:
    """Reads one sample, scales the cloud to metres (`xyz_scale`: own data in other units),
    removes the plane at full resolution (unless `params` is None), resizes.

    A top-level function of plain arguments, so a process pool can run it.
    """
    raw = mvtec3d.read_sample(files)
    xyz, rgb, info = raw.xyz, raw.rgb, None
    if xyz_scale != 1.0:
        xyz = xyz * np.float32(xyz_scale)
    if params is not None:
        xyz, rgb, info = remove_support_plane(xyz, rgb, params, sample_seed(seed, files.file_id))
    return PreparedSample(
        files=files,
        rgb=resize.resize_rgb(rgb, image_size),
        xyz=resize.resize_xyz(xyz, image_size),
        mask=resize.resize_mask(raw.mask, image_size).astype(np.uint8),
        num_nonfinite=raw.num_nonfinite,
        plane_info=info,
    )
