"""Defaults shared by every config. Dataset configs import `get_base_config` and override.

Keys a user usually sets on the command line:
  --config.data_dir=...        raw dataset folder (never modified)
  --config.data.classes=bagel,tire  comma-separated subset, or "all"
  --config.rgb_weights=...     DINO ViT-B/8 checkpoint (.pth / .safetensors / .npz / orbax dir)
  --config.point_weights=...   Point-MAE pretrain.pth (or converted)
  --config.method=lsfa|raw|fpfh
  --config.mode=train_eval|eval|test|predict|prepare|convert
"""

import ml_collections

from lsfa_jax.adaptation.train import default_adaptation_config


def get_base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # every random choice (init, coreset, shuffling) derives from it
    # lsfa: adapted DINO + Point-MAE features; raw: the same backbones without adaptation (the
    # paper's "PatchCore*" rows); fpfh: PatchCore on hand-made FPFH point features only.
    config.method = "lsfa"
    config.mode = "train_eval"  # train_eval | eval | test | predict | prepare | convert | keys
    # mode=eval: the adaptor checkpoint folder (<workdir>/adaptation/checkpoints);
    # mode=test / predict: a model folder (<workdir>/model, movable).
    config.checkpoint = ""
    config.input = ""  # folder or sample for mode=predict
    config.skip_bad_samples = False  # True: leave unreadable samples out (listed), not fail
    config.debug = False  # True: user errors show their traceback too (or LSFA_DEBUG=1)

    config.data_dir = ml_collections.FieldReference("", field_type=str)  # raw dataset (read only)
    config.cache_dir = ""  # default: <workdir>/cache

    config.data = ml_collections.ConfigDict()
    config.data.name = "mvtec3d"  # mvtec3d | eyecandies | synthetic
    config.data.data_dir = config.get_ref("data_dir")
    config.data.classes = "all"  # or comma-separated names: "bagel,tire"
    config.data.image_size = 224  # side of the square images the backbones see
    config.data.preprocess = True  # remove the support plane and outlier points (RANSAC, DBSCAN)
    config.data.num_workers = 0  # 0: all CPU cores
    config.data.seed = config.get_ref("seed")
    # Own data (data.name=folder): clouds in other units are scaled to metres by xyz_scale; a
    # class without validation/good holds out this seeded fraction of train/good instead.
    config.data.xyz_scale = 1.0
    config.data.validation_fraction = 0.2
    config.data.plane = ml_collections.ConfigDict(
        dict(
            border=10,
            ransac_distance=0.004,
            ransac_n=50,
            ransac_iterations=1000,
            remove_distance=0.005,
            dbscan_eps=0.006,
            dbscan_min_points=30,
        )
    )

    config.allow_random_init = False  # True: random backbones when no weights (not the paper)
    config.rgb_weights = ""  # DINO ViT-B/8 checkpoint (.pth / .safetensors / .npz / orbax dir)
    config.point_weights = ""  # Point-MAE pretrain.pth (or converted)
    config.rgb_backbone = ml_collections.ConfigDict(
        dict(patch_size=8, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4)
    )
    config.point_backbone = ml_collections.ConfigDict(
        dict(
            num_group=1024,
            group_size=128,
            trans_dim=384,
            depth=12,
            num_heads=6,
            mlp_ratio=4,
            out_layers=(3, 7, 11),
        )
    )
    config.fpfh = ml_collections.ConfigDict(
        dict(
            voxel_size=0.0,
            normal_radius=0.004,
            normal_max_nn=30,
            feature_radius=0.01,
            feature_max_nn=100,
        )
    )
    config.batch_size = 8  # feature extraction and scoring
    config.grid_size = 56  # patch grid side of the features and banks

    config.patchcore = ml_collections.ConfigDict(
        dict(
            coreset_ratio=0.1,
            rgb_coreset_ratio=0.1,
            projection_eps=0.9,
            reweight=True,
            blur="gaussian",  # gaussian (float, on device) | pil (the reference's 8-bit blur)
            blur_sigma=4.0,
            bank_dtype="float32",  # float32 | bfloat16: storage of the memory-bank rows
            # screened: bfloat16 screen certified in float32 (exact, fastest); exact: plain
            # float32 search; approximate: opt-in, screen on approximate_dim principal
            # directions of the bank with a float32 re-rank (distances can only come out high).
            search="screened",
            approximate_dim=128,
            # > 0: build the banks from the first N training samples of a class (M3DM's fit
            # loop stops after 401); 0: all of them.
            max_train_samples=0,
        )
    )
    config.adaptation = default_adaptation_config()
    # The reference feeds CLS through the RGB adaptor in training but not at inference (notes
    # 9.2-6); here one flag covers both, off by default (patch tokens only, as in the paper).
    config.adaptation.prepend_cls = False
    config.adaptation.seed = config.get_ref("seed")
    config.adaptation.few_shot = 0  # > 0: that many seeded training samples per class

    config.fusion = ml_collections.ConfigDict(
        dict(
            method="zscore",  # zscore | minmax | ocsvm
            # Image decision threshold per class and setting: auto (f1 when the validation split
            # holds defects, else quantile) | f1 | quantile | fpr | manual
            threshold_rule="auto",
            threshold_quantile=0.99,  # rule quantile: this quantile of normal validation scores
            threshold_target_fpr=0.01,  # rule fpr: highest false-alarm rate on normal validation
            threshold_value=ml_collections.config_dict.placeholder(float),  # rule manual
            # Pixel threshold (the predicted masks), the same rules over map pixels.
            pixel_threshold_rule="auto",
            pixel_threshold_quantile=0.99,  # rule quantile, over normal validation pixels
            pixel_threshold_target_fpr=0.01,  # rule fpr
            pixel_threshold_value=ml_collections.config_dict.placeholder(float),  # rule manual
        )
    )
    config.report = ml_collections.ConfigDict(
        dict(
            num_overlays=4,  # overlay images per class and group (missed, false alarm, top)
            plots=True,  # ROC and PRO curve images
        )
    )
    return config
