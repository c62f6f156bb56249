"""Frozen-backbone patch features on the 56x56 grid.

Point branch (docs/method.md#point-mae-features-and-the-grid): pack the valid points of the
organized cloud, FPS centres,
kNN groups, Point-MAE encoder, 3-NN interpolation back to every valid point, then the shared
pixel-grid projection of `features.patch_grid`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lsfa_jax.features.patch_grid import pack_valid_points, project_points_to_grid
from lsfa_jax.models import point_mae


def _point_features(
    encoder: point_mae.PointMAEEncoder,
    variables: Mapping[str, Any],
    organized: jax.Array,
    grid_size: int,
) -> tuple[jax.Array, jax.Array]:
    """(S, S, 3) organized cloud -> ((grid^2, C) patch features, (grid^2,) foreground)."""
    points, pixel_index, point_mask = pack_valid_points(organized.astype(jnp.float32))
    centre_idx = point_mae.farthest_point_sampling(
        points, point_mask, encoder.num_group, encoder.fps_ties
    )
    centres = points[centre_idx]
    _, neighbourhoods = point_mae.knn_group(points, point_mask, centres, encoder.group_size)
    centre_features = point_mae.encode(encoder, variables, neighbourhoods, centres)
    point_features = point_mae.interpolate_to_points(points, point_mask, centres, centre_features)
    return project_points_to_grid(
        point_features, pixel_index, point_mask, organized.shape[:2], grid_size
    )


def point_mae_clouds(
    variables: Mapping[str, Any],
    clouds: jax.Array,
    *,
    encoder: point_mae.PointMAEEncoder,
    grid_size: int,
) -> tuple[jax.Array, jax.Array]:
    """(B, S, S, 3) clouds -> ((B, grid^2, C), (B, grid^2) bool), traceable (not jitted).

    lax.map runs one cloud at a time: the per-cloud kNN / interpolation buffers are large, and
    a cloud's features do not depend on the batch it came in."""
    return jax.lax.map(lambda c: _point_features(encoder, variables, c, grid_size), clouds)


@functools.cache
def _compiled(encoder: point_mae.PointMAEEncoder, grid_size: int, batched: bool):
    if not batched:
        return jax.jit(functools.partial(_point_features, encoder, grid_size=grid_size))
    return jax.jit(functools.partial(point_mae_clouds, encoder=encoder, grid_size=grid_size))


def check_clouds(clouds: np.ndarray, encoder: point_mae.PointMAEEncoder, name: str) -> None:
    """Host-side shape and size checks for (B, S, S, 3) clouds (before any jitted call)."""
    if clouds.ndim != 4 or clouds.shape[-1] != 3:
        raise ValueError(f"{name}: expected organized clouds (..., H, W, 3), got {clouds.shape}")
    valid = np.all(np.isfinite(clouds), axis=-1) & np.all(clouds != 0, axis=-1)
    for i, n_valid in enumerate(valid.reshape(len(clouds), -1).sum(axis=1)):
        point_mae.check_cloud(int(n_valid), encoder.num_group, encoder.group_size, f"{name}[{i}]")


def point_mae_patch_grid(
    variables: Mapping[str, Any],
    organized: jax.Array | np.ndarray,
    model_cfg: Mapping[str, Any] | Any,
    grid_size: int = 56,
    name: str = "point cloud",
    precision: str = "highest",
) -> tuple[jax.Array, jax.Array]:
    """Point-MAE patch features of one organized cloud.

    Args:
      variables: encoder {'params', 'batch_stats'}.
      organized: (S, S, 3) float cloud in metres, (0, 0, 0) = missing.
      model_cfg: the `point_backbone` config.
      grid_size: side of the patch grid.
      name: identifies the sample in errors.
      precision: the encoder's precision policy (`lsfa_jax.precision`); grouping and
        interpolation are exact whatever it is.

    Returns:
      patch_features (grid_size**2, C) float32 with C = len(out_layers) * trans_dim, and
      foreground (grid_size**2,) bool.

    Raises:
      ValueError when the cloud has fewer valid points than group_size.
    """
    encoder = point_mae.point_mae_encoder(model_cfg, precision)
    check_clouds(np.asarray(organized)[None], encoder, name)
    return _compiled(encoder, grid_size, False)(variables, jnp.asarray(organized))


def point_mae_patch_grid_batch(
    variables: Mapping[str, Any],
    organized: jax.Array | np.ndarray,
    model_cfg: Mapping[str, Any] | Any,
    grid_size: int = 56,
    name: str = "point clouds",
    precision: str = "highest",
) -> tuple[jax.Array, jax.Array]:
    """Batched `point_mae_patch_grid`: (B, S, S, 3) -> ((B, grid^2, C), (B, grid^2) bool).

    Clouds run one after another inside one jitted `lax.map`, bounding peak memory to that of a
    single cloud.
    """
    encoder = point_mae.point_mae_encoder(model_cfg, precision)
    check_clouds(np.asarray(organized), encoder, name)
    return _compiled(encoder, grid_size, True)(variables, jnp.asarray(organized))
