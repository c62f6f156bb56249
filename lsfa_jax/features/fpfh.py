"""FPFH point features (open3d) projected onto the shared 56x56 patch grid.

Default radii, in metres: MVTec 3D-AD clouds are about 0.1-0.2 m across at ~0.65 m from the
camera, so at 224 px the point spacing is roughly 0.5-1 mm. M3DM/BTF use voxel 0.05 with
radii 2x and 5x the voxel in their normalised units; in metres we take a 4 mm normal radius
(tens of neighbours, capped at 30: normals are stable on the ~1 mm sensor noise without
blurring edges) and a 10 mm feature radius (capped at 100 neighbours, ~2.5x the normal radius
as FPFH needs), with no voxel down-sampling (every point gets its own feature). These match
`configs/base.py`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import open3d as o3d
from scipy.spatial import cKDTree

from lsfa_jax.features.patch_grid import pack_valid_points, project_points_to_grid

FPFH_DIM = 33


class FpfhParams(NamedTuple):
    """voxel_size: 0 for none, else FPFH is computed on a voxel-down-sampled cloud and every
    point takes the feature of its nearest down-sampled point. Radii in metres."""

    voxel_size: float = 0.0
    normal_radius: float = 0.004
    normal_max_nn: int = 30
    feature_radius: float = 0.01
    feature_max_nn: int = 100


DEFAULT_FPFH_PARAMS = FpfhParams()


def _fpfh(points: np.ndarray, params: FpfhParams) -> np.ndarray:
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points.astype(np.float64)))
    cloud.estimate_normals(
        o3d.geometry.KDTreeSearchParamHybrid(
            radius=params.normal_radius, max_nn=params.normal_max_nn
        )
    )
    # Normal signs from PCA are arbitrary and FPFH angles depend on them; the camera is at the
    # origin of the MVTec 3D-AD frame, so point every normal towards it.
    cloud.orient_normals_towards_camera_location(np.zeros(3))
    feature = o3d.pipelines.registration.compute_fpfh_feature(
        cloud,
        o3d.geometry.KDTreeSearchParamHybrid(
            radius=params.feature_radius, max_nn=params.feature_max_nn
        ),
    )
    return np.asarray(feature.data, np.float32).T


def fpfh_point_features(
    points: np.ndarray, params: FpfhParams = DEFAULT_FPFH_PARAMS, *, name: str | None = None
) -> np.ndarray:
    """(N, 3) float points in metres -> (N, 33) float32 FPFH features.

    Normals: hybrid KD-tree search (normal_radius, normal_max_nn), oriented towards the camera
    at the origin; features: hybrid search (feature_radius, feature_max_nn).
    """
    where = f"{name}: " if name else ""
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"{where}fpfh_point_features: points must be (N, 3), got {points.shape}")
    if points.shape[0] == 0:
        raise ValueError(f"{where}fpfh_point_features: empty point cloud")
    if not np.all(np.isfinite(points)):
        raise ValueError(f"{where}fpfh_point_features: non-finite coordinates")
    if params.voxel_size > 0:
        cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points.astype(np.float64)))
        down = np.asarray(cloud.voxel_down_sample(params.voxel_size).points)
        features = _fpfh(down, params)
        _, nearest = cKDTree(down).query(points.astype(np.float64))
        features = features[nearest]
    else:
        features = _fpfh(points, params)
    if not np.all(np.isfinite(features)):
        raise ValueError(f"{where}fpfh_point_features: open3d returned non-finite features")
    return features


def fpfh_patch_features(
    organized: np.ndarray,
    params: FpfhParams = DEFAULT_FPFH_PARAMS,
    *,
    name: str | None = None,
    grid_size: int = 56,
) -> tuple[np.ndarray, np.ndarray]:
    """Organized cloud (S, S, 3) -> patch features (grid_size**2, 33) float32, foreground bool.

    Valid points ((0, 0, 0) and non-finite are missing) get FPFH features, which are scattered
    to their pixels and pooled onto the patch grid exactly like the Point-MAE features
    (`features.patch_grid`). `name` (e.g. the sample path) is used in error messages.
    """
    where = f"{name}: " if name else ""
    organized = np.asarray(organized)
    if organized.ndim != 3 or organized.shape[-1] != 3:
        raise ValueError(
            f"{where}fpfh_patch_features: expected an organized cloud (H, W, 3), "
            f"got {organized.shape}"
        )
    height, width, _ = organized.shape
    points, pixel_index, point_mask = (
        np.asarray(a) for a in pack_valid_points(jnp.asarray(organized, jnp.float32))
    )
    n_valid = int(point_mask.sum())
    if n_valid == 0:
        raise ValueError(f"{where}fpfh_patch_features: no valid points (every point is missing)")
    features = np.zeros((height * width, FPFH_DIM), np.float32)
    features[:n_valid] = fpfh_point_features(points[:n_valid], params, name=name)
    patch_features, foreground = project_points_to_grid(
        jnp.asarray(features),
        jnp.asarray(pixel_index),
        jnp.asarray(point_mask),
        (height, width),
        grid_size,
    )
    return np.asarray(patch_features, np.float32), np.asarray(foreground)
