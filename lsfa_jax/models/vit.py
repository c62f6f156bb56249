"""DINO ViT-B/8 RGB backbone (Flax linen) and conversion from PyTorch state dicts.

Architecture as in docs/method.md#dino-vit-features-and-the-56x56-grid: conv patch embedding, CLS
token, learned position
embedding, pre-norm blocks (`models.transformer.EncoderBlock`: fused qkv, exact-erf GELU),
final LayerNorm (eps 1e-6). Parameter
names mirror the torch names: `patch_embed/proj`, `cls_token`, `pos_embed`,
`blocks_{i}/{norm1,attn/qkv,attn/proj,norm2,mlp/fc1,mlp/fc2}`, `norm`.

Only the last layer's normalised patch tokens are used downstream (same section); `dino_patch_grid`
returns them on the 56x56 grid shared with the point features (same section).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lsfa_jax.models.checkpoint_io import (
    CheckpointError,
    flatten_state_dict,
    load_orbax,
    load_state_dict,
    read_header,
    strict_match,
)
from lsfa_jax.models.transformer import EncoderBlock
from lsfa_jax.precision import PINNED, policy


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Sizes of the ViT; the defaults are DINO ViT-B/8 at 224x224 (85.8 M parameters)."""

    img_size: int = 224
    patch_size: int = 8
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    ln_eps: float = 1e-6

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} not divisible by {self.num_heads} heads")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} not a multiple of patch {self.patch_size}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


def vit_config(cfg: ViTConfig | Mapping[str, Any] | Any | None = None) -> ViTConfig:
    """ViTConfig from a ViTConfig, a mapping or ConfigDict (fields not given keep defaults)."""
    if cfg is None:
        return ViTConfig()
    if isinstance(cfg, ViTConfig):
        return cfg
    names = [f.name for f in dataclasses.fields(ViTConfig)]
    if isinstance(cfg, Mapping):
        values = {n: cfg[n] for n in names if n in cfg}
    else:
        values = {n: getattr(cfg, n) for n in names if hasattr(cfg, n)}
    return ViTConfig(**values)


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys cubic convolution weights for the 4 taps at offsets -1, 0, 1, 2; t in [0, 1)."""
    x = np.stack([t + 1.0, t, 1.0 - t, 2.0 - t], axis=-1)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x <= 1.0, near, far)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) matrix of torch's bicubic resize (a=-0.75, align_corners=False).

    Border taps are clamped to the edge, as in torch's `upsample_bicubic2d`.
    """
    src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    base = np.floor(src)
    weights = _cubic_weights(src - base)
    taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3), 0, in_size - 1)
    matrix = np.zeros((out_size, in_size), np.float64)
    np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
    return matrix.astype(np.float32)


def resize_pos_embed(pos_embed: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
    """(1, 1+g*g, D) -> (1, 1+gh*gw, D): bicubic resize of the grid part, CLS entry kept.

    Same rule as timm's `resample_abs_pos_embed` (torch bicubic, align_corners=False, by
    target size). At the training grid this is the identity and is skipped.
    """
    n_grid = pos_embed.shape[1] - 1
    g = round(n_grid**0.5)
    if g * g != n_grid:
        raise ValueError(f"pos_embed grid of {n_grid} entries is not square")
    gh, gw = grid_hw
    if (gh, gw) == (g, g):
        return pos_embed
    grid = pos_embed[0, 1:].reshape(g, g, -1)
    rows, cols = jnp.asarray(bicubic_matrix(g, gh)), jnp.asarray(bicubic_matrix(g, gw))
    # A fixed resampling of parameters: pinned, whatever the precision policy.
    resized = jnp.einsum("hg,gwd,vw->hvd", rows, grid, cols, precision=PINNED)
    return jnp.concatenate([pos_embed[:, :1], resized.reshape(1, gh * gw, -1)], axis=1)


class PatchEmbed(nn.Module):
    """(B, H, W, 3) -> (B, H/p * W/p, D), row-major over the (H/p, W/p) grid."""

    patch_size: int
    embed_dim: int
    dtype: Any = jnp.float32
    precision: jax.lax.Precision = PINNED

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        p = self.patch_size
        x = nn.Conv(
            self.embed_dim,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            precision=self.precision,
            name="proj",
        )(images)
        return x.reshape(x.shape[0], -1, self.embed_dim)


_init_std = nn.initializers.truncated_normal(0.02)


class VisionTransformer(nn.Module):
    """DINO ViT. (B, H, W, 3) ImageNet-normalised -> (B, 1 + H/p * W/p, D) normalised tokens.

    Token 0 is CLS; the rest are the patch tokens row-major over the (H/p, W/p) grid. Inputs of
    another size than `config.img_size` get a bicubically resized position embedding. `dtype` and
    `precision` are those of the dense layers, the patch convolution and the attention einsums
    (`lsfa_jax.precision`); the residual stream and the output stay float32.
    """

    config: ViTConfig = ViTConfig()  # frozen, hashable: fine as a default
    dtype: Any = jnp.float32
    precision: jax.lax.Precision = PINNED

    @classmethod
    def from_config(cls, cfg: ViTConfig, precision: str = "highest") -> VisionTransformer:
        """The ViT of these sizes under the precision policy named `precision`."""
        layers = policy(precision)
        return cls(cfg, dtype=layers.dtype, precision=layers.precision)

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        cfg = self.config
        b, h, w, _ = images.shape
        p, d = cfg.patch_size, cfg.embed_dim
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        embed = PatchEmbed(p, d, self.dtype, self.precision, name="patch_embed")
        x = embed(images).astype(jnp.float32)
        cls_token = self.param("cls_token", _init_std, (1, 1, d))
        g = cfg.grid_size
        pos_embed = self.param("pos_embed", _init_std, (1, 1 + g * g, d))
        cls = jnp.broadcast_to(cls_token, (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1)
        x = x + resize_pos_embed(pos_embed, (h // p, w // p))
        block = functools.partial(
            EncoderBlock,
            cfg.num_heads,
            cfg.mlp_ratio,
            cfg.qkv_bias,
            cfg.ln_eps,
            self.dtype,
            self.precision,
        )
        for i in range(cfg.depth):
            x = block(name=f"blocks_{i}")(x)
        x = nn.LayerNorm(epsilon=cfg.ln_eps, dtype=self.dtype, name="norm")(x)
        return x.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("model_cfg", "return_cls", "precision"))
def dino_patch_grid(
    params: Any,
    images: jax.Array,
    *,
    model_cfg: ViTConfig = ViTConfig(),  # frozen, hashable: fine as a default
    return_cls: bool = False,
    precision: str = "highest",
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Last-layer normalised patch tokens on the 2x upsampled grid.

    Args:
      params: the ViT 'params' collection.
      images: (B, H, W, 3) ImageNet-normalised, H and W multiples of the patch size p.
      model_cfg: the ViT sizes (hashable; static under jit).
      return_cls: also return the CLS token.
      precision: the precision policy of the layers (`lsfa_jax.precision`).

    Returns:
      (B, (2H/p) * (2W/p), D) patch features, row-major; (B, 3136, 768) at 224 with p=8.
      Each token becomes a 2x2 block: torch's AdaptiveAvgPool2d(28 -> 56) is exactly this
      replication (docs/method.md#dino-vit-features-and-the-56x56-grid). With return_cls, also the
      (B, D) CLS token.
    """
    model = VisionTransformer.from_config(model_cfg, precision)
    tokens = model.apply({"params": params}, images)
    b, h, w, _ = images.shape
    gh, gw = h // model_cfg.patch_size, w // model_cfg.patch_size
    grid = tokens[:, 1:].reshape(b, gh, gw, -1)
    grid = jnp.repeat(jnp.repeat(grid, 2, axis=1), 2, axis=2).reshape(b, 4 * gh * gw, -1)
    if return_cls:
        return grid, tokens[:, 0]
    return grid


def init_random_vit_params(key: jax.Array, model_cfg: ViTConfig | Any = None) -> dict[str, Any]:
    """Randomly initialised ViT 'params' (truncated normal 0.02 for tokens and positions)."""
    cfg = vit_config(model_cfg)
    dummy = jnp.zeros((1, cfg.img_size, cfg.img_size, 3), jnp.float32)
    return VisionTransformer.from_config(cfg).init(key, dummy)["params"]


def expected_torch_shapes(cfg: ViTConfig) -> dict[str, tuple[int, ...]]:
    """Torch state-dict names -> shapes for a ViT of these sizes
    (docs/method.md#checkpoint-layouts)."""
    d, m, p, g = cfg.embed_dim, cfg.mlp_dim, cfg.patch_size, cfg.grid_size
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 1 + g * g, d),
        "patch_embed.proj.weight": (d, 3, p, p),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    for i in range(cfg.depth):
        blk = f"blocks.{i}."
        shapes.update(
            {
                blk + "norm1.weight": (d,),
                blk + "norm1.bias": (d,),
                blk + "attn.qkv.weight": (3 * d, d),
                blk + "attn.proj.weight": (d, d),
                blk + "attn.proj.bias": (d,),
                blk + "norm2.weight": (d,),
                blk + "norm2.bias": (d,),
                blk + "mlp.fc1.weight": (m, d),
                blk + "mlp.fc1.bias": (m,),
                blk + "mlp.fc2.weight": (d, m),
                blk + "mlp.fc2.bias": (d,),
            }
        )
        if cfg.qkv_bias:
            shapes[blk + "attn.qkv.bias"] = (3 * d,)
    return shapes


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _backbone_state(state: Mapping[str, Any], source: str) -> dict[str, np.ndarray]:
    """Flat torch backbone names from a backbone-only, timm or full DINO checkpoint."""
    if "teacher" in state:
        # Full DINO checkpoint: the teacher's backbone, behind DDP/MultiCropWrapper prefixes.
        teacher = flatten_state_dict(state["teacher"])
        flat = {_strip(k, ("module.", "backbone.")): v for k, v in teacher.items()}
        # The DINO projection head is trained with the backbone but not part of it.
        return {k: v for k, v in flat.items() if not k.startswith("head.")}
    flat = flatten_state_dict(state)
    if len(flat) != len(state):
        nested = sorted(k for k, v in state.items() if not isinstance(v, np.ndarray))
        raise CheckpointError(f"{source}: non-tensor top-level entries {nested}")
    # timm with num_classes=0 may keep empty head tensors; an empty head is no head.
    return {k: v for k, v in flat.items() if not (k.startswith("head.") and v.size == 0)}


def vit_params_from_state_dict(
    state: Mapping[str, Any], *, model_cfg: ViTConfig | Any = None, source: str
) -> dict[str, Any]:
    """Torch DINO/timm ViT state dict -> Flax 'params' (docs/method.md#checkpoint-layouts), checked
    strictly.

    Linear (out, in) -> kernel (in, out); conv OIHW -> HWIO; LayerNorm weight -> scale; qkv stays
    fused. Raises CheckpointError naming `source` with every missing/unexpected/misshaped key.
    """
    cfg = vit_config(model_cfg)
    flat = _backbone_state(state, source)
    strict_match(flat, expected_torch_shapes(cfg), source=source)
    t = {k: np.asarray(v, dtype=np.float32) for k, v in flat.items()}

    def dense(name: str, bias: bool = True) -> dict[str, np.ndarray]:
        out = {"kernel": t[f"{name}.weight"].T}
        if bias:
            out["bias"] = t[f"{name}.bias"]
        return out

    def layer_norm(name: str) -> dict[str, np.ndarray]:
        return {"scale": t[f"{name}.weight"], "bias": t[f"{name}.bias"]}

    params: dict[str, Any] = {
        "patch_embed": {
            "proj": {
                "kernel": t["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
                "bias": t["patch_embed.proj.bias"],
            }
        },
        "cls_token": t["cls_token"],
        "pos_embed": t["pos_embed"],
        "norm": layer_norm("norm"),
    }
    for i in range(cfg.depth):
        blk = f"blocks.{i}"
        params[f"blocks_{i}"] = {
            "norm1": layer_norm(f"{blk}.norm1"),
            "attn": {
                "qkv": dense(f"{blk}.attn.qkv", bias=cfg.qkv_bias),
                "proj": dense(f"{blk}.attn.proj"),
            },
            "norm2": layer_norm(f"{blk}.norm2"),
            "mlp": {"fc1": dense(f"{blk}.mlp.fc1"), "fc2": dense(f"{blk}.mlp.fc2")},
        }
    return jax.tree.map(np.ascontiguousarray, params)


def _check_param_tree(params: Any, cfg: ViTConfig, source: str) -> None:
    expected = jax.eval_shape(
        functools.partial(init_random_vit_params, model_cfg=cfg), jax.random.key(0)
    )
    want = {
        "/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(expected)
    }
    have = {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }
    strict_match(have, want, source=source)


def check_vit_checkpoint(path: str | os.PathLike, model_cfg: ViTConfig | Any = None) -> None:
    """The checks of `load_vit_params` on a file's keys and shapes only (`read_header`), for a
    check before any long work. Orbax folders are checked when loaded."""
    cfg = vit_config(model_cfg)
    path = Path(path)
    if path.is_dir():
        return
    flat = _backbone_state(read_header(path), str(path))
    strict_match(flat, expected_torch_shapes(cfg), source=str(path))


def load_vit_params(path: str | os.PathLike, model_cfg: ViTConfig | Any = None) -> dict[str, Any]:
    """Flax ViT 'params' from a `.pth`/`.pt`, `.safetensors` or `.npz` file with torch names, or
    from an orbax directory written by `save_orbax` (a converted checkpoint)."""
    cfg = vit_config(model_cfg)
    path = Path(path)
    if path.is_dir():
        params = load_orbax(path)
        _check_param_tree(params, cfg, str(path))
        return params
    return vit_params_from_state_dict(load_state_dict(path), model_cfg=cfg, source=str(path))
