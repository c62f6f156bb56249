"""Adaptor training for a run: cached train features of all classes -> `train_adaptors`.

As in the reference code, one pair of adaptors is trained jointly on the train split of every
selected class (class ids pick the per-class memory banks); few-shot runs (paper 4.4) keep
`adaptation.few_shot` seeded samples per class.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import ml_collections
import numpy as np

from lsfa_jax import console
from lsfa_jax.adaptation.train import select_few_shot, train_adaptors
from lsfa_jax.features.cache import SplitFeatures
from lsfa_jax.jobs.common import ConfigError


def adaptation_config(
    config: ml_collections.ConfigDict, train: Sequence[SplitFeatures]
) -> ml_collections.ConfigDict:
    """`config.adaptation` with the feature sizes read from the cached features."""
    cfg = ml_collections.ConfigDict(config.adaptation.to_dict())
    first = train[0].arrays
    cfg.rgb_dim = int(first["rgb"].shape[-1])
    cfg.xyz_dim = int(first["xyz"].shape[-1])
    cfg.num_patches = int(first["rgb"].shape[1])
    return cfg


def training_indices(
    train: Sequence[SplitFeatures], few_shot: int, seed: int
) -> list[tuple[int, int]]:
    """(class index, sample index) pairs used for training, all or `few_shot` per class."""
    per_class = {c: list(range(len(split))) for c, split in enumerate(train)}
    if few_shot > 0:
        per_class = select_few_shot(per_class, few_shot, seed)
    return [(c, i) for c, indices in per_class.items() for i in indices]


def make_batches_fn(
    train: Sequence[SplitFeatures], pairs: list[tuple[int, int]], batch_size: int, seed: int
):
    """batches_fn(epoch): seeded shuffle of `pairs` per epoch, full batches only (drop_last)."""
    if len(pairs) < batch_size:
        raise ConfigError(
            f"adaptation: {len(pairs)} training samples is fewer than one batch ({batch_size}); "
            "lower config.adaptation.batch_size"
        )

    def batches_fn(epoch: int) -> Iterator[dict[str, np.ndarray]]:
        order = np.random.default_rng((seed, epoch)).permutation(len(pairs))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            chosen = [pairs[k] for k in order[start : start + batch_size]]
            yield {
                "rgb": np.stack([train[c].arrays["rgb"][i] for c, i in chosen]),
                "rgb_cls": np.stack([train[c].arrays["rgb_cls"][i] for c, i in chosen]),
                "xyz": np.stack([train[c].arrays["xyz"][i] for c, i in chosen]),
                "fg": np.stack([train[c].arrays["fg"][i] for c, i in chosen]),
                "class_id": np.asarray([c for c, _ in chosen], np.int32),
            }

    return batches_fn


def train_lsfa(
    config: ml_collections.ConfigDict, train: Sequence[SplitFeatures], workdir: Path
) -> tuple[dict, ml_collections.ConfigDict]:
    """Trains the adaptors on the cached features; returns (params, adaptation config)."""
    cfg = adaptation_config(config, train)
    pairs = training_indices(train, int(config.adaptation.few_shot), config.seed)
    steps_per_epoch = len(pairs) // cfg.batch_size
    console.stage(
        "training the LSFA adaptors: %d samples over %d classes, %d batches per epoch; "
        "checkpoints and TensorBoard logs in %s",
        len(pairs),
        len(train),
        steps_per_epoch,
        workdir / "adaptation",
    )
    state = train_adaptors(
        cfg,
        make_batches_fn(train, pairs, cfg.batch_size, config.seed),
        workdir / "adaptation",
        num_classes=len(train),
        steps_per_epoch=steps_per_epoch,
    )
    return state.params, cfg
