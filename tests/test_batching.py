"""lsfa_jax.batching against plain slicing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsfa_jax.batching import map_in_batches, map_in_chunks, pad_batch


def test_pad_batch_repeats_the_last_row_and_masks_it() -> None:
    batch = {"x": np.arange(6).reshape(3, 2), "name": ["a", "b", "c"]}
    padded, mask = pad_batch(batch, 5)
    assert padded["x"].tolist() == [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]]
    assert padded["name"] == ["a", "b", "c", "c", "c"]
    assert mask.tolist() == [True, True, True, False, False]
    with pytest.raises(ValueError, match="different lengths"):
        pad_batch({"x": np.zeros(2), "y": np.zeros(3)}, 4)
    with pytest.raises(ValueError, match="do not fit"):
        pad_batch({"x": np.zeros(5)}, 4)


def test_map_in_batches_sees_one_shape_and_returns_the_real_rows() -> None:
    x = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    shapes, masks = [], []

    def fn(batch, mask):
        shapes.append(batch["x"].shape)
        masks.append(mask.sum())
        return {"double": 2 * batch["x"], "norm": np.linalg.norm(batch["x"], axis=1)}

    out = map_in_batches(fn, {"x": x}, 4)
    assert shapes == [(4, 3)] * 3 and masks == [4, 4, 2]
    np.testing.assert_array_equal(out["double"], 2 * x)
    np.testing.assert_allclose(out["norm"], np.linalg.norm(x, axis=1))


@pytest.mark.parametrize("chunk", [None, 3, 5, 10, 16])
def test_map_in_chunks_equals_numpy_and_scans_the_full_chunks(chunk) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(10, 4)).astype(np.float32)
    y = rng.normal(size=(7, 4)).astype(np.float32)
    w = rng.normal(size=10).astype(np.float32)

    def fn(row):  # one row of x and its weight -> (weighted distances to y, their sum)
        x_i, w_i = row
        d = w_i * jnp.sum((x_i[None] - y) ** 2, axis=-1)
        return d, jnp.sum(d)

    got_d, got_sum = jax.jit(lambda x, w: map_in_chunks(fn, (x, w), chunk))(x, w)
    want_d = w[:, None] * ((x[:, None] - y[None]) ** 2).sum(-1)
    np.testing.assert_allclose(np.asarray(got_d), want_d, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got_sum), want_d.sum(1), rtol=1e-6)
    scans = [e for e in jax.make_jaxpr(lambda x: map_in_chunks(fn, (x, w), chunk))(x).eqns]
    lengths = [e.params["length"] for e in scans if e.primitive.name == "scan"]
    assert lengths == ([] if chunk is None or chunk >= 10 else [10 // chunk])


@pytest.mark.slow
def test_map_in_chunks_remat_keeps_values_and_gradients() -> None:
    x = jnp.asarray(np.random.default_rng(2).normal(size=(9, 3)), jnp.float32)
    loss = lambda chunk, remat: (
        lambda x: jnp.sum(
            map_in_chunks(lambda r: jnp.sin(r) * jnp.sum(r**2), x, chunk, remat=remat) ** 2
        )
    )
    v_full, g_full = jax.value_and_grad(loss(None, False))(x)
    v_remat, g_remat = jax.value_and_grad(loss(4, True))(x)
    np.testing.assert_allclose(float(v_remat), float(v_full), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g_remat), np.asarray(g_full), rtol=1e-6)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss(4, True)))(x))
    assert "remat" in jaxpr or "checkpoint" in jaxpr
