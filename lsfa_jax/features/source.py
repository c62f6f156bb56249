"""Patch features of every split for the configured method, computed once and cached.

method fpfh: FPFH point features only ({"xyz", "fg"}); methods raw / lsfa: frozen DINO +
Point-MAE features ({"rgb", "rgb_cls", "xyz", "fg"}).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import ml_collections
import numpy as np

from lsfa_jax.features import cache
from lsfa_jax.features.extract import Backbones, extract_batch, load_backbones
from lsfa_jax.features.fpfh import FpfhParams, fpfh_patch_features


@dataclasses.dataclass
class FeatureSource:
    """Cached patch features of one run; `split(class, split)` computes them on first use."""

    config: ml_collections.ConfigDict
    prepared: Mapping[str, str]
    cache_root: Path
    backbones: Backbones | None

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
            return extract_batch(self.backbones, batch, grid_size=self.config.grid_size)
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
    config: ml_collections.ConfigDict, prepared: Mapping[str, str], cache_root: Path
) -> FeatureSource:
    backbones = None if config.method == "fpfh" else load_backbones(config)
    return FeatureSource(config, prepared, cache_root, backbones)
