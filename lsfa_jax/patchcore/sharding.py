"""PatchCore memory banks split by rows over the devices of the run's `data` mesh.

With `patchcore.shard_bank`, each of the d devices holds R consecutive rows of a bank (its M
rows padded with invalid rows to d * R, `shard_size`), so a bank d times larger than one
device's memory can be searched. A query's nearest row is found in two steps inside the jitted
scorer: every device searches its own rows with the searches of `knn`, unchanged (the certified
bfloat16 screen or the float32 search), then the smallest distance over the devices wins, ties
going to the lowest global row, which is what the unsharded search answers (rows whose float32
distances round to the same value may be swapped, as between `knn`'s own searches). The image
score's reweighting needs rows of the bank and the winner's nearest rows, which are fetched and
searched the same way. Queries are small (one batch), so every device sees the whole batch and
returns its own share of the outputs.

The coreset of a sharded library is `coreset.greedy_k_center` with a mesh.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from lsfa_jax import mesh as meshes
from lsfa_jax.batching import map_in_batches, padded_batch_size
from lsfa_jax.errors import UserError
from lsfa_jax.patchcore.bank import MemoryBank
from lsfa_jax.patchcore.knn import (
    SearchIndex,
    nearest_neighbours,
    screened_nearest_neighbour,
    search_index,
)
from lsfa_jax.patchcore.normalisation import normalise
from lsfa_jax.patchcore.scorer import (
    BLURS,
    SCREEN_GROUP,
    ScoringSettings,
    anomaly_map,
    pil_blur,
    reweighted_score,
)
from lsfa_jax.patchcore.search_choice import in_graph_search

SHARDED_SEARCHES = ("screened", "exact")
BANK_CHUNK = 4096  # bank rows per scan step, as the unsharded scorer
_NONE = np.iinfo(np.int32).max  # global row of "no valid row", above every real one


class ShardedSearchError(UserError, ValueError):
    """A search the sharded bank does not offer was asked for."""


def shard_size(n_rows: int, n_devices: int, bank_chunk: int = BANK_CHUNK) -> int:
    """Rows R per device of a bank of n_rows over n_devices: ceil(n_rows / n_devices) rounded
    up to c scan steps of equal size, c = the fewest steps of at most bank_chunk rows, each a
    multiple of the screen's group of 8 rows (`_scan_chunk`), so the screened search runs on
    every shard and the padding stays below 8 c rows per device."""
    rows = -(-n_rows // n_devices)
    steps = -(-rows // bank_chunk)
    return steps * (-(-rows // (steps * SCREEN_GROUP)) * SCREEN_GROUP)


def _scan_chunk(rows_per_shard: int, bank_chunk: int) -> int:
    """Rows per scan step of a shard of `shard_size` rows: its c equal steps."""
    return rows_per_shard // -(-rows_per_shard // bank_chunk)


def _bank_specs(bank: MemoryBank) -> MemoryBank:
    """shard_map specs of a sharded bank: rows split over `data`, statistics replicated."""
    rows = PartitionSpec(meshes.DATA)
    index = None if bank.index is None else SearchIndex(rows, rows, rows, rows)
    return MemoryBank(rows, rows, PartitionSpec(), index, None)


@functools.lru_cache(maxsize=8)
def _index_per_shard(mesh: Mesh):
    rows = PartitionSpec(meshes.DATA)
    return jax.jit(
        jax.shard_map(
            search_index,
            mesh=mesh,
            in_specs=(rows, rows),
            out_specs=SearchIndex(rows, rows, rows, rows),
        )
    )


def shard_bank(
    bank: MemoryBank, mesh: Mesh, *, screened: bool = True, bank_chunk: int = BANK_CHUNK
) -> MemoryBank:
    """The bank split by rows over `mesh`: features (d * R, D) and valid (d * R,) with the
    rows beyond M invalid, R = `shard_size(M, d)`, row i on device i // R; the screened search's
    index (screened=True) computed by each device for its own rows; stats replicated.

    Each process places only its own devices' rows (`mesh.shard_rows`); the approximate
    search's index is dropped (that search is not offered on a sharded bank).
    """
    n_rows = bank.features.shape[0]
    rows = shard_size(n_rows, mesh.size, bank_chunk)
    pad = rows * mesh.size - n_rows
    features = np.pad(np.asarray(bank.features), ((0, pad), (0, 0)))
    valid = np.pad(np.asarray(bank.valid, bool), (0, pad))
    features, valid = meshes.shard_rows(mesh, (features, valid))
    index = _index_per_shard(mesh)(features, valid) if screened else None
    return MemoryBank(features, valid, meshes.replicate(mesh, bank.stats), index, None)


def _global_rows(local: jax.Array, rows_per_shard: int) -> jax.Array:
    """This device's row indices (-1: none) -> global rows (_NONE: none)."""
    offset = jax.lax.axis_index(meshes.DATA) * rows_per_shard
    return jnp.where(local >= 0, local + offset, _NONE).astype(jnp.int32)


def _take_rows(features: jax.Array, rows: jax.Array) -> jax.Array:
    """Global rows (...) of the bank whose shard is `features` (R, D) -> (..., D) float32 on
    every device: each device contributes the rows it holds, zeros for the others, so the sum
    over the devices is exact. Rows outside the bank give zeros."""
    per_shard = features.shape[0]
    local = rows - jax.lax.axis_index(meshes.DATA) * per_shard
    mine = (local >= 0) & (local < per_shard)
    values = features[jnp.clip(local, 0, per_shard - 1)].astype(jnp.float32)
    return jax.lax.psum(jnp.where(mine[..., None], values, 0.0), meshes.DATA)


def _nearest(
    queries: jax.Array, bank: MemoryBank, search: str, bank_chunk: int
) -> tuple[jax.Array, jax.Array]:
    """Nearest row of the whole sharded bank for (Q, D) float32 normalised queries, the same on
    every device -> distances (Q,) float32 computed from the differences (inf where no row is
    valid) and global rows (Q,) int32 (-1 there)."""
    per_shard = bank.features.shape[0]
    chunk = _scan_chunk(per_shard, bank_chunk)
    if search == "screened":
        dist, local, _ = screened_nearest_neighbour(
            queries,
            bank.features,
            bank.index,
            bank_chunk=chunk,
            group=SCREEN_GROUP,
            exact_chunk=chunk,
        )
    else:
        dist, local = nearest_neighbours(queries, bank.features, bank.valid, k=1, bank_chunk=chunk)
        dist, local = dist[:, 0], local[:, 0]
    # The winner's distance from the difference itself, as the unsharded scorer computes it,
    # on the device that holds the row (no row travels).
    rows = bank.features[jnp.maximum(local, 0)].astype(jnp.float32)
    exact = jnp.sqrt(jnp.sum(jnp.square(queries - rows), axis=-1))
    rows = _global_rows(local, per_shard)
    best = jax.lax.pmin(dist, meshes.DATA)
    winner = jax.lax.pmin(jnp.where(dist == best, rows, _NONE), meshes.DATA)
    # Global rows are distinct across devices: one device adds its distance, the others 0.
    exact = jax.lax.psum(jnp.where(rows == winner, exact, 0.0), meshes.DATA)
    found = winner != _NONE
    return jnp.where(found, exact, jnp.inf), jnp.where(found, winner, -1)


def _k_nearest_rows(queries: jax.Array, bank: MemoryBank, k: int, bank_chunk: int) -> jax.Array:
    """Global rows (Q, k) int32 of the k nearest rows of the sharded bank, ascending, lowest
    row on ties (-1 where fewer than k are valid), for (Q, D) float32 queries."""
    chunk = _scan_chunk(bank.features.shape[0], bank_chunk)
    dist, local = nearest_neighbours(queries, bank.features, bank.valid, k=k, bank_chunk=chunk)
    rows = _global_rows(local, bank.features.shape[0])
    dist = jax.lax.all_gather(dist, meshes.DATA, axis=1, tiled=True)  # (Q, d * k)
    rows = jax.lax.all_gather(rows, meshes.DATA, axis=1, tiled=True)
    # Device-major, each device's k ascending with lower rows first on ties, and lower devices
    # hold lower rows: a stable sort breaks ties by the lowest global row.
    order = jnp.argsort(dist, axis=1, stable=True)[:, :k]
    rows = jnp.take_along_axis(rows, order, axis=1)
    return jnp.where(rows == _NONE, -1, rows)


def _image_score(
    queries: jax.Array,
    bank: MemoryBank,
    nn_dist: jax.Array,
    nn_idx: jax.Array,
    *,
    reweight: bool,
    bank_chunk: int,
) -> jax.Array:
    """`scorer.patchcore_image_score` on a sharded bank: queries (P, D), nn_dist / nn_idx (P,)
    with global rows -> () float32, the same on every device."""
    worst = jnp.argmax(nn_dist)
    s_star = nn_dist[worst]
    if not reweight:
        return s_star
    m_star = _take_rows(bank.features, nn_idx[worst][None])
    neighbours = _k_nearest_rows(m_star, bank, 3, bank_chunk)[0]
    others = _take_rows(bank.features, neighbours[1:])
    return reweighted_score(queries[worst], s_star, others, queries.shape[-1])


def _score_images(
    bank: MemoryBank,
    queries: jax.Array,
    *,
    out_size: int,
    reweight: bool,
    sigma: float | None,
    bank_chunk: int,
    search: str,
) -> tuple[jax.Array, jax.Array]:
    """Per device: its bank rows and its (b, P, D) images -> its b image scores and
    (b, out_size, out_size) maps, from the whole batch's search of the whole bank."""
    local_batch = queries.shape[0]
    queries = normalise(queries, bank.stats)
    queries = jax.lax.all_gather(queries, meshes.DATA, axis=0, tiled=True)
    n_patches = queries.shape[1]
    grid = math.isqrt(n_patches)
    if grid * grid != n_patches:
        raise ValueError(f"score_features_sharded: {n_patches} patches do not form a grid")

    def one_image(features):
        dist, idx = _nearest(features, bank, search, bank_chunk)
        score = _image_score(features, bank, dist, idx, reweight=reweight, bank_chunk=bank_chunk)
        return score, dist

    scores, patch_scores = jax.lax.map(one_image, queries)
    start = jax.lax.axis_index(meshes.DATA) * local_batch
    scores = jax.lax.dynamic_slice_in_dim(scores, start, local_batch)
    patch_scores = jax.lax.dynamic_slice_in_dim(patch_scores, start, local_batch)
    maps = anomaly_map(
        patch_scores.reshape(local_batch, grid, grid), out_size=out_size, sigma=sigma
    )
    return scores, maps


@functools.lru_cache(maxsize=32)
def _sharded(fn, mesh: Mesh, bank_specs: MemoryBank, query_spec: PartitionSpec, **static: Any):
    """jit(shard_map(fn(bank, queries, **static))) with the bank's rows split over `mesh`."""
    mapped = jax.shard_map(
        functools.partial(fn, **static),
        mesh=mesh,
        in_specs=(bank_specs, query_spec),
        out_specs=query_spec,
        # As `mesh.data_parallel`: the knn scans start from constants and update them from
        # per-device rows; the collectives here are the only cross-device values.
        check_vma=False,
    )
    mapped.__name__ = f"sharded_{fn.__name__}"
    return jax.jit(mapped)


def _check_search(search: str) -> None:
    if search not in SHARDED_SEARCHES:
        raise ShardedSearchError(
            f"config.patchcore.shard_bank=True offers search "
            f"{' or '.join(SHARDED_SEARCHES)}, not {search!r}: change patchcore.search or set "
            "patchcore.shard_bank=False"
        )


def _nearest_all(bank: MemoryBank, queries: jax.Array, *, search: str, bank_chunk: int):
    return _nearest(queries.astype(jnp.float32), bank, search, bank_chunk)


def sharded_nearest_neighbour(
    bank: MemoryBank, queries: jax.Array, mesh: Mesh, *, search: str = "screened"
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest rows of a bank placed by `shard_bank` for (Q, D) queries (already normalised)
    -> distances (Q,) float32 from the differences and rows (Q,) int32 of the unsharded bank
    (inf and -1 where no row is valid), on the host."""
    _check_search(search)
    run = _sharded(
        _nearest_all,
        mesh,
        _bank_specs(bank),
        PartitionSpec(),
        search=search,
        bank_chunk=BANK_CHUNK,
    )
    return meshes.to_host(run(bank, meshes.replicate(mesh, np.asarray(queries, np.float32))))


def score_features_sharded(
    bank: MemoryBank,
    features: np.ndarray,
    settings: ScoringSettings,
    desc: str = "scoring",
    mesh: Mesh | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`scorer.score_features` with the bank's rows split over `mesh` (default: every device)
    instead of replicated: (N, P, C) features -> image scores (N,) and maps (N, S, S), equal to
    the unsharded scores. Batches of `settings.batch_size` rounded up to a multiple of the
    devices are split over them as there."""
    # auto takes its choice among the in-graph searches (faiss, on the host, cannot shard).
    search = in_graph_search(settings.search).search
    _check_search(search)
    if settings.blur not in BLURS:
        raise ValueError(f"score_features_sharded: blur must be one of {BLURS}: {settings.blur!r}")
    if features.ndim != 3 or features.shape[-1] != bank.features.shape[-1]:
        raise ValueError(
            f"score_features_sharded: features must be (N, P, {bank.features.shape[-1]}), "
            f"got {features.shape}"
        )
    mesh = mesh or meshes.make_mesh()
    placed = shard_bank(bank, mesh, screened=search == "screened")
    run = _sharded(
        _score_images,
        mesh,
        _bank_specs(placed),
        PartitionSpec(meshes.DATA),
        out_size=settings.out_size,
        reweight=settings.reweight,
        sigma=float(settings.sigma) if settings.blur == "gaussian" else None,
        bank_chunk=BANK_CHUNK,
        search=search,
    )

    def score(batch: dict, _) -> dict[str, np.ndarray]:
        queries = meshes.shard_rows(mesh, np.asarray(batch["features"], np.float32))
        scores, maps = meshes.to_host(run(placed, queries))
        if settings.blur == "pil":
            maps = pil_blur(maps, settings.sigma)
        return {"scores": scores, "maps": maps}

    size = padded_batch_size(settings.batch_size, mesh.size)
    out = map_in_batches(score, {"features": features}, size, desc=desc)
    return out["scores"], out["maps"]
