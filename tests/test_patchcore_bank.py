"""Feature statistics (streaming vs numpy float64) and memory-bank construction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsfa_jax.patchcore import bank as bank_lib
from lsfa_jax.patchcore import coreset
from lsfa_jax.patchcore.normalisation import fit_feature_stats, identity_stats, normalise


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_scalar_stats_match_numpy(chunk):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(203, 11)) * 3.0 + 100.0).astype(np.float32)
    stats = fit_feature_stats(x, chunk=chunk)
    assert stats.mean.shape == () and stats.std.shape == ()
    np.testing.assert_allclose(float(stats.mean), x.astype(np.float64).mean(), rtol=1e-6)
    np.testing.assert_allclose(float(stats.std), x.astype(np.float64).std(ddof=1), rtol=1e-5)


def test_per_channel_and_masked_stats_match_numpy():
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(150, 5)) * np.arange(1, 6) + np.arange(5)).astype(np.float32)
    mask = rng.random(150) > 0.4
    stats = fit_feature_stats(x, mask, per_channel=True, chunk=16)
    ref = x[mask].astype(np.float64)
    np.testing.assert_allclose(np.asarray(stats.mean), ref.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(stats.std), ref.std(0, ddof=1), rtol=1e-5)
    scalar = fit_feature_stats(x, mask, chunk=16)
    np.testing.assert_allclose(float(scalar.std), ref.std(ddof=1), rtol=1e-5)


def test_stats_accept_bf16_device_input_and_reject_bad_input():
    x = jnp.asarray(np.arange(40, dtype=np.float32).reshape(10, 4), jnp.bfloat16)
    stats = fit_feature_stats(x, chunk=3)
    ref = np.asarray(x, np.float64)
    np.testing.assert_allclose(float(stats.std), ref.std(ddof=1), rtol=1e-6)
    with pytest.raises(ValueError, match="zero standard deviation"):
        fit_feature_stats(np.ones((5, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        fit_feature_stats(np.ones(5, np.float32))
    with pytest.raises(ValueError, match="at least 2"):
        fit_feature_stats(np.ones((1, 1), np.float32))


def test_normalise():
    x = np.array([[1.0, 3.0]], np.float32)
    stats = fit_feature_stats(np.array([[1.0, 3.0], [3.0, 1.0]], np.float32))
    np.testing.assert_allclose(np.asarray(normalise(x, stats)), (x - 2.0) / np.sqrt(4 / 3))
    np.testing.assert_array_equal(np.asarray(normalise(x, identity_stats())), x)


@pytest.mark.slow
def test_build_memory_bank_gathers_normalised_coreset_rows():
    rng = np.random.default_rng(2)
    library = (rng.normal(size=(500, 32)) * 2.0 + 1.0).astype(np.float32)
    key = jax.random.key(0)
    bank = bank_lib.build_memory_bank(
        library, ratio=0.1, key=key, projection_dim=8, pad_multiple=32, chunk=128
    )
    assert bank.features.shape == (64, 32) and bank.valid.shape == (64,)
    assert int(bank.valid.sum()) == 50
    mean, std = library.astype(np.float64).mean(), library.astype(np.float64).std(ddof=1)
    np.testing.assert_allclose(float(bank.stats.mean), mean, rtol=1e-5)
    # The same selection as the greedy loop on the normalised, projected library.
    idx = coreset.greedy_coreset(
        library, 50, key=key, projection_dim=8, stats=bank.stats, chunk=128
    )
    np.testing.assert_allclose(
        np.asarray(bank.features[:50]),
        (library[np.asarray(idx)] - mean) / std,
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_array_equal(np.asarray(bank.features[50:]), 0.0)
    assert not bool(bank.valid[50:].any())


@pytest.mark.slow
def test_build_memory_bank_options():
    rng = np.random.default_rng(3)
    library = rng.normal(size=(100, 8)).astype(np.float32)
    raw = bank_lib.build_memory_bank(
        library,
        ratio=0.2,
        key=jax.random.key(1),
        normalise_features=False,
        padded_size=30,
        dtype=jnp.bfloat16,
    )
    assert raw.features.shape == (30, 8) and raw.features.dtype == jnp.bfloat16
    assert float(raw.stats.mean) == 0.0 and float(raw.stats.std) == 1.0
    # Without normalisation and projection the bank rows are library rows (bf16-rounded).
    rows = np.asarray(raw.features[:20], np.float32)
    dists = np.abs(rows[:, None, :] - library[None]).max(-1).min(-1)
    assert np.all(dists < 2e-2)
    assert np.array_equal(rows[0], np.asarray(jnp.asarray(library[0], jnp.bfloat16), np.float32))
    with pytest.raises(ValueError, match="padded_size"):
        bank_lib.build_memory_bank(library, ratio=0.5, key=jax.random.key(1), padded_size=10)
    assert bank_lib.padded_bank_size(76_518, 4096) == 77_824
