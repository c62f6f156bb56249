"""Patch features of every split for the configured method, computed once and cached.

method fpfh: FPFH point features only ({"xyz", "fg"}); methods raw / lsfa: frozen DINO +
Point-MAE features ({"rgb", "rgb_cls", "xyz", "fg"}). The rotation term of the loss (w_rot > 0)
also needs DINO features of block-rotated training images ({"rgb_rot"}), cached separately.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import ml_collections
import numpy as np
from jax.sharding import Mesh

from lsfa_jax import mesh as meshes
from lsfa_jax.batching import pad_batch, padded_batch_size
from lsfa_jax.data.block_rotation import block_rotation_turns, rotate_blocks
from lsfa_jax.features import cache
from lsfa_jax.features.extract import Backbones, extract_batch, load_backbones, rgb_features
from lsfa_jax.features.fpfh import FpfhParams, fpfh_patch_features


@dataclasses.dataclass
class FeatureSource:
    """Cached patch features of one run; `split(class, split)` computes them on first use."""

    config: ml_collections.ConfigDict
    prepared: Mapping[str, str]
    cache_root: Path
    backbones: Backbones | None
    mesh: Mesh | None = None  # the backbones' devices; None: every device (`lsfa_jax.mesh`)

    @property
    def devices_used(self) -> int:
        """Devices the backbones run on (FPFH runs on the host: 0)."""
        return 0 if self.backbones is None else (self.mesh or meshes.make_mesh()).size

    @property
    def modalities(self) -> tuple[str, ...]:
        """Feature arrays scored by PatchCore: ("xyz",) for FPFH, ("rgb", "xyz") otherwise."""
        return ("xyz",) if self.backbones is None else ("rgb", "xyz")

    def fingerprint(self) -> str:
        if self.backbones is not None:
            return f"backbones-{self.backbones.fingerprint()}-grid{self.config.grid_size}"
        payload = json.dumps([self.config.fpfh.to_dict(), self.config.grid_size], sort_keys=True)
        return "fpfh-" + hashlib.sha256(payload.encode()).hexdigest()[:16]

    def extract(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.backbones is not None:
            return extract_batch(
                self.backbones,
                batch,
                grid_size=self.config.grid_size,
                batch_size=self.config.batch_size,
                mesh=self.mesh,
            )
        params = FpfhParams(**self.config.fpfh.to_dict())
        pairs = [
            fpfh_patch_features(cloud, params, grid_size=self.config.grid_size, name=str(file_id))
            for cloud, file_id in zip(batch["xyz"], batch["file_id"], strict=True)
        ]
        return {
            "xyz": np.stack([np.asarray(f) for f, _ in pairs]),
            "fg": np.stack([np.asarray(m) for _, m in pairs]),
        }

    def extract_in_batches(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`extract` over (N, ...) inputs in consecutive batches of `config.batch_size`, as the
        feature cache does, so the same samples in the same order give the same features."""
        size = self.config.batch_size
        count = len(inputs["file_id"])
        parts = [
            self.extract({k: v[start : start + size] for k, v in inputs.items()})
            for start in range(0, count, size)
        ]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def extract_rotated(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """DINO features of the training images with each grid cell's pixel block rotated by a
        seeded quarter turn (`data.block_rotation`): {"rgb_rot": (B, P, D_rgb)}."""
        grid = self.config.grid_size
        images = np.stack(
            [
                rotate_blocks(image, block_rotation_turns(f"{cls}/{fid}", grid, self.config.seed))
                for image, cls, fid in zip(
                    batch["rgb"], batch["class"], batch["file_id"], strict=True
                )
            ]
        )
        mesh = self.mesh or meshes.make_mesh()
        size = padded_batch_size(max(self.config.batch_size, len(images)), mesh.size)
        padded, _ = pad_batch({"rgb": images}, size)
        rgb, _ = rgb_features(self.backbones, padded["rgb"], mesh)
        return {"rgb_rot": rgb[: len(images)]}

    def rotated_train(self, class_name: str) -> cache.SplitFeatures:
        """`rgb_rot` features of a class's training split (computed once, cached)."""
        if self.backbones is None:
            raise ValueError("rotated-image features need the DINO backbone (not method=fpfh)")
        return cache.split_features(
            self.extract_rotated,
            f"{self.fingerprint()}-blockrot-seed{self.config.seed}",
            self.prepared,
            class_name,
            "train",
            self.cache_root,
            batch_size=self.config.batch_size,
        )

    def split(self, class_name: str, split: str) -> cache.SplitFeatures:
        return cache.split_features(
            self.extract,
            self.fingerprint(),
            self.prepared,
            class_name,
            split,
            self.cache_root,
            batch_size=self.config.batch_size,
        )


def feature_source(
    config: ml_collections.ConfigDict,
    prepared: Mapping[str, str],
    cache_root: Path,
    mesh: Mesh | None = None,
) -> FeatureSource:
    backbones = None if config.method == "fpfh" else load_backbones(config)
    return FeatureSource(config, prepared, cache_root, backbones, mesh)
