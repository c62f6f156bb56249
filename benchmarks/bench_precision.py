"""Precision policies on this device: seconds per stage, feature deviation, metric change.

  stages     ViT-B/8 at 224, the Point-MAE branch (paper config, synthetic cloud) and the
             encoder1 adaptors at 3136 patches, batch --batch, random weights: best-of seconds
             per policy (timed round-robin, so load hits every policy alike) and the largest
             deviation of each stage's output from the `highest` output (absolute, and relative
             to the output's standard deviation)
  synthetic  the small synthetic evaluation (method raw, two classes, as the end-to-end tests):
             the cached features' deviation and every metric's change, bf16 against highest

    .venv/bin/python benchmarks/bench_precision.py [--batch 1] [--repeats 3] [--skip-synthetic]

The scorer is not timed per policy: its distances are pinned (lsfa_jax/precision.py).
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
from common import best_of, emit, machine_description  # noqa: E402

from lsfa_jax.features.point_mae_grid import point_mae_patch_grid_batch  # noqa: E402
from lsfa_jax.models import point_mae, vit  # noqa: E402
from lsfa_jax.models.adaptors import apply_adaptors, init_lsfa_params, lsfa_model  # noqa: E402

POLICIES = ("highest", "bf16")
POINT_CFG = {f: getattr(point_mae.PointMAEEncoder, f) for f in point_mae.CONFIG_FIELDS}


def cloud(size: int = 224) -> np.ndarray:
    v, u = np.mgrid[:size, :size] / size
    z = 0.5 + 0.01 * np.sin(6 * u) * np.cos(4 * v)
    points = np.stack([0.1 * u, 0.1 * v, z], -1).astype(np.float32)
    points[np.hypot(u - 0.5, v - 0.5) > 0.44] = 0.0  # ~30k valid points, as real samples
    return points


def stages(batch: int, repeats: int) -> None:
    key = jax.random.key(0)
    rng = np.random.default_rng(0)
    rgb_params = vit.init_random_vit_params(key, vit.ViTConfig())
    point_vars = point_mae.init_random_point_mae_variables(key, POINT_CFG)
    adaptor_params = init_lsfa_params(lsfa_model(), key)
    images = jnp.asarray(rng.normal(size=(batch, 224, 224, 3)).astype(np.float32))
    clouds = np.stack([cloud()] * batch)
    rgb = jnp.asarray(rng.normal(size=(batch, 3136, 768)).astype(np.float32))
    xyz = jnp.asarray(rng.normal(size=(batch, 3136, 1152)).astype(np.float32))

    def run(stage: str, policy: str):
        if stage == "vit":
            out = vit.dino_patch_grid(rgb_params, images, precision=policy)
        elif stage == "point":
            out = point_mae_patch_grid_batch(point_vars, clouds, POINT_CFG, precision=policy)[0]
        else:
            out = jnp.concatenate(apply_adaptors(adaptor_params, rgb, xyz, precision=policy), -1)
        return jax.block_until_ready(out)

    fns = {
        (s, p): functools.partial(run, s, p) for s in ("vit", "point", "adaptors") for p in POLICIES
    }
    seconds = best_of({f"{s}/{p}": fn for (s, p), fn in fns.items()}, repeats)
    for stage in ("vit", "point", "adaptors"):
        want = np.asarray(run(stage, "highest"), np.float64)
        got = np.asarray(run(stage, "bf16"), np.float64)
        deviation = float(np.max(np.abs(got - want)))
        fast, base = seconds[f"{stage}/bf16"], seconds[f"{stage}/highest"]
        print(
            f"{stage:9s} highest {base:7.3f} s  bf16 {fast:7.3f} s  speed-up {base / fast:5.2f}x  "
            f"max |bf16 - highest| {deviation:.3g} ({deviation / want.std():.3g} of the std)"
        )
        emit(
            bench="precision",
            stage=stage,
            batch=batch,
            highest_s=base,
            bf16_s=fast,
            speedup=base / fast,
            max_abs_deviation=deviation,
            relative_to_std=deviation / float(want.std()),
        )


def synthetic() -> None:
    from lsfa_jax.features.source import feature_source
    from lsfa_jax.jobs import run_evaluation
    from lsfa_jax.jobs.common import cache_dir, prepared_dataset
    from tests.helpers.tiny import raw_evaluation_config

    results, features = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for policy in POLICIES:
            config = raw_evaluation_config(
                Path(tmp) / "raw",
                image_size=64,
                counts=(6, 3, 4, 2),
                rgb_backbone=dict(patch_size=8, embed_dim=96, depth=2, num_heads=4, mlp_ratio=4),
                point_backbone=dict(
                    num_group=64,
                    group_size=32,
                    trans_dim=96,
                    depth=4,
                    num_heads=4,
                    mlp_ratio=4,
                    out_layers=(1, 3),
                ),
                grid_size=16,
                batch_size=4,
            )
            config.allow_random_init = True
            config.precision = policy
            config.cache_dir = str(Path(tmp) / "cache")
            workdir = Path(tmp) / policy
            results[policy] = run_evaluation.run_evaluation(config, workdir)
            prepared = prepared_dataset(config, workdir)
            source = feature_source(config, prepared, cache_dir(config, workdir))
            features[policy] = {c: source.split(c, "test").arrays for c in ("sphere_cap", "torus")}
    for modality in ("rgb", "xyz"):
        deviation = max(
            float(np.max(np.abs(features["bf16"][c][modality] - features["highest"][c][modality])))
            for c in features["highest"]
        )
        scale = max(float(np.std(features["highest"][c][modality])) for c in features["highest"])
        print(
            f"synthetic {modality} features: max |bf16 - highest| {deviation:.3g} (std {scale:.3g})"
        )
        emit(bench="precision_synthetic", modality=modality, max_abs_deviation=deviation, std=scale)
    for setting, per_class in results["highest"].items():
        for class_name, values in per_class.items():
            other = results["bf16"][setting][class_name]
            change = {k: other[k] - v for k, v in values.items() if isinstance(v, float)}
            print(
                f"synthetic {setting:7s} {class_name:10s} bf16 - highest: "
                + ", ".join(f"{k} {d:+.4f}" for k, d in sorted(change.items()))
            )
            emit(bench="precision_synthetic", setting=setting, cls=class_name, change=change)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-synthetic", action="store_true")
    args = parser.parse_args()
    print(machine_description())
    stages(args.batch, args.repeats)
    if not args.skip_synthetic:
        synthetic()


if __name__ == "__main__":
    main()
