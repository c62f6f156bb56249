"""Test-time latency and throughput of the whole RGB+3D pipeline, stage by stage.

Stages (each jitted, timed with block_until_ready, best of --repeats after a warm-up call):
  vit       DINO ViT-B/8 at 224 -> (B, 3136, 768)
  point     Point-MAE branch (FPS 1024 x kNN 128, 12 x 384 encoder, 3-NN, 56x56 grid) on real
            MVTec 3D-AD clouds (cable_gland, legacy-nearest to 224) or synthetic ones
  adaptors  LSFA adaptors Psi_I / Psi_P (encoder1, paper sizes)
  score     PatchCore per modality: normalise, exact 1-NN over the bank, reweighted image
            score, bilinear upsampling + Gaussian blur -> (B, 224, 224) maps
  total     all stages called back to back in one timed call (the host only blocks at the end)
Weights and banks are random (timing does not depend on their values). The reference figures
are NOT measured here: they come from the original code's logs (reference notes 7.5) on an
unknown GPU, with its CPU cdist scorer.

    .venv/bin/python benchmarks/bench_end_to_end.py                # paper shapes, batch 1 and 8
    .venv/bin/python benchmarks/bench_end_to_end.py --quick        # reduced banks, batch 1 and 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import CompileCounter, best_of, emit, machine_description

from configs.base import get_base_config
from lsfa_jax.adaptation.train import build_model
from lsfa_jax.features.point_mae_grid import point_mae_patch_grid_batch
from lsfa_jax.models import point_mae, vit
from lsfa_jax.models.adaptors import apply_adaptors, init_lsfa_params
from lsfa_jax.patchcore.bank import MemoryBank, with_search_index
from lsfa_jax.patchcore.normalisation import FeatureStats
from lsfa_jax.patchcore.scorer import score_batch

ADAPTATION = get_base_config().adaptation.copy_and_resolve_references()
SAMPLE = Path(__file__).resolve().parents[2] / "shared/data/mvtec3d_sample/cable_gland"
# The real Point-MAE shape (1024 groups of 128, 12 x 384, taps 3/7/11): the encoder's defaults.
POINT_CFG = {f: getattr(point_mae.PointMAEEncoder, f) for f in point_mae.CONFIG_FIELDS}
# Reference notes 7.5: `pointrgbfeatblockmae_all0.log`, original PyTorch code, unknown GPU.
REFERENCE_S_PER_IMAGE = {
    "feature extraction (train)": (3.4, 3.7),
    "test (features + scoring)": (7.5, 8.5),
}


def real_clouds(count: int) -> tuple[np.ndarray, str]:
    """(count, 224, 224, 3) organized clouds: the real cable_gland samples (cycled), or synthetic
    bumpy planes with ~30k valid points when the shared samples are absent."""
    files = sorted(SAMPLE.glob("*/*/xyz/*.tiff"))
    if files:
        from lsfa_jax.data.mvtec3d import read_xyz
        from lsfa_jax.data.resize import resize_xyz

        clouds = [resize_xyz(read_xyz(f), 224) for f in files[:count]]
        clouds = [clouds[i % len(clouds)] for i in range(count)]
        source = f"real cable_gland clouds ({min(count, len(files))} distinct files)"
        return np.stack(clouds).astype(np.float32), source
    rng = np.random.default_rng(0)
    v, u = np.mgrid[:224, :224] / 224.0
    clouds = []
    for _ in range(count):
        z = 0.5 + 0.01 * np.sin(6 * u + rng.uniform()) + 1e-4 * rng.normal(size=u.shape)
        cloud = np.stack([0.1 * u, 0.1 * v, z], -1).astype(np.float32)
        radius = np.hypot(u - 0.5, v - 0.5)
        cloud[radius > 0.44] = 0.0  # ~30k of 50k pixels stay valid
        clouds.append(cloud)
    return np.stack(clouds), "synthetic clouds (~30k valid points)"


def random_bank(rows: int, dim: int, seed: int) -> MemoryBank:
    rng = np.random.default_rng(seed)
    features = jnp.asarray(rng.normal(size=(rows, dim)).astype(np.float32))
    stats = FeatureStats(jnp.float32(0.0), jnp.float32(1.0))
    # The search index is built once per bank, as evaluate's banks carry it.
    return with_search_index(
        MemoryBank(features=features, valid=jnp.ones((rows,), bool), stats=stats)
    )


def measure_batch(batch: int, models: dict, banks: dict, clouds: np.ndarray, args) -> dict:
    """Best-of seconds per stage and for the whole pipeline at one batch size."""
    rng = np.random.default_rng(batch)
    images = jnp.asarray(rng.normal(size=(batch, 224, 224, 3)).astype(np.float32))
    clouds = clouds[:batch]

    def extract_rgb():
        return vit.dino_patch_grid(models["rgb"], images, model_cfg=vit.ViTConfig())

    def extract_xyz():
        return point_mae_patch_grid_batch(models["point"], clouds, POINT_CFG)[0]

    def adapt(rgb, xyz):
        return apply_adaptors(models["adaptors"], rgb, xyz, structure="encoder1")

    def score(modality, features):
        _, maps = score_batch(banks[modality], features, bank_chunk=args.bank_chunk)
        return maps

    def total():
        rgb, xyz = adapt(extract_rgb(), extract_xyz())
        return jax.block_until_ready((score("rgb", rgb), score("xyz", xyz)))

    rgb_feat = jax.block_until_ready(extract_rgb())
    xyz_feat = jax.block_until_ready(extract_xyz())
    stages = {
        "vit": lambda: jax.block_until_ready(extract_rgb()),
        "point": lambda: jax.block_until_ready(extract_xyz()),
        "adaptors": lambda: jax.block_until_ready(adapt(rgb_feat, xyz_feat)),
        "score_rgb": lambda: jax.block_until_ready(score("rgb", rgb_feat)),
        "score_xyz": lambda: jax.block_until_ready(score("xyz", xyz_feat)),
    }
    start = time.perf_counter()
    seconds = best_of(stages, args.repeats)
    seconds["sum_of_stages"] = sum(seconds.values())
    total()  # warm-up outside the counter: the timed calls must not compile
    with CompileCounter() as compiles:
        seconds["total"] = best_of({"total": total}, args.repeats)["total"]
    print(
        f"batch {batch} (measured in {time.perf_counter() - start:.0f} s incl. warm-up; "
        f"compilations during the timed total calls: {len(compiles.names)}):"
    )
    return {"seconds": seconds, "compilations": len(compiles.names)}


def run(args: argparse.Namespace) -> None:
    key = jax.random.key(0)
    models = {
        "rgb": vit.init_random_vit_params(key, vit.ViTConfig()),
        "point": point_mae.init_random_point_mae_variables(key, POINT_CFG),
        "adaptors": init_lsfa_params(
            build_model(get_base_config().adaptation.copy_and_resolve_references()), key
        ),
    }
    banks = {
        "rgb": random_bank(args.rgb_bank, 768, 1),
        "xyz": random_bank(args.xyz_bank, 1152, 2),
    }
    clouds, cloud_source = real_clouds(max(args.batches))
    print(f"point clouds: {cloud_source}")
    print(f"banks: rgb {args.rgb_bank} x 768, xyz {args.xyz_bank} x 1152 (float32)")
    for batch in args.batches:
        measured = measure_batch(batch, models, banks, clouds, args)
        for name, value in measured["seconds"].items():
            print(
                f"  {name:13s} {value:8.2f} s/batch  {value / batch:8.2f} s/image  "
                f"{batch / value:7.3f} images/s"
            )
            emit(
                bench="end_to_end",
                stage=name,
                batch=batch,
                seconds_per_batch=value,
                seconds_per_image=value / batch,
                images_per_s=batch / value,
                rgb_bank=args.rgb_bank,
                xyz_bank=args.xyz_bank,
                clouds=cloud_source,
                compilations_in_timed_total=measured["compilations"],
            )
    print("reference (original PyTorch code, logs on an unknown GPU, NOT measured here):")
    for name, (low, high) in REFERENCE_S_PER_IMAGE.items():
        print(f"  {name:28s} {low:.1f}-{high:.1f} s/image")
        emit(bench="end_to_end_reference", stage=name, low_s_per_image=low, high_s_per_image=high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="banks 4096 rows, batch 1 and 2")
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--rgb-bank", type=int, help="RGB bank rows (default 30720)")
    parser.add_argument("--xyz-bank", type=int, help="xyz bank rows (default 61440)")
    parser.add_argument("--bank-chunk", type=int, default=4096)
    parser.add_argument("--repeats", type=int)
    args = parser.parse_args()
    args.batches = args.batches or ([1, 2] if args.quick else [1, 8])
    args.rgb_bank = args.rgb_bank or (4096 if args.quick else 30720)
    args.xyz_bank = args.xyz_bank or (8192 if args.quick else 61440)
    args.repeats = args.repeats or (1 if args.quick else 2)
    print(machine_description())
    run(args)


if __name__ == "__main__":
    main()
