"""mode=convert: turn the public PyTorch checkpoints into JAX-native (orbax) ones.

  python main.py --config=configs/mvtec3d.py --config.mode=convert \
      --config.rgb_weights=dino_vitbase8_pretrain.pth --config.point_weights=pretrain.pth

writes <workdir>/converted/{rgb,point}; pass those folders as rgb_weights / point_weights later
(loading skips unpickling and key conversion). Random initialisation is never converted.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from lsfa_jax.features.extract import load_backbones
from lsfa_jax.jobs.common import ConfigError
from lsfa_jax.models.checkpoint_io import save_orbax


def run_convert(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, Path]:
    if not (config.rgb_weights or config.point_weights):
        raise ConfigError("mode=convert needs --config.rgb_weights and/or --config.point_weights")
    probe = ml_collections.ConfigDict(config.to_dict())
    probe.allow_random_init = True
    backbones = load_backbones(probe)
    written = {}
    trees = {"rgb": backbones.rgb_params, "point": backbones.point_variables}
    for modality, tree in trees.items():
        if backbones.random_init[modality]:
            continue
        target = workdir / "converted" / modality
        save_orbax(tree, target, overwrite=True)
        written[modality] = target
        print(f"{modality}: {backbones.weight_files[modality]} -> {target}")
    return written
