"""The certified bfloat16-screened 1-NN search vs float64 brute force and the float32 search."""

import jax.numpy as jnp
import numpy as np
import pytest

from lsfa_jax.patchcore import knn, scorer
from lsfa_jax.patchcore.bank import MemoryBank, with_search_index
from lsfa_jax.patchcore.normalisation import FeatureStats


def brute_nn(queries, bank, valid):
    """float64 nearest valid row, lowest index on exact ties."""
    d = np.sqrt(
        np.sum((queries[:, None].astype(np.float64) - bank[None].astype(np.float64)) ** 2, -1)
    )
    d = np.where(valid[None], d, np.inf)
    return d.min(1), d.argmin(1)


def screened(queries, bank, valid, **kw):
    index = knn.search_index(jnp.asarray(bank), jnp.asarray(valid), chunk=kw.pop("index_chunk", 64))
    dist, idx, failed = knn.screened_nearest_neighbour(
        jnp.asarray(queries), jnp.asarray(bank), index, **kw
    )
    return np.asarray(dist), np.asarray(idx), int(failed)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("n_bank", "bank_chunk", "group", "candidates"),
    [(512, 128, 8, 6), (512, 512, 16, 2), (384, 64, 4, 1), (64, 64, 8, 20)],
)
def test_screened_matches_brute_force(n_bank, bank_chunk, group, candidates):
    rng = np.random.default_rng(n_bank + group)
    bank = rng.normal(size=(n_bank, 48)).astype(np.float32)
    valid = rng.random(n_bank) > 0.2
    queries = (rng.normal(size=(50, 48)) * 1.2 + 0.3).astype(np.float32)
    dist, idx, failed = screened(
        queries, bank, valid, bank_chunk=bank_chunk, group=group, candidates=candidates
    )
    ref_d, ref_i = brute_nn(queries, bank, valid)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=2e-5)
    assert 0 <= failed <= len(queries)


def test_screened_bf16_bank_and_no_valid_rows():
    rng = np.random.default_rng(1)
    bank = jnp.asarray(rng.normal(size=(256, 32)), jnp.bfloat16)
    valid = np.ones(256, bool)
    index = knn.search_index(bank, jnp.asarray(valid))
    assert index.rows is bank  # a bfloat16 bank is screened as it is
    assert float(jnp.max(index.rounding_norms)) == 0.0
    queries = rng.normal(size=(20, 32)).astype(np.float32)
    dist, idx, _ = knn.screened_nearest_neighbour(jnp.asarray(queries), bank, index, bank_chunk=64)
    ref_d, ref_i = brute_nn(queries, np.asarray(bank, np.float32), valid)
    np.testing.assert_array_equal(np.asarray(idx), ref_i)
    np.testing.assert_allclose(np.asarray(dist), ref_d, rtol=2e-5)

    none_valid = knn.search_index(bank, jnp.zeros(256, bool))
    dist, idx, _ = knn.screened_nearest_neighbour(
        jnp.asarray(queries), bank, none_valid, bank_chunk=64
    )
    assert np.all(np.isinf(np.asarray(dist))) and np.all(np.asarray(idx) == -1)


def near_tie_problem(n_tied: int):
    """Queries whose nearest rows have duplicates (exact ties) in other groups, and rows whose
    distances differ by far less than the bfloat16 rounding error: no screen can separate
    them, so the certificate must fail and the exact search must decide."""
    rng = np.random.default_rng(7)
    dim = 64
    bank = rng.normal(size=(1024, dim)).astype(np.float32)
    queries = rng.normal(size=(40, dim)).astype(np.float32)
    for i in range(n_tied):
        target = queries[i] + 0.05 * rng.normal(size=dim).astype(np.float32)
        bank[100 + 8 * i] = target  # lowest index: must win
        bank[900 - 8 * i] = target  # exact duplicate in another group
        # A row whose distance differs from the nearest by ~1e-4 relative (bf16 error ~4e-3).
        bank[500 + 8 * i] = queries[i] + (target - queries[i]) * np.float32(1.0 + 1e-4)
    return queries, bank, np.ones(len(bank), bool)


@pytest.mark.parametrize("spare", [64, 3])  # redo the failed queries only / the whole batch
def test_near_ties_fall_back_to_the_exact_search(spare):
    queries, bank, valid = near_tie_problem(n_tied=10)
    # One re-ranked group per query: the duplicate's group stays outside it.
    dist, idx, failed = screened(
        queries, bank, valid, bank_chunk=256, group=8, candidates=1, spare=spare
    )
    ref_d, ref_i = brute_nn(queries, bank, valid)
    assert failed >= 10  # the tied queries could not be certified...
    np.testing.assert_array_equal(idx, ref_i)  # ...and were decided exactly
    exact_d, exact_i = scorer.nearest_neighbours(jnp.asarray(queries), jnp.asarray(bank), k=1)
    np.testing.assert_array_equal(idx, np.asarray(exact_i[:, 0]))
    np.testing.assert_allclose(dist, np.asarray(exact_d[:, 0]), rtol=1e-6)
    # float32 ||q||^2 + ||x||^2 - 2 q.x loses ~1e-6 ||q||^2 to cancellation at tiny distances.
    np.testing.assert_allclose(dist, ref_d, rtol=2e-5, atol=1e-3)


def test_screen_bound_is_a_lower_bound():
    """Every group bound the screen returns is <= the float64 ||x||^2 - 2 q.x of its rows."""
    rng = np.random.default_rng(3)
    bank = (rng.normal(size=(256, 96)) * rng.uniform(0.1, 10, size=(256, 1))).astype(np.float32)
    queries = (rng.normal(size=(30, 96)) * 5).astype(np.float32)
    index = knn.search_index(jnp.asarray(bank), jnp.ones(256, bool))
    bounds, groups = knn._screen_candidates(
        jnp.asarray(queries), index, bank_chunk=64, group=4, candidates=63
    )
    b64, q64 = bank.astype(np.float64), queries.astype(np.float64)
    partial = np.sum(b64**2, 1)[None] - 2.0 * q64 @ b64.T  # (Q, M)
    group_min = partial.reshape(30, 64, 4).min(2)
    taken = np.take_along_axis(group_min, np.asarray(groups), 1)
    assert np.all(np.asarray(bounds, np.float64) <= taken)
    # ... and not vacuous: the slack is within 1 % of the cross term's scale 2 ||q|| ||x||
    # (bfloat16 keeps 8 significant bits: the rounding is ~0.2-0.4 % of each norm).
    x_norm = np.linalg.norm(b64, axis=1).reshape(64, 4).max(1)[np.asarray(groups)]
    scale = 2.0 * np.linalg.norm(q64, axis=1)[:, None] * x_norm
    assert np.all(taken - np.asarray(bounds) <= 0.01 * scale)


def test_search_index_chunked_equals_whole():
    rng = np.random.default_rng(5)
    features = jnp.asarray(rng.normal(size=(128, 24)), jnp.float32)
    valid = jnp.asarray(rng.random(128) > 0.3)
    whole = knn.search_index(features, valid, chunk=1000)
    chunked = knn.search_index(features, valid, chunk=32)
    for a, b in zip(whole, chunked, strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6)
    x = np.asarray(features, np.float64)
    rounded = np.asarray(features.astype(jnp.bfloat16), np.float64)
    np.testing.assert_allclose(
        np.asarray(whole.rounding_norms), np.linalg.norm(x - rounded, axis=1), rtol=1e-5
    )
    assert np.all(np.isinf(np.asarray(whole.sq_norms))[~np.asarray(valid)])


@pytest.mark.slow
def test_score_batch_screened_equals_exact():
    rng = np.random.default_rng(11)
    dim, n_bank = 32, 512
    features = jnp.asarray(rng.normal(size=(n_bank, dim)), jnp.float32)
    stats = FeatureStats(mean=jnp.zeros(()), std=jnp.ones(()))
    bank = MemoryBank(features=features, valid=jnp.arange(n_bank) < 400, stats=stats)
    queries = jnp.asarray(rng.normal(size=(3, 16, dim)) * 1.3, jnp.float32)
    exact = scorer.score_batch(bank, queries, out_size=32, search="exact", bank_chunk=128)
    for b in (bank, with_search_index(bank)):
        got = scorer.score_batch(b, queries, out_size=32, search="screened", bank_chunk=128)
        np.testing.assert_allclose(np.asarray(got[0]), np.asarray(exact[0]), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(got[1]), np.asarray(exact[1]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="search must be"):
        scorer.score_batch(bank, queries, search="approximately")


def test_screened_rejects_bank_not_a_multiple_of_the_chunk():
    features = jnp.zeros((100, 8), jnp.float32)
    index = knn.search_index(features, jnp.ones(100, bool))
    with pytest.raises(ValueError, match="multiple of bank_chunk"):
        knn.screened_nearest_neighbour(jnp.zeros((2, 8)), features, index, bank_chunk=64)


def test_screened_is_traced_once_per_shape():
    rng = np.random.default_rng(2)
    features = jnp.asarray(rng.normal(size=(256, 16)), jnp.float32)
    index = knn.search_index(features, jnp.ones(256, bool))
    knn.screened_nearest_neighbour.clear_cache()
    for seed in range(3):
        q = jnp.asarray(np.random.default_rng(seed).normal(size=(10, 16)), jnp.float32)
        knn.screened_nearest_neighbour(q, features, index, bank_chunk=64)
    assert knn.screened_nearest_neighbour._cache_size() == 1


def low_rank_problem(n_bank=1024, dim=64, rank=12, seed=4):
    """Rows and queries near a `rank`-dimensional subspace, as patch features largely are."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(rank, dim))
    bank = rng.normal(size=(n_bank, rank)) @ mixing + 0.01 * rng.normal(size=(n_bank, dim))
    queries = rng.normal(size=(60, rank)) @ mixing + 0.01 * rng.normal(size=(60, dim))
    return queries.astype(np.float32), bank.astype(np.float32)


def approximate(queries, bank, valid, dim, **kw):
    index = knn.approximate_index(jnp.asarray(bank), jnp.asarray(valid), dim=dim)
    dist, idx, uncertain = knn.approximate_nearest_neighbour(
        jnp.asarray(queries), jnp.asarray(bank), index, **kw
    )
    return np.asarray(dist), np.asarray(idx), int(uncertain)


def test_approximate_finds_the_nearest_rows_of_low_rank_data():
    queries, bank = low_rank_problem()
    valid = np.ones(len(bank), bool)
    valid[::7] = False
    dist, idx, uncertain = approximate(queries, bank, valid, dim=16, bank_chunk=256)
    ref_d, ref_i = brute_nn(queries, bank, valid)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-4, atol=1e-3)
    assert uncertain < len(queries)  # most answers are even proven exact on such data


def test_approximate_distances_are_true_distances_of_the_returned_rows():
    """With too few directions for random data the answer may be a farther row, but its
    distance is that row's true distance: never below the nearest one."""
    rng = np.random.default_rng(8)
    bank = rng.normal(size=(512, 32)).astype(np.float32)
    queries = rng.normal(size=(80, 32)).astype(np.float32)
    valid = np.ones(512, bool)
    dist, idx, uncertain = approximate(queries, bank, valid, dim=4, bank_chunk=128, candidates=2)
    ref_d, ref_i = brute_nn(queries, bank, valid)
    own = np.linalg.norm(queries.astype(np.float64) - bank[idx].astype(np.float64), axis=1)
    np.testing.assert_allclose(dist, own, rtol=1e-4, atol=1e-4)
    assert np.all(dist >= ref_d * (1 - 1e-5))
    wrong = np.sum(idx != ref_i)
    assert 0 < wrong <= uncertain  # a wrong answer is never one claimed proven


def test_approximate_on_every_direction_is_proven_exact():
    rng = np.random.default_rng(9)
    bank = rng.normal(size=(256, 24)).astype(np.float32)
    queries = rng.normal(size=(40, 24)).astype(np.float32)
    valid = np.ones(256, bool)
    dist, idx, uncertain = approximate(queries, bank, valid, dim=24, bank_chunk=64)
    ref_d, ref_i = brute_nn(queries, bank, valid)
    assert uncertain == 0
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=2e-5, atol=1e-4)
    with pytest.raises(ValueError, match=r"dim must be in 1\.\.24"):
        knn.approximate_index(jnp.asarray(bank), jnp.asarray(valid), dim=25)


@pytest.mark.slow
def test_score_batch_approximate_on_low_rank_data_equals_exact():
    queries, bank_rows = low_rank_problem(n_bank=512, dim=32, rank=8)
    stats = FeatureStats(mean=jnp.zeros(()), std=jnp.ones(()))
    bank = MemoryBank(jnp.asarray(bank_rows), jnp.ones(512, bool), stats)
    images = jnp.asarray(queries[:48].reshape(3, 16, 32))
    exact = scorer.score_batch(bank, images, out_size=16, search="exact", bank_chunk=128)
    for b in (bank, with_search_index(bank, approximate_dim=12)):
        got = scorer.score_batch(
            b, images, out_size=16, search="approximate", approximate_dim=12, bank_chunk=128
        )
        np.testing.assert_allclose(np.asarray(got[0]), np.asarray(exact[0]), rtol=1e-4)
        np.testing.assert_allclose(np.asarray(got[1]), np.asarray(exact[1]), rtol=1e-4, atol=1e-5)


def test_with_search_index_computes_only_what_is_missing():
    rng = np.random.default_rng(12)
    stats = FeatureStats(mean=jnp.zeros(()), std=jnp.ones(()))
    bank = with_search_index(
        MemoryBank(jnp.asarray(rng.normal(size=(64, 16)), jnp.float32), jnp.ones(64, bool), stats)
    )
    assert bank.index is not None and bank.approximate is None
    with_approximate = with_search_index(bank, approximate_dim=4)
    assert with_approximate.index is bank.index  # kept, not recomputed
    assert with_approximate.approximate.basis.shape == (16, 4)
    again = with_search_index(with_approximate, approximate_dim=4)
    assert again.approximate is with_approximate.approximate
    assert with_search_index(again, approximate_dim=8).approximate.basis.shape == (16, 8)
