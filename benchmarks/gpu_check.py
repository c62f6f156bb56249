"""One-device check of numerics and speed: what a GPU machine must show, in one summary.

Sections (each timed; a section that would start after --budget seconds is skipped and says so):
  device      the JAX device (kind, platform, count)
  parity      DINO ViT and Point-MAE with random weights in the official torch layouts, converted
              by the project's loaders, against the torch float32 reference (CPU), under each
              precision policy (highest = default, tf32, bf16): max |JAX - torch|
  end_to_end  RGB+3D inference (ViT, Point-MAE branch, adaptors, both PatchCore scorers) at
              paper shapes and banks, samples/s per batch size (benchmarks/bench_end_to_end.py)
  knn         1-NN search per image (3136 queries) at 100k x 1152: float32 exact, screened
              (float32 bank), bf16 (bfloat16 bank, screened)
  train_step  one adaptor train step at the paper's shapes (benchmarks/bench_train_step.py)
  memory      device memory per stage: XLA's buffer sizes of each compiled stage (arguments +
              outputs + temporaries), and the device's peak where the backend reports it

    benchmarks/gpu_check.sh                 # one GPU, paper shapes, under 8 minutes
    benchmarks/gpu_check.sh --quick         # anywhere (CPU): small shapes, same code paths

Writes <out>/gpu_check.json and <out>/gpu_check.md (default out: gpu_check_results).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# This checkout's lsfa_jax first (not another one installed in the environment), then the
# sibling benchmark modules.
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
import bench_end_to_end  # noqa: E402
from bench_train_step import train_step_figures  # noqa: E402
from common import best_of, device_peak_mib, machine_description  # noqa: E402

from lsfa_jax.atomic_io import atomic_write_json, atomic_write_text  # noqa: E402
from lsfa_jax.features.point_mae_grid import point_mae_patch_grid, point_mae_patch_grid_batch  # noqa: E402
from lsfa_jax.models import point_mae, vit  # noqa: E402
from lsfa_jax.models.adaptors import apply_adaptors, init_lsfa_params, lsfa_model  # noqa: E402
from lsfa_jax.patchcore.knn import (  # noqa: E402
    nearest_neighbours,
    screened_nearest_neighbour,
    search_index,
)
from lsfa_jax.patchcore.scorer import score_batch  # noqa: E402
from lsfa_jax.precision import POLICIES  # noqa: E402
from tests.helpers.torch_point_mae import REAL_CFG, make_torch_model, torch_point_grid  # noqa: E402
from tests.helpers.torch_vit import torch_model, torch_tokens  # noqa: E402

QUICK_VIT = vit.ViTConfig(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4)
QUICK_POINT = dict(
    num_group=32, group_size=16, trans_dim=48, depth=4, num_heads=4, mlp_ratio=4, out_layers=(1, 3)
)
MIB = 2**20


def compiled_mib(fn, *args) -> float:
    """Device memory one compiled call needs: arguments + outputs + temporaries - aliases."""
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    if analysis is None:
        return float("nan")
    total = (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )
    return round(total / MIB, 1)


def _blocking(fn):
    return jax.block_until_ready(fn())


def synthetic_cloud(size: int) -> np.ndarray:
    """(size, size, 3) bumpy plane in metres with a missing border (as bench_end_to_end)."""
    rng = np.random.default_rng(0)
    v, u = np.mgrid[:size, :size] / size
    z = 0.5 + 0.01 * np.sin(6 * u + 0.3) + 1e-4 * rng.normal(size=u.shape)
    cloud = np.stack([0.1 * u, 0.1 * v, z], -1).astype(np.float32)
    cloud[np.hypot(u - 0.5, v - 0.5) > 0.44] = 0.0
    return cloud


def parity(quick: bool) -> dict[str, Any]:
    """max |JAX - torch| of the ViT tokens and the Point-MAE patch grid under each policy."""
    import torch

    cfg = QUICK_VIT if quick else vit.ViTConfig()
    model = torch_model(cfg)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    params = vit.vit_params_from_state_dict(state, model_cfg=cfg, source="random torch ViT")
    images = np.random.default_rng(1).normal(size=(1, cfg.img_size, cfg.img_size, 3))
    images = images.astype(np.float32)
    want_tokens = torch_tokens(model, images)

    point_cfg = QUICK_POINT if quick else REAL_CFG
    torch_point = make_torch_model(point_cfg, seed=2)
    point_state = {k: v.numpy() for k, v in torch_point.state_dict().items()}
    variables = point_mae.point_mae_params_from_state_dict(
        point_state, model_cfg=point_cfg, source="random torch Point-MAE"
    )
    cloud = synthetic_cloud(48 if quick else 224)
    grid = 12 if quick else 56
    with torch.no_grad():
        want_grid = torch_point_grid(
            torch_point, cloud, point_cfg["num_group"], point_cfg["group_size"], grid
        )[0].numpy()
    out: dict[str, Any] = {"vit": f"{cfg}", "point_mae": point_cfg, "max_abs_error": {}}
    for policy in POLICIES:
        module = vit.VisionTransformer.from_config(cfg, policy)
        tokens = np.asarray(jax.jit(module.apply)({"params": params}, jnp.asarray(images)))
        features, _ = point_mae_patch_grid(variables, cloud, point_cfg, grid, precision=policy)
        out["max_abs_error"][policy] = {
            "vit_tokens": float(np.max(np.abs(tokens - want_tokens))),
            "point_grid": float(np.max(np.abs(np.asarray(features) - want_grid))),
        }
    return out


def end_to_end(quick: bool, memory: dict[str, float]) -> dict[str, Any]:
    """Samples/s of the whole RGB+3D inference per batch size (paper shapes and banks; small
    ones with --quick): ViT, Point-MAE branch, adaptors, both PatchCore scorers."""
    vit_cfg = QUICK_VIT if quick else vit.ViTConfig()
    point_cfg = QUICK_POINT if quick else bench_end_to_end.POINT_CFG
    size, grid = vit_cfg.img_size, 2 * vit_cfg.grid_size
    rgb_dim, xyz_dim = vit_cfg.embed_dim, len(point_cfg["out_layers"]) * point_cfg["trans_dim"]
    heads = 4 if quick else 12
    key = jax.random.key(0)
    rgb_params = vit.init_random_vit_params(key, vit_cfg)
    point_vars = point_mae.init_random_point_mae_variables(key, point_cfg)
    adaptor_model = lsfa_model(rgb_dim=rgb_dim, xyz_dim=xyz_dim, rgb_heads=heads, xyz_heads=heads)
    adaptor_params = init_lsfa_params(adaptor_model, key)
    rgb_rows, xyz_rows = (4096, 8192) if quick else (30720, 61440)
    banks = {
        "rgb": bench_end_to_end.random_bank(rgb_rows, rgb_dim, 1),
        "xyz": bench_end_to_end.random_bank(xyz_rows, xyz_dim, 2),
    }
    batches = [1, 2] if quick else [1, 8, 32]
    if quick:
        clouds, source = np.stack([synthetic_cloud(size)] * max(batches)), "synthetic"
    else:
        clouds, source = bench_end_to_end.real_clouds(max(batches))
    out: dict[str, Any] = {"banks": {"rgb": rgb_rows, "xyz": xyz_rows}, "clouds": source}
    for batch in batches:
        images = jnp.asarray(np.random.default_rng(batch).normal(size=(batch, size, size, 3)))
        images = images.astype(jnp.float32)
        batch_clouds = clouds[:batch]

        def rgb_features(images=images):
            return vit.dino_patch_grid(rgb_params, images, model_cfg=vit_cfg)

        def xyz_features(batch_clouds=batch_clouds):
            return point_mae_patch_grid_batch(point_vars, batch_clouds, point_cfg, grid)[0]

        def adapt(rgb, xyz):
            return apply_adaptors(
                adaptor_params, rgb, xyz, rgb_heads=heads, xyz_heads=heads, structure="encoder1"
            )

        def score(modality, features):
            return score_batch(banks[modality], features, out_size=size)[1]

        def total(rgb_features=rgb_features, xyz_features=xyz_features):
            rgb, xyz = adapt(rgb_features(), xyz_features())
            return jax.block_until_ready((score("rgb", rgb), score("xyz", xyz)))

        rgb, xyz = jax.block_until_ready((rgb_features(), xyz_features()))
        stages = {
            "vit": rgb_features,
            "point": xyz_features,
            "adaptors": functools.partial(adapt, rgb, xyz),
            "score_rgb": functools.partial(score, "rgb", rgb),
            "score_xyz": functools.partial(score, "xyz", xyz),
            "total": total,
        }
        stages = {k: functools.partial(_blocking, fn) for k, fn in stages.items()}
        seconds = best_of(stages, 1 if quick else 2)
        out[f"batch_{batch}"] = {
            "samples_per_s": round(batch / seconds["total"], 3),
            "seconds_per_stage": {k: round(v, 4) for k, v in seconds.items()},
        }
        if batch == batches[0]:
            memory[f"vit (batch {batch})"] = compiled_mib(
                functools.partial(vit.dino_patch_grid, model_cfg=vit_cfg), rgb_params, images
            )
            memory[f"adaptors (batch {batch})"] = compiled_mib(
                functools.partial(
                    apply_adaptors, structure="encoder1", rgb_heads=heads, xyz_heads=heads
                ),
                adaptor_params,
                rgb,
                xyz,
            )
            memory[f"score xyz (batch {batch})"] = compiled_mib(
                lambda bank, q: score_batch(bank, q, out_size=size), banks["xyz"], xyz
            )
    return out


def knn(quick: bool, memory: dict[str, float]) -> dict[str, Any]:
    """Seconds per image (3136 queries) of the three exact 1-NN searches."""
    rows = 4096 if quick else 102_400  # 100k rows, padded to a multiple of the 4096-row chunk
    dim, queries = 1152, 3136
    rng = np.random.default_rng(3)
    bank = jnp.asarray(rng.normal(size=(rows, dim)).astype(np.float32))
    valid = jnp.ones((rows,), bool)
    query = jnp.asarray(rng.normal(size=(queries, dim)).astype(np.float32))
    bank_bf16 = bank.astype(jnp.bfloat16)
    index, index_bf16 = search_index(bank, valid), search_index(bank_bf16, valid)
    searches = {
        "float32": lambda: nearest_neighbours(query, bank, valid, k=1),
        "screened": lambda: screened_nearest_neighbour(query, bank, index),
        "bf16": lambda: screened_nearest_neighbour(query, bank_bf16, index_bf16),
    }
    out: dict[str, Any] = {"bank": [rows, dim], "queries_per_image": queries, "s_per_image": {}}
    found = {}
    for name, search in searches.items():
        distances, indices = jax.block_until_ready(search())[:2]
        found[name] = np.asarray(indices).reshape(-1), np.asarray(distances).reshape(-1)
        best = float("inf")
        for _ in range(1 if quick else 3):
            start = time.perf_counter()
            jax.block_until_ready(search())
            best = min(best, time.perf_counter() - start)
        out["s_per_image"][name] = round(best, 4)
    # Rows whose float32 distances tie within rounding may be swapped: count them and bound the
    # distance difference instead of asking for equal indices.
    for name in ("screened", "bf16"):
        out[f"{name}_vs_float32"] = {
            "same_index_fraction": float(np.mean(found[name][0] == found["float32"][0])),
            "max_distance_difference": float(np.max(np.abs(found[name][1] - found["float32"][1]))),
        }
    memory["knn float32 (1 image)"] = compiled_mib(
        lambda q, b: nearest_neighbours(q, b, k=1), query, bank
    )
    memory["knn screened (1 image)"] = compiled_mib(screened_nearest_neighbour, query, bank, index)
    return out


def train_step(quick: bool, memory: dict[str, float]) -> dict[str, Any]:
    shapes = (
        dict(batch=2, patches=64, rgb_dim=48, xyz_dim=96, bank=512, classes=2, steps=1)
        if quick
        else dict(batch=8, patches=3136, bank=50_000, classes=10, steps=2)
    )
    figures = train_step_figures(**shapes)
    memory["train step"] = round(
        figures["xla_argument_mib"] + figures["xla_temp_mib"] + figures["xla_output_mib"], 1
    )
    return figures


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"# GPU check ({'quick' if summary['quick'] else 'paper shapes'})", ""]
    lines.append(f"device: {summary['device']}")
    for name in ("parity", "end_to_end", "knn", "train_step", "memory"):
        lines += ["", f"## {name} ({summary['section_seconds'].get(name, 'skipped')} s)", ""]
        lines.append("```")
        lines.append(json.dumps(summary.get(name, "skipped"), indent=1))
        lines.append("```")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (CPU test run)")
    parser.add_argument("--out", default="gpu_check_results")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; later sections skip")
    args = parser.parse_args()
    started = time.perf_counter()
    device = jax.devices()[0]
    summary: dict[str, Any] = {
        "quick": args.quick,
        "device": f"{device.device_kind} ({device.platform}, {jax.device_count()} devices)",
        "machine": machine_description(),
        "section_seconds": {},
        "skipped": [],
    }
    memory: dict[str, float] = {}
    sections = {
        "parity": lambda: parity(args.quick),
        "end_to_end": lambda: end_to_end(args.quick, memory),
        "knn": lambda: knn(args.quick, memory),
        "train_step": lambda: train_step(args.quick, memory),
    }
    for name, section in sections.items():
        if time.perf_counter() - started > args.budget:
            summary["skipped"].append(name)
            continue
        start = time.perf_counter()
        summary[name] = section()
        summary["section_seconds"][name] = round(time.perf_counter() - start, 1)
        print(f"{name}: {json.dumps(summary[name])[:400]}", flush=True)
    summary["memory"] = {"compiled_stage_mib": memory, "device_peak_mib": device_peak_mib()}
    summary["section_seconds"]["memory"] = 0.0
    summary["total_seconds"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    atomic_write_json(out / "gpu_check.json", summary)
    atomic_write_text(out / "gpu_check.md", markdown(summary))
    print(f"summary: {out / 'gpu_check.md'} ({summary['total_seconds']} s)")


if __name__ == "__main__":
    main()
