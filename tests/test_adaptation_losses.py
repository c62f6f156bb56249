"""LSFA losses against numpy references: masked InfoNCE (Eqs. 2-3) and IFC (Eqs. 5-6)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from lsfa_jax.adaptation.banks import Bank, bank_push, init_bank
from lsfa_jax.adaptation.losses import (
    clc_global_loss,
    clc_local_loss,
    feature_distance,
    ifc_global_loss,
    ifc_local_loss,
    lsfa_loss,
    random_subset,
    rotation_loss,
)
from lsfa_jax.models.adaptors import LSFAModel, init_lsfa_params
from tests.helpers.configs import loss_config


def np_normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_infonce(a, b, T):
    """-log softmax over all columns of the (already selected) rows; mean over rows."""
    logits = np_normalize(a) @ np_normalize(b).T / T
    return np.mean(logsumexp(logits, axis=1) - np.diag(logits))


def np_symmetric(a, b, T):
    return 0.5 * (np_infonce(a, b, T) + np_infonce(b, a, T))


@pytest.mark.parametrize("chunk", [None, 7, 64])
@pytest.mark.parametrize("T", [1.0, 0.1])
def test_clc_local_matches_numpy_masked_infonce(chunk, T):
    rng = np.random.default_rng(0)
    B, P, E = 3, 10, 5
    q = rng.normal(size=(B, P, E)).astype(np.float32)
    k = rng.normal(size=(B, P, E)).astype(np.float32)
    fg = rng.random((B, P)) < 0.6
    fg[2] = False  # a sample without foreground contributes neither rows nor negatives
    sel = fg.reshape(-1)
    want = np_symmetric(q.reshape(-1, E)[sel], k.reshape(-1, E)[sel], T)
    got = clc_local_loss(jnp.asarray(q), jnp.asarray(k), jnp.asarray(fg), T, chunk_size=chunk)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    got2t = clc_local_loss(q, k, fg, T, scale_by_2t=True, chunk_size=chunk)
    np.testing.assert_allclose(float(got2t), 2 * T * want, rtol=1e-5)


def test_clc_local_is_asymmetric_parts_averaged():
    # One direction alone differs from the other; the loss is their mean.
    rng = np.random.default_rng(1)
    q = rng.normal(size=(1, 6, 4)).astype(np.float32)
    k = (q + rng.normal(size=q.shape) * 2).astype(np.float32)
    a, b = q[0], k[0]
    assert abs(np_infonce(a, b, 0.5) - np_infonce(b, a, 0.5)) > 1e-3
    got = clc_local_loss(q, k, np.ones((1, 6), bool), 0.5, chunk_size=None)
    np.testing.assert_allclose(float(got), np_symmetric(a, b, 0.5), rtol=1e-5)


@pytest.mark.slow
def test_clc_local_chunked_gradient_equals_unchunked():
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(2, 9, 4)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 9, 4)), jnp.float32)
    fg = jnp.asarray(rng.random((2, 9)) < 0.7)
    g_full = jax.grad(lambda q: clc_local_loss(q, k, fg, chunk_size=None))(q)
    g_chunk = jax.grad(lambda q: clc_local_loss(q, k, fg, chunk_size=4))(q)
    np.testing.assert_allclose(np.asarray(g_chunk), np.asarray(g_full), rtol=1e-5, atol=1e-7)
    assert np.all(np.isfinite(np.asarray(g_full)))
    # Background patches get no gradient.
    assert np.all(np.asarray(g_full)[~np.asarray(fg)] == 0)


def test_clc_local_no_foreground_is_zero_and_finite():
    q = jnp.ones((2, 4, 3))
    loss, g = jax.value_and_grad(lambda q: clc_local_loss(q, q, jnp.zeros((2, 4), bool)))(q)
    assert float(loss) == 0.0
    assert np.all(np.isfinite(np.asarray(g)))


def test_clc_global_matches_numpy():
    rng = np.random.default_rng(3)
    g1 = rng.normal(size=(5, 6)).astype(np.float32)
    g2 = rng.normal(size=(5, 6)).astype(np.float32)
    valid = np.array([1, 1, 0, 1, 1], bool)
    np.testing.assert_allclose(
        float(clc_global_loss(g1, g2, 0.2)), np_symmetric(g1, g2, 0.2), rtol=1e-5
    )
    np.testing.assert_allclose(
        float(clc_global_loss(g1, g2, 0.2, valid)),
        np_symmetric(g1[valid], g2[valid], 0.2),
        rtol=1e-5,
    )


def filled_bank(rng, K, M, C, counts):
    bank = init_bank(K, M, C)
    for k, n in enumerate(counts):
        rows = rng.normal(size=(n, C)).astype(np.float32)
        bank = bank_push(bank, rows, np.ones(n, bool), np.full(n, k))
    return bank


def np_ifc_local(x, mask, bank: Bank, ids, capped=False):
    feats, count = np.asarray(bank.features), np.asarray(bank.count)
    per, ok = [], []
    for b in range(x.shape[0]):
        rows = feats[ids[b], : count[ids[b]]]
        m = mask[b] & (len(rows) > 0)
        if not m.any():
            ok.append(False)
            per.append(0.0)
            continue
        d2 = ((x[b][:, None, :] - rows[None]) ** 2).sum(-1).min(axis=1)
        d = np.sqrt(np.clip(d2, 1e-12, 50.0) if capped else np.maximum(d2, 1e-12))
        per.append(d[m].mean())
        ok.append(True)
    ok = np.array(ok)
    return np.array(per)[ok].mean() if ok.any() else 0.0


@pytest.mark.slow
@pytest.mark.parametrize("capped", [False, True])
@pytest.mark.parametrize("chunk", [3, 100])
def test_ifc_local_matches_brute_force(capped, chunk):
    rng = np.random.default_rng(4)
    K, M, C, B, P = 3, 12, 4, 4, 6
    bank = filled_bank(rng, K, M, C, counts=[5, 12, 0])  # class 2 empty, class 1 full
    x = (rng.normal(size=(B, P, C)) * (5.0 if capped else 1.0)).astype(np.float32)
    mask = rng.random((B, P)) < 0.7
    ids = np.array([0, 1, 2, 1])
    got = ifc_local_loss(x, mask, bank, ids, capped=capped, chunk_size=chunk)
    want = np_ifc_local(x, mask, bank, ids, capped)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    if capped:  # some distances exceed the cap, so capping changed the value
        assert abs(want - np_ifc_local(x, mask, bank, ids, False)) > 1e-3


@pytest.mark.slow
def test_ifc_ignores_unfilled_slots():
    # Empty slots hold zeros; a query at the origin must not match them.
    bank = init_bank(1, 8, 2)
    bank = bank_push(bank, np.array([[3.0, 4.0]], np.float32), np.ones(1, bool), np.zeros(1))
    x = np.zeros((1, 1, 2), np.float32)
    got = ifc_local_loss(x, np.ones((1, 1), bool), bank, np.zeros(1, int))
    np.testing.assert_allclose(float(got), 5.0, rtol=1e-6)


@pytest.mark.slow
def test_ifc_global_matches_brute_force_and_gradient():
    rng = np.random.default_rng(5)
    bank = filled_bank(rng, 2, 5, 3, counts=[4, 2])
    g = rng.normal(size=(3, 3)).astype(np.float32)
    ids = np.array([1, 0, 1])
    valid = np.array([True, True, False])
    want = np_ifc_local(g[:, None], valid[:, None], bank, ids)
    np.testing.assert_allclose(float(ifc_global_loss(g, bank, ids, valid)), want, rtol=1e-5)
    grad = np.asarray(jax.grad(lambda g: ifc_global_loss(g, bank, ids, valid))(jnp.asarray(g)))
    assert np.all(grad[2] == 0) and np.all(np.abs(grad[:2]).sum(-1) > 0)
    # d|x-y|/dx is the unit vector from the nearest y, divided by the 2 valid samples.
    feats = np.asarray(bank.features)
    rows = feats[ids[0], :2]
    y = rows[np.argmin(((g[0] - rows) ** 2).sum(-1))]
    np.testing.assert_allclose(grad[0], (g[0] - y) / np.linalg.norm(g[0] - y) / 2, rtol=1e-5)


def test_feature_distance_gradients_finite_at_zero_and_zero_beyond_cap():
    x = jnp.zeros((3,))
    g = jax.grad(lambda x: feature_distance(x, jnp.zeros(3)))(x)
    assert np.all(np.isfinite(np.asarray(g)))
    far = jnp.full((3,), 10.0)
    g_cap = jax.grad(lambda x: feature_distance(x, jnp.zeros(3), capped=True))(far)
    assert np.all(np.asarray(g_cap) == 0)
    np.testing.assert_allclose(float(feature_distance(far, jnp.zeros(3), capped=True)), 50**0.5)


# Jitted once per (model, cfg): eager op-by-op dispatch of the whole loss is slow.
jit_lsfa_loss = jax.jit(lsfa_loss, static_argnums=(1, 6))


def tiny_setup(seed=0, B=4, P=9):
    model = LSFAModel(rgb_dim=8, xyz_dim=12, proj_dim=6, rgb_heads=2, xyz_heads=3)
    params = init_lsfa_params(model, jax.random.PRNGKey(seed), P)
    rng = np.random.default_rng(seed)
    batch = dict(
        rgb=rng.normal(size=(B, P, 8)).astype(np.float32),
        xyz=rng.normal(size=(B, P, 12)).astype(np.float32),
        fg=rng.random((B, P)) < 0.7,
        class_id=np.array([0, 1, 0, 1], np.int32)[:B],
        rgb_cls=None,
    )
    banks = dict(
        rgb_local=filled_bank(rng, 2, 30, 8, [30, 30]),
        xyz_local=filled_bank(rng, 2, 30, 12, [20, 30]),
        rgb_global=filled_bank(rng, 2, 5, 8, [5, 3]),
        xyz_global=filled_bank(rng, 2, 5, 12, [5, 3]),
    )
    return model, params, batch, banks


@pytest.mark.slow
def test_lsfa_loss_combines_terms_with_weights_and_gates_ifc():
    model, params, batch, banks = tiny_setup()
    cfg = loss_config(
        lambda_clc=0.3, w_la=0.7, w_ga=0.2, w_ifc=0.9, w_lc=1.1, w_gc=0.4,
        ifc_warmup_steps=5, global_method="masked_mean",
    )  # fmt: skip
    key = jax.random.PRNGKey(0)
    total, aux = jit_lsfa_loss(params, model, batch, banks, jnp.int32(5), key, cfg)
    t = {k: float(v) for k, v in aux["terms"].items()}
    want = 0.9 * (1.1 * (t["lc_rgb"] + t["lc_xyz"]) + 0.4 * (t["gc_rgb"] + t["gc_xyz"])) + 0.3 * (
        0.7 * t["la"] + 0.2 * t["ga"]
    )
    np.testing.assert_allclose(float(total), want, rtol=1e-6)
    assert min(t["lc_rgb"], t["lc_xyz"], t["gc_rgb"], t["gc_xyz"], t["la"], t["ga"]) > 0
    # The IFC terms are exactly the standalone losses on the adapted features.
    f_img, f_pt = model.apply({"params": params}, batch["rgb"], batch["xyz"])
    ids = batch["class_id"]
    lc_xyz = ifc_local_loss(f_pt, batch["fg"], banks["xyz_local"], ids)
    np.testing.assert_allclose(t["lc_xyz"], float(lc_xyz), rtol=1e-5)
    all_patches = np.ones_like(batch["fg"])
    lc_rgb = ifc_local_loss(f_img, all_patches, banks["rgb_local"], ids)
    np.testing.assert_allclose(t["lc_rgb"], float(lc_rgb), rtol=1e-5)
    # Before the warm-up ends, IFC is off.
    _, aux_early = jit_lsfa_loss(params, model, batch, banks, jnp.int32(4), key, cfg)
    assert float(aux_early["terms"]["ifc"]) == 0.0
    assert float(aux_early["terms"]["la"]) == pytest.approx(t["la"], rel=1e-6)
    # "Bank full" eligibility: only class 0's RGB bank would count if it needed > 30 rows.
    cfg_full = loss_config(ifc_min_bank_fill=1.0, global_method="masked_mean")
    _, aux_full = jit_lsfa_loss(params, model, batch, banks, jnp.int32(0), key, cfg_full)
    assert float(aux_full["terms"]["ifc_eligible"]) == 4.0
    partly = dict(banks, rgb_local=filled_bank(np.random.default_rng(9), 2, 30, 8, [30, 10]))
    _, aux_part = jit_lsfa_loss(params, model, batch, partly, jnp.int32(0), key, cfg_full)
    assert float(aux_part["terms"]["ifc_eligible"]) == 2.0


@pytest.mark.slow
def test_lsfa_loss_gradients_reach_all_params_and_not_inputs():
    model, params, batch, banks = tiny_setup(1)
    before = {k: (None if v is None else np.array(v, copy=True)) for k, v in batch.items()}
    cfg = loss_config(kmeans_clusters=3)
    loss_fn = lambda p: lsfa_loss(p, model, batch, banks, jnp.int32(0), jax.random.PRNGKey(1), cfg)
    grads, _ = jax.jit(jax.grad(loss_fn, has_aux=True))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), path
        assert np.abs(g).max() > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"
    for k, v in before.items():
        if v is not None:
            np.testing.assert_array_equal(batch[k], v)


def test_random_subset_size_membership_and_uniformity():
    rng = np.random.default_rng(11)
    fg = rng.random((3, 20)) < 0.6
    n_fg = int(fg.sum())
    hits = np.zeros(fg.shape)
    for i in range(200):
        sub = np.asarray(random_subset(jnp.asarray(fg), 6, jax.random.PRNGKey(i)))
        assert sub.sum() == n_fg // 6
        assert not np.any(sub & ~fg)
        hits += sub
    # Each foreground patch is drawn with probability (|F| // 6) / |F|.
    p = (n_fg // 6) / n_fg
    assert np.abs(hits[fg] / 200 - p).max() < 4 * np.sqrt(p * (1 - p) / 200)


def test_rotation_loss_is_one_directional_infonce_over_the_subset():
    rng = np.random.default_rng(12)
    q = rng.normal(size=(2, 7, 4)).astype(np.float32)
    q_rot = rng.normal(size=(2, 7, 4)).astype(np.float32)
    subset = rng.random((2, 7)) < 0.5
    sel = subset.reshape(-1)
    want = np_infonce(q.reshape(-1, 4)[sel], q_rot.reshape(-1, 4)[sel], 1.0)
    got = rotation_loss(q, q_rot, subset, 1.0, scale_by_2t=True, chunk_size=5)
    np.testing.assert_allclose(float(got), 2.0 * want, rtol=1e-5)


def test_lsfa_loss_rotation_term():
    model, params, batch, banks = tiny_setup(2)
    cfg = loss_config(w_rot=0.05, global_method="masked_mean")
    key, step = jax.random.PRNGKey(0), jnp.int32(0)
    with pytest.raises(KeyError, match="rgb_rot"):
        lsfa_loss(params, model, batch, banks, step, key, cfg)
    rot_batch = dict(batch, rgb_rot=np.asarray(batch["rgb"])[:, ::-1].copy())
    total, aux = jit_lsfa_loss(params, model, rot_batch, banks, step, key, cfg)
    t = {k: float(v) for k, v in aux["terms"].items()}
    assert t["rot"] > 0
    without = t["ifc"] + 0.6 * t["clc"]
    np.testing.assert_allclose(float(total), without + 0.05 * t["rot"], rtol=1e-6)


@pytest.mark.parametrize("T", [1.0, 0.1])
def test_clc_unnormalised_uses_raw_inner_products(T):
    rng = np.random.default_rng(13)
    q = rng.normal(size=(2, 6, 5)).astype(np.float32)
    k = rng.normal(size=(2, 6, 5)).astype(np.float32)
    fg = rng.random((2, 6)) < 0.7
    a, b = q.reshape(-1, 5)[fg.reshape(-1)], k.reshape(-1, 5)[fg.reshape(-1)]

    def raw_infonce(x, y):
        logits = x @ y.T / T
        return np.mean(logsumexp(logits, axis=1) - np.diag(logits))

    want = 0.5 * (raw_infonce(a, b) + raw_infonce(b, a))
    got = clc_local_loss(q, k, fg, T, chunk_size=4, normalize=False)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    assert abs(want - np_symmetric(a, b, T)) > 1e-2  # normalising changes it
    with pytest.raises(ValueError, match="clc_temperature"):
        loss_config(clc_temperature=0.0)


def test_zero_weight_terms_are_exactly_zero_and_the_rest_unchanged():
    model, params, batch, banks = tiny_setup(3)
    key, step = jax.random.PRNGKey(0), jnp.int32(0)
    full = loss_config(global_method="masked_mean")
    off = loss_config(global_method="masked_mean", w_ga=0.0, w_lc=0.0, clc_temperature=0.5)
    _, aux_full = jit_lsfa_loss(params, model, batch, banks, step, key, full)
    t_full = {k: float(v) for k, v in aux_full["terms"].items()}
    total, aux = jit_lsfa_loss(params, model, batch, banks, step, key, off)
    t = {k: float(v) for k, v in aux["terms"].items()}
    assert t["ga"] == t["lc_rgb"] == t["lc_xyz"] == 0.0
    assert t["gc_rgb"] == pytest.approx(t_full["gc_rgb"], rel=1e-6) and t["gc_rgb"] > 0
    assert t["la"] > 0 and t["la"] != pytest.approx(t_full["la"])  # the temperature is used
    want = (t["gc_rgb"] + t["gc_xyz"]) + 0.6 * t["la"]
    np.testing.assert_allclose(float(total), want, rtol=1e-6)
    no_family = loss_config(global_method="masked_mean", lambda_clc=0.0)
    t0 = jit_lsfa_loss(params, model, batch, banks, step, key, no_family)[1]["terms"]
    assert float(t0["la"]) == float(t0["ga"]) == float(t0["clc"]) == 0.0
