"""A class's PatchCore memory banks from its training patch features (one per modality)."""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from lsfa_jax.data.few_shot import few_shot_indices
from lsfa_jax.patchcore.bank import MemoryBank, build_memory_bank, padded_bank_size
from lsfa_jax.patchcore.coreset import coreset_size


def name_key(seed: int, *names: str) -> jax.Array:
    """A PRNG key from the run seed and names (class, modality): a stable hash of each name,
    never a position, so a class's numbers do not depend on which other classes ran."""
    key = jax.random.PRNGKey(seed)
    for name in names:
        key = jax.random.fold_in(key, zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF)
    return key


def bank_sample_indices(
    class_name: str, n_train: int, *, few_shot: int, max_train_samples: int, seed: int
) -> np.ndarray:
    """Indices of a class's training samples that go into its banks: the few-shot samples the
    adaptors are trained on (`adaptation.few_shot` > 0, paper 4.4: they are the training set),
    else the first `patchcore.max_train_samples` (0: all of them)."""
    if few_shot > 0:
        return few_shot_indices(class_name, n_train, few_shot, seed)
    return np.arange(min(n_train, max_train_samples) if max_train_samples > 0 else n_train)


def bank_padded_size(rows_per_class: Sequence[int], ratio: float) -> int:
    """One padded bank size for every class, so the scorer compiles once per modality."""
    return padded_bank_size(coreset_size(max(rows_per_class), ratio), 4096)


def build_class_banks(
    class_name: str,
    train: Mapping[str, np.ndarray],
    *,
    ratios: Mapping[str, float],
    padded: Mapping[str, int],
    seed: int,
    eps: float,
    dtype: jnp.dtype,
    mesh: Mesh | None = None,
) -> dict[str, MemoryBank]:
    """{modality: (N, P, C) training features} -> {modality: MemoryBank}.

    The coreset's random projection is keyed by (seed, class name, modality). With `mesh`
    (`patchcore.shard_bank`), the greedy coreset runs on the projected library split over its
    devices, selecting the same rows.
    """
    banks = {}
    for modality, features in train.items():
        library = np.asarray(features, np.float32).reshape(-1, features.shape[-1])
        logging.info("%s/%s: coreset of %d library rows", class_name, modality, len(library))
        banks[modality] = build_memory_bank(
            library,
            ratio=ratios[modality],
            key=name_key(seed, class_name, modality),
            eps=eps,
            padded_size=padded[modality],
            dtype=dtype,
            progress=True,
            mesh=mesh,
        )
    return banks
