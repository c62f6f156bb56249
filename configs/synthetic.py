"""Built-in synthetic data in the MVTec 3D-AD layout: the demo (`make demo`) and the tests' data.

No pretrained weights exist on a machine without network access, so the backbones are randomly
initialised (allow_random_init=True, logged loudly and recorded in the results) and reduced in
size so the whole pipeline runs on a 2-core CPU in minutes. Figures from this config measure the
code, not the paper's method.

The paper-row variants of configs/mvtec3d.py apply here too (`configs/base.py` VARIANTS), so each
runs end to end on built-in data: `--config=configs/synthetic.py:la_only`. Few-shot variants
need that many training samples per class (num_train=16 here: fewshot5 and fewshot10 run as is,
fewshot50 needs --config.data.synthetic.num_train=50 or more).
"""

import ml_collections

from configs.base import VARIANT_HELP, apply_variant, get_base_config

__all__ = ["VARIANT_HELP", "get_config"]


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = get_base_config()
    config.data.name = "synthetic"
    config.data_dir = ""  # empty: generated once into <cache_dir>/synthetic_raw (under the workdir)
    config.data.synthetic = ml_collections.ConfigDict(
        dict(
            classes=("sphere_cap", "box", "torus"),
            image_size=224,
            num_train=16,
            num_validation=4,
            num_test_good=6,
            num_test_per_defect=6,
            seed=0,
        )
    )
    config.allow_random_init = True
    config.rgb_backbone = ml_collections.ConfigDict(
        dict(patch_size=8, embed_dim=192, depth=4, num_heads=3, mlp_ratio=4)
    )
    config.point_backbone = ml_collections.ConfigDict(
        dict(
            num_group=256,
            group_size=32,
            trans_dim=96,
            depth=4,
            num_heads=4,
            mlp_ratio=4,
            out_layers=(1, 2, 3),
            fps_ties="lowest",
            batchnorm="running",
        )
    )
    # Adaptation sized to the small backbones (192 / 288 channels) and the small dataset.
    config.adaptation.rgb_heads = 4
    config.adaptation.xyz_heads = 4
    config.adaptation.proj_dim = 128
    config.adaptation.batch_size = 4
    config.adaptation.num_steps = 8  # a short run keeps `make demo` at a few minutes on 2 cores
    config.adaptation.warmup_steps = 2
    config.adaptation.local_bank_size = 8192
    config.adaptation.global_bank_size = 32
    config.adaptation.checkpoint_every = 4
    config.adaptation.log_every = 2
    config.batch_size = 4
    return apply_variant(config, variant, "configs/synthetic.py")
