"""Anomaly-map overlays: RGB + ground truth | heat map + predicted mask | colour bar.

The heat map uses one colour scale (vmin, vmax) for every image of a class, so that a colour
means the same score on every panel; the colour bar gives the scale in score units and marks the
pixel threshold that defines the predicted mask (contour in PRED_RGB on the heat panel). The
title gives the verdict, the image score and the image threshold with its rule. Evaluation and
mode=predict use `fixed_scale` of the class's normal validation maps, stored with the model, so
images of separate runs and predict calls compare too; `shared_scale` spans a given set of maps.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw

from lsfa_jax.atomic_io import atomic_write_bytes

TITLE_HEIGHT = 38  # pixels of the title strip above the panels: three lines of text
CONTOUR_RGB = (0, 255, 0)  # ground truth
PRED_RGB = (255, 255, 255)  # predicted mask: map > pixel threshold
COLORBAR_WIDTH = 64  # pixels: a 12-pixel gradient and its tick labels
THRESHOLD_RGB = (255, 0, 255)
HEAT_ALPHA = 0.5
HEAT_COLORMAP = "jet"


def _check_inputs(rgb: np.ndarray, gt_mask: np.ndarray | None, anomaly_map: np.ndarray) -> None:
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"overlays: rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    gt_shape = rgb.shape[:2] if gt_mask is None else gt_mask.shape
    if gt_shape != rgb.shape[:2] or anomaly_map.shape != rgb.shape[:2]:
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


def _title_strip(lines: list[str], width: int) -> np.ndarray:
    img = Image.new("RGB", (width, TITLE_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for row, line in enumerate(lines[:3]):
        draw.text((2, 1 + 12 * row), line, fill=(0, 0, 0))
    return np.asarray(img)


def colorbar(height: int, vmin: float, vmax: float, threshold: float | None = None) -> np.ndarray:
    """(height, COLORBAR_WIDTH, 3) uint8: the heat colours from vmax (top) to vmin (bottom) with
    tick labels in score units, and `threshold` as a THRESHOLD_RGB line (an arrow at the end
    when it lies outside [vmin, vmax])."""
    rows = vmax - (np.arange(height) + 0.5) / height * (vmax - vmin)
    img = Image.new("RGB", (COLORBAR_WIDTH, height), (255, 255, 255))
    gradient = heat_colors(np.repeat(rows[:, None], 12, axis=1), vmin, vmax)
    img.paste(Image.fromarray(gradient), (2, 0))
    draw = ImageDraw.Draw(img)
    if height >= 40:
        for value, y in ((vmax, 0), ((vmin + vmax) / 2, height // 2 - 5), (vmin, height - 11)):
            draw.text((16, y), f"{value:.3g}", fill=(0, 0, 0))
    if threshold is not None and np.isfinite(threshold):
        y = int(np.clip(round((vmax - threshold) / (vmax - vmin) * height), 0, height - 1))
        draw.line([(0, y), (15, y)], fill=THRESHOLD_RGB, width=2)
        if height >= 40:
            label = "thr" if vmin <= threshold <= vmax else ("thr>" if threshold > vmax else "thr<")
            draw.text((16, min(max(y - 5, 11), height - 22)), label, fill=THRESHOLD_RGB)
    return np.asarray(img)


def overlay_image(
    rgb_uint8: np.ndarray,
    gt_mask: np.ndarray | None,
    anomaly_map: np.ndarray,
    *,
    title: str,
    vmin: float,
    vmax: float,
    pixel_threshold: float | None = None,
    note: str = "",
) -> np.ndarray:
    """The panel as (TITLE_HEIGHT + H, 2 W + COLORBAR_WIDTH, 3) uint8.

    Columns: the RGB image with the ground-truth contour in CONTOUR_RGB (plain RGB when gt_mask
    is None, e.g. in mode=predict); the heat map (colour scale [vmin, vmax], one per class)
    blended over the RGB image, with the contour of `anomaly_map > pixel_threshold` in PRED_RGB
    when a threshold is given; the colour bar with that threshold marked. Above them: `title`,
    `note` (e.g. the threshold's rule) and what the colours and contours mean.
    """
    rgb = np.asarray(rgb_uint8)
    anomaly_map = np.asarray(anomaly_map)
    gt_mask = None if gt_mask is None else np.asarray(gt_mask)
    _check_inputs(rgb, gt_mask, anomaly_map)
    truth = rgb.copy()
    if gt_mask is not None:
        truth[mask_contour(gt_mask)] = CONTOUR_RGB
    heat = heat_colors(anomaly_map, vmin, vmax).astype(np.float64)
    blended = np.round((1 - HEAT_ALPHA) * rgb + HEAT_ALPHA * heat).astype(np.uint8)
    if pixel_threshold is not None:
        blended[mask_contour(anomaly_map > pixel_threshold)] = PRED_RGB
    bar = colorbar(rgb.shape[0], vmin, vmax, pixel_threshold)
    panels = np.concatenate([truth, blended, bar], axis=1)
    legend = "green: ground truth" if gt_mask is not None else "no ground truth"
    if pixel_threshold is not None:
        legend += f"; white: map > {pixel_threshold:.3g} (pixel threshold, magenta on the bar)"
    lines = [title, note, f"{legend}; colours [{vmin:.3g}, {vmax:.3g}] of the class"]
    lines = [line for line in lines if line]
    return np.concatenate([_title_strip(lines, panels.shape[1]), panels], axis=0)


def save_overlay_png(
    path: str | os.PathLike,
    rgb_uint8: np.ndarray,
    gt_mask: np.ndarray | None,
    anomaly_map: np.ndarray,
    *,
    title: str,
    vmin: float,
    vmax: float,
    pixel_threshold: float | None = None,
    note: str = "",
) -> Path:
    """Writes `overlay_image(...)` as a PNG atomically; returns the path."""
    panel = overlay_image(
        rgb_uint8,
        gt_mask,
        anomaly_map,
        title=title,
        vmin=vmin,
        vmax=vmax,
        pixel_threshold=pixel_threshold,
        note=note,
    )
    return atomic_write_bytes(path, png_bytes(panel))


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, 3) or (H, W) uint8 -> PNG file content."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def verdict_title(name: str, score: float, threshold: float | None, rule: str = "") -> str:
    """ "<name>: ANOMALOUS, score 1.23 > threshold 0.95 (rule)" or "... normal, score ... <=" """
    if threshold is None or not np.isfinite(threshold):
        return f"{name}: score {score:.3g} (no threshold)"
    anomalous = score > threshold
    verdict, sign = ("ANOMALOUS", ">") if anomalous else ("normal", "<=")
    rule_text = f" ({rule})" if rule else ""
    return f"{name}: {verdict}, score {score:.3g} {sign} threshold {threshold:.3g}{rule_text}"


def select_overlay_samples(
    labels: np.ndarray, scores: np.ndarray, k: int, threshold: float | None = None
) -> dict[str, np.ndarray]:
    """Indices of the samples worth looking at, not just the first files.

    Args:
      labels: (N,) {0 good, 1 defect}.
      scores: (N,) image anomaly scores.
      k: how many per group (fewer when a group has fewer samples).
      threshold: the image decision threshold (anomalous iff score > threshold). With it the
        groups are what the threshold decides; without it, the extremes of the ranking.

    Returns (ties broken by index):
      with a threshold:
        "missed_defects": defects scored <= threshold, lowest first;
        "false_alarms": good samples scored > threshold, highest first;
        "top_defects": detected defects (> threshold), highest first;
      without: "missed_defects" the k lowest-scored defects, "false_alarms" the k highest-scored
        good samples, "top_defects" the k highest-scored defects not already in missed_defects.
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
    if threshold is not None:
        flagged = scores > threshold
        missed = defects[~flagged[defects]]
        alarms = goods[flagged[goods]]
        found = defects[flagged[defects]]
        return {
            "missed_defects": missed[np.argsort(scores[missed], kind="stable")][:k],
            "false_alarms": alarms[np.lexsort((alarms, -scores[alarms]))][:k],
            "top_defects": found[np.lexsort((found, -scores[found]))][:k],
        }
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


GROUP_TITLES = {
    "missed_defects": "missed defect",
    "false_alarms": "false alarm",
    "top_defects": "detected defect",
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
    threshold: float | None = None,
    rule: str = "",
    pixel_threshold: float | None = None,
) -> list[Path]:
    """Overlays of one class's informative samples, all on one colour scale.

    Args:
      rgb_uint8: (N, H, W, 3) uint8; gt_masks: (N, H, W); anomaly_maps: (N, H, W).
      labels, scores: (N,) as in `select_overlay_samples`.
      sample_names: (N,) names used in titles and file names (default: the index).
      scale: (vmin, vmax), e.g. the model's `fixed_scale`; default `shared_scale(anomaly_maps)`.
      threshold, rule: the image threshold and its rule's description: the groups follow it
        and titles give the verdict. pixel_threshold: draws the predicted mask.

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
    for group, indices in select_overlay_samples(labels, scores, k, threshold).items():
        for rank, i in enumerate(indices):
            if threshold is None:
                title = f"{class_name} {names[i]} {group} score {float(scores[i]):.3g}"
            else:
                title = f"{GROUP_TITLES[group]}: " + verdict_title(
                    f"{class_name} {names[i]}", float(scores[i]), threshold
                )
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
                    pixel_threshold=pixel_threshold,
                    note=f"image threshold: {rule}" if rule else "",
                )
            )
    return paths


def resize_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) scores -> (H, W) float32 = size, bilinear (PIL "F" mode, no 8-bit rounding)."""
    height, width = size
    image = Image.fromarray(np.asarray(anomaly_map, np.float32), mode="F")
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), np.float32)


def save_prediction_files(
    out_dir: str | os.PathLike,
    stem: str,
    rgb_uint8: np.ndarray,
    anomaly_map: np.ndarray,
    *,
    input_size: tuple[int, int],
    title: str,
    vmin: float,
    vmax: float,
    pixel_threshold: float | None,
    gt_mask: np.ndarray | None = None,
    note: str = "",
) -> dict[str, Path]:
    """What mode=predict leaves per sample, each written atomically:

    <stem>_map.tiff     float32 anomaly map at the input's resolution `input_size` (H, W)
    <stem>_mask.png     0 / 255: that map > pixel_threshold (absent without a threshold)
    <stem>_overlay.png  `overlay_image` at the model's resolution (with `gt_mask` if given)
    """
    import tifffile

    out_dir = Path(out_dir)
    full = resize_map(anomaly_map, input_size)
    buf = io.BytesIO()
    tifffile.imwrite(buf, full)
    paths = {"map": atomic_write_bytes(out_dir / f"{stem}_map.tiff", buf.getvalue())}
    if pixel_threshold is not None:
        mask = np.where(full > pixel_threshold, 255, 0).astype(np.uint8)
        paths["mask"] = atomic_write_bytes(out_dir / f"{stem}_mask.png", png_bytes(mask))
    paths["overlay"] = save_overlay_png(
        out_dir / f"{stem}_overlay.png",
        rgb_uint8,
        gt_mask,
        anomaly_map,
        title=title,
        vmin=vmin,
        vmax=vmax,
        pixel_threshold=pixel_threshold,
        note=note,
    )
    return paths
