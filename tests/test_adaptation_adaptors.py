"""Adaptors and heads against a small PyTorch reference block; init, sizes, structures, CLS flag."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lsfa_jax.models.adaptors import (
    STRUCTURES,
    Adaptor,
    LSFAModel,
    apply_adaptors,
    init_lsfa_params,
)


def jit_apply(module):
    """module.apply, jitted: eager op-by-op dispatch of a whole block is slow on CPU."""
    return jax.jit(module.apply, static_argnames=("method",))


class TorchBlock(torch.nn.Module):
    """Pre-norm encoder block as described in the notes (4.2), written for this test."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = torch.nn.LayerNorm(dim, eps=1e-5)
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
        self.proj = torch.nn.Linear(dim, dim)
        self.norm2 = torch.nn.LayerNorm(dim, eps=1e-5)
        self.fc1 = torch.nn.Linear(dim, 4 * dim)
        self.fc2 = torch.nn.Linear(4 * dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        hd = C // self.heads
        qkv = self.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * hd**-0.5, qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


def load_block(tb: TorchBlock, p: dict) -> None:
    def lin(mod, d):
        mod.weight.data = torch.from_numpy(np.asarray(d["kernel"]).T.copy())
        if "bias" in d:
            mod.bias.data = torch.from_numpy(np.asarray(d["bias"]).copy())

    def ln(mod, d):
        mod.weight.data = torch.from_numpy(np.asarray(d["scale"]).copy())
        mod.bias.data = torch.from_numpy(np.asarray(d["bias"]).copy())

    ln(tb.norm1, p["norm1"])
    ln(tb.norm2, p["norm2"])
    lin(tb.qkv, p["attn"]["qkv"])
    lin(tb.proj, p["attn"]["proj"])
    lin(tb.fc1, p["mlp"]["fc1"])
    lin(tb.fc2, p["mlp"]["fc2"])


def random_ln(params, rng):
    """Non-trivial LayerNorm parameters, so the mapping of scale/bias is exercised."""
    return jax.tree_util.tree_map_with_path(
        lambda path, v: (
            v + rng.normal(size=v.shape).astype(np.float32) * 0.1
            if "norm" in jax.tree_util.keystr(path)
            else v
        ),
        params,
    )


@pytest.mark.slow
@pytest.mark.parametrize("dim,heads", [(24, 4), (36, 3)])
def test_encoder_block_matches_torch_reference(dim, heads):
    rng = np.random.default_rng(0)
    model = LSFAModel(rgb_dim=dim, xyz_dim=dim, proj_dim=8, rgb_heads=heads, xyz_heads=heads)
    params = random_ln(init_lsfa_params(model, jax.random.PRNGKey(0), 10), rng)
    x = rng.normal(size=(2, 10, dim)).astype(np.float32)
    apply = jit_apply(model)
    f_img, f_pt = apply({"params": params}, x, x * 0.5)
    tb = TorchBlock(dim, heads)
    load_block(tb, params["rgb_mlp"]["blocks_0"])
    with torch.no_grad():
        want = tb(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(f_img), want, rtol=1e-4, atol=1e-5)
    load_block(tb, params["xyz_mlp"]["blocks_0"])
    with torch.no_grad():
        want_pt = tb(torch.from_numpy(x * 0.5)).numpy()
    np.testing.assert_allclose(np.asarray(f_pt), want_pt, rtol=1e-4, atol=1e-5)
    proj = apply({"params": params}, f_img, method="project_rgb")
    head = params["rgb_head"]
    want_proj = np.asarray(f_img) @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
    np.testing.assert_allclose(np.asarray(proj), want_proj, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_query_chunked_attention_equals_full_with_gradients():
    x = np.random.default_rng(7).normal(size=(2, 11, 8)).astype(np.float32)
    full = Adaptor(8, num_heads=2, attn_query_chunk=None)
    chunked = Adaptor(8, num_heads=2, attn_query_chunk=4)  # 11 = 4 + 4 + 3: padding exercised
    params = full.init(jax.random.PRNGKey(0), x)["params"]
    f = lambda mod: jax.jit(lambda p: (mod.apply({"params": p}, x) ** 2).sum())
    v1, g1 = jax.jit(jax.value_and_grad(f(full)))(params)
    v2, g2 = jax.jit(jax.value_and_grad(f(chunked)))(params)
    np.testing.assert_allclose(float(v2), float(v1), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_torch_default_init_bounds_and_not_identity():
    model = LSFAModel(rgb_dim=64, xyz_dim=96, proj_dim=32, rgb_heads=4, xyz_heads=4)
    params = init_lsfa_params(model, jax.random.PRNGKey(1), 4)
    for path, v in jax.tree_util.tree_leaves_with_path(params):
        name = jax.tree_util.keystr(path)
        v = np.asarray(v)
        if "norm" in name:
            want = 1.0 if "scale" in name else 0.0
            np.testing.assert_array_equal(v, want)
            continue
        dim = 64 if "rgb" in name else 96
        fan_in = 4 * dim if "fc2" in name else dim
        bound = 1 / math.sqrt(fan_in)
        assert np.abs(v).max() <= bound, name
        # Uniform: max close to the bound, std close to bound / sqrt(3), bias non-zero.
        assert np.abs(v).max() > 0.9 * bound, name
        if v.size > 1000:
            assert abs(v.std() - bound / math.sqrt(3)) < 0.05 * bound, name
    x = np.random.default_rng(0).normal(size=(1, 4, 64)).astype(np.float32)
    f_img, _ = jit_apply(model)({"params": params}, x, np.zeros((1, 4, 96), np.float32))
    assert np.abs(np.asarray(f_img) - x).max() > 1e-2


def test_parameter_counts_at_paper_shapes():
    model = LSFAModel()
    shapes = jax.eval_shape(lambda: init_lsfa_params(model, jax.random.PRNGKey(0), num_patches=4))
    count = lambda t: sum(int(np.prod(v.shape)) for v in jax.tree.leaves(t))
    # Figures from the notes (4.2), i.e. the reference state dict.
    assert count(shapes["rgb_mlp"]) == 7_085_568
    assert count(shapes["xyz_mlp"]) == 15_936_768
    assert count(shapes["rgb_head"]) == 393_728
    assert count(shapes["xyz_head"]) == 590_336
    assert shapes["rgb_mlp"]["blocks_0"]["attn"]["qkv"]["kernel"].shape == (768, 2304)
    assert "bias" not in shapes["rgb_mlp"]["blocks_0"]["attn"]["qkv"]


@pytest.mark.parametrize("structure", STRUCTURES)
def test_structures_shapes_and_layers(structure):
    x = np.random.default_rng(0).normal(size=(2, 16, 8)).astype(np.float32)
    ad = Adaptor(8, structure, num_heads=2)
    params = ad.init(jax.random.PRNGKey(0), x)["params"]
    y = ad.apply({"params": params}, x)
    assert y.shape == x.shape
    if structure == "encoder2":
        assert set(params) == {"blocks_0", "blocks_1"}
    if structure in ("linear", "conv1x1"):
        # Per-token affine maps: a token's output depends on that token only.
        x2 = x.copy()
        x2[:, 3] += 1.0
        y2 = ad.apply({"params": params}, x2)
        np.testing.assert_allclose(np.delete(np.asarray(y2), 3, 1), np.delete(np.asarray(y), 3, 1))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="unknown structure"):
        Adaptor(8, "mlp").init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 8)))
    with pytest.raises(ValueError, match="square patch grid"):
        Adaptor(8, "conv1x1").init(jax.random.PRNGKey(0), jnp.zeros((1, 5, 8)))
    with pytest.raises(ValueError, match="dim 8"):
        Adaptor(8).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 6)))


@pytest.mark.slow
def test_apply_adaptors_cls_flag():
    rng = np.random.default_rng(5)
    model = LSFAModel(rgb_dim=8, xyz_dim=12, proj_dim=4, rgb_heads=2, xyz_heads=2)
    params = init_lsfa_params(model, jax.random.PRNGKey(2), 6)
    rgb = rng.normal(size=(2, 6, 8)).astype(np.float32)
    xyz = rng.normal(size=(2, 6, 12)).astype(np.float32)
    cls = rng.normal(size=(2, 8)).astype(np.float32)
    r0, p0 = apply_adaptors(params, rgb, xyz, cls, rgb_heads=2, xyz_heads=2)
    apply = jit_apply(model)
    want = apply({"params": params}, rgb, xyz)
    np.testing.assert_allclose(np.asarray(r0), np.asarray(want[0]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(p0), np.asarray(want[1]), rtol=1e-5, atol=1e-6)
    r1, _ = apply_adaptors(params, rgb, xyz, cls, rgb_heads=2, xyz_heads=2, prepend_cls=True)
    full = apply({"params": params}, np.concatenate([cls[:, None], rgb], 1), method="adapt_rgb")
    np.testing.assert_allclose(np.asarray(r1), np.asarray(full)[:, 1:], rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(r1) - np.asarray(r0)).max() > 1e-4
    with pytest.raises(ValueError, match="prepend_cls"):
        apply_adaptors(params, rgb, xyz, prepend_cls=True, rgb_heads=2, xyz_heads=2)


@pytest.mark.slow
def test_bf16_compute_is_close_to_fp32_and_keeps_fp32_params():
    rng = np.random.default_rng(8)
    kw = dict(rgb_dim=16, xyz_dim=24, proj_dim=8, rgb_heads=2, xyz_heads=2)
    params = init_lsfa_params(LSFAModel(**kw), jax.random.PRNGKey(3), 8)
    bf16 = LSFAModel(**kw, dtype=jnp.bfloat16)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(params))
    rgb = rng.normal(size=(2, 8, 16)).astype(np.float32)
    xyz = rng.normal(size=(2, 8, 24)).astype(np.float32)
    want = jit_apply(LSFAModel(**kw))({"params": params}, rgb, xyz)
    got = jit_apply(bf16)({"params": params}, rgb, xyz)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == jnp.float32  # the residual stream keeps the input dtype
        err = np.abs(np.asarray(g, np.float32) - np.asarray(w)).max()
        assert 0 < err < 0.05 * np.abs(np.asarray(w)).max()
