"""Nearest-neighbour search of patch features in a memory bank, exact, on device.

Two searches, both jitted with static shapes and walking the bank in fixed-size chunks with
`lax.scan` (memory O(Q * chunk), so banks of a million rows fit):

- `nearest_neighbours`: k nearest rows by float32 distances at HIGHEST precision.
- `screened_nearest_neighbour`: the 1-nearest row, same answer, about twice as fast on CPU and
  far faster on GPU. A bfloat16 matmul (AMX / tensor cores) screens the bank with a rigorous
  lower bound of every float32 distance; the few best candidates per query are re-ranked in
  float32, and a certificate proves that no other row can be nearer. Queries whose certificate
  fails (near-ties within the bfloat16 error) are searched again exactly, so the result never
  depends on the screen.

The bank side of the screen (bfloat16 rows and per-row norms) is a `SearchIndex`, computed once
per bank by `search_index`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def _row_argmin(values: jax.Array, group: int = 128) -> tuple[jax.Array, jax.Array]:
    """(Q, C) -> argmin (Q,) int32 and min (Q, 1), lowest index on ties.

    XLA's CPU argmin (a variadic reduce) is ~10x slower than a plain min, so: min over groups
    of `group` columns, argmin over the few group minima, then argmin inside the winning group
    only. Exact: the first group holding the row minimum holds its first occurrence.
    """
    n_rows, n_cols = values.shape
    if n_cols % group or n_cols == group:
        local = jnp.argmin(values, axis=1).astype(jnp.int32)
        return local, jnp.take_along_axis(values, local[:, None], axis=1)
    grouped = values.reshape(n_rows, n_cols // group, group)
    group_min = jnp.min(grouped, axis=2)
    winner = jnp.argmin(group_min, axis=1)
    inside = jnp.take_along_axis(grouped, winner[:, None, None], axis=1)[:, 0, :]
    offset = jnp.argmin(inside, axis=1)
    local = (winner * group + offset).astype(jnp.int32)
    return local, jnp.take_along_axis(group_min, winner[:, None], axis=1)


@functools.partial(jax.jit, static_argnames=("k", "bank_chunk"))
def nearest_neighbours(
    queries: jax.Array,
    bank: jax.Array,
    bank_valid: jax.Array | None = None,
    *,
    k: int = 1,
    bank_chunk: int = 4096,
) -> tuple[jax.Array, jax.Array]:
    """Exact k nearest bank rows (L2) of each query.

    Args:
      queries: (Q, D) float.
      bank: (M, D) float32 or bfloat16 (converted to float32 one chunk at a time).
      bank_valid: optional (M,) bool; masked rows never win.
      k: neighbours per query.
      bank_chunk: bank rows per scan step (the bank is padded to a multiple of it; a bank that
        is already a multiple, as `MemoryBank`s are, is not copied).

    Returns:
      distances (Q, k) float32 ascending and indices (Q, k) int32; lowest index on ties. Where
      fewer than k valid rows exist the missing entries are inf with index -1.
    Distances use ||q||^2 + ||b||^2 - 2 q.b at HIGHEST precision (TF32 would be far off on
    GPU), clamped at 0 before the sqrt; in float32 they are exact to about 1e-7 * ||q||^2
    (absolute, squared), which is far below NN distances of standardised features.
    """
    queries = queries.astype(jnp.float32)
    n_bank, dim = bank.shape
    chunk = min(bank_chunk, n_bank)
    n_chunks = -(-n_bank // chunk)
    pad = n_chunks * chunk - n_bank
    valid = jnp.ones((n_bank,), bool) if bank_valid is None else bank_valid.astype(bool)
    if pad:
        bank = jnp.pad(bank, ((0, pad), (0, 0)))
        valid = jnp.pad(valid, (0, pad))
    blocks = bank.reshape(n_chunks, chunk, dim)
    valid_blocks = valid.reshape(n_chunks, chunk)
    offsets = jnp.arange(n_chunks, dtype=jnp.int32) * chunk
    n_queries = queries.shape[0]

    def step(carry, inputs):
        # Ranks by ||b||^2 - 2 q.b (||q||^2 is added once at the end): fewer passes over the
        # (Q, chunk) block; masked rows get +inf so they never win.
        best, best_idx = carry
        block, block_valid, offset = inputs
        block = block.astype(jnp.float32)
        block_sq = jnp.where(block_valid, jnp.sum(jnp.square(block), axis=-1), jnp.inf)
        partial = block_sq[None, :] - 2.0 * jnp.matmul(queries, block.T, precision=_HIGHEST)
        if k == 1:
            local, local_best = _row_argmin(partial)
            # Strict < keeps the earlier chunk on ties: lowest index overall.
            better = local_best < best
            best = jnp.where(better, local_best, best)
            best_idx = jnp.where(better, (local + offset)[:, None].astype(jnp.int32), best_idx)
        else:
            block_idx = jnp.broadcast_to(offset + jnp.arange(chunk, dtype=jnp.int32), partial.shape)
            merged = jnp.concatenate([best, partial], axis=1)
            merged_idx = jnp.concatenate([best_idx, block_idx], axis=1)
            # top_k puts the lower position first on ties; the carry (earlier rows) comes first.
            neg_best, pos = jax.lax.top_k(-merged, k)
            best = -neg_best
            best_idx = jnp.take_along_axis(merged_idx, pos, axis=1)
        return (best, best_idx), None

    init = (
        jnp.full((n_queries, k), jnp.inf, jnp.float32),
        jnp.full((n_queries, k), -1, jnp.int32),
    )
    (best, best_idx), _ = jax.lax.scan(step, init, (blocks, valid_blocks, offsets))
    best_idx = jnp.where(jnp.isfinite(best), best_idx, -1)
    best_d2 = jnp.maximum(best + jnp.sum(jnp.square(queries), axis=-1)[:, None], 0.0)
    return jnp.sqrt(best_d2), best_idx


# Unit roundoff of float32 (round to nearest).
_F32_UNIT = 2.0**-24


class SearchIndex(NamedTuple):
    """Bank-side data of the screened search, for a bank of M rows of dimension D.

    rows: (M, D) bfloat16 rows (the bank itself when it is stored in bfloat16).
    sq_norms: (M,) float32 ||x||^2 of the stored rows, +inf for invalid rows (they never win).
    rounding_norms: (M,) float32 ||x - bf16(x)||, the rounding error of each row.
    rounded_norms: (M,) float32 ||bf16(x)||.
    """

    rows: jax.Array
    sq_norms: jax.Array
    rounding_norms: jax.Array
    rounded_norms: jax.Array


@functools.partial(jax.jit, static_argnames=("chunk",))
def _index_norms(
    features: jax.Array, valid: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    def norms(block):
        exact = block.astype(jnp.float32)
        rounded = block.astype(jnp.bfloat16).astype(jnp.float32)
        return (
            jnp.sum(jnp.square(exact), axis=-1),
            jnp.sqrt(jnp.sum(jnp.square(exact - rounded), axis=-1)),
            jnp.sqrt(jnp.sum(jnp.square(rounded), axis=-1)),
        )

    n_rows, dim = features.shape
    if n_rows % chunk:
        sq, rounding, rounded = norms(features)
    else:
        # Row blocks keep the float32 temporaries at O(chunk * D) for million-row bf16 banks.
        sq, rounding, rounded = (
            a.reshape(n_rows) for a in jax.lax.map(norms, features.reshape(-1, chunk, dim))
        )
    return jnp.where(valid, sq, jnp.inf), rounding, rounded


def search_index(features: jax.Array, valid: jax.Array, *, chunk: int = 4096) -> SearchIndex:
    """SearchIndex of a bank: features (M, D) float32 or bfloat16, valid (M,) bool.

    A bfloat16 bank is used as it is (no copy, zero rounding error); a float32 bank gets a
    bfloat16 copy, half its size.
    """
    features = jnp.asarray(features)
    valid = jnp.asarray(valid, bool)
    if features.dtype == jnp.bfloat16:
        rows = features
    else:
        rows = jax.jit(lambda f: f.astype(jnp.bfloat16))(features)
    sq, rounding, rounded = _index_norms(features, valid, min(chunk, features.shape[0]))
    return SearchIndex(rows=rows, sq_norms=sq, rounding_norms=rounding, rounded_norms=rounded)


def _screen_candidates(
    queries: jax.Array, index: SearchIndex, *, bank_chunk: int, group: int, candidates: int
) -> tuple[jax.Array, jax.Array]:
    """Lower bounds of ||x||^2 - 2 q.x per group of `group` consecutive bank rows.

    Returns the `candidates` + 1 smallest group bounds per query, ascending, (Q, c + 1) float32,
    and their group ids (Q, c + 1) int32.

    Bound: with q~, x~ the bfloat16 roundings, |q.x - fl(q~.x~)| <= ||q|| ||x - x~|| +
    (||q - q~|| + gamma ||q~||) ||x~||, where gamma = (D + 16) u covers the float32
    accumulation of the bfloat16 products and the rounding of the bound itself.
    """
    n_queries, dim = queries.shape
    n_bank = index.rows.shape[0]
    n_chunks = n_bank // bank_chunk
    groups_per_chunk = bank_chunk // group
    rounded_q = queries.astype(jnp.bfloat16)
    q_norm = jnp.sqrt(jnp.sum(jnp.square(queries), axis=-1))
    q_err = jnp.sqrt(jnp.sum(jnp.square(queries - rounded_q.astype(jnp.float32)), axis=-1))
    q_err = q_err + (dim + 16) * _F32_UNIT * q_norm

    def step(carry, inputs):
        best, best_group = carry
        rows, sq, rounding, rounded, first_group = inputs
        cross = jax.lax.dot_general(
            rounded_q, rows, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
        slack = q_norm[:, None] * rounding[None, :] + q_err[:, None] * rounded[None, :]
        lower = sq[None, :] - 2.0 * (cross + slack)
        group_min = jnp.min(lower.reshape(n_queries, groups_per_chunk, group), axis=2)
        ids = first_group + jnp.arange(groups_per_chunk, dtype=jnp.int32)
        values = jnp.concatenate([best, group_min], axis=1)
        all_ids = jnp.concatenate([best_group, jnp.broadcast_to(ids, group_min.shape)], axis=1)
        neg, pos = jax.lax.top_k(-values, candidates + 1)
        return (-neg, jnp.take_along_axis(all_ids, pos, axis=1)), None

    def blocks(a):
        return a.reshape(n_chunks, bank_chunk, *a.shape[1:])

    init = (
        jnp.full((n_queries, candidates + 1), jnp.inf, jnp.float32),
        jnp.zeros((n_queries, candidates + 1), jnp.int32),
    )
    first_groups = jnp.arange(n_chunks, dtype=jnp.int32) * groups_per_chunk
    (bounds, group_ids), _ = jax.lax.scan(
        step,
        init,
        (
            blocks(index.rows),
            blocks(index.sq_norms),
            blocks(index.rounding_norms),
            blocks(index.rounded_norms),
            first_groups,
        ),
    )
    return bounds, group_ids


def _rerank(
    queries: jax.Array, features: jax.Array, sq_norms: jax.Array, group_ids: jax.Array, group: int
) -> tuple[jax.Array, jax.Array]:
    """Squared distances ||q - x||^2 to every row of the given groups -> the smallest (Q,)
    float32 and its row (Q,) int32, the lowest row index on exact ties.

    Computed from the differences, not as ||q||^2 + ||x||^2 - 2 q.x: no cancellation, so small
    distances (normal patches next to their bank rows) are accurate to float32 rounding.
    queries (Q, D) float32; features (M, D); sq_norms (M,) (+inf marks invalid rows);
    group_ids (Q, c).
    """
    n_queries, n_groups = group_ids.shape
    rows = group_ids[:, :, None] * group + jnp.arange(group, dtype=jnp.int32)
    rows = rows.reshape(n_queries, n_groups * group)
    diff = queries[:, None, :] - features[rows].astype(jnp.float32)
    sq_dist = jnp.where(jnp.isfinite(sq_norms[rows]), jnp.sum(jnp.square(diff), axis=-1), jnp.inf)
    best = jnp.min(sq_dist, axis=1)
    best_row = jnp.min(jnp.where(sq_dist == best[:, None], rows, features.shape[0]), axis=1)
    return best, best_row


def _check_blocks(caller: str, n_bank: int, bank_chunk: int, group: int) -> None:
    if n_bank % bank_chunk or bank_chunk % group:
        raise ValueError(
            f"{caller}: bank rows ({n_bank}) must be a multiple of bank_chunk ({bank_chunk}), "
            f"and bank_chunk a multiple of group ({group})"
        )


def _distances(best: jax.Array, best_row: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(squared distance, row) -> (distance, row), inf and -1 where no row was valid."""
    finite = jnp.isfinite(best)
    return jnp.sqrt(best), jnp.where(finite, best_row, -1).astype(jnp.int32)


@functools.partial(
    jax.jit, static_argnames=("bank_chunk", "group", "candidates", "spare", "exact_chunk")
)
def screened_nearest_neighbour(
    queries: jax.Array,
    features: jax.Array,
    index: SearchIndex,
    *,
    bank_chunk: int = 4096,
    group: int = 8,
    candidates: int = 6,
    spare: int = 64,
    exact_chunk: int = 4096,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Exact 1-nearest bank row of each query, screened in bfloat16 and certified in float32.

    Args:
      queries: (Q, D) float.
      features: (M, D) float32 or bfloat16 bank rows (the candidates are re-ranked on them).
      index: `search_index(features, valid)`; M must be a multiple of bank_chunk (MemoryBanks
        are padded to one) and bank_chunk a multiple of group.
      bank_chunk: bank rows per scan step.
      group: consecutive bank rows screened as one candidate.
      candidates: groups per query re-ranked in float32.
      spare: queries per call that can be searched again exactly when their certificate fails;
        if more fail, the whole batch is searched exactly.
      exact_chunk: bank_chunk of those exact searches.

    Returns:
      distances (Q,) float32, indices (Q,) int32 (-1 and inf where no row is valid) and the
      number of queries whose certificate failed (() int32, for benchmarks and tests).
    The answer is the nearest row, as `nearest_neighbours(..., k=1)` gives (rows whose
    distances differ by float32 rounding only may be swapped): a row of another group can only
    be nearer than the re-ranked best if its lower bound is, which the certificate excludes. On
    exact ties the lowest index wins. Certified distances are computed from the differences,
    so they are more accurate than the expanded ||q||^2 + ||x||^2 - 2 q.x of the float32
    search (used for the queries searched again), which loses about 1e-7 ||q||^2 to
    cancellation.
    """
    queries = queries.astype(jnp.float32)
    n_queries = queries.shape[0]
    n_bank = features.shape[0]
    _check_blocks("screened_nearest_neighbour", n_bank, bank_chunk, group)
    # With every group re-ranked, the (candidates + 1)-th bound is +inf: certified.
    candidates = min(candidates, n_bank // group)
    spare = min(spare, n_queries)
    bounds, group_ids = _screen_candidates(
        queries, index, bank_chunk=bank_chunk, group=group, candidates=candidates
    )
    best, best_row = _rerank(queries, features, index.sq_norms, group_ids[:, :candidates], group)
    # Every row outside the re-ranked groups has a distance >= its group's bound >= this.
    certified = bounds[:, candidates] + jnp.sum(jnp.square(queries), axis=-1) >= best
    n_failed = jnp.sum(~certified).astype(jnp.int32)
    valid = jnp.isfinite(index.sq_norms)

    def exact(q):
        dist, idx = nearest_neighbours(q, features, valid, k=1, bank_chunk=exact_chunk)
        return dist[:, 0], idx[:, 0]

    def certified_only(_):
        return _distances(best, best_row)

    def redo_failed(_):
        dist, idx = certified_only(None)
        redo = jnp.argsort(certified, stable=True)[:spare]  # the failed queries first
        redo_dist, redo_idx = exact(queries[redo])
        keep = certified[redo]
        dist = dist.at[redo].set(jnp.where(keep, dist[redo], redo_dist))
        idx = idx.at[redo].set(jnp.where(keep, idx[redo], redo_idx))
        return dist, idx

    branch = jnp.where(n_failed == 0, 0, jnp.where(n_failed <= spare, 1, 2))
    dist, idx = jax.lax.switch(
        branch, [certified_only, redo_failed, lambda _: exact(queries)], None
    )
    return dist, idx, n_failed


class ApproximateIndex(NamedTuple):
    """Bank-side data of the approximate search: the bank's top principal directions.

    mean: (D,) float32 mean of the valid rows; basis: (D, r) float32 orthonormal columns;
    projected: SearchIndex of the bank rows projected onto them, (x - mean) @ basis, (M, r);
    sq_norms: (M,) float32 ||x||^2 of the full rows, +inf for invalid rows.
    """

    mean: jax.Array
    basis: jax.Array
    projected: SearchIndex
    sq_norms: jax.Array


@functools.partial(jax.jit, static_argnames=("dim", "chunk"))
def _principal_directions(
    features: jax.Array, valid: jax.Array, dim: int, chunk: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    n_rows, width = features.shape
    weights = valid.astype(jnp.float32)
    total = jnp.einsum("m,md->d", weights, features.astype(jnp.float32), precision=_HIGHEST)
    mean = total / jnp.maximum(jnp.sum(weights), 1.0)

    def scatter(args):
        block, block_weights = args
        centred = (block.astype(jnp.float32) - mean) * block_weights[:, None]
        return jnp.einsum("md,me->de", centred, centred, precision=_HIGHEST)

    if n_rows % chunk:
        covariance = scatter((features, weights))
    else:
        covariance = jnp.sum(
            jax.lax.map(scatter, (features.reshape(-1, chunk, width), weights.reshape(-1, chunk))),
            axis=0,
        )
    _, vectors = jnp.linalg.eigh(covariance)  # ascending eigenvalues
    basis = vectors[:, ::-1][:, :dim]
    projected = jnp.einsum(
        "md,dr->mr", features.astype(jnp.float32) - mean, basis, precision=_HIGHEST
    )
    return mean, basis, projected


def approximate_index(
    features: jax.Array, valid: jax.Array, *, dim: int = 128, chunk: int = 4096
) -> ApproximateIndex:
    """ApproximateIndex of a bank: features (M, D), valid (M,) bool; dim principal directions."""
    features = jnp.asarray(features)
    valid = jnp.asarray(valid, bool)
    if not 0 < dim <= features.shape[1]:
        raise ValueError(f"approximate_index: dim must be in 1..{features.shape[1]}, got {dim}")
    mean, basis, projected = _principal_directions(
        features, valid, dim, min(chunk, features.shape[0])
    )
    projected_index = search_index(projected, valid)
    sq_norms, _, _ = _index_norms(features, valid, min(chunk, features.shape[0]))
    return ApproximateIndex(mean, basis, projected_index, sq_norms)


@functools.partial(jax.jit, static_argnames=("bank_chunk", "group", "candidates"))
def approximate_nearest_neighbour(
    queries: jax.Array,
    features: jax.Array,
    index: ApproximateIndex,
    *,
    bank_chunk: int = 4096,
    group: int = 8,
    candidates: int = 6,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Approximate 1-nearest bank row (opt-in): a screen on the bank's r principal directions
    (a bfloat16 matmul of r instead of D columns: about D / r times less work) and an exact
    float32 re-rank of the `candidates` best groups of `group` rows.

    The returned distance is the true float32 distance of the returned row, so it can only be
    too large (the true nearest row was not among the candidates), never too small. Projection
    onto orthonormal directions shortens every distance, so the screen's bounds are lower
    bounds and the result is provably exact where the third output says so; unlike
    `screened_nearest_neighbour`, uncertified queries are not searched again.

    Args as `screened_nearest_neighbour`; index: `approximate_index(features, valid, dim=r)`.

    Returns:
      distances (Q,) float32, indices (Q,) int32 and the number of queries not proven exact
      (() int32).
    """
    queries = queries.astype(jnp.float32)
    n_bank = features.shape[0]
    _check_blocks("approximate_nearest_neighbour", n_bank, bank_chunk, group)
    candidates = min(candidates, n_bank // group)
    projected = jnp.einsum("qd,dr->qr", queries - index.mean, index.basis, precision=_HIGHEST)
    bounds, group_ids = _screen_candidates(
        projected, index.projected, bank_chunk=bank_chunk, group=group, candidates=candidates
    )
    best, best_row = _rerank(queries, features, index.sq_norms, group_ids[:, :candidates], group)
    # Projected squared distances (bounds + ||Pq||^2) are lower bounds of the full ones.
    proven = bounds[:, candidates] + jnp.sum(jnp.square(projected), axis=-1) >= best
    dist, idx = _distances(best, best_row)
    return dist, idx, jnp.sum(~proven).astype(jnp.int32)
