"""Greedy k-center coreset over a sparse random projection (docs/method.md#coreset).

The reference projects the library with sklearn's SparseRandomProjection(eps=0.9) and runs the
greedy k-center loop in fp16 on the GPU. Here the projection matrix is generated from a JAX key
with the same Johnson-Lindenstrauss dimension, density and scale (so it is statistically, not
bitwise, the same matrix), the projection is applied in bounded chunks, and the greedy loop is a
jitted `lax.fori_loop` in float32 over a vector of N minimum distances (never an N x N matrix);
the reference's fp16 cast is not reproduced.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec
from tqdm import tqdm

from lsfa_jax import mesh as meshes
from lsfa_jax.patchcore.normalisation import FeatureStats, normalise


def johnson_lindenstrauss_min_dim(n_samples: int, eps: float) -> int:
    """sklearn's rule: floor(4 ln n / (eps^2/2 - eps^3/3)), e.g. 765,184 rows, eps 0.9 -> 334."""
    if not 0.0 < eps < 1.0:
        raise ValueError(f"johnson_lindenstrauss_min_dim: eps must be in (0, 1), got {eps}")
    if n_samples < 1:
        raise ValueError(f"johnson_lindenstrauss_min_dim: n_samples must be >= 1, got {n_samples}")
    denominator = eps**2 / 2.0 - eps**3 / 3.0
    return int(4.0 * math.log(n_samples) / denominator)


def coreset_size(n: int, ratio: float) -> int:
    """Number of rows kept from a library of n rows: int(ratio * n), at least 1.

    The reference keeps int(0.1 * N) rows for xyz but int(0.1 * size of the already reduced xyz
    bank) for RGB, i.e. about 1 % (docs/method.md#coreset). Here every modality uses its own ratio
    of its own
    library; pass ratio=0.01 to reproduce the reference's RGB bank size.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"coreset_size: ratio must be in (0, 1], got {ratio}")
    if n < 1:
        raise ValueError(f"coreset_size: empty library (n={n})")
    return max(1, int(ratio * n))


def sparse_random_projection_matrix(
    key: jax.Array,
    in_dim: int,
    n_rows: int,
    eps: float = 0.9,
    *,
    n_components: int | None = None,
) -> jax.Array:
    """(in_dim, k) float32 sparse random projection as a dense matrix.

    k = johnson_lindenstrauss_min_dim(n_rows, eps) unless n_components is given. As in sklearn
    (density 'auto'), each entry is nonzero with probability 1/sqrt(in_dim), and nonzero entries
    are +-sqrt(1/density)/sqrt(k) with equal probability.
    """
    k = n_components if n_components is not None else johnson_lindenstrauss_min_dim(n_rows, eps)
    if k < 1:
        raise ValueError(f"sparse_random_projection_matrix: n_components must be >= 1, got {k}")
    density = 1.0 / math.sqrt(in_dim)
    key_nonzero, key_sign = jax.random.split(key)
    nonzero = jax.random.bernoulli(key_nonzero, density, (in_dim, k))
    sign = jnp.where(jax.random.bernoulli(key_sign, 0.5, (in_dim, k)), 1.0, -1.0)
    scale = math.sqrt(1.0 / density) / math.sqrt(k)
    return jnp.where(nonzero, sign * scale, 0.0).astype(jnp.float32)


@jax.jit
def _project_chunk(
    chunk: jax.Array, projection: jax.Array, mean: jax.Array, std: jax.Array
) -> jax.Array:
    normalised = normalise(chunk, FeatureStats(mean, std))
    return jnp.matmul(normalised, projection, precision=jax.lax.Precision.HIGHEST)


def project_features(
    features: np.ndarray | jax.Array,
    projection: jax.Array | None,
    *,
    stats: FeatureStats | None = None,
    chunk: int = 16384,
) -> jax.Array:
    """(N, D) -> (N, k) float32, normalised with `stats` (if given) then projected, chunk by chunk.

    Only one chunk of the (possibly host-resident, possibly bf16) library is converted at a time.
    projection=None keeps the (normalised) features as they are.
    """
    n_rows, dim = features.shape
    stats = stats if stats is not None else FeatureStats(jnp.float32(0.0), jnp.float32(1.0))
    matrix = projection if projection is not None else jnp.eye(dim, dtype=jnp.float32)
    chunk = max(1, min(chunk, n_rows))
    parts = []
    for start in range(0, n_rows, chunk):
        block = jnp.asarray(features[start : start + chunk])
        rows = block.shape[0]
        if rows < chunk:
            block = jnp.pad(block, ((0, chunk - rows), (0, 0)))
        parts.append(_project_chunk(block, matrix, stats.mean, stats.std)[:rows])
    return jnp.concatenate(parts, axis=0)


@functools.partial(jax.jit, donate_argnums=(2, 3))
def _greedy_steps(
    z: jax.Array,
    z_sq: jax.Array,
    min_dist: jax.Array,
    selected: jax.Array,
    start: jax.Array,
    stop: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Iterations [start, stop) of k-center greedy; selected[start - 1] is the last pick."""

    def body(i, carry):
        min_dist, selected = carry
        last = selected[i - 1]
        # Squared distances (same argmax as distances) as ||z||^2 + ||l||^2 - 2 z.l: a
        # read-only matrix-vector product over z, several times faster on CPU than forming
        # z - l, which XLA materialises (N, k) every iteration.
        cross = jnp.matmul(z, z[last], precision=jax.lax.Precision.HIGHEST)
        dist = jnp.maximum(z_sq + z_sq[last] - 2.0 * cross, 0.0)
        min_dist = jnp.minimum(min_dist, dist)
        pick = jnp.argmax(min_dist).astype(jnp.int32)  # lowest index on ties
        return min_dist.at[pick].set(0.0), selected.at[i].set(pick)

    return jax.lax.fori_loop(start, stop, body, (min_dist, selected))


def _centred(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(N, k) points -> the points centred (the selection is translation invariant, and the
    float32 expansion of the distances then loses little to cancellation) and their squared
    norms (N,)."""
    z = jnp.asarray(z, jnp.float32)
    z = z - jnp.mean(z, axis=0)
    return z, jnp.sum(jnp.square(z), axis=-1)


def _sharded_steps(
    z: jax.Array,
    z_sq: jax.Array,
    min_dist: jax.Array,
    selected: jax.Array,
    last: jax.Array,
    last_sq: jax.Array,
    start: jax.Array,
    stop: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`_greedy_steps` on one device's rows z (R, k) of the points: each iteration's argmax is
    the largest of the devices' own, lowest global index on ties, and the winning device's row
    (last (k,), last_sq ()) comes with it to every device for the next distances."""
    per_shard = z.shape[0]
    me = jax.lax.axis_index(meshes.DATA)

    def body(i, carry):
        min_dist, selected, last, last_sq = carry
        cross = jnp.matmul(z, last, precision=jax.lax.Precision.HIGHEST)
        dist = jnp.maximum(z_sq + last_sq - 2.0 * cross, 0.0)
        min_dist = jnp.minimum(min_dist, dist)
        local = jnp.argmax(min_dist).astype(jnp.int32)
        # Devices hold consecutive rows, so the first device with the largest value holds the
        # lowest global index among the ties, as the unsharded argmax.
        values = jax.lax.all_gather(min_dist[local], meshes.DATA)
        rows = jax.lax.all_gather(z[local], meshes.DATA)
        norms = jax.lax.all_gather(z_sq[local], meshes.DATA)
        locals_ = jax.lax.all_gather(local, meshes.DATA)
        owner = jnp.argmax(values).astype(jnp.int32)
        pick = owner * per_shard + locals_[owner]
        min_dist = min_dist.at[local].set(jnp.where(owner == me, 0.0, min_dist[local]))
        return min_dist, selected.at[i].set(pick), rows[owner], norms[owner]

    return jax.lax.fori_loop(start, stop, body, (min_dist, selected, last, last_sq))


@functools.lru_cache(maxsize=8)
def _sharded_greedy_steps(mesh: Mesh):
    rows, same = PartitionSpec(meshes.DATA), PartitionSpec()
    mapped = jax.shard_map(
        _sharded_steps,
        mesh=mesh,
        in_specs=(rows, rows, rows, same, same, same, same, same),
        out_specs=(rows, same, same, same),
        # The carry starts replicated and is updated from all-gathered values only.
        check_vma=False,
    )
    return jax.jit(mapped, donate_argnums=(2, 3))


def greedy_k_center(
    z: jax.Array, n_select: int, *, progress: bool = False, mesh: Mesh | None = None
) -> jax.Array:
    """k-center greedy on (N, k) float32 points, starting at index 0 -> (n_select,) int32.

    Each step adds the point farthest from the current selection (argmax of the running minimum
    squared distance, lowest index on ties). The points are centred first (`_centred`).
    progress=True runs the loop in ~100 jitted blocks and shows a tqdm bar between them; the
    selection is the same either way. With `mesh`, the points are split by rows over its
    devices (padded with rows that are never picked) and each iteration's argmax is a
    reduction across them: the same selection, each device holding N / d points.
    """
    n_rows = z.shape[0]
    if not 1 <= n_select <= n_rows:
        raise ValueError(f"greedy_k_center: n_select must be in [1, {n_rows}], got {n_select}")
    z, z_sq = _centred(z)
    min_dist = jnp.full((n_rows,), jnp.inf, jnp.float32).at[0].set(0.0)
    selected = jnp.zeros((n_select,), jnp.int32)
    if mesh is None:
        state = (min_dist, selected)

        def steps(state, start, stop):
            return _greedy_steps(z, z_sq, *state, start, stop)
    else:
        pad = -(-n_rows // mesh.size) * mesh.size - n_rows
        # Padding rows start at -inf: the running minimum keeps them there, never the argmax.
        sharded_z, sharded_sq, min_dist = meshes.shard_rows(
            mesh,
            (
                np.pad(np.asarray(z), ((0, pad), (0, 0))),
                np.pad(np.asarray(z_sq), (0, pad)),
                np.pad(np.asarray(min_dist), (0, pad), constant_values=-np.inf),
            ),
        )
        state = (min_dist, *meshes.replicate(mesh, (selected, z[0], z_sq[0])))
        run = _sharded_greedy_steps(mesh)

        def steps(state, start, stop):
            return run(sharded_z, sharded_sq, *state, start, stop)

    block = max(1, -(-(n_select - 1) // 100)) if progress else max(1, n_select - 1)
    with tqdm(total=n_select - 1, desc="coreset", disable=not progress) as bar:
        for start in range(1, n_select, block):
            stop = min(start + block, n_select)
            state = steps(state, start, stop)
            if progress:
                state[1].block_until_ready()
                bar.update(stop - start)
    # The selection is replicated: any device's copy is all of it.
    return state[1] if mesh is None else jnp.asarray(state[1].addressable_data(0))


def greedy_coreset(
    features: np.ndarray | jax.Array,
    n_select: int,
    *,
    key: jax.Array,
    projection_dim: int | None = None,
    eps: float = 0.9,
    stats: FeatureStats | None = None,
    chunk: int = 16384,
    progress: bool = False,
    mesh: Mesh | None = None,
) -> jax.Array:
    """Indices of a greedy k-center coreset of a library.

    Args:
      features: (N, D) library (host or device).
      n_select: number of rows to keep (see `coreset_size`).
      key: PRNG key of the random projection (the selection is deterministic given the key).
      projection_dim: None for the Johnson-Lindenstrauss dimension of N at `eps` (no projection
        when that is >= D, where it could not reduce anything); 0 for no projection; k > 0 for a
        k-dimensional projection.
      eps: JL distortion (the reference's 0.9).
      stats: if given, rows are normalised with it before projection.
      chunk: rows projected at a time.
      progress: show a tqdm bar over the greedy iterations.
      mesh: split the projected rows over its devices (`greedy_k_center`); same indices.

    Returns:
      (n_select,) int32 indices into features, the first being 0.
    """
    if features.ndim != 2:
        raise ValueError(f"greedy_coreset: features must be (N, D), got {features.shape}")
    n_rows, dim = features.shape
    if projection_dim is None:
        k = johnson_lindenstrauss_min_dim(n_rows, eps)
        k = 0 if k >= dim else k
    else:
        k = projection_dim
    projection = (
        sparse_random_projection_matrix(key, dim, n_rows, eps, n_components=k) if k > 0 else None
    )
    z = project_features(features, projection, stats=stats, chunk=chunk)
    return greedy_k_center(z, n_select, progress=progress, mesh=mesh)
