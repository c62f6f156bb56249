"""Anomaly-map overlays: a panel RGB | RGB + ground-truth contour | heat map over RGB.

The heat map uses one colour scale (vmin, vmax) for every image of a class, so that a colour
means the same score on every panel; the title gives the scale. Evaluation and mode=predict use
`fixed_scale` of the class's normal validation maps, stored with the model, so images of
separate runs and predict calls compare too; `shared_scale` spans a given set of maps.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw

from lsfa_jax.atomic_io import atomic_write_bytes

TITLE_HEIGHT = 14  # pixels of title strip above the panels
CONTOUR_RGB = (0, 255, 0)
HEAT_ALPHA = 0.5
HEAT_COLORMAP = "jet"


def _check_inputs(rgb: np.ndarray, gt_mask: np.ndarray, anomaly_map: np.ndarray) -> None:
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"overlays: rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    if gt_mask.shape != rgb.shape[:2] or anomaly_map.shape != rgb.shape[:2]:
        raise ValueError(
            f"overlays: gt_mask {gt_mask.shape} and anomaly_map {anomaly_map.shape} must match "
            f"the image size {rgb.shape[:2]}"
        )
    if not np.all(np.isfinite(anomaly_map)):
        raise ValueError("overlays: anomaly_map has non-finite values")


def mask_contour(mask: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W) bool: mask pixels with a 4-neighbour outside the mask (or the image)."""
    m = np.pad(np.asarray(mask) > 0, 1, constant_values=False)
    interior = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return (np.asarray(mask) > 0) & ~interior


def heat_colors(anomaly_map: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """(H, W) scores -> (H, W, 3) uint8 colours, scores clipped to [vmin, vmax]."""
    if not vmax > vmin:
        raise ValueError(f"overlays: need vmax > vmin, got vmin={vmin}, vmax={vmax}")
    t = np.clip((np.asarray(anomaly_map, np.float64) - vmin) / (vmax - vmin), 0.0, 1.0)
    rgba = matplotlib.colormaps[HEAT_COLORMAP](t)
    return np.round(rgba[..., :3] * 255).astype(np.uint8)


def shared_scale(anomaly_maps: np.ndarray) -> tuple[float, float]:
    """(N, H, W) maps of one class -> (vmin, vmax) = their min and max, one scale per class."""
    maps = np.asarray(anomaly_maps)
    if maps.size == 0 or not np.all(np.isfinite(maps)):
        raise ValueError("overlays: shared_scale needs a non-empty set of finite maps")
    lo, hi = float(maps.min()), float(maps.max())
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def fixed_scale(normal_maps: np.ndarray) -> tuple[float, float]:
    """(N, H, W) maps of normal validation samples -> (vmin, vmax) = (median, max) of their pixels.

    Why these: the scale depends only on the model (stored with it), never on the maps being
    drawn, so one colour is one score for every sample and call. With vmin at the median, the
    typical normal surface takes the coldest colour; with vmax at the largest normal validation
    pixel, only scores above anything a normal sample reached take the hottest one. A constant
    set of maps gives (value, value + 1).
    """
    maps = np.asarray(normal_maps, np.float64)
    if maps.ndim != 3 or maps.size == 0 or not np.all(np.isfinite(maps)):
        raise ValueError(
            f"overlays: fixed_scale needs non-empty finite (N, H, W) maps; got shape {maps.shape}"
        )
    lo, hi = float(np.median(maps)), float(maps.max())
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _title_strip(title: str, width: int) -> np.ndarray:
    img = Image.new("RGB", (width, TITLE_HEIGHT), (255, 255, 255))
    ImageDraw.Draw(img).text((2, 1), title, fill=(0, 0, 0))
    return np.asarray(img)


def overlay_image(
    rgb_uint8: np.ndarray,
    gt_mask: np.ndarray,
    anomaly_map: np.ndarray,
    *,
    title: str,
    vmin: float,
    vmax: float,
) -> np.ndarray:
    """The panel as (TITLE_HEIGHT + H, 3 W, 3) uint8.

    Columns: the RGB image; the RGB image with the ground-truth contour in CONTOUR_RGB; the heat
    map (colour scale [vmin, vmax], one per class) blended over the RGB image.
    """
    rgb = np.asarray(rgb_uint8)
    gt_mask = np.asarray(gt_mask)
    anomaly_map = np.asarray(anomaly_map)
    _check_inputs(rgb, gt_mask, anomaly_map)
    contour = rgb.copy()
    contour[mask_contour(gt_mask)] = CONTOUR_RGB
    heat = heat_colors(anomaly_map, vmin, vmax).astype(np.float64)
    blended = np.round((1 - HEAT_ALPHA) * rgb + HEAT_ALPHA * heat).astype(np.uint8)
    panels = np.concatenate([rgb, contour, blended], axis=1)
    full_title = f"{title} | colour scale [{vmin:.3g}, {vmax:.3g}] of the class"
    return np.concatenate([_title_strip(full_title, panels.shape[1]), panels], axis=0)


def save_overlay_png(
    path: str | os.PathLike,
    rgb_uint8: np.ndarray,
    gt_mask: np.ndarray,
    anomaly_map: np.ndarray,
    *,
    title: str,
    vmin: float,
    vmax: float,
) -> Path:
    """Writes `overlay_image(...)` as a PNG atomically; returns the path."""
    panel = overlay_image(rgb_uint8, gt_mask, anomaly_map, title=title, vmin=vmin, vmax=vmax)
    buf = io.BytesIO()
    Image.fromarray(panel).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def select_overlay_samples(labels: np.ndarray, scores: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Indices of the samples worth looking at, not just the first files.

    Args:
      labels: (N,) {0 good, 1 defect}.
      scores: (N,) image anomaly scores.
      k: how many per group (fewer when a group has fewer samples).

    Returns:
      "missed_defects": the k lowest-scored defects, lowest first (the model's worst misses);
      "false_alarms": the k highest-scored good samples, highest first;
      "top_defects": the k highest-scored defects not already in missed_defects, highest first.
      Ties are broken by index.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"overlays: labels {labels.shape} and scores {scores.shape} must be (N,)")
    if not np.all(np.isin(labels, (0, 1))):
        raise ValueError("overlays: labels must be 0 (good) or 1 (defect)")
    if not np.all(np.isfinite(scores)):
        raise ValueError("overlays: scores have non-finite values")
    if k < 0:
        raise ValueError(f"overlays: k must be >= 0, got {k}")
    defects = np.flatnonzero(labels == 1)
    goods = np.flatnonzero(labels == 0)
    by_score = defects[np.argsort(scores[defects], kind="stable")]
    missed = by_score[:k]
    goods_desc = goods[np.lexsort((goods, -scores[goods]))]
    rest = np.setdiff1d(defects, missed)
    rest_desc = rest[np.lexsort((rest, -scores[rest]))]
    return {
        "missed_defects": missed,
        "false_alarms": goods_desc[:k],
        "top_defects": rest_desc[:k],
    }


def save_class_overlays(
    out_dir: str | os.PathLike,
    class_name: str,
    rgb_uint8: np.ndarray,
    gt_masks: np.ndarray,
    anomaly_maps: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    *,
    k: int,
    sample_names: list[str] | None = None,
    scale: tuple[float, float] | None = None,
) -> list[Path]:
    """Overlays of one class's informative samples, all on one colour scale.

    Args:
      rgb_uint8: (N, H, W, 3) uint8; gt_masks: (N, H, W); anomaly_maps: (N, H, W).
      labels, scores: (N,) as in `select_overlay_samples`.
      sample_names: (N,) names used in titles and file names (default: the index).
      scale: (vmin, vmax), e.g. the model's `fixed_scale`; default `shared_scale(anomaly_maps)`.

    Returns the written paths, `<out_dir>/<class>_<group>_<rank>_<name>.png`.
    """
    n = len(labels)
    if not (len(rgb_uint8) == len(gt_masks) == len(anomaly_maps) == len(scores) == n):
        raise ValueError(f"overlays: {class_name}: inputs must all have N={n} samples")
    names = [f"{i:03d}" for i in range(n)] if sample_names is None else list(sample_names)
    if len(names) != n:
        raise ValueError(f"overlays: {class_name}: {len(names)} sample names for {n} samples")
    vmin, vmax = shared_scale(anomaly_maps) if scale is None else scale
    paths = []
    for group, indices in select_overlay_samples(labels, scores, k).items():
        for rank, i in enumerate(indices):
            title = f"{class_name} {names[i]} {group} score {float(scores[i]):.3g}"
            path = Path(out_dir) / f"{class_name}_{group}_{rank}_{names[i]}.png"
            paths.append(
                save_overlay_png(
                    path,
                    rgb_uint8[i],
                    gt_masks[i],
                    anomaly_maps[i],
                    title=title,
                    vmin=vmin,
                    vmax=vmax,
                )
            )
    return paths
