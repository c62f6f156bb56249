"""Fixed-size FIFO memory banks on device (paper 3.3, Eq. 7;
docs/method.md#ifc-losses-and-memory-banks).

A `Bank` holds K independent ring buffers (K = number of classes, or 1 for a shared bank) of M
rows each. Slots fill from 0 upwards, so the filled slots of buffer k are always
`arange(M) < count[k]`; once full, `ptr[k]` points at the oldest row, which is overwritten first.
Pushes keep static shapes: the caller passes every candidate row with a validity mask.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class Bank(NamedTuple):
    """features (K, M, C); ptr (K,) int32 next write slot; count (K,) int32 filled slots."""

    features: jax.Array
    ptr: jax.Array
    count: jax.Array


def init_bank(num_banks: int, size: int, dim: int, dtype: Any = jnp.float32) -> Bank:
    """An empty bank of `num_banks` ring buffers, each (size, dim)."""
    if num_banks < 1 or size < 1 or dim < 1:
        raise ValueError(f"banks.py: bad bank shape ({num_banks}, {size}, {dim})")
    return Bank(
        jnp.zeros((num_banks, size, dim), dtype),
        jnp.zeros((num_banks,), jnp.int32),
        jnp.zeros((num_banks,), jnp.int32),
    )


def bank_push(bank: Bank, rows: jax.Array, row_valid: jax.Array, class_ids: jax.Array) -> Bank:
    """Appends the valid `rows` (R, C) in order to buffer `class_ids` (R,), FIFO (Eq. 7).

    Row r of class c goes to slot (ptr[c] + rank) % M, where rank counts the valid class-c rows
    before r. When one push brings more than M rows for a class only its last M are kept, so
    no two rows target one slot. The rows are stored under stop_gradient.
    """
    K, M, _ = bank.features.shape
    rows = jax.lax.stop_gradient(rows).astype(bank.features.dtype)
    class_ids = class_ids.astype(jnp.int32)
    onehot = (class_ids[:, None] == jnp.arange(K)[None, :]) & row_valid[:, None]  # (R, K)
    per_class = onehot.astype(jnp.int32)
    rank = jnp.take_along_axis(
        jnp.cumsum(per_class, axis=0) - per_class, class_ids[:, None].clip(0, K - 1), axis=1
    )[:, 0]
    pushed = per_class.sum(axis=0)  # (K,)
    keep = onehot.any(axis=1) & (rank >= pushed[class_ids.clip(0, K - 1)] - M)
    slot = (bank.ptr[class_ids.clip(0, K - 1)] + rank) % M
    # Rows that are not kept are sent out of bounds and dropped by the scatter.
    slot = jnp.where(keep, slot, M)
    features = bank.features.at[class_ids.clip(0, K - 1), slot].set(rows, mode="drop")
    return Bank(
        features,
        ((bank.ptr + pushed) % M).astype(jnp.int32),
        jnp.minimum(bank.count + pushed, M).astype(jnp.int32),
    )


def nearest_in_buffer(
    features: jax.Array, count: jax.Array, x: jax.Array, chunk_size: int = 8192
) -> tuple[jax.Array, jax.Array]:
    """Nearest filled slot of one buffer for each query: (M, C), (), (N, C) -> idx (N,), d2 (N,).

    The search runs over chunks of `chunk_size` slots (bounding memory to N x chunk_size) with
    d2 = |x|^2 + |y|^2 - 2 x.y in fp32 at highest matmul precision; empty slots are masked. With
    an empty buffer idx is 0 and d2 is +inf. No gradient flows through the search.
    """
    M, _ = features.shape
    chunk = min(chunk_size, M)
    num_chunks = -(-M // chunk)
    x = jax.lax.stop_gradient(x).astype(jnp.float32)
    x_sq = jnp.sum(x * x, axis=-1)

    def body(carry, i):
        best_d2, best_idx = carry
        # The last chunk is shifted back to stay in bounds; re-visited slots do not change a min.
        start = jnp.minimum(i * chunk, M - chunk)
        y = jax.lax.dynamic_slice_in_dim(features, start, chunk).astype(jnp.float32)
        d2 = (
            x_sq[:, None]
            + jnp.sum(y * y, axis=-1)[None, :]
            - 2.0 * jnp.matmul(x, y.T, precision=jax.lax.Precision.HIGHEST)
        )
        filled = (start + jnp.arange(chunk)) < count
        d2 = jnp.where(filled[None, :], jnp.maximum(d2, 0.0), jnp.inf)
        j = jnp.argmin(d2, axis=1)
        d2_min = jnp.take_along_axis(d2, j[:, None], axis=1)[:, 0]
        better = d2_min < best_d2
        return (jnp.where(better, d2_min, best_d2), jnp.where(better, start + j, best_idx)), None

    init = (jnp.full(x.shape[:1], jnp.inf, jnp.float32), jnp.zeros(x.shape[:1], jnp.int32))
    (best_d2, best_idx), _ = jax.lax.scan(body, init, jnp.arange(num_chunks))
    return jax.lax.stop_gradient(best_idx), jax.lax.stop_gradient(best_d2)


def nearest_rows(
    bank: Bank, x: jax.Array, bank_ids: jax.Array, chunk_size: int = 8192
) -> tuple[jax.Array, jax.Array]:
    """Nearest filled row of buffer bank_ids[b] for each query x[b]: (B, N, C) -> (B, N, C), (B,).

    Returns the nearest rows (to compute a differentiable distance from) and whether buffer
    bank_ids[b] holds anything. Samples are processed one at a time (lax.map) so only one
    buffer is sliced at once.
    """

    def one(args):
        xb, kb = args
        idx, _ = nearest_in_buffer(bank.features[kb], bank.count[kb], xb, chunk_size)
        return bank.features[kb][idx]

    rows = jax.lax.map(one, (x, bank_ids.astype(jnp.int32)))
    return jax.lax.stop_gradient(rows), bank.count[bank_ids] > 0
