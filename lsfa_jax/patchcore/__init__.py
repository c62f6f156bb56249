"""PatchCore on one modality: normalisation, greedy coreset, memory bank, kNN scoring, maps."""

from lsfa_jax.patchcore.bank import MemoryBank, build_memory_bank
from lsfa_jax.patchcore.coreset import coreset_size, greedy_coreset
from lsfa_jax.patchcore.normalisation import FeatureStats, fit_feature_stats, normalise
from lsfa_jax.patchcore.scorer import (
    anomaly_map,
    nearest_neighbours,
    patchcore_image_score,
    score_batch,
)

__all__ = [
    "FeatureStats",
    "MemoryBank",
    "anomaly_map",
    "build_memory_bank",
    "coreset_size",
    "fit_feature_stats",
    "greedy_coreset",
    "nearest_neighbours",
    "normalise",
    "patchcore_image_score",
    "score_batch",
]
