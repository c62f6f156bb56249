"""The fixed anomaly-map colour scale stored with the model, and overlays drawn on it."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from lsfa_jax.reports import overlays


def test_fixed_scale_is_median_and_max_of_normal_pixels() -> None:
    rng = np.random.default_rng(0)
    maps = rng.gamma(2.0, 1.0, size=(3, 5, 7))
    lo, hi = overlays.fixed_scale(maps)
    flat = np.sort(maps.ravel())
    assert flat.size == 105 and lo == flat[52]  # an odd count: the median is the middle pixel
    assert hi == flat[-1]
    assert overlays.fixed_scale(np.full((2, 3, 3), 0.25)) == (0.25, 1.25)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        overlays.fixed_scale(maps[0])
    with pytest.raises(ValueError, match="finite"):
        overlays.fixed_scale(np.where(maps > 3, np.nan, maps))


def test_same_score_same_colour_whatever_else_is_in_the_map() -> None:
    """On a fixed scale a score's colour does not depend on the other scores being drawn."""
    scale = (0.5, 2.0)
    first = np.array([[0.5, 1.0], [1.25, 9.0]])
    second = np.array([[0.5, 1.0], [1.25, -3.0]])
    a, b = (overlays.heat_colors(m, *scale) for m in (first, second))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1, 0], b[1, 0])
    jet = matplotlib.colormaps["jet"]
    want = np.round(np.asarray(jet(0.5)[:3]) * 255).astype(np.uint8)  # 1.25 is mid-scale
    np.testing.assert_array_equal(a[1, 0], want)


def test_class_overlays_use_the_given_scale(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    n, h, w = 4, 8, 8
    rgb = rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)
    gts = np.zeros((n, h, w), np.uint8)
    maps = rng.uniform(0, 3, size=(n, h, w))
    labels = np.array([1, 1, 0, 0])
    scores = np.array([0.9, 0.2, 0.4, 0.1])
    paths = overlays.save_class_overlays(
        tmp_path, "foam", rgb, gts, maps, labels, scores, k=1, scale=(0.5, 1.5)
    )
    assert paths[0].name == "foam_missed_defects_0_001.png"
    want = overlays.overlay_image(
        rgb[1], gts[1], maps[1], title="foam 001 missed_defects score 0.2", vmin=0.5, vmax=1.5
    )
    np.testing.assert_array_equal(np.asarray(Image.open(paths[0])), want)
