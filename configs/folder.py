"""Own parts in the MVTec 3D-AD layout with any class and defect names (data/README.md).

  python main.py --config=configs/folder.py --config.data_dir=/path/to/parts \
      --config.rgb_weights=checkpoints/dino_vitbase8_pretrain.pth \
      --config.point_weights=checkpoints/pointmae_pretrain.pth --workdir=workdir/parts

  No weights at hand: `--config.method=fpfh` (PatchCore on FPFH point features, 3D only).

Every subfolder of data_dir with train/good is a class (or choose with --config.data.classes=a,b).
Masks are optional; without validation/good, data.validation_fraction of train/good is held out.
Clouds in millimetres: --config.data.xyz_scale=0.001. Support-plane removal is on, as for
MVTec 3D-AD; parts on no plane: --config.data.preprocess=False.
"""

import ml_collections

from configs.base import get_base_config


def get_config() -> ml_collections.ConfigDict:
    config = get_base_config()
    config.data.name = "folder"
    config.data_dir = "data/parts"
    return config
