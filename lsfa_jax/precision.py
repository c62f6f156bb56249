"""The precision policy of the learned layers: one setting, `config.precision`, for every stage.

  highest  float32 operands at Precision.HIGHEST (the default): the backbones and adaptors match
           the PyTorch float32 reference on every device, GPUs included.
  tf32     float32 operands at the device's default matmul precision: TF32 tensor cores on
           Ampere/Hopper GPUs (about 1e-3 relative error per product); on CPU the same as highest.
  bf16     bfloat16 operands (Intel AMX, GPU tensor cores) with float32 accumulation; residual
           streams, softmax, LayerNorm statistics and outputs stay float32.

The policy covers the dense layers, convolutions and attention einsums of the backbones
(`models.vit`, `models.point_mae`) and of the adaptors (`models.adaptors`). Every other dot in the
project is pinned to `PINNED` whatever the policy: distances and similarities (kNN, FPS,
interpolation weights, coreset, memory-bank search, contrastive logits), where TF32 or bfloat16
operands would change neighbour sets, and the fixed resampling matrices (position-embedding
resize, patch-grid pooling, anomaly-map upsampling), which are cheap. The certified bfloat16 kNN
screen is exact by construction (`patchcore.knn`) and also independent of the policy.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

POLICIES = ("highest", "tf32", "bf16")

# Precision of every dot that must stay float32 whatever the policy (see the module docstring).
PINNED = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Policy:
    """Compute dtype and matmul precision of the learned layers (hashable: a static argument)."""

    name: str = "highest"

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ValueError(f"config.precision={self.name!r}: use one of {POLICIES}")

    @property
    def dtype(self) -> Any:
        """Operand dtype of the dense layers, convolutions and attention einsums."""
        return jnp.bfloat16 if self.name == "bf16" else jnp.float32

    @property
    def precision(self) -> jax.lax.Precision:
        """`precision=` of those ops: HIGHEST, or the device default (TF32 on recent GPUs)."""
        return PINNED if self.name == "highest" else jax.lax.Precision.DEFAULT


def config_policy(config: Any) -> str:
    """`config.precision` of a run config; "highest" for configs saved before the key existed
    (their layers ran at full float32, which is what "highest" pins)."""
    return policy(config.get("precision", "highest")).name


def policy(name: str | Policy) -> Policy:
    """The Policy named `name` ("highest" | "tf32" | "bf16"); raises ValueError on other names."""
    return name if isinstance(name, Policy) else Policy(str(name))
