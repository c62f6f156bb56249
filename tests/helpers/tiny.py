"""The smallest settings the whole pipeline runs with, shared by the end-to-end tests.

`shrink` is the tiny pipeline (32 px images, an 8x8 patch grid, depth-1 random backbones, two
adaptor steps); `tiny_evaluation_config` is a smaller one still (method raw, two classes, the
last batch of each split padded) for the tests of the scoring path.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

# The smallest Point-MAE branch the extractors and the tiny evaluations both run.
TINY_POINT_BACKBONE = dict(
    num_group=8, group_size=8, trans_dim=16, depth=2, num_heads=2, mlp_ratio=2, out_layers=(0, 1)
)


def shrink(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` at the tiny pipeline's sizes (in place; returned for chaining)."""
    config.data.image_size = 32
    config.data.preprocess = False
    config.data.num_workers = 1
    config.allow_random_init = True
    config.rgb_backbone.update(depth=1, embed_dim=32, num_heads=2)
    config.point_backbone.update(
        num_group=32, group_size=8, trans_dim=32, depth=1, num_heads=2, out_layers=(0,)
    )
    config.grid_size = 8
    config.batch_size = 2
    config.adaptation.update(
        num_steps=2, batch_size=2, rgb_heads=2, xyz_heads=2, proj_dim=16, checkpoint_every=1,
        global_bank_size=4, local_bank_size=256, warmup_steps=1, log_every=1,
    )  # fmt: skip
    config.report.num_overlays = 1
    config.report.plots = True
    return config


def tiny_synthetic(config: ml_collections.ConfigDict, classes: tuple[str, ...]) -> None:
    """Synthetic data of `classes`, 4 training samples each, generated at 64 px (in place)."""
    config.data.classes = ",".join(classes)
    config.data.synthetic.update(
        dict(
            classes=tuple(classes),
            image_size=64,
            num_train=4,
            num_validation=2,
            num_test_good=2,
            num_test_per_defect=1,
        )
    )


def raw_evaluation_config(
    data_dir: Path,
    *,
    image_size: int,
    counts: tuple[int, int, int, int],
    rgb_backbone: dict,
    point_backbone: dict,
    grid_size: int,
    batch_size: int,
) -> ml_collections.ConfigDict:
    """Method raw on the synthetic classes sphere_cap and torus, small random backbones, no
    overlays or plots. `counts`: (train, validation, test good, test per defect) samples."""
    from configs import synthetic as synthetic_config

    config = synthetic_config.get_config()
    config.method = "raw"
    config.data_dir = str(data_dir)
    config.data.preprocess = False
    config.data.num_workers = 1
    config.data.image_size = image_size
    num_train, num_validation, num_test_good, num_test_per_defect = counts
    config.data.synthetic.update(
        dict(
            classes=("sphere_cap", "torus"),
            image_size=image_size,
            num_train=num_train,
            num_validation=num_validation,
            num_test_good=num_test_good,
            num_test_per_defect=num_test_per_defect,
        )
    )
    config.rgb_backbone = ml_collections.ConfigDict(rgb_backbone)
    config.point_backbone = ml_collections.ConfigDict(point_backbone)
    config.grid_size = grid_size
    config.batch_size = batch_size
    config.report.num_overlays = 0
    config.report.plots = False
    return config


def tiny_evaluation_config(data_dir: Path) -> ml_collections.ConfigDict:
    """Method raw on two 32 px synthetic classes with 16-channel depth-1 backbones."""
    config = raw_evaluation_config(
        data_dir,
        image_size=32,
        counts=(3, 2, 2, 1),
        rgb_backbone=dict(patch_size=8, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2),
        point_backbone=TINY_POINT_BACKBONE,
        grid_size=8,  # 32 px / patch 8 = 4 tokens, replicated 2x -> 8x8, as the point grid
        batch_size=2,  # splits of 3 and 5 samples: the last batch is padded
    )
    config.patchcore.coreset_ratio = 0.25
    config.patchcore.rgb_coreset_ratio = 0.25
    return config
