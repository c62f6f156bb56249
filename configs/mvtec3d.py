"""MVTec 3D-AD, the paper's main benchmark (Tables 1-2): LSFA on DINO ViT-B/8 + Point-MAE.

  python main.py --config=configs/mvtec3d.py \
      --config.data_dir=data/mvtec_3d_anomaly_detection \
      --config.rgb_weights=checkpoints/dino_vitbase8_pretrain.pth \
      --config.point_weights=checkpoints/pointmae_pretrain.pth

Other rows of the paper: --config.method=raw (PatchCore* without adaptation), --config.method=fpfh
(PatchCore + FPFH, no weights needed), and the configs/mvtec3d_*.py variants.
"""

import ml_collections

from configs.base import get_base_config


def get_config() -> ml_collections.ConfigDict:
    config = get_base_config()
    config.data.name = "mvtec3d"
    config.data_dir = "data/mvtec_3d_anomaly_detection"
    return config
