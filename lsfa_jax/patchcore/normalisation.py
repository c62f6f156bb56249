"""Feature standardisation for PatchCore memory banks, one set of statistics per modality.

The reference code standardises every library and query with scalar constants taken over every
element of a library (unbiased std), but mixes them up between modalities
(docs/method.md#feature-normalisation:
xyz_mean = mean(xyz), xyz_std = std(rgb), ...). Here each modality is fitted on its own library;
per-channel statistics are an option.

Statistics are accumulated in float32 chunks of bounded size and combined in float64 on the host
(Chan et al.'s pairwise update), so a million-row library is never copied to float64.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class FeatureStats(NamedTuple):
    """Standardisation constants: scalars () or per-channel (D,) float32 arrays."""

    mean: jax.Array
    std: jax.Array


def identity_stats() -> FeatureStats:
    """Stats that leave features unchanged (for banks built on unnormalised features)."""
    return FeatureStats(mean=jnp.float32(0.0), std=jnp.float32(1.0))


@functools.partial(jax.jit, static_argnames="per_channel")
def _chunk_moments(
    chunk: jax.Array, row_mask: jax.Array, per_channel: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(C, D) chunk -> count, mean, sum of squared deviations from that mean (masked rows only)."""
    chunk = chunk.astype(jnp.float32)
    weight = row_mask.astype(jnp.float32)[:, None]
    axis = 0 if per_channel else None
    rows = jnp.sum(weight)
    count = rows if per_channel else rows * chunk.shape[1]
    mean = jnp.sum(chunk * weight, axis=axis) / jnp.maximum(count, 1.0)
    m2 = jnp.sum(jnp.square((chunk - mean) * weight), axis=axis)
    return count, mean, m2


def fit_feature_stats(
    features: np.ndarray | jax.Array,
    mask: np.ndarray | jax.Array | None = None,
    *,
    per_channel: bool = False,
    chunk: int = 16384,
) -> FeatureStats:
    """Mean and unbiased std of one modality's training library.

    Args:
      features: (N, D) library (host or device array; any float dtype).
      mask: optional (N,) bool, rows to include (e.g. foreground patches only).
      per_channel: False for the reference's scalar statistics over every element; True for one
        mean/std per channel.
      chunk: rows processed at a time (bounds the temporary memory).

    Returns:
      FeatureStats with float32 scalars, or (D,) arrays when per_channel.
    """
    if features.ndim != 2:
        raise ValueError(f"fit_feature_stats: features must be (N, D), got {features.shape}")
    n_rows, dim = features.shape
    if mask is not None and tuple(mask.shape) != (n_rows,):
        raise ValueError(f"fit_feature_stats: mask must be ({n_rows},), got {mask.shape}")
    chunk = max(1, min(chunk, n_rows))
    shape = (dim,) if per_channel else ()
    total = np.zeros((), np.float64)
    mean = np.zeros(shape, np.float64)
    m2 = np.zeros(shape, np.float64)
    for start in range(0, n_rows, chunk):
        block = features[start : start + chunk]
        rows = block.shape[0]
        valid = np.ones(rows, bool) if mask is None else np.asarray(mask[start : start + rows])
        pad = chunk - rows
        if pad:
            # Pad the last chunk so every call has the same static shape (one compilation).
            block = jnp.pad(jnp.asarray(block), ((0, pad), (0, 0)))
            valid = np.pad(valid, (0, pad))
        count_b, mean_b, m2_b = (
            np.asarray(v, np.float64) for v in _chunk_moments(block, valid, per_channel)
        )
        if count_b == 0:
            continue
        new_total = total + count_b
        delta = mean_b - mean
        mean = mean + delta * (count_b / new_total)
        m2 = m2 + m2_b + np.square(delta) * (total * count_b / new_total)
        total = new_total
    if total < 2:
        raise ValueError(
            f"fit_feature_stats: need at least 2 values per statistic, got {int(total)}"
        )
    std = np.sqrt(m2 / (total - 1))
    if np.any(std == 0):
        raise ValueError("fit_feature_stats: zero standard deviation (constant features)")
    return FeatureStats(mean=jnp.asarray(mean, jnp.float32), std=jnp.asarray(std, jnp.float32))


def normalise(features: jax.Array, stats: FeatureStats) -> jax.Array:
    """(..., D) -> (..., D) float32: (x - mean) / std."""
    return (jnp.asarray(features, jnp.float32) - stats.mean) / stats.std
