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

from lsfa_jax.adaptation.train import default_adaptation_config, reference_code_overrides

# The paper's other rows, as overrides of the default (full LSFA) config, chosen after a colon:
# --config=configs/mvtec3d.py:raw. Every dataset config accepts the same names.
#
# Tables 4 and 6 ablate the terms of one loss family. In both, the row with both terms off
# equals the no-adaptation baseline (0.929 I-AUROC), so the other family is off in those
# tables, and the variants switch it off (w_ifc = 0 for Table 4, lambda_clc = 0 for Table 6).
# The paper is not consistent here: Table 4's (CLC) full row, 0.959 / 0.964 / 0.992, is Table 5's
# IFC-only row, and Table 6's (IFC) full row, 0.957 / 0.963 / 0.990, is Table 5's CLC-only row,
# as if the two captions (or the two full rows) were swapped. The variants follow the column
# headers (L_LA / L_GA in Table 4, L_LC / L_GC in Table 6); under that reading the full row of
# Table 4 is `clc_only` and the full row of Table 6 is `ifc_only`.
VARIANTS = {
    "": {},  # the paper's full LSFA: Table 5 last row, Tables 1-2 and 7 "Single encoder layer"
    "raw": {"method": "raw"},  # "PatchCore*" rows, first row of Tables 4-6
    "fpfh": {"method": "fpfh"},  # "PatchCore + FPFH" (Tables 1-2)
    "ifc_only": {"adaptation.lambda_clc": 0.0},  # Table 5 row 3 (IFC, no CLC)
    "clc_only": {"adaptation.w_ifc": 0.0},  # Table 5 row 2 (CLC, no IFC)
    "la_only": {"adaptation.w_ifc": 0.0, "adaptation.w_ga": 0.0},  # Table 4 row 2
    "ga_only": {"adaptation.w_ifc": 0.0, "adaptation.w_la": 0.0},  # Table 4 row 3
    "gc_only": {"adaptation.lambda_clc": 0.0, "adaptation.w_lc": 0.0},  # Table 6 row 2
    "lc_only": {"adaptation.lambda_clc": 0.0, "adaptation.w_gc": 0.0},  # Table 6 row 3
    "linear": {"adaptation.structure": "linear"},  # Table 7 "Linear projection"
    "encoder2": {"adaptation.structure": "encoder2"},  # Table 7 "Two encoder layers"
    "conv1x1": {"adaptation.structure": "conv1x1"},  # Table 7 "1x1 Convolution"
    "fewshot5": {"adaptation.few_shot": 5},  # Table 9 "5-shot"
    "fewshot10": {"adaptation.few_shot": 10},  # Table 9 "10-shot"
    "fewshot50": {"adaptation.few_shot": 50},  # Table 9 "50-shot"
    # No paper row: the reference code's loss weights, banks, CLS and schedule.
    "reference": {f"adaptation.{k}": v for k, v in reference_code_overrides().items()},
}

# One line per variant for `python main.py --help`.
VARIANT_HELP = {
    "raw": "PatchCore on unadapted DINO / Point-MAE features (PatchCore*, ablation baseline)",
    "fpfh": "PatchCore + FPFH point features (no weights needed)",
    "ifc_only": "IFC losses only (Table 5, CLC off)",
    "clc_only": "CLC losses only (Table 5, IFC off)",
    "la_only": "CLC with the local term only, IFC off (Table 4)",
    "ga_only": "CLC with the global term only, IFC off (Table 4)",
    "lc_only": "IFC with the local term only, CLC off (Table 6)",
    "gc_only": "IFC with the global term only, CLC off (Table 6)",
    "linear": "linear adaptors (Table 7; the default is one encoder layer)",
    "encoder2": "two encoder layers per adaptor (Table 7)",
    "conv1x1": "1x1-convolution adaptors (Table 7)",
    "fewshot5": "5 seeded training samples per class, adaptors and banks (Table 9)",
    "fewshot10": "10 seeded training samples per class, adaptors and banks (Table 9)",
    "fewshot50": "50 seeded training samples per class, adaptors and banks (Table 9)",
    "reference": "the reference code's loss weights, banks, CLS and schedule (no paper row)",
}


def apply_variant(
    config: ml_collections.ConfigDict, variant: str, config_file: str
) -> ml_collections.ConfigDict:
    """`config` with the overrides of `VARIANTS[variant]`; unknown names are refused."""
    if variant not in VARIANTS:
        raise ValueError(f"{config_file}: unknown variant {variant!r}; known: {list(VARIANTS)}")
    config.update_from_flattened_dict(VARIANTS[variant])
    return config


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
    config.overwrite = False  # mode=export: replace an existing export folder
    config.debug = False  # True: user errors show their traceback too (or LSFA_DEBUG=1)

    # Multi-process runs (one process per machine or per GPU group, lsfa_jax/distributed.py):
    # set the first three keys here, or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    # JAX_PROCESS_ID in each process's environment; unset (the default), the run is one process.
    config.distributed = ml_collections.ConfigDict(
        dict(
            coordinator_address="",  # host:port of process 0, reachable from every process
            num_processes=0,  # processes in the run (0: JAX_NUM_PROCESSES, else a single one)
            process_id=-1,  # this process, 0 .. num_processes - 1 (-1: JAX_PROCESS_ID)
            local_device_ids="",  # comma-separated devices this process uses ("": all it sees)
            initialization_timeout=300,  # seconds to wait for every process to join
        )
    )

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
            # lowest | pointnet2: FPS tie rule (pointnet2: the CUDA kernel's, see point_mae.py)
            fps_ties="lowest",
            # running (LSFA, eval mode) | batch (M3DM: batch statistics of each cloud)
            batchnorm="running",
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
    # highest | tf32 | bf16: operands of the backbones' and adaptors' layers (lsfa_jax/precision).
    # highest matches the PyTorch float32 reference on every device; tf32 and bf16 are faster on
    # GPUs (and bf16 on AMX CPUs) and opt-in. Distances are float32 at HIGHEST whatever it is.
    config.precision = "highest"
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
    # The reference feeds CLS through the RGB adaptor in training but not at inference
    # (docs/method.md#adaptors); here one flag covers both, off by default (patch tokens only, as
    # in the paper).
    config.adaptation.prepend_cls = False
    config.adaptation.seed = config.get_ref("seed")
    config.adaptation.precision = config.get_ref("precision")
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
