"""`validate(config)`: every enumerated choice and range of a run config, checked before any work.

The choices are the library's own tuples (one list per setting, where the code that acts on it
lives), so a new option is allowed here as soon as it exists there. The settings the library
reads into frozen dataclasses (`LossConfig`, `ScoringSettings`, `AdaptorSettings`,
`ThresholdSettings`) are built once here too, so their own checks run up front.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from lsfa_jax.adaptation.kmeans import GLOBAL_METHODS
from lsfa_jax.adaptation.losses import LossConfig
from lsfa_jax.data.prepare import DATASETS
from lsfa_jax.fusion import FUSION_METHODS, THRESHOLD_RULES, ThresholdSettings
from lsfa_jax.jobs.common import ConfigError
from lsfa_jax.model_folder import BANK_DTYPES
from lsfa_jax.models.adaptors import STRUCTURES, AdaptorSettings
from lsfa_jax.models.point_mae import BATCHNORMS, FPS_TIES
from lsfa_jax.patchcore import faiss_search
from lsfa_jax.patchcore.scorer import BLURS, SEARCHES, ScoringSettings
from lsfa_jax.patchcore.sharding import SHARDED_SEARCHES
from lsfa_jax.precision import POLICIES

MODES = ("prepare", "train_eval", "eval", "test", "predict", "convert", "export")
METHODS = ("lsfa", "raw", "fpfh")

# Dotted key -> the values it may take.
CHOICES: dict[str, tuple[str, ...]] = {
    "mode": MODES,
    "method": METHODS,
    "data.name": DATASETS,
    "precision": POLICIES,
    "point_backbone.fps_ties": FPS_TIES,
    "point_backbone.batchnorm": BATCHNORMS,
    "patchcore.search": SEARCHES,
    "patchcore.blur": BLURS,
    "patchcore.bank_dtype": tuple(BANK_DTYPES),
    "adaptation.structure": STRUCTURES,
    "adaptation.global_method": GLOBAL_METHODS,
    "adaptation.bank_dtype": tuple(BANK_DTYPES),
    "fusion.method": FUSION_METHODS,
    "fusion.threshold_rule": THRESHOLD_RULES,
    "fusion.pixel_threshold_rule": THRESHOLD_RULES,
}

# Dotted key -> (test, what the value must be).
RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "grid_size": (lambda v: v >= 1, ">= 1"),
    "data.xyz_scale": (lambda v: v > 0, "> 0"),
    "data.validation_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
    "patchcore.coreset_ratio": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "patchcore.rgb_coreset_ratio": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "patchcore.approximate_dim": (lambda v: v >= 1, ">= 1"),
    "patchcore.max_train_samples": (lambda v: v >= 0, ">= 0 (0: every training sample)"),
    "adaptation.batch_size": (lambda v: v >= 1, ">= 1"),
    "adaptation.accum_steps": (lambda v: v >= 1, ">= 1"),
    "adaptation.few_shot": (lambda v: v >= 0, ">= 0 (0: every training sample)"),
    "adaptation.clc_temperature": (lambda v: v > 0, "> 0 (1.0: the reference's)"),
    "adaptation.local_bank_size": (lambda v: v >= 1, ">= 1"),
    "adaptation.global_bank_size": (lambda v: v >= 1, ">= 1"),
}


def _lookup(config: ml_collections.ConfigDict, key: str):
    node = config
    for part in key.split("."):
        if part not in node:
            return None
        node = node[part]
    return node


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises one ConfigError naming the first bad key of `config` and its allowed values."""
    for key, allowed in CHOICES.items():
        value = _lookup(config, key)
        if value is not None and value not in allowed:
            raise ConfigError(f"config.{key}={value!r}: use one of {', '.join(allowed)}")
    for key, (ok, rule) in RANGES.items():
        value = _lookup(config, key)
        if value is not None and not ok(value):
            raise ConfigError(f"config.{key}={value!r}: must be {rule}")
    sharded_searches = (*SHARDED_SEARCHES, "auto")  # auto picks an in-graph search there
    if _lookup(config, "patchcore.shard_bank") and config.patchcore.search not in sharded_searches:
        raise ConfigError(
            f"config.patchcore.search={config.patchcore.search!r}: with patchcore.shard_bank=True "
            f"use one of {', '.join(sharded_searches)} (or patchcore.shard_bank=False)"
        )
    if _lookup(config, "patchcore.search") == "faiss" and not faiss_search.available():
        raise ConfigError(f"config.{faiss_search.MISSING}")
    for build in (
        lambda: LossConfig.from_config(config.adaptation),
        lambda: AdaptorSettings.from_mapping(config.adaptation),
        lambda: ScoringSettings.from_config(config),
        lambda: ThresholdSettings.from_config(config.fusion),
    ):
        try:
            build()
        except (KeyError, ValueError, TypeError) as error:
            raise ConfigError(f"config: {error}") from error
