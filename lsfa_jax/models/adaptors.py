"""LSFA adaptors Psi_I / Psi_P and projection heads H_I / H_P (paper 3.1-3.2,
docs/method.md#adaptors).

The default adaptor is one pre-norm transformer encoder block (x <- x + Attn(LN1(x)),
x <- x + MLP(LN2(x)), `models.transformer.EncoderBlock`): fused qkv without bias, output
projection with bias, exact-erf GELU, LayerNorm eps 1e-5, no final LayerNorm. Parameter names
mirror the reference state dict (`rgb_mlp`, `xyz_mlp`, `rgb_head`, `xyz_head`; inside a block
`norm1`, `attn/qkv`, `attn/proj`, `norm2`, `mlp/fc1`, `mlp/fc2`). Every Dense uses PyTorch's
default nn.Linear initialisation, U(+-1/sqrt(fan_in)) for kernel and bias, so a fresh adaptor is
distributed like the reference's (not an identity map).

Structures (paper Table 7): `encoder1` (default), `encoder2` (two blocks), `linear` (one Dense
per token) and `conv1x1` (a 1x1 convolution over the square patch grid; the same function class
as `linear`, kept as a separate structure so the ablation names map one to one).

`dtype` (e.g. bfloat16) is the compute dtype of the Dense, LayerNorm and attention matmuls and
`precision` their matmul precision (both from the policy in `lsfa_jax.precision`; HIGHEST by
default); parameters stay float32 and the residual stream keeps the input's dtype (float32
features).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lsfa_jax import mesh as meshes
from lsfa_jax.batching import map_in_batches, padded_batch_size
from lsfa_jax.models.transformer import DenseLayers, EncoderBlock
from lsfa_jax.precision import PINNED, policy

STRUCTURES = ("encoder1", "encoder2", "linear", "conv1x1")
LN_EPS = 1e-5  # PyTorch's nn.LayerNorm default, which the reference adaptors use


def torch_uniform_init(fan_in: int) -> nn.initializers.Initializer:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for Linear/Conv weight and bias."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Adaptor(nn.Module):
    """Psi_I or Psi_P: (B, N, dim) -> (B, N, dim); see the module docstring for `structure`."""

    dim: int
    structure: str = "encoder1"
    num_heads: int = 12
    mlp_ratio: float = 4.0
    dtype: Any = None
    attn_query_chunk: int | None = 1024
    precision: jax.lax.Precision = PINNED

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.dim:
            raise ValueError(f"adaptors.py: expected features of dim {self.dim}, got {x.shape}")
        if self.structure in ("encoder1", "encoder2"):
            block = functools.partial(
                EncoderBlock,
                self.num_heads,
                self.mlp_ratio,
                qkv_bias=False,
                ln_eps=LN_EPS,
                dtype=self.dtype,
                precision=self.precision,
                dense_init=torch_uniform_init,
                query_chunk=self.attn_query_chunk,
            )
            for i in range(1 if self.structure == "encoder1" else 2):
                x = block(name=f"blocks_{i}")(x)
            return x
        if self.structure == "linear":
            dense = DenseLayers(self.dtype, self.precision, torch_uniform_init)
            return dense(self.dim, self.dim, "linear")(x)
        if self.structure == "conv1x1":
            B, N, C = x.shape
            side = math.isqrt(N)
            if side * side != N:
                raise ValueError(f"adaptors.py: conv1x1 needs a square patch grid, got N={N}")
            init = torch_uniform_init(C)
            conv = nn.Conv(
                C,
                (1, 1),
                kernel_init=init,
                bias_init=init,
                name="conv",
                dtype=self.dtype,
                precision=self.precision,
            )
            return conv(x.reshape(B, side, side, C)).reshape(B, N, C)
        raise ValueError(f"adaptors.py: unknown structure {self.structure!r}; use {STRUCTURES}")


class LSFAModel(nn.Module):
    """Adaptors Psi_I (`rgb_mlp`), Psi_P (`xyz_mlp`) and heads H_I (`rgb_head`), H_P (`xyz_head`).

    `__call__(rgb (B,P,rgb_dim), xyz (B,P,xyz_dim), rgb_cls (B,rgb_dim) | None)` returns the
    adapted local features (F_I (B,P,rgb_dim), F_P (B,P,xyz_dim)). With `rgb_cls` the CLS token is
    prepended before the RGB adaptor and dropped after it (the reference's training input).
    `project_rgb` / `project_xyz` map (..., dim) -> (..., proj_dim).
    """

    rgb_dim: int = 768
    xyz_dim: int = 1152
    proj_dim: int = 512
    structure: str = "encoder1"
    rgb_heads: int = 12
    xyz_heads: int = 12
    mlp_ratio: float = 4.0
    dtype: Any = None
    precision: jax.lax.Precision = PINNED

    def setup(self) -> None:
        adaptor = functools.partial(
            Adaptor,
            structure=self.structure,
            mlp_ratio=self.mlp_ratio,
            dtype=self.dtype,
            precision=self.precision,
        )
        self.rgb_mlp = adaptor(self.rgb_dim, num_heads=self.rgb_heads)
        self.xyz_mlp = adaptor(self.xyz_dim, num_heads=self.xyz_heads)
        head = DenseLayers(self.dtype, self.precision, torch_uniform_init)
        self.rgb_head = head(self.proj_dim, self.rgb_dim, "rgb_head")
        self.xyz_head = head(self.proj_dim, self.xyz_dim, "xyz_head")

    def adapt_rgb(self, rgb: jax.Array, rgb_cls: jax.Array | None = None) -> jax.Array:
        """(B, P, rgb_dim) [+ CLS (B, rgb_dim)] -> F_I (B, P, rgb_dim)."""
        if rgb_cls is None:
            return self.rgb_mlp(rgb)
        tokens = jnp.concatenate([rgb_cls[:, None, :].astype(rgb.dtype), rgb], axis=1)
        return self.rgb_mlp(tokens)[:, 1:]

    def adapt_xyz(self, xyz: jax.Array) -> jax.Array:
        """(B, P, xyz_dim) -> F_P (B, P, xyz_dim)."""
        return self.xyz_mlp(xyz)

    def project_rgb(self, f: jax.Array) -> jax.Array:
        """H_I: (..., rgb_dim) -> (..., proj_dim)."""
        return self.rgb_head(f)

    def project_xyz(self, f: jax.Array) -> jax.Array:
        """H_P: (..., xyz_dim) -> (..., proj_dim)."""
        return self.xyz_head(f)

    def __call__(
        self, rgb: jax.Array, xyz: jax.Array, rgb_cls: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        f_img = self.adapt_rgb(rgb, rgb_cls)
        f_pt = self.adapt_xyz(xyz)
        if self.is_initializing():
            # Create the heads' parameters too, so `init` returns the full tree.
            self.project_rgb(f_img[:, :1])
            self.project_xyz(f_pt[:, :1])
        return f_img, f_pt


def init_lsfa_params(model: LSFAModel, key: jax.Array, num_patches: int = 4) -> dict:
    """Parameters of `model` (all four modules) from `key`; P only matters for `conv1x1`."""
    side = math.isqrt(num_patches)
    if model.structure == "conv1x1" and side * side != num_patches:
        raise ValueError(f"adaptors.py: conv1x1 needs a square num_patches, got {num_patches}")
    rgb = jnp.zeros((1, num_patches, model.rgb_dim), jnp.float32)
    xyz = jnp.zeros((1, num_patches, model.xyz_dim), jnp.float32)
    return model.init(key, rgb, xyz)["params"]


def lsfa_model(precision: str = "highest", **fields: Any) -> LSFAModel:
    """An LSFAModel with these fields, its layers under the policy named `precision`."""
    layers = policy(precision)
    dtype = layers.dtype if layers.name == "bf16" else None
    return LSFAModel(**fields, dtype=dtype, precision=layers.precision)


def model_from_params(
    params: dict,
    structure: str = "encoder1",
    rgb_heads: int = 12,
    xyz_heads: int = 12,
    precision: str = "highest",
) -> LSFAModel:
    """An LSFAModel whose dims (rgb, xyz, proj) are read from the heads' kernels in `params`."""
    rgb_dim, proj_dim = params["rgb_head"]["kernel"].shape
    xyz_dim = params["xyz_head"]["kernel"].shape[0]
    return lsfa_model(
        precision,
        rgb_dim=int(rgb_dim),
        xyz_dim=int(xyz_dim),
        proj_dim=int(proj_dim),
        structure=structure,
        rgb_heads=rgb_heads,
        xyz_heads=xyz_heads,
    )


@functools.partial(
    jax.jit, static_argnames=("structure", "rgb_heads", "xyz_heads", "prepend_cls", "precision")
)
def apply_adaptors(
    params: dict,
    rgb: jax.Array,
    xyz: jax.Array,
    rgb_cls: jax.Array | None = None,
    *,
    structure: str = "encoder1",
    rgb_heads: int = 12,
    xyz_heads: int = 12,
    prepend_cls: bool = False,
    precision: str = "highest",
) -> tuple[jax.Array, jax.Array]:
    """Inference: (rgb (B,P,Ci), xyz (B,P,Cp)) -> adapted local features of the same shapes.

    Only the local adapted features go to PatchCore (paper 3.4). The reference applies the RGB
    adaptor without CLS at inference (docs/method.md#adaptors); `prepend_cls=True` uses `rgb_cls`
    (B, Ci).
    `precision` names the layers' policy (`lsfa_jax.precision`); outputs are float32.
    """
    if prepend_cls and rgb_cls is None:
        raise ValueError("adaptors.py: prepend_cls=True needs rgb_cls (B, C)")
    model = model_from_params(params, structure, rgb_heads, xyz_heads, precision)
    f_img, f_pt = model.apply({"params": params}, rgb, xyz, rgb_cls if prepend_cls else None)
    return f_img.astype(jnp.float32), f_pt.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class AdaptorSettings:
    """What applying trained adaptors needs besides their parameters (the fused qkv kernels do
    not depend on the head count, so the counts must travel with the parameters)."""

    structure: str
    rgb_heads: int
    xyz_heads: int
    prepend_cls: bool

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> AdaptorSettings:
        """The settings named in `values` (e.g. `config.adaptation`); other keys are ignored."""
        return cls(
            structure=str(values["structure"]),
            rgb_heads=int(values["rgb_heads"]),
            xyz_heads=int(values["xyz_heads"]),
            prepend_cls=bool(values["prepend_cls"]),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _apply_adaptors(
    params: dict, rgb: jax.Array, xyz: jax.Array, rgb_cls: jax.Array, **settings: Any
) -> dict[str, jax.Array]:
    out_rgb, out_xyz = apply_adaptors(params, rgb, xyz, rgb_cls, **settings)
    return {"rgb": out_rgb, "xyz": out_xyz}


def adapt_features(
    params: dict,
    settings: AdaptorSettings,
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    precision: str = "highest",
    mesh: Mesh | None = None,
) -> dict[str, np.ndarray]:
    """Adapted features of a whole split: {"rgb" (N, P, Ci), "xyz" (N, P, Cp), "rgb_cls"
    (N, Ci)} -> {"rgb", "xyz"} float32 of the same shapes; `precision` names the layers' policy.

    Batches of `batch_size` rounded up to a multiple of the devices of `mesh` (default: every
    device) are split over them with the parameters replicated; every call sees a full batch
    (`batching.map_in_batches`), so the jitted adaptors compile once whatever the split size.
    """
    mesh = mesh or meshes.make_mesh()
    params = meshes.replicate(mesh, params)
    run = meshes.data_parallel(
        _apply_adaptors,
        mesh,
        1,
        4,
        structure=settings.structure,
        rgb_heads=settings.rgb_heads,
        xyz_heads=settings.xyz_heads,
        prepend_cls=settings.prepend_cls,
        precision=precision,
    )

    def adapt(batch: dict, _) -> dict[str, np.ndarray]:
        rows = meshes.shard_rows(mesh, [batch["rgb"], batch["xyz"], batch["rgb_cls"]])
        return meshes.to_host(run(params, *rows))

    inputs = {m: arrays[m] for m in ("rgb", "rgb_cls", "xyz")}
    return map_in_batches(adapt, inputs, padded_batch_size(batch_size, mesh.size))
