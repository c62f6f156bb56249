"""Every device stage of a run on tiny random-init models, for the multi-device tests.

`extract` gives features of 10 generated samples (ViT + Point-MAE, batch 6: a full batch and a
padded one), `train` runs 2 adaptor steps on 8 of them (checkpoints in
`<workdir>/adaptation/checkpoints`), `adapt` adapts every sample, `score` builds a PatchCore bank
per modality from 6 samples and scores the other 4 against it; `run_stages` runs them all. All
run on the given mesh, so the same call on 1 device, on 4 devices or in 2 processes x 2 devices
must give the same numbers. Used in subprocesses started with forced host devices.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from configs.base import get_base_config
from lsfa_jax.adaptation.train import TrainState, train_adaptors
from lsfa_jax.features.extract import Backbones
from lsfa_jax.features.source import FeatureSource
from lsfa_jax.models import point_mae, vit
from lsfa_jax.models.adaptors import AdaptorSettings, adapt_features
from lsfa_jax.patchcore.bank import build_memory_bank
from lsfa_jax.patchcore.scorer import ScoringSettings, score_features
from tests.helpers.configs import adaptation_defaults

IMAGE, GRID, SAMPLES, TRAIN, BANK = 32, 8, 10, 8, 6
POINT_BACKBONE = dict(
    num_group=8, group_size=8, trans_dim=16, depth=2, num_heads=2, mlp_ratio=2, out_layers=(0, 1)
)


def tiny_backbones() -> Backbones:
    rgb_cfg = vit.ViTConfig(img_size=IMAGE, embed_dim=16, depth=1, num_heads=2)
    point_cfg = ml_collections.ConfigDict(POINT_BACKBONE)
    return Backbones(
        rgb_params=vit.init_random_vit_params(jax.random.key(0), rgb_cfg),
        rgb_cfg=rgb_cfg,
        point_variables=point_mae.init_random_point_mae_variables(jax.random.key(1), point_cfg),
        point_cfg=point_cfg,
        weight_files={"rgb": "random-init (seed 0)", "point": "random-init (seed 1)"},
        random_init={"rgb": True, "point": True},
    )


def organized_cloud(size: int, hole: int, seed: int) -> np.ndarray:
    """(size, size, 3) bumpy surface in metres with a (hole x hole) missing square."""
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[:size, :size] / size
    z = 0.5 + 0.01 * np.sin(6 * u) * np.cos(5 * v) + 1e-4 * rng.normal(size=u.shape)
    cloud = np.stack([u * 0.1, v * 0.1, z], axis=-1).astype(np.float32)
    cloud[:hole, :hole] = 0.0
    return cloud


def tiny_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "rgb": rng.normal(size=(SAMPLES, IMAGE, IMAGE, 3)).astype(np.float32),
        "xyz": np.stack([organized_cloud(IMAGE, 3 + i, i) for i in range(SAMPLES)]),
        "file_id": np.asarray([f"s{i}" for i in range(SAMPLES)]),
    }


def adaptation_config() -> ml_collections.ConfigDict:
    cfg = adaptation_defaults()
    cfg.update(
        dict(
            rgb_dim=16, xyz_dim=32, num_patches=GRID * GRID, proj_dim=8, rgb_heads=2,
            xyz_heads=2, batch_size=4, warmup_steps=1, local_bank_size=64, global_bank_size=4,
            lr=1e-3, kmeans_clusters=2, kmeans_iters=2, clc_chunk_size=16, nn_chunk_size=32,
            checkpoint_every=1, log_every=1, num_steps=2, eps=1e-3,
        )
    )  # fmt: skip
    # eps=1e-3: AdamW's 1e-8 turns near-zero gradients into steps of about lr whose sign is
    # float32 reduction-order noise, which would make the comparison about that noise.
    return cfg


def extract(workdir: Path, mesh: Mesh, batch_size: int = 6) -> dict[str, np.ndarray]:
    """Backbone features of the 10 samples in batches of `batch_size` (6: the second one is
    padded)."""
    config = ml_collections.ConfigDict(dict(batch_size=batch_size, grid_size=GRID, seed=0))
    source = FeatureSource(config, {}, Path(workdir), tiny_backbones(), mesh)
    return source.extract_in_batches(tiny_inputs())


def train(workdir: Path, mesh: Mesh, features: dict[str, np.ndarray]) -> TrainState:
    """2 adaptor training steps of batch 4 on the first 8 samples' features."""
    data = {k: features[k][:TRAIN] for k in ("rgb", "rgb_cls", "xyz", "fg")}
    batches = [
        {**{k: v[i : i + 4] for k, v in data.items()}, "class_id": np.asarray([0, 1, 0, 1])}
        for i in (0, 4)
    ]
    return train_adaptors(
        adaptation_config(),
        lambda epoch: batches,
        Path(workdir) / "adaptation",
        num_classes=2,
        mesh=mesh,
    )


def adapt(
    mesh: Mesh, params: dict, features: dict[str, np.ndarray], batch_size: int = 3
) -> dict[str, np.ndarray]:
    """Adapted features of every sample in batches of `batch_size` (padded to a multiple of
    the device count)."""
    settings = AdaptorSettings.from_mapping(adaptation_config())
    return adapt_features(params, settings, features, batch_size=batch_size, mesh=mesh)


def score(
    mesh: Mesh, features: dict[str, np.ndarray], batch_size: int = 3
) -> dict[str, np.ndarray]:
    """Per modality: a bank of the first 6 samples' patches, the other 4 scored against it."""
    out = {}
    for modality in ("rgb", "xyz"):
        library = features[modality][:BANK].reshape(-1, features[modality].shape[-1])
        bank = build_memory_bank(library, ratio=0.25, key=jax.random.key(2), pad_multiple=128)
        settings = dataclasses.replace(
            ScoringSettings.from_config(get_base_config()), out_size=IMAGE, batch_size=batch_size
        )
        scores, maps = score_features(bank, features[modality][BANK:], settings, mesh=mesh)
        out[f"scores/{modality}"], out[f"maps/{modality}"] = scores, maps
    return out


def run_stages(workdir: Path, mesh: Mesh) -> tuple[dict[str, np.ndarray], TrainState]:
    """Every stage on `mesh` -> ({name: host array}, the final training state). Training and
    adaptation get the extracted features, scoring gets them too (see below)."""
    features = extract(workdir, mesh)
    state = train(workdir, mesh, features)
    adapted = adapt(mesh, jax.tree.map(np.asarray, state.params), features)
    out = {f"features/{k}": v for k, v in features.items()}
    out |= {f"adapted/{k}": v for k, v in adapted.items()}
    # Scored: the backbone features, which no collective touches, so every run scores the same
    # numbers. The adapted ones carry the training's all-reduce rounding (which differs between
    # gloo and one process), and a nearest-row distance moves with it.
    out |= score(mesh, features)
    leaves = jax.tree_util.tree_leaves_with_path((state.params, state.banks))
    out |= {f"train{jax.tree_util.keystr(p)}": np.asarray(v) for p, v in leaves}
    return out, state
