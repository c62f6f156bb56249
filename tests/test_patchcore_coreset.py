"""Coreset: JL dimension vs sklearn, projection statistics, greedy k-center vs brute-force numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.random_projection import johnson_lindenstrauss_min_dim as sk_jl_min_dim

from lsfa_jax.patchcore import coreset
from lsfa_jax.patchcore.normalisation import FeatureStats


def numpy_greedy(z: np.ndarray, n_select: int) -> np.ndarray:
    """The reference loop, written directly in float64 numpy."""
    z = z.astype(np.float64)
    selected = [0]
    min_dist = np.sum((z - z[0]) ** 2, axis=1)
    for _ in range(n_select - 1):
        min_dist = np.minimum(min_dist, np.sum((z - z[selected[-1]]) ** 2, axis=1))
        pick = int(np.argmax(min_dist))
        min_dist[pick] = 0.0
        selected.append(pick)
    return np.asarray(selected)


@pytest.mark.parametrize("n", [10, 1000, 658_560, 765_184, 1_132_096])
@pytest.mark.parametrize("eps", [0.5, 0.9])
def test_jl_min_dim_matches_sklearn(n, eps):
    assert coreset.johnson_lindenstrauss_min_dim(n, eps) == int(sk_jl_min_dim(n, eps=eps))


def test_jl_min_dim_reference_examples():
    # Reference notes 5.3.
    assert coreset.johnson_lindenstrauss_min_dim(658_560, 0.9) == 330
    assert coreset.johnson_lindenstrauss_min_dim(765_184, 0.9) == 334
    assert coreset.johnson_lindenstrauss_min_dim(1_132_096, 0.9) == 344


def test_projection_matrix_density_and_values():
    in_dim, n_rows = 1152, 765_184
    matrix = np.asarray(coreset.sparse_random_projection_matrix(jax.random.key(0), in_dim, n_rows))
    k = 334
    assert matrix.shape == (in_dim, k)
    density = 1.0 / np.sqrt(in_dim)
    scale = np.sqrt(1.0 / density) / np.sqrt(k)
    nonzero = matrix[matrix != 0]
    np.testing.assert_allclose(np.abs(nonzero), scale, rtol=1e-6)
    # Binomial(in_dim * k, density): 6-sigma band.
    expected = in_dim * k * density
    assert abs(nonzero.size - expected) < 6 * np.sqrt(expected)
    assert abs(np.mean(nonzero > 0) - 0.5) < 6 * 0.5 / np.sqrt(nonzero.size)
    other = coreset.sparse_random_projection_matrix(jax.random.key(1), in_dim, n_rows)
    assert not np.array_equal(matrix, np.asarray(other))


def test_projection_preserves_distances_roughly():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 1152)).astype(np.float32)
    matrix = coreset.sparse_random_projection_matrix(jax.random.key(3), 1152, 200, 0.5)
    z = np.asarray(coreset.project_features(x, matrix, chunk=64))
    d_in = np.linalg.norm(x[:100] - x[100:], axis=1)
    d_out = np.linalg.norm(z[:100] - z[100:], axis=1)
    ratio = d_out / d_in
    assert np.all((ratio > 0.5) & (ratio < 1.5))


def test_project_features_chunked_matches_dense():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(37, 20)).astype(np.float32)
    matrix = coreset.sparse_random_projection_matrix(jax.random.key(0), 20, 37, n_components=7)
    stats = FeatureStats(jnp.float32(0.3), jnp.float32(2.0))
    z = coreset.project_features(x, matrix, stats=stats, chunk=8)
    expected = ((x.astype(np.float64) - 0.3) / 2.0) @ np.asarray(matrix, np.float64)
    np.testing.assert_allclose(np.asarray(z), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("progress", [False, True])
def test_greedy_k_center_matches_numpy(progress):
    rng = np.random.default_rng(2)
    z = rng.normal(size=(500, 6)).astype(np.float32)
    selected = np.asarray(coreset.greedy_k_center(jnp.asarray(z), 60, progress=progress))
    np.testing.assert_array_equal(selected, numpy_greedy(z, 60))
    assert selected.dtype == np.int32
    assert len(set(selected.tolist())) == 60


def test_greedy_ties_pick_lowest_index():
    # Duplicated points: the farthest distance is tied between copies.
    base = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 3.0]], np.float32)
    z = np.concatenate([base, base[1:], base[1:]])
    selected = np.asarray(coreset.greedy_k_center(jnp.asarray(z), 3))
    np.testing.assert_array_equal(selected, [0, 1, 2])
    np.testing.assert_array_equal(selected, numpy_greedy(z, 3))


@pytest.mark.slow
def test_greedy_coreset_with_projection_matches_numpy_on_projected():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 64)).astype(np.float32)
    key = jax.random.key(7)
    stats = FeatureStats(jnp.float32(0.1), jnp.float32(1.5))
    selected = coreset.greedy_coreset(x, 40, key=key, projection_dim=16, stats=stats, chunk=128)
    matrix = np.asarray(coreset.sparse_random_projection_matrix(key, 64, 400, n_components=16))
    z = ((x - 0.1) / 1.5) @ matrix
    np.testing.assert_array_equal(np.asarray(selected), numpy_greedy(z, 40))


def test_greedy_coreset_default_skips_useless_projection():
    # JL dimension of 300 rows at eps 0.9 is 140 > 8: no projection, exact greedy on x.
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    selected = coreset.greedy_coreset(x, 25, key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(selected), numpy_greedy(x, 25))


def test_greedy_coreset_is_seeded():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 64)).astype(np.float32)
    a = coreset.greedy_coreset(x, 30, key=jax.random.key(1), projection_dim=8)
    b = coreset.greedy_coreset(x, 30, key=jax.random.key(1), projection_dim=8)
    c = coreset.greedy_coreset(x, 30, key=jax.random.key(2), projection_dim=8)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_coreset_size():
    assert coreset.coreset_size(765_184, 0.1) == 76_518
    assert coreset.coreset_size(5, 0.1) == 1
    with pytest.raises(ValueError, match="ratio"):
        coreset.coreset_size(10, 0.0)
    with pytest.raises(ValueError, match="n_select"):
        coreset.greedy_k_center(jnp.zeros((4, 2)), 5)


def test_greedy_k_center_far_from_origin_matches_numpy():
    # A large common offset would ruin the float32 distance expansion without centring.
    rng = np.random.default_rng(6)
    z = (rng.normal(size=(2000, 32)) + 1000.0).astype(np.float32)
    selected = np.asarray(coreset.greedy_k_center(jnp.asarray(z), 100))
    np.testing.assert_array_equal(selected, numpy_greedy(z, 100))
