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

# The reference code's loss variant, banks and schedule as `config.adaptation` overrides (the
# `reference` variant). Schedule: the reference updates once per 16 batches, warms up linearly
# over its first epoch (332 batches, about 20 updates), then follows a half-cosine over 99 more
# epochs of which it trains one, so the learning rate stays about 3e-4 (lr_decay_steps =
# 99 * 332 / 16). Its accumulation bug (only the last of each 16 batches reaches an update) is
# not reproduced: here each update averages all 16 batches (docs/method.md#optimiser-and-schedule).
REFERENCE_CODE = dict(
    lambda_clc=1.0,
    w_la=1.0,
    w_ga=0.1,
    w_rot=0.05,
    w_ifc=0.9,
    w_lc=1.0,
    w_gc=0.4,
    scale_by_2t=True,
    capped_distance=True,
    ifc_warmup_steps=60,
    ifc_min_bank_fill=59_900 / 60_000,
    local_bank_size=60_000,
    global_bank_size=100,
    global_method="masked_mean",
    accum_steps=16,
    warmup_steps=20,
    lr_decay_steps=2054,
    prepend_cls=True,
)

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
    "reference": {f"adaptation.{k}": v for k, v in REFERENCE_CODE.items()},
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
            # Nearest-neighbour search of the bank. auto: the fastest exact search of this
            # machine (screened on GPU / TPU; on CPU the fastest of screened, exact and faiss,
            # timed once per machine and cached in $XDG_CACHE_HOME/lsfa_jax/knn_search.json);
            # screened: bfloat16 screen certified in float32 (exact; fast where bfloat16
            # matmuls are: AMX, tensor cores); exact: plain float32 search; faiss: faiss-cpu's
            # exact IndexFlatL2 on the host. All give the same nearest rows and scores.
            # approximate: opt-in, screen on approximate_dim principal directions of the bank
            # with a float32 re-rank (distances can only come out high).
            search="auto",
            approximate_dim=128,
            # Split each bank's rows over the devices of the run's mesh (each holds 1/d of them,
            # for banks larger than one device's memory; coreset and scores as unsharded).
            # Searches: screened | exact.
            shard_bank=False,
            # > 0: build the banks from the first N training samples of a class (M3DM's fit
            # loop stops after 401); 0: all of them.
            max_train_samples=0,
        )
    )
    # LSFA adaptor training (lsfa_jax/adaptation/train.py). The loss weights and bank size are the
    # paper's (Eq. 9, lambda 0.6; section 4.3). The paper gives no optimiser, learning rate,
    # schedule or length: those are the reference code's (lr from its README's command, AdamW
    # betas 0.9 / 0.95, PyTorch's weight decay 0.01 and eps 1e-8, batch 8, 2 epochs, a one-epoch
    # warm-up of 332 batches at batch 8 on MVTec's 2656 training samples) except the decay to 0
    # at the end of the run, which is ours (docs/method.md#optimiser-and-schedule).
    config.adaptation = ml_collections.ConfigDict(
        dict(
            structure="encoder1",  # adaptor structure: encoder1 | encoder2 | linear | conv1x1
            rgb_dim=768,  # input feature dim of the RGB adaptor (DINO ViT-B/8)
            xyz_dim=1152,  # input feature dim of the point adaptor (3 Point-MAE blocks x 384)
            num_patches=3136,  # patches per sample P (56 x 56), used only for initialisation
            proj_dim=512,  # projection heads' output dim E
            rgb_heads=12,  # attention heads of the RGB adaptor
            xyz_heads=12,  # attention heads of the point adaptor
            # Feed the CLS token through the RGB adaptor. The reference does so in training but
            # not at inference (docs/method.md#adaptors); here one flag covers both, off (patch
            # tokens only, as in the paper).
            prepend_cls=False,
            lr=3e-4,  # AdamW peak learning rate
            weight_decay=0.01,  # AdamW weight decay
            b1=0.9,  # AdamW beta 1
            b2=0.95,  # AdamW beta 2
            eps=1e-8,  # AdamW epsilon
            warmup_steps=332,  # linear warm-up from 0, in updates (capped at half the run)
            # Cosine decay horizon after the warm-up, in updates; 0: decay to 0 exactly at the
            # end of the run.
            lr_decay_steps=0,
            num_epochs=2,  # training length in epochs, used when num_steps is 0
            num_steps=0,  # > 0: training length in batches
            batch_size=8,  # global batch size (split over the devices)
            accum_steps=1,  # gradient accumulation: one AdamW update per accum_steps batches
            local_bank_size=50_000,  # rows per local bank n^L (paper 4.3)
            global_bank_size=100,  # rows per global bank n^G
            banks_per_class=True,  # one bank per class (reference) or one shared bank
            bank_dtype="float32",  # float32 | bfloat16: storage of the training banks
            # The adaptors' layers follow the run's policy; parameters, losses, banks: float32.
            precision=config.get_ref("precision"),
            seed=config.get_ref("seed"),  # parameter init and k-means keys
            checkpoint_every=100,  # checkpoint period in batches
            keep_checkpoints=3,  # checkpoints kept
            log_every=10,  # logging period in batches
            few_shot=0,  # > 0: that many seeded training samples per class (Table 9)
            # The loss (lsfa_jax/adaptation/losses.py, Eq. 9): L = w_ifc * [w_lc * L_LC +
            # w_gc * L_GC] + lambda_clc * (w_la * L_LA + w_ga * L_GA) + w_rot * L_rot.
            lambda_clc=0.6,  # lambda of Eq. 9: weight of the CLC family
            w_la=1.0,  # weight of the local CLC term L_LA
            w_ga=1.0,  # weight of the global CLC term L_GA
            w_ifc=1.0,  # weight of the IFC family
            w_lc=1.0,  # weight of the local IFC term L_LC
            w_gc=1.0,  # weight of the global IFC term L_GC
            w_rot=0.0,  # the reference's local-rotation term (needs rotated-image features)
            rot_subset_divisor=6,  # the rotation term uses 1 / this of the patches
            clc_temperature=1.0,  # InfoNCE temperature T of the CLC logits (> 0)
            clc_normalize=True,  # L2-normalise the projections before the CLC inner products
            scale_by_2t=False,  # scale InfoNCE by 2T as the reference does
            capped_distance=False,  # cap the IFC distances at distance_cap (reference)
            distance_cap=50.0,  # the cap of capped_distance
            ifc_warmup_steps=0,  # IFC starts after this many steps
            ifc_min_bank_fill=0.0,  # IFC only for samples whose class RGB bank is this full
            rgb_local_all_patches=True,  # local RGB IFC over all patches, not foreground only
            global_method="kmeans",  # kmeans | masked_mean: a sample's global feature
            kmeans_clusters=8,  # clusters of the kmeans global feature
            kmeans_iters=10,  # k-means iterations
            clc_chunk_size=4096,  # rows of the CLC logits built at once (memory)
            nn_chunk_size=8192,  # bank rows searched at once by the IFC nearest neighbour
        )
    )

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
