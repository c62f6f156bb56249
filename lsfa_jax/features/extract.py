"""Frozen backbones for a run: loading (strict, random only when allowed) and batch features.

`load_backbones` returns the RGB (DINO ViT) and point (Point-MAE) parameters named by the config;
`extract_batch` maps one pipeline batch to patch features on the 56x56 grid:

  rgb      (B, P, D_rgb)  last-layer DINO tokens, 2x replicated     (P = 3136 at 224)
  rgb_cls  (B, D_rgb)     the CLS token (used only by the adaptor during training, optional)
  xyz      (B, P, D_xyz)  Point-MAE blocks 3/7/11, interpolated and pooled
  fg       (B, P) bool    patches with at least one valid point

Both backbones run data-parallel over the run's mesh (`lsfa_jax.mesh`): the batch is padded
to a multiple of the device count and split, the frozen parameters are replicated, and each
process checks and transfers only its own rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from lsfa_jax import mesh as meshes
from lsfa_jax.batching import pad_batch, padded_batch_size
from lsfa_jax.errors import UserError
from lsfa_jax.features.point_mae_grid import check_clouds, point_mae_clouds
from lsfa_jax.models import point_mae, vit
from lsfa_jax.precision import config_policy


class WeightsError(UserError, ValueError):
    """Backbone weights are missing and random initialisation was not allowed."""


@dataclasses.dataclass
class Backbones:
    """Frozen backbone variables and where they came from."""

    rgb_params: Any
    rgb_cfg: vit.ViTConfig
    point_variables: Any
    point_cfg: ml_collections.ConfigDict
    weight_files: dict[str, str]  # modality -> file, or "random-init (seed N)"
    random_init: dict[str, bool]
    precision: str = "highest"  # the layers' policy (lsfa_jax/precision.py)
    # mesh -> (rgb params, point variables) replicated on it, placed once per mesh.
    _placed: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def on(self, mesh: Mesh) -> tuple[Any, Any]:
        """The RGB parameters and point variables replicated over `mesh`."""
        if mesh not in self._placed:
            self._placed[mesh] = meshes.replicate(mesh, (self.rgb_params, self.point_variables))
        return self._placed[mesh]

    def fingerprint(self) -> str:
        """Identifies the features these backbones produce (sizes, weight files, precision)."""
        payload = {
            "rgb_cfg": dataclasses.asdict(self.rgb_cfg),
            "point_cfg": self.point_cfg.to_dict(),
            "weights": {k: _file_identity(v) for k, v in self.weight_files.items()},
        }
        if self.precision != "highest":  # keeps the keys of caches written before the policy
            payload["precision"] = self.precision
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _file_identity(path: str) -> str:
    """Path plus size and mtime: cheap, and changes whenever the file is replaced."""
    file = Path(path)
    if not file.exists():
        return path
    if file.is_dir():
        stats = [(p.name, p.stat().st_size) for p in sorted(file.rglob("*")) if p.is_file()]
        return f"{file.resolve()}:{stats}"
    stat = file.stat()
    return f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def _random_warning(modalities: list[str]) -> None:
    logging.warning(
        "%s backbone%s: RANDOM INITIALISATION (config.allow_random_init=True): features are "
        "NOT pretrained, results say nothing about the paper's method",
        " and ".join(modalities),
        "s" if len(modalities) > 1 else "",
    )


def load_backbones(config: ml_collections.ConfigDict) -> Backbones:
    """Loads both backbones from `config.rgb_weights` / `config.point_weights`.

    A missing weights path is an error unless `config.allow_random_init` is True, in which case
    the backbone is randomly initialised from `config.seed` with a loud warning, and the run's
    results record it. `config.precision` is the layers' precision policy.
    """
    precision = config_policy(config)
    image_size = config.data.image_size
    rgb_cfg = vit.vit_config({**config.rgb_backbone.to_dict(), "img_size": image_size})
    point_cfg = config.point_backbone
    key_rgb, key_point = jax.random.split(jax.random.PRNGKey(config.seed))
    weight_files: dict[str, str] = {}
    random_init: dict[str, bool] = {}

    for modality, path in (("rgb", config.rgb_weights), ("point", config.point_weights)):
        if path:
            if not Path(path).exists():
                raise WeightsError(f"config.{modality}_weights={path}: file not found")
            weight_files[modality] = str(path)
            random_init[modality] = False
        elif config.allow_random_init:
            weight_files[modality] = f"random-init (seed {config.seed})"
            random_init[modality] = True
        else:
            raise WeightsError(
                f"config.{modality}_weights is not set. Give the pretrained checkpoint "
                f"(--config.{modality}_weights=/path/to/file), or set "
                "--config.allow_random_init=True to run with random weights (not the paper)."
            )

    if any(random_init.values()):
        _random_warning([m.upper() for m, random in random_init.items() if random])
    if random_init["rgb"]:
        rgb_params = vit.init_random_vit_params(key_rgb, rgb_cfg)
    else:
        logging.info("Loading RGB backbone from %s", weight_files["rgb"])
        rgb_params = vit.load_vit_params(weight_files["rgb"], rgb_cfg)
    if random_init["point"]:
        point_variables = point_mae.init_random_point_mae_variables(key_point, point_cfg)
    else:
        logging.info("Loading point backbone from %s", weight_files["point"])
        point_variables = point_mae.load_point_mae_variables(weight_files["point"], point_cfg)
    return Backbones(
        rgb_params, rgb_cfg, point_variables, point_cfg, weight_files, random_init, precision
    )


def _dino_patch_grid(params: Any, images: jax.Array, *, model_cfg, precision: str):
    return vit.dino_patch_grid(
        params, images, model_cfg=model_cfg, return_cls=True, precision=precision
    )


def rgb_features(
    backbones: Backbones, images: np.ndarray, mesh: Mesh
) -> tuple[np.ndarray, np.ndarray]:
    """(B, H, W, 3) images, B a multiple of mesh.size -> DINO patch grid (B, P, D) and CLS
    (B, D) as host arrays, split over `mesh`."""
    rgb_params, _ = backbones.on(mesh)
    run = meshes.data_parallel(
        _dino_patch_grid,
        mesh,
        1,
        2,
        model_cfg=backbones.rgb_cfg,
        precision=backbones.precision,
    )
    return meshes.to_host(run(rgb_params, meshes.shard_rows(mesh, images)))


def extract_batch(
    backbones: Backbones,
    batch: dict[str, np.ndarray],
    *,
    grid_size: int = 56,
    batch_size: int | None = None,
    mesh: Mesh | None = None,
) -> dict[str, np.ndarray]:
    """One pipeline batch -> patch features (module docstring) as host numpy arrays.

    The batch is padded (`batching.pad_batch`) to `batch_size` (default: its own size) rounded
    up to a multiple of the devices of `mesh` (default: every device), so the backbones compile
    once per run; only the real samples' features are returned, on every process.
    """
    mesh = mesh or meshes.make_mesh()
    count = len(batch["file_id"])
    size = padded_batch_size(batch_size or count, mesh.size)
    batch, _ = pad_batch({k: batch[k] for k in ("rgb", "xyz", "file_id")}, size)
    rgb, rgb_cls = rgb_features(backbones, np.asarray(batch["rgb"]), mesh)
    names = [str(n) for n in batch["file_id"]]
    encoder = point_mae.point_mae_encoder(backbones.point_cfg, backbones.precision)
    mine = meshes.process_rows(mesh, size)
    clouds = np.asarray(batch["xyz"])
    check_clouds(clouds[mine], encoder, f"clouds {names[mine][0]}..{names[mine][-1]}")
    _, point_variables = backbones.on(mesh)
    run = meshes.data_parallel(point_mae_clouds, mesh, 1, 2, encoder=encoder, grid_size=grid_size)
    xyz, fg = meshes.to_host(run(point_variables, meshes.shard_rows(mesh, clouds)))
    features = {"rgb": rgb, "rgb_cls": rgb_cls, "xyz": xyz, "fg": fg}
    return {name: value[:count] for name, value in features.items()}
