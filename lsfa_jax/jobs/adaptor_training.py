"""Adaptor training for a run: cached train features of all classes -> `train_adaptors`.

As in the reference code, one pair of adaptors is trained jointly on the train split of every
selected class (class ids pick the per-class memory banks); few-shot runs (paper 4.4) keep
`adaptation.few_shot` seeded samples per class (`data.few_shot.few_shot_indices`, the same
samples the PatchCore banks are built from). With w_rot > 0 the batches also carry `rgb_rot`,
the features of the block-rotated training images.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_collections
import numpy as np
from jax.sharding import Mesh

from lsfa_jax import console
from lsfa_jax.adaptation.train import train_adaptors
from lsfa_jax.data.few_shot import few_shot_indices
from lsfa_jax.features.cache import SplitFeatures
from lsfa_jax.jobs.common import ConfigError


def adaptation_config(
    config: ml_collections.ConfigDict, train: Mapping[str, SplitFeatures]
) -> ml_collections.ConfigDict:
    """`config.adaptation` with the feature sizes read from the cached features."""
    cfg = ml_collections.ConfigDict(config.adaptation.to_dict())
    first = next(iter(train.values())).arrays
    cfg.rgb_dim = int(first["rgb"].shape[-1])
    cfg.xyz_dim = int(first["xyz"].shape[-1])
    cfg.num_patches = int(first["rgb"].shape[1])
    return cfg


def training_indices(
    train: Mapping[str, SplitFeatures], few_shot: int, seed: int
) -> list[tuple[int, int]]:
    """(class index, sample index) pairs used for training, all or `few_shot` per class; the
    class index is the position in `train` (it picks the class's adaptation banks), the
    few-shot draw depends on the class name only."""
    pairs = []
    for c, (name, split) in enumerate(train.items()):
        chosen = few_shot_indices(name, len(split), few_shot, seed) if few_shot > 0 else None
        pairs += [(c, int(i)) for i in (range(len(split)) if chosen is None else chosen)]
    return pairs


def make_batches_fn(
    train: Mapping[str, SplitFeatures],
    pairs: list[tuple[int, int]],
    batch_size: int,
    seed: int,
    rotated: Mapping[str, SplitFeatures] | None = None,
):
    """batches_fn(epoch): seeded shuffle of `pairs` per epoch, full batches only (drop_last).
    With `rotated` (class -> split holding `rgb_rot`) the batches carry `rgb_rot` too."""
    if len(pairs) < batch_size:
        raise ConfigError(
            f"adaptation: {len(pairs)} training samples is fewer than one batch ({batch_size}); "
            "lower config.adaptation.batch_size"
        )

    splits = list(train.values())
    rot = None if rotated is None else [rotated[name] for name in train]

    def batches_fn(epoch: int) -> Iterator[dict[str, np.ndarray]]:
        order = np.random.default_rng((seed, epoch)).permutation(len(pairs))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            chosen = [pairs[k] for k in order[start : start + batch_size]]
            batch = {
                name: np.stack([splits[c].arrays[name][i] for c, i in chosen])
                for name in ("rgb", "rgb_cls", "xyz", "fg")
            }
            batch["class_id"] = np.asarray([c for c, _ in chosen], np.int32)
            if rot is not None:
                batch["rgb_rot"] = np.stack([rot[c].arrays["rgb_rot"][i] for c, i in chosen])
            yield batch

    return batches_fn


def train_lsfa(
    config: ml_collections.ConfigDict,
    train: Mapping[str, SplitFeatures],
    workdir: Path,
    rotated: Mapping[str, SplitFeatures] | None = None,
    mesh: Mesh | None = None,
) -> tuple[dict, ml_collections.ConfigDict]:
    """Trains the adaptors on the cached features of `train` (class name -> train split, in
    class-id order); `rotated` (class name -> `rgb_rot` features) is needed when w_rot > 0.
    Returns (params, adaptation config)."""
    cfg = adaptation_config(config, train)
    if cfg.w_rot and rotated is None:
        raise ValueError(
            "adaptation.w_rot > 0 needs the rotated-image features (FeatureSource.rotated_train)"
        )
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
        make_batches_fn(train, pairs, cfg.batch_size, config.seed, rotated if cfg.w_rot else None),
        workdir / "adaptation",
        num_classes=len(train),
        steps_per_epoch=steps_per_epoch,
        mesh=mesh,
    )
    return state.params, cfg
