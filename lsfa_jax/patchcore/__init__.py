"""PatchCore on one modality: normalisation, greedy coreset, memory bank, kNN scoring, maps."""

from lsfa_jax.patchcore.bank import MemoryBank, build_memory_bank, with_search_index
from lsfa_jax.patchcore.coreset import coreset_size, greedy_coreset
from lsfa_jax.patchcore.knn import (
    ApproximateIndex,
    SearchIndex,
    approximate_index,
    approximate_nearest_neighbour,
    nearest_neighbours,
    screened_nearest_neighbour,
    search_index,
)
from lsfa_jax.patchcore.normalisation import FeatureStats, fit_feature_stats, normalise
from lsfa_jax.patchcore.scorer import (
    anomaly_map,
    patchcore_image_score,
    score_batch,
)

__all__ = [
    "ApproximateIndex",
    "FeatureStats",
    "MemoryBank",
    "SearchIndex",
    "anomaly_map",
    "approximate_index",
    "approximate_nearest_neighbour",
    "build_memory_bank",
    "coreset_size",
    "fit_feature_stats",
    "greedy_coreset",
    "nearest_neighbours",
    "normalise",
    "patchcore_image_score",
    "score_batch",
    "screened_nearest_neighbour",
    "search_index",
    "with_search_index",
]
