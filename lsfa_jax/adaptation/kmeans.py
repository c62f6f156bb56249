"""Masked k-means and the instance (global) feature G of paper 3.2.

Initialisation is k-means++ (D^2 sampling) driven by an explicit key, so a call is deterministic
given its key; Lloyd iterations then run for a fixed number of steps (static shapes, no
convergence test). Only the masked rows take part. An empty cluster keeps its previous centroid.

The paper obtains the instance feature "by k-means clustering of the local features" without
saying how K centroids become one vector. The size-weighted mean of the centroids is exactly the
masked mean of the rows, i.e. the reference code's pooling, so it is offered as `masked_mean`.
`kmeans` returns the centroid of the largest cluster: the dominant mode of the object's
features, which, unlike the mean, is not pulled by a few outlying (e.g. edge) patches. Ties in
size go to the lowest cluster index. The clustering itself runs without gradient; the returned
centroid is recomputed as the masked mean of its member rows so that gradients reach them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

GLOBAL_METHODS = ("kmeans", "masked_mean")


def _sq_dists(x: jax.Array, c: jax.Array) -> jax.Array:
    """(P, C), (K, C) -> (P, K) squared distances from differences (exact, no expansion)."""
    return jnp.sum((x[:, None, :] - c[None, :, :]) ** 2, axis=-1)


def kmeans_plus_plus_init(
    x: jax.Array, mask: jax.Array, num_clusters: int, key: jax.Array
) -> jax.Array:
    """k-means++ seeds (K, C) from the masked rows of x (P, C).

    The first seed is drawn uniformly from the valid rows, each next one with probability
    proportional to the squared distance to the nearest seed. When no valid row has positive
    distance left (fewer distinct rows than K) the first valid row is repeated.
    """
    x, mask = jnp.asarray(x, jnp.float32), jnp.asarray(mask, bool)
    keys = jax.random.split(key, num_clusters)
    first_valid = jnp.argmax(mask)

    def pick(key_i, weights):
        logits = jnp.where(weights > 0, jnp.log(jnp.where(weights > 0, weights, 1.0)), -jnp.inf)
        drawn = jax.random.categorical(key_i, logits)
        return jnp.where(jnp.any(weights > 0), drawn, first_valid)

    i0 = pick(keys[0], mask.astype(jnp.float32))
    seeds = jnp.zeros((num_clusters, x.shape[1]), jnp.float32).at[0].set(x[i0])
    min_d2 = jnp.where(mask, jnp.sum((x - x[i0]) ** 2, axis=-1), 0.0)

    def body(k, carry):
        seeds, min_d2 = carry
        i = pick(keys[k], min_d2)
        seeds = seeds.at[k].set(x[i])
        d2 = jnp.where(mask, jnp.sum((x - x[i]) ** 2, axis=-1), 0.0)
        return seeds, jnp.minimum(min_d2, d2)

    seeds, _ = jax.lax.fori_loop(1, num_clusters, body, (seeds, min_d2))
    return seeds


def lloyd(
    x: jax.Array, mask: jax.Array, centroids: jax.Array, iters: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`iters` Lloyd steps from `centroids` (K, C) -> (centroids, assignments (P,), sizes (K,)).

    Assignments of masked-out rows are -1; ties go to the lowest centroid index.
    """
    x, mask = jnp.asarray(x, jnp.float32), jnp.asarray(mask, bool)
    K = centroids.shape[0]

    def assign(c):
        a = jnp.argmin(_sq_dists(x, c), axis=1)
        onehot = (a[:, None] == jnp.arange(K)[None, :]) & mask[:, None]
        return a, onehot.astype(jnp.float32)

    def step(c, _):
        _, onehot = assign(c)
        sizes = onehot.sum(axis=0)
        # Sums of the assigned rows: a masked mean, pinned like the distances.
        sums = jnp.matmul(onehot.T, x, precision=jax.lax.Precision.HIGHEST)
        c = jnp.where(sizes[:, None] > 0, sums / jnp.maximum(sizes, 1.0)[:, None], c)
        return c, None

    centroids, _ = jax.lax.scan(step, centroids.astype(jnp.float32), None, length=iters)
    a, onehot = assign(centroids)
    return centroids, jnp.where(mask, a, -1).astype(jnp.int32), onehot.sum(0).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("num_clusters", "iters"))
def kmeans(
    x: jax.Array, mask: jax.Array, num_clusters: int, iters: int, key: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Masked k-means of x (P, C) -> (centroids (K, C), assignments (P,) int32, sizes (K,) int32).

    k-means++ seeding from `key`, then `iters` Lloyd steps; masked-out rows get assignment -1.
    """
    return lloyd(x, mask, kmeans_plus_plus_init(x, mask, num_clusters, key), iters)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of the masked rows: (..., P, C), (..., P) -> (..., C); zeros when none is valid."""
    w = mask.astype(x.dtype)[..., None]
    return jnp.sum(x * w, axis=-2) / jnp.maximum(jnp.sum(w, axis=-2), 1.0)


def global_feature(
    x: jax.Array,
    mask: jax.Array,
    method: str = "kmeans",
    num_clusters: int = 8,
    iters: int = 10,
    key: jax.Array | None = None,
) -> jax.Array:
    """Instance feature G of one sample: x (P, C), mask (P,) -> (C,); see the module docstring.

    `kmeans`: centroid of the largest cluster (differentiable w.r.t. its member rows);
    `masked_mean`: the reference code's masked mean pooling.
    """
    if method == "masked_mean":
        return masked_mean(x, mask)
    if method != "kmeans":
        raise ValueError(f"kmeans.py: unknown global method {method!r}; use {GLOBAL_METHODS}")
    if key is None:
        raise ValueError("kmeans.py: method='kmeans' needs a PRNG key")
    _, assignments, sizes = kmeans(jax.lax.stop_gradient(x), mask, num_clusters, iters, key)
    largest = jnp.argmax(sizes)
    return masked_mean(x, mask & (assignments == largest))
