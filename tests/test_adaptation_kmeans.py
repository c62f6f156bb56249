"""Masked k-means against a numpy Lloyd from the same seeds; instance-feature options."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsfa_jax.adaptation.kmeans import (
    global_feature,
    kmeans,
    kmeans_plus_plus_init,
    masked_mean,
)


def np_lloyd(x, mask, c, iters):
    c = c.astype(np.float64).copy()
    xv = x[mask].astype(np.float64)
    for _ in range(iters):
        a = ((xv[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        for k in range(len(c)):
            if np.any(a == k):
                c[k] = xv[a == k].mean(0)
    a = ((xv[:, None] - c[None]) ** 2).sum(-1).argmin(1)
    return c, a, np.bincount(a, minlength=len(c))


def blobs(rng, P=60, C=3, centers=4):
    mu = rng.normal(size=(centers, C)) * 6
    return (mu[rng.integers(0, centers, P)] + rng.normal(size=(P, C))).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_kmeans_matches_numpy_lloyd_with_same_init(seed):
    rng = np.random.default_rng(seed)
    x = blobs(rng)
    mask = rng.random(60) < 0.8
    key = jax.random.PRNGKey(seed)
    K, iters = 4, 7
    init = np.asarray(kmeans_plus_plus_init(jnp.asarray(x), jnp.asarray(mask), K, key))
    c, a, sizes = kmeans(x, mask, K, iters, key)
    c_np, a_np, sizes_np = np_lloyd(x, mask, init, iters)
    np.testing.assert_allclose(np.asarray(c), c_np, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(a)[mask], a_np)
    assert np.all(np.asarray(a)[~mask] == -1)
    np.testing.assert_array_equal(np.asarray(sizes), sizes_np)
    # Deterministic given the key.
    c2, _, _ = kmeans(x, mask, K, iters, key)
    np.testing.assert_array_equal(np.asarray(c), np.asarray(c2))


def test_kmeans_plus_plus_seeds_are_distinct_valid_rows():
    rng = np.random.default_rng(2)
    x = blobs(rng, P=30)
    mask = np.zeros(30, bool)
    mask[[3, 7, 8, 20, 25]] = True
    seeds = np.asarray(kmeans_plus_plus_init(x, mask, 5, jax.random.PRNGKey(0)))
    rows = {tuple(r) for r in x[mask]}
    assert {tuple(s) for s in seeds} == rows  # 5 seeds from 5 valid rows: each exactly once


def test_kmeans_fewer_valid_rows_than_clusters_is_finite():
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    mask = np.array([False, True, False, True, False, False])
    c, a, sizes = kmeans(x, mask, 4, 3, jax.random.PRNGKey(1))
    assert np.all(np.isfinite(np.asarray(c)))
    assert int(np.asarray(sizes).sum()) == 2
    assert set(np.asarray(a)[mask]) <= set(range(4))


@pytest.mark.slow
def test_global_feature_largest_cluster_and_masked_mean():
    rng = np.random.default_rng(3)
    big = rng.normal(size=(30, 2)) * 0.1 + np.array([5.0, 5.0])
    small = rng.normal(size=(8, 2)) * 0.1 + np.array([-5.0, 0.0])
    x = np.concatenate([big, small]).astype(np.float32)
    mask = np.ones(38, bool)
    mask[0] = False
    g = global_feature(x, mask, "kmeans", num_clusters=2, iters=5, key=jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.asarray(g), x[1:30].mean(0), rtol=1e-5)
    gm = global_feature(x, mask, "masked_mean")
    np.testing.assert_allclose(np.asarray(gm), x[mask].mean(0), rtol=1e-5)
    # Gradient of the k-means feature reaches exactly the members of the largest cluster.
    grad = jax.grad(lambda x: global_feature(x, mask, "kmeans", 2, 5, jax.random.PRNGKey(0)).sum())(
        jnp.asarray(x)
    )
    grad = np.asarray(grad)
    np.testing.assert_allclose(grad[1:30], 1.0 / 29, rtol=1e-5)
    assert np.all(grad[0] == 0) and np.all(grad[30:] == 0)
    with pytest.raises(ValueError, match="unknown global method"):
        global_feature(x, mask, "median")


def test_masked_mean_empty_mask_is_zero():
    out = masked_mean(jnp.ones((2, 4, 3)), jnp.zeros((2, 4), bool))
    np.testing.assert_array_equal(np.asarray(out), np.zeros((2, 3)))
