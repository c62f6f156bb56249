"""The pre-norm transformer encoder block of all three stacks: the DINO ViT (`models.vit`), the
Point-MAE encoder (`models.point_mae`) and the LSFA adaptors (`models.adaptors`).

    x <- x + proj(MHSA(qkv(norm1(x))))      x <- x + fc2(GELU(fc1(norm2(x))))

The layout of big_vision's `Encoder1DBlock`, with what the three torch models share: one fused
qkv projection whose output channel s*C + h*hd + d is (q/k/v s, head h, channel d), as torch's
reshape to (B, N, 3, heads, hd) reads it; exact-erf GELU (torch `nn.GELU()`'s default); an output
projection and both MLP layers with bias. They differ only in the fields: qkv bias (ViT yes,
Point-MAE and adaptors no), LayerNorm eps (ViT 1e-6, the others 1e-5), the initialisation (the
adaptors use torch's `nn.Linear` default, `dense_init`) and query chunking (adaptors). The
submodule names are the torch ones, which the checkpoint converters map to: `norm1`,
`attn/qkv`, `attn/proj`, `norm2`, `mlp/fc1`, `mlp/fc2`.

Attention is `jax.nn.dot_product_attention`, which takes no `precision=`: for float32 operands
its two einsums pass precision=None, which `jax.lax` resolves against
`jax_default_matmul_precision` when they are traced (bfloat16 logits pin BF16_BF16_F32 with
float32 accumulation themselves). `self_attention` therefore traces it under
`jax.default_matmul_precision` of the policy's precision, so both dot_generals carry that
precision in the jaxpr (tests/test_precision.py emulates TF32 on every one that is not HIGHEST).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lsfa_jax.batching import map_in_chunks
from lsfa_jax.precision import PINNED

# fan_in -> initializer of a Dense layer's kernel and bias (e.g. torch's nn.Linear default).
DenseInit = Callable[[int], nn.initializers.Initializer]


@dataclasses.dataclass(frozen=True)
class DenseLayers:
    """How a stack builds its Dense layers: compute dtype, matmul precision and initialisation
    (`init(fan_in)` for kernel and bias, or Flax's defaults when None)."""

    dtype: Any = None
    precision: jax.lax.Precision = PINNED
    init: DenseInit | None = None

    def __call__(self, features: int, fan_in: int, name: str, use_bias: bool = True) -> nn.Dense:
        inits = {}
        if self.init is not None:
            inits = {"kernel_init": self.init(fan_in), "bias_init": self.init(fan_in)}
        return nn.Dense(
            features,
            use_bias=use_bias,
            dtype=self.dtype,
            precision=self.precision,
            name=name,
            **inits,
        )


def self_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    precision: jax.lax.Precision = PINNED,
    query_chunk: int | None = None,
) -> jax.Array:
    """softmax(q k^T / sqrt(hd)) v per head: (B, N, H, hd) inputs -> (B, N, H, hd).

    With N > query_chunk the queries go `query_chunk` at a time (`batching.map_in_chunks`), each
    chunk recomputed in the backward pass, so at most (B, H, query_chunk, N) weights exist at
    once (at N = 3136 the full weights are 3.8 GB per layer and batch of 8). Exact either way.
    """
    with jax.default_matmul_precision(precision.name.lower()):
        if query_chunk is None or query_chunk >= q.shape[1]:
            return jax.nn.dot_product_attention(q, k, v)
        one_query = lambda q_row: jax.nn.dot_product_attention(q_row[:, None], k, v)[:, 0]
        rows = map_in_chunks(one_query, jnp.moveaxis(q, 1, 0), query_chunk, remat=True)
        return jnp.moveaxis(rows, 0, 1)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused qkv Dense: (..., N, C) -> (..., N, C)."""

    num_heads: int
    qkv_bias: bool
    query_chunk: int | None
    dense: DenseLayers

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        *lead, n, c = x.shape
        if c % self.num_heads:
            raise ValueError(f"transformer.py: width {c} not divisible by {self.num_heads} heads")
        qkv = self.dense(3 * c, c, "qkv", use_bias=self.qkv_bias)(x.reshape(-1, n, c))
        q, k, v = jnp.moveaxis(qkv.reshape(-1, n, 3, self.num_heads, c // self.num_heads), 2, 0)
        out = self_attention(q, k, v, self.dense.precision, self.query_chunk)
        return self.dense(c, c, "proj")(out.reshape(*lead, n, c))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2: (..., C) -> (..., C)."""

    hidden_dim: int
    dense: DenseLayers

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        h = jax.nn.gelu(self.dense(self.hidden_dim, c, "fc1")(x), approximate=False)
        return self.dense(c, self.hidden_dim, "fc2")(h)


class EncoderBlock(nn.Module):
    """Pre-norm block (module docstring): (..., N, C) -> (..., N, C), MLP width int(C * mlp_ratio).

    `dtype` and `precision` are those of the Dense layers, LayerNorms and attention einsums
    (`lsfa_jax.precision`); the residual stream keeps the input's dtype.
    """

    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    ln_eps: float = 1e-6
    dtype: Any = None
    precision: jax.lax.Precision = PINNED
    dense_init: DenseInit | None = None
    query_chunk: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        norm = functools.partial(nn.LayerNorm, epsilon=self.ln_eps, dtype=self.dtype)
        dense = DenseLayers(self.dtype, self.precision, self.dense_init)
        attn = SelfAttention(self.num_heads, self.qkv_bias, self.query_chunk, dense, name="attn")
        x = x + attn(norm(name="norm1")(x))
        mlp = Mlp(int(x.shape[-1] * self.mlp_ratio), dense, name="mlp")
        return x + mlp(norm(name="norm2")(x))
