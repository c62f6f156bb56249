"""MVTec 3D-AD, the paper's main benchmark (Tables 1-2): LSFA on DINO ViT-B/8 + Point-MAE.

  python main.py --config=configs/mvtec3d.py \
      --config.data_dir=data/mvtec_3d_anomaly_detection \
      --config.rgb_weights=checkpoints/dino_vitbase8_pretrain.pth \
      --config.point_weights=checkpoints/pointmae_pretrain.pth

The paper's other rows are variants, chosen after a colon: `--config=configs/mvtec3d.py:raw`
(`configs/base.py` VARIANTS, with the paper row each reproduces): raw, fpfh, ifc_only, clc_only
(Table 5), la_only, ga_only (Table 4), lc_only, gc_only (Table 6), linear, encoder2, conv1x1
(Table 7), fewshot5, fewshot10, fewshot50 (Table 9), reference (the reference code's settings).
"""

import ml_collections

from configs.base import VARIANT_HELP, VARIANTS, apply_variant, get_base_config

__all__ = ["VARIANTS", "VARIANT_HELP", "get_config"]


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = get_base_config()
    config.data.name = "mvtec3d"
    config.data_dir = "data/mvtec_3d_anomaly_detection"
    return apply_variant(config, variant, "configs/mvtec3d.py")
