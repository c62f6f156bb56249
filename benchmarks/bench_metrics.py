"""Times `metrics.evaluate_class` on a class-sized test split; compares P-AUROC with sklearn.

Usage: python benchmarks/bench_metrics.py [--images 150] [--size 224] [--regions 50]
Synthetic split: the first `regions` images have one disc-shaped defect each, the rest are
good; maps are smoothed noise plus the mask, float32, optionally quantised to 256 levels per
image (as the reference's uint8 blur does), which creates many ties.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from lsfa_jax import metrics


def synthetic_split(
    n_images: int, size: int, n_regions: int, quantise: bool, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """labels (N,), scores (N,), masks (N, S, S) uint8, maps (N, S, S) float32."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n_images, size, size), np.uint8)
    for i in range(n_regions):
        cy, cx = rng.integers(20, size - 20, 2)
        radius = rng.uniform(3, 15)
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    noise = ndimage.gaussian_filter(rng.normal(size=masks.shape), sigma=(0, 4, 4))
    maps = (noise / noise.std() + 4.0 * ndimage.gaussian_filter(masks * 1.0, (0, 2, 2))).astype(
        np.float32
    )
    if quantise:
        peak = maps.max(axis=(1, 2), keepdims=True)
        maps = (np.floor(maps / peak * 255) / 255 * peak).astype(np.float32)
    labels = masks.reshape(n_images, -1).any(axis=1).astype(np.int64)
    scores = maps.reshape(n_images, -1).max(axis=1)
    return labels, scores, masks, maps


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=150)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--regions", type=int, default=50)
    args = parser.parse_args()
    for quantise in (False, True):
        labels, scores, masks, maps = synthetic_split(
            args.images, args.size, args.regions, quantise
        )
        print(
            f"split: {args.images} images {args.size}x{args.size} ({masks.size:,} pixels), "
            f"{args.regions} regions, maps {'quantised to 256 levels' if quantise else 'float'}"
        )
        exact, t_exact = timed(metrics.evaluate_class, labels, scores, masks, maps)
        ref, t_ref = timed(
            metrics.evaluate_class, labels, scores, masks, maps, aupro_method="reference"
        )
        p_ours, t_p = timed(metrics.pixel_auroc, masks, maps)
        p_sk, t_sk = timed(roc_auc_score, masks.ravel(), maps.ravel())
        print(f"  evaluate_class (exact AUPRO)     {t_exact:6.2f} s  {exact.values()}")
        print(f"  evaluate_class (reference AUPRO) {t_ref:6.2f} s  {ref.values()}")
        print(f"  pixel_auroc                      {t_p:6.2f} s  {p_ours:.12f}")
        print(f"  sklearn roc_auc_score (pixels)   {t_sk:6.2f} s  {p_sk:.12f}")
        print(f"  |P-AUROC ours - sklearn| = {abs(p_ours - p_sk):.2e}")


if __name__ == "__main__":
    main()
