"""models.transformer: attention against numpy, query chunking, and the policy's precision on
the einsums inside jax.nn.dot_product_attention (which takes no `precision=`)."""

from __future__ import annotations

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
import pytest

from lsfa_jax.models.transformer import EncoderBlock, self_attention
from lsfa_jax.precision import policy


def numpy_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """float64 softmax(q k^T / sqrt(hd)) v per head; (B, N, H, hd) in and out."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


def dot_precisions(jaxpr: jcore.Jaxpr) -> list:
    """precision params of every dot_general in a jaxpr, sub-jaxprs (scan, jit, remat) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn.params["precision"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple) else (value,):
                if isinstance(sub, jcore.ClosedJaxpr):
                    found += dot_precisions(sub.jaxpr)
                elif isinstance(sub, jcore.Jaxpr):
                    found += dot_precisions(sub)
    return found


QKV = [np.random.default_rng(i).normal(size=(2, 11, 3, 4)).astype(np.float32) for i in range(3)]


@pytest.mark.parametrize("query_chunk", [None, 4, 11])  # 4: 11 = 4 + 4 + a remainder of 3
def test_self_attention_matches_numpy(query_chunk) -> None:
    got = jax.jit(lambda q, k, v: self_attention(q, k, v, query_chunk=query_chunk))(*QKV)
    np.testing.assert_allclose(np.asarray(got), numpy_attention(*QKV), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["highest", "tf32", "bf16"])
@pytest.mark.parametrize("query_chunk", [None, 4])
def test_attention_einsums_carry_the_policy_precision(name: str, query_chunk) -> None:
    layers = policy(name)
    q, k, v = (jnp.asarray(t, layers.dtype) for t in QKV)
    fn = lambda q, k, v: self_attention(q, k, v, layers.precision, query_chunk)
    found = dot_precisions(jax.make_jaxpr(fn)(q, k, v).jaxpr)
    # logits and weighted values; chunked: once in the scan body, once for the remainder
    assert len(found) == (2 if query_chunk is None else 4)
    want = (layers.precision, layers.precision)
    if name == "bf16":
        # bfloat16 logits: dot_product_attention pins bf16 operands with float32 accumulation.
        assert all(p in (want, jax.lax.DotAlgorithmPreset.BF16_BF16_F32) for p in found)
    else:
        assert found == [want] * len(found)


@pytest.mark.slow
def test_encoder_block_names_and_shapes() -> None:
    x = jnp.asarray(np.random.default_rng(3).normal(size=(5, 12)), jnp.float32)  # no batch axis
    block = EncoderBlock(num_heads=3, mlp_ratio=2.0, qkv_bias=False)
    params = jax.jit(block.init)(jax.random.key(0), x)["params"]
    shapes = jax.tree.map(jnp.shape, params)
    assert shapes["attn"]["qkv"] == {"kernel": (12, 36)}
    assert shapes["mlp"]["fc1"]["kernel"] == (12, 24)
    assert set(shapes) == {"norm1", "attn", "norm2", "mlp"}
    apply = jax.jit(block.apply)
    batched = apply({"params": params}, jnp.stack([x, 2 * x]))
    np.testing.assert_allclose(batched[0], apply({"params": params}, x), rtol=1e-6)
    with pytest.raises(ValueError, match="width 12 not divisible by 5 heads"):
        EncoderBlock(num_heads=5).init(jax.random.key(0), x)
