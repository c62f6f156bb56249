"""Own parts in the MVTec 3D-AD layout with any class and defect names (data/README.md).

  python main.py --config=configs/folder.py --config.data_dir=/path/to/parts \
      --config.rgb_weights=checkpoints/dino_vitbase8_pretrain.pth \
      --config.point_weights=checkpoints/pointmae_pretrain.pth --workdir=workdir/parts

  No weights at hand: `--config=configs/folder.py:fpfh` (PatchCore on FPFH point features, 3D
  only). The other variants of configs/mvtec3d.py apply here too.

Every subfolder of data_dir with train/good is a class (or choose with --config.data.classes=a,b).
Masks are optional; without validation/good, data.validation_fraction of train/good is held out.
Clouds in millimetres: --config.data.xyz_scale=0.001. Support-plane removal is on, as for
MVTec 3D-AD; parts on no plane: --config.data.preprocess=False.
"""

import ml_collections

from configs.base import VARIANT_HELP, apply_variant, get_base_config

__all__ = ["VARIANT_HELP", "get_config"]


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = get_base_config()
    config.data.name = "folder"
    config.data_dir = "data/parts"
    return apply_variant(config, variant, "configs/folder.py")
