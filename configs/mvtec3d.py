"""MVTec 3D-AD, the paper's main benchmark (Tables 1-2): LSFA on DINO ViT-B/8 + Point-MAE.

  python main.py --config=configs/mvtec3d.py \
      --config.data_dir=data/mvtec_3d_anomaly_detection \
      --config.rgb_weights=checkpoints/dino_vitbase8_pretrain.pth \
      --config.point_weights=checkpoints/pointmae_pretrain.pth

The paper's other rows are variants, chosen after a colon: `--config=configs/mvtec3d.py:raw`
(`VARIANT_HELP` below; `python main.py --help` lists them).
"""

import ml_collections

from configs.base import get_base_config
from lsfa_jax.adaptation.train import reference_code_overrides

VARIANT_HELP = {
    "raw": "PatchCore on unadapted DINO / Point-MAE features (PatchCore*, ablation baseline)",
    "fpfh": "PatchCore + FPFH point features (no weights needed)",
    "ifc_only": "IFC losses only (Table 5, CLC off)",
    "clc_only": "CLC losses only (Table 5, IFC off)",
    "la_only": "CLC with the local term only (Table 4)",
    "ga_only": "CLC with the global term only (Table 4)",
    "lc_only": "IFC with the local term only (Table 6)",
    "gc_only": "IFC with the global term only (Table 6)",
    "linear": "linear adaptors (Table 7; the default is one encoder layer)",
    "encoder2": "two encoder layers per adaptor (Table 7)",
    "conv1x1": "1x1-convolution adaptors (Table 7)",
    "fewshot5": "5 seeded training samples per class (Table 9)",
    "fewshot10": "10 seeded training samples per class (Table 9)",
    "fewshot50": "50 seeded training samples per class (Table 9)",
    "reference": "the reference code's loss variant and schedule",
}
VARIANTS = {
    "": {},
    "raw": {"method": "raw"},
    "fpfh": {"method": "fpfh"},
    "ifc_only": {"adaptation.lambda_clc": 0.0},
    "clc_only": {"adaptation.w_ifc": 0.0},
    "la_only": {"adaptation.w_ga": 0.0},
    "ga_only": {"adaptation.w_la": 0.0},
    "lc_only": {"adaptation.w_gc": 0.0},
    "gc_only": {"adaptation.w_lc": 0.0},
    "linear": {"adaptation.structure": "linear"},
    "encoder2": {"adaptation.structure": "encoder2"},
    "conv1x1": {"adaptation.structure": "conv1x1"},
    "fewshot5": {"adaptation.few_shot": 5},
    "fewshot10": {"adaptation.few_shot": 10},
    "fewshot50": {"adaptation.few_shot": 50},
    "reference": {f"adaptation.{k}": v for k, v in reference_code_overrides().items()},
}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(
            f"configs/mvtec3d.py: unknown variant {variant!r}; known: {list(VARIANTS)}"
        )
    config = get_base_config()
    config.data.name = "mvtec3d"
    config.data_dir = "data/mvtec_3d_anomaly_detection"
    for key, value in VARIANTS[variant].items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config
