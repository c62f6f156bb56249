"""The PatchCore memory bank of one modality: coreset rows, validity mask, library stats."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lsfa_jax.patchcore.coreset import coreset_size, greedy_coreset
from lsfa_jax.patchcore.knn import (
    ApproximateIndex,
    SearchIndex,
    approximate_index,
    search_index,
)
from lsfa_jax.patchcore.normalisation import (
    FeatureStats,
    fit_feature_stats,
    identity_stats,
    normalise,
)


class MemoryBank(NamedTuple):
    """features (M, D) normalised rows (float32 or bfloat16), zero beyond the real rows;
    valid (M,) bool, True for real rows; stats: the library's standardisation constants
    (queries are normalised with them before the search); index / approximate: the screened /
    approximate search's bank data (`with_search_index`), or None to compute it in every
    scoring call that needs it. M is padded to a fixed size so that jitted scoring compiles
    once for banks of different classes."""

    features: jax.Array
    valid: jax.Array
    stats: FeatureStats
    index: SearchIndex | None = None
    approximate: ApproximateIndex | None = None


def with_search_index(bank: MemoryBank, approximate_dim: int | None = None) -> MemoryBank:
    """The bank with its SearchIndex (and, given approximate_dim, its ApproximateIndex on that
    many principal directions); what it already holds is kept, only what is missing is
    computed. Scoring calls then reuse them."""
    index = bank.index if bank.index is not None else search_index(bank.features, bank.valid)
    approximate = bank.approximate
    if approximate_dim is not None and (
        approximate is None or approximate.basis.shape[1] != approximate_dim
    ):
        approximate = approximate_index(bank.features, bank.valid, dim=approximate_dim)
    return bank._replace(index=index, approximate=approximate)


def padded_bank_size(n_rows: int, multiple: int) -> int:
    """n_rows rounded up to a multiple of `multiple`."""
    return -(-n_rows // multiple) * multiple


def build_memory_bank(
    library: np.ndarray | jax.Array,
    *,
    ratio: float = 0.1,
    key: jax.Array,
    projection_dim: int | None = None,
    eps: float = 0.9,
    normalise_features: bool = True,
    per_channel: bool = False,
    pad_multiple: int = 4096,
    padded_size: int | None = None,
    dtype: jnp.dtype = jnp.float32,
    chunk: int = 16384,
    progress: bool = False,
    mesh: Mesh | None = None,
) -> MemoryBank:
    """Library (N, D) -> MemoryBank: fit stats, normalise, greedy coreset, gather, pad.

    Args:
      library: (N, D) training patch features of one modality.
      ratio: coreset fraction (0.1 for both modalities by default; the reference's RGB bank is
        effectively 0.01, see `coreset_size`).
      key: PRNG key of the coreset's random projection.
      projection_dim, eps: see `greedy_coreset`.
      normalise_features: False keeps raw features (identity stats), as the reference's
        3D-only run does.
      per_channel: per-channel instead of scalar statistics.
      pad_multiple: the bank is padded to a multiple of this (use the scorer's bank_chunk).
      padded_size: fixed padded size instead (e.g. the largest bank over classes).
      dtype: storage dtype of the bank rows (float32 or bfloat16).
      chunk: rows processed at a time when fitting stats and projecting.
      progress: tqdm bar over the greedy iterations.
      mesh: run the greedy coreset on the projected library split over its devices (same
        rows; `patchcore.shard_bank`).
    """
    n_rows = library.shape[0]
    stats = (
        fit_feature_stats(library, per_channel=per_channel, chunk=chunk)
        if normalise_features
        else identity_stats()
    )
    n_select = coreset_size(n_rows, ratio)
    indices = greedy_coreset(
        library,
        n_select,
        key=key,
        projection_dim=projection_dim,
        eps=eps,
        stats=stats,
        chunk=chunk,
        progress=progress,
        mesh=mesh,
    )
    rows = normalise(jnp.asarray(library[np.asarray(indices)]), stats)
    size = padded_size if padded_size is not None else padded_bank_size(n_select, pad_multiple)
    if size < n_select:
        raise ValueError(f"build_memory_bank: padded_size {size} < coreset size {n_select}")
    features = jnp.zeros((size, rows.shape[1]), dtype).at[:n_select].set(rows.astype(dtype))
    valid = jnp.arange(size) < n_select
    return with_search_index(MemoryBank(features=features, valid=valid, stats=stats))
