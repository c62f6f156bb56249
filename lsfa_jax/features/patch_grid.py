"""Organized clouds <-> packed points, and point features -> the 56x56 patch grid.

Shared by every point-feature path (Point-MAE and FPFH), so both land on exactly the same grid
as the RGB tokens (docs/method.md#point-mae-features-and-the-grid):

  scatter point features to the HxW pixel grid (missing pixels stay 0)
  -> 3x3 average pool, stride 1, no padding (zeros count)       (H-2, W-2)
  -> adaptive average pool to (G, G), bins [floor(i*L/G), ceil((i+1)*L/G))
  -> (G*G, C) in row-major (h, w) order.

Both pools are linear and separable, so they are folded into one (G, H) matrix per axis and the
whole projection is two matmuls over the scattered image: no loops over points or patches.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def valid_point_mask(organized: jax.Array) -> jax.Array:
    """(..., 3) -> (...) bool: a point is valid when all three coordinates are finite and nonzero.

    (0, 0, 0) marks a missing point in MVTec 3D-AD; the reference code requires all three
    coordinates to be nonzero.
    """
    finite = jnp.all(jnp.isfinite(organized), axis=-1)
    return finite & jnp.all(organized != 0, axis=-1)


def pack_valid_points(organized: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Moves the valid points of an organized cloud to the front, keeping raster order.

    Args:
      organized: (H, W, 3) float cloud.

    Returns:
      points (H*W, 3): valid points first (raster order), then zeros;
      pixel_index (H*W,) int32: the flat pixel each entry came from;
      point_mask (H*W,) bool: True for the first n_valid entries.
    Static shapes: the padded length is always H*W.
    """
    flat = organized.reshape(-1, 3)
    valid = valid_point_mask(flat)
    order = jnp.argsort(~valid, stable=True).astype(jnp.int32)
    n_valid = jnp.sum(valid)
    point_mask = jnp.arange(flat.shape[0]) < n_valid
    points = jnp.where(point_mask[:, None], flat[order], 0.0)
    return points, order, point_mask


@functools.cache
def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) averaging matrix of PyTorch's AdaptiveAvgPool1d.

    Row i averages input [floor(i*in/out), ceil((i+1)*in/out)).
    """
    matrix = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


@functools.cache
def box_pool_matrix(in_size: int, kernel: int = 3) -> np.ndarray:
    """(in_size - kernel + 1, in_size) matrix of a 1-D average pool, stride 1, no padding."""
    out_size = in_size - kernel + 1
    matrix = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        matrix[i, i : i + kernel] = 1.0 / kernel
    return matrix


@functools.cache
def grid_projection_matrix(image_size: int, grid_size: int) -> np.ndarray:
    """(grid_size, image_size) float32: the 3x3 box pool then the adaptive pool along one axis."""
    box = box_pool_matrix(image_size, 3)
    adaptive = adaptive_pool_matrix(image_size - 2, grid_size)
    return (adaptive @ box).astype(np.float32)


def pixel_image_to_grid(image: jax.Array, grid_size: int = 56) -> jax.Array:
    """(H, W, C) pixel features -> (grid_size**2, C) patch features (3x3 pool + adaptive pool)."""
    height, width, channels = image.shape
    rows = jnp.asarray(grid_projection_matrix(height, grid_size))
    cols = jnp.asarray(grid_projection_matrix(width, grid_size))
    grid = jnp.einsum("ih,hwc,jw->ijc", rows, image, cols, precision=jax.lax.Precision.HIGHEST)
    return grid.reshape(grid_size * grid_size, channels)


def project_points_to_grid(
    point_features: jax.Array,
    pixel_index: jax.Array,
    point_mask: jax.Array,
    image_shape: tuple[int, int],
    grid_size: int = 56,
) -> tuple[jax.Array, jax.Array]:
    """Scatters per-point features to the pixel grid and pools them onto the patch grid.

    Args:
      point_features: (N, C) features of packed points (see `pack_valid_points`).
      pixel_index: (N,) int flat pixel index of each point.
      point_mask: (N,) bool, False for padding entries (their features are ignored).
      image_shape: (H, W) of the organized cloud.
      grid_size: side of the output patch grid.

    Returns:
      patch_features (grid_size**2, C) and foreground (grid_size**2,) bool: True where at least
      one valid point lies in the patch's receptive window (the reference code's "all channels
      nonzero" test, made robust to features that are legitimately zero).
    """
    height, width = image_shape
    channels = point_features.shape[-1]
    values = jnp.where(point_mask[:, None], point_features, 0.0)
    image = jnp.zeros((height * width, channels), point_features.dtype)
    image = image.at[pixel_index].add(values).reshape(height, width, channels)
    counts = (
        jnp.zeros((height * width,), jnp.float32)
        .at[pixel_index]
        .add(point_mask.astype(jnp.float32))
    )
    patch_features = pixel_image_to_grid(image, grid_size)
    coverage = pixel_image_to_grid(counts.reshape(height, width, 1), grid_size)[:, 0]
    return patch_features, coverage > 0
