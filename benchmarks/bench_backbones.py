"""Backbone throughput and peak memory: JAX vs a PyTorch reference, on the local device.

Each (branch, implementation, batch) case runs in its own subprocess so that the peak resident
set size (`ru_maxrss`) belongs to that case alone; it includes the framework's own footprint,
which `rss_init_mb` (after imports and weight init, before the first forward) shows.
Weights are random: throughput does not depend on their values.

    .venv/bin/python benchmarks/bench_backbones.py [--batches 1 4] [--repeats 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lsfa_jax.atomic_io import atomic_write_json

REPO = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def _time_calls(run, repeats: int) -> tuple[float, float]:
    """(first call seconds incl. compilation, mean seconds of `repeats` later calls)."""
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeats):
        run()
    return first, (time.perf_counter() - t0) / repeats


# ----------------------------------------------------------------------------- RGB branch


def _rgb_jax(batch: int, repeats: int) -> dict[str, Any]:
    import jax
    import numpy as np

    from lsfa_jax.models import vit

    cfg = vit.ViTConfig()
    params = vit.init_random_vit_params(jax.random.key(0), cfg)
    images = jax.numpy.asarray(np.random.default_rng(0).normal(size=(batch, 224, 224, 3)), "f4")
    rss_init = _rss_mb()
    first, step = _time_calls(
        lambda: vit.dino_patch_grid(params, images, model_cfg=cfg).block_until_ready(), repeats
    )
    return {
        "first_call_s": first,
        "step_s": step,
        "rss_init_mb": rss_init,
        "device": str(jax.devices()[0]),
    }


def _torch_vit_b8():
    """Minimal DINO ViT-B/8 in torch (same layout as the reference), plus 2x nearest upsampling."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d: int = 768, heads: int = 12):
            super().__init__()
            self.heads = heads
            self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

        def forward(self, x):
            b, n, d = x.shape
            qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            attn = ((q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5).softmax(-1)
            x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))
            return x + self.mlp(self.norm2(x))

    class ViT(nn.Module):
        def __init__(self, d: int = 768, depth: int = 12):
            super().__init__()
            self.proj = nn.Conv2d(3, d, 8, 8)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
            self.pos_embed = nn.Parameter(torch.zeros(1, 785, d))
            self.blocks = nn.Sequential(*[Block(d) for _ in range(depth)])
            self.norm = nn.LayerNorm(d, eps=1e-6)

        def forward(self, x):  # (B, 3, 224, 224) -> (B, 3136, 768)
            x = self.proj(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
            x = self.norm(self.blocks(x))[:, 1:].transpose(1, 2).reshape(-1, 768, 28, 28)
            return nn.functional.adaptive_avg_pool2d(x, 56).flatten(2).transpose(1, 2)

    return ViT().eval()


def _rgb_torch(batch: int, repeats: int) -> dict[str, Any]:
    import torch

    model = _torch_vit_b8()
    images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    rss_init = _rss_mb()
    with torch.inference_mode():
        first, step = _time_calls(lambda: model(images), repeats)
    return {
        "first_call_s": first,
        "step_s": step,
        "rss_init_mb": rss_init,
        "device": f"cpu ({torch.get_num_threads()} threads)",
    }


def bench_rgb_branch(batches: list[int], repeats: int) -> list[dict[str, Any]]:
    """DINO ViT-B/8 at 224x224 -> (B, 3136, 768), JAX vs torch, one subprocess per case."""
    return [_run_case("rgb", impl, b, repeats) for impl in ("jax", "torch") for b in batches]


# ----------------------------------------------------------------------------- point branch
# Slot for the Point-MAE engineer: measure the point branch (FPS + kNN grouping + Point-MAE
# encoder -> 56x56 grid) the same way, one subprocess per case via `_run_case("point", ...)`,
# and register the worker functions in WORKERS.


def bench_point_branch(batches: list[int], repeats: int) -> list[dict[str, Any]]:
    """Point-MAE branch cases; empty until the point branch is added (main says so)."""
    del batches, repeats
    return []


# ----------------------------------------------------------------------------- driver

WORKERS = {("rgb", "jax"): _rgb_jax, ("rgb", "torch"): _rgb_torch}


def _run_case(branch: str, impl: str, batch: int, repeats: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        branch,
        impl,
        str(batch),
        "--repeats",
        str(repeats),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{branch}/{impl}/batch {batch} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(branch=branch, impl=impl, batch=batch, repeats=repeats)
    result["samples_per_s"] = batch / result["step_s"]
    return result


def _worker(branch: str, impl: str, batch: int, repeats: int) -> None:
    result = WORKERS[(branch, impl)](batch, repeats)
    result["peak_rss_mb"] = _rss_mb()
    print(json.dumps(result))


def _write_json(results: list[dict[str, Any]], out_dir: Path) -> Path:
    return atomic_write_json(out_dir / "bench_backbones.json", results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="folder for bench_backbones.json")
    parser.add_argument(
        "--worker", nargs=3, metavar=("BRANCH", "IMPL", "BATCH"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        branch, impl, batch = args.worker
        _worker(branch, impl, int(batch), args.repeats)
        return
    results = bench_rgb_branch(args.batches, args.repeats)
    point = bench_point_branch(args.batches, args.repeats)
    if not point:
        print("point branch: not measured (bench_point_branch has no cases yet)")
    results += point
    print(
        f"{'branch':6} {'impl':6} {'batch':>5} {'samples/s':>10} {'step s':>8} "
        f"{'1st call s':>10} {'RSS init MB':>11} {'peak RSS MB':>11}  device"
    )
    for r in results:
        print(
            f"{r['branch']:6} {r['impl']:6} {r['batch']:5d} {r['samples_per_s']:10.3f} "
            f"{r['step_s']:8.2f} {r['first_call_s']:10.2f} {r['rss_init_mb']:11.0f} "
            f"{r['peak_rss_mb']:11.0f}  {r['device']}"
        )
    if args.out:
        print(f"wrote {_write_json(results, args.out)}")


if __name__ == "__main__":
    main()
