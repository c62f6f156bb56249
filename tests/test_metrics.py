"""Metrics against independent references: sklearn, pairwise counts, brute-force PRO curves."""

from __future__ import annotations

import bisect
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve

from lsfa_jax import metrics

SAMPLE = Path(__file__).resolve().parents[2] / "shared/data/mvtec3d_sample"


# ---------------------------------------------------------------- independent references


def pairwise_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """O(n^2) Mann-Whitney count: P(score_pos > score_neg) + 0.5 P(tie)."""
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    wins = 0.0
    for p in pos:
        for n in neg:
            wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (len(pos) * len(neg))


def flood_fill_regions(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components of one 2D mask by explicit flood fill."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    for i in range(h):
        for j in range(w):
            if mask[i, j] and not seen[i, j]:
                stack, pixels = [(i, j)], []
                seen[i, j] = True
                while stack:
                    a, b = stack.pop()
                    pixels.append((a, b))
                    for da in (-1, 0, 1):
                        for db in (-1, 0, 1):
                            y, x = a + da, b + db
                            if 0 <= y < h and 0 <= x < w and mask[y, x] and not seen[y, x]:
                                seen[y, x] = True
                                stack.append((y, x))
                regions.append(pixels)
    return regions


def region_score_lists(masks: np.ndarray, maps: np.ndarray) -> list[np.ndarray]:
    out = []
    for mask, amap in zip(masks, maps, strict=True):
        for pixels in flood_fill_regions(mask):
            out.append(np.array([amap[p] for p in pixels]))
    return out


def clipped_area(points: list[tuple[float, float]], limit: float) -> float:
    """Area under a polyline (x non-decreasing) up to `limit`, segment by segment."""
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 >= limit:
            break
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_lim) / 2
    return area


def brute_force_aupro(masks: np.ndarray, maps: np.ndarray, limit: float) -> float:
    """Every distinct threshold, FPR and per-region overlap recomputed from scratch."""
    regions = region_score_lists(masks, maps)
    ok = maps[masks == 0]
    points = [(0.0, 0.0)]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        fpr = float(np.mean(ok >= t))
        pro = float(np.mean([np.mean(r >= t) for r in regions]))
        points.append((fpr, pro))
    points.append((1.0, 1.0))
    return clipped_area(points, limit) / limit


def transcribed_reference_aupro(masks: np.ndarray, maps: np.ndarray, limit: float) -> float:
    """Notes §6 literally: loops over the 100 positions, then an insert-and-correct trapezoid."""
    regions = region_score_lists(masks, maps)
    ok = np.sort(maps[masks == 0])
    n_ok = len(ok)
    fprs, pros = [1.0], [1.0]
    for pos in np.linspace(0, n_ok - 1, num=100).astype(int):
        t = ok[pos]
        fprs.append(1.0 - (pos + 1) / n_ok)
        pros.append(sum(np.mean(r > t) for r in regions) / len(regions))
    idx = sorted(range(len(fprs)), key=lambda i: fprs[i])
    x = [fprs[i] for i in idx]
    y = [pros[i] for i in idx]
    correction = 0.0
    if limit not in x:
        ins = bisect.bisect_left(x, limit)
        y_lim = y[ins - 1] + (y[ins] - y[ins - 1]) * (limit - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_lim + y[ins - 1]) * (limit - x[ins - 1])
    keep = [i for i in range(len(x)) if x[i] <= limit]
    area = sum(0.5 * (y[i] + y[i + 1]) * (x[i + 1] - x[i]) for i in keep[:-1])
    return (area + correction) / limit


# ---------------------------------------------------------------- small random inputs


def random_case(seed: int, n: int = 3, h: int = 12, w: int = 14, levels: int = 0):
    """Masks with several blobs per image; maps correlated with them, optionally quantised."""
    rng = np.random.default_rng(seed)
    masks = (rng.random((n, h, w)) < 0.12).astype(np.uint8)
    masks[0] = 0  # one good image
    maps = rng.normal(size=(n, h, w)) + 1.2 * masks
    if levels:
        maps = np.round(maps * levels / 4) / levels  # many ties, across OK and defect pixels
    return masks, maps.astype(np.float32)


@pytest.mark.parametrize("seed", range(5))
def test_image_auroc_matches_sklearn_and_pairwise(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 40)
    scores = rng.integers(0, 6, 40).astype(np.float32)  # heavy ties
    got = metrics.image_auroc(labels, scores)
    assert got == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert got == pytest.approx(pairwise_auroc(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_pixel_auroc_matches_sklearn(seed):
    masks, maps = random_case(seed, levels=3 + seed)
    got = metrics.pixel_auroc(masks, maps)
    assert got == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert got == pytest.approx(pairwise_auroc(masks.ravel(), maps.ravel()), abs=1e-12)


def test_roc_curve_points_match_sklearn():
    masks, maps = random_case(7, levels=5)
    fpr, tpr, thr = metrics.roc_curve_points(masks, maps)
    ref_fpr, ref_tpr, ref_thr = roc_curve(masks.ravel(), maps.ravel(), drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-12)
    np.testing.assert_array_equal(thr[1:], ref_thr[1:])
    assert thr[0] == np.inf


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("levels", [0, 4])
def test_exact_aupro_matches_brute_force(seed, levels):
    masks, maps = random_case(seed, levels=levels)
    for limit in (0.3, 0.01, 1.0):
        assert metrics.aupro(masks, maps, limit) == pytest.approx(
            brute_force_aupro(masks, maps, limit), abs=1e-12
        )


def test_exact_aupro_hand_computed_with_ties():
    # Region {0.5, 0.2}; OK pixels {0.5, 0.1}. Curve (0,0) (.5,.5) (.5,1) (1,1).
    masks = np.array([[[1, 1], [0, 0]]], np.uint8)
    maps = np.array([[[0.5, 0.2], [0.5, 0.1]]], np.float32)
    assert metrics.aupro(masks, maps, 0.3) == pytest.approx(0.15)  # 0.5 * 0.3 * 0.3 / 0.3
    assert metrics.aupro(masks, maps, 1.0) == pytest.approx(0.625)
    fpr, pro, _ = metrics.pro_curve_points(masks, maps)
    np.testing.assert_allclose(fpr, [0, 0.5, 0.5, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 1, 1])


def test_single_region_and_diagonal_connectivity():
    masks = np.zeros((2, 8, 8), np.uint8)
    # Touching only diagonally: one region of 3 pixels under 8-connectivity, but {(1,1)} and
    # {(2,2),(2,3)} under 4-connectivity.
    masks[0, 1, 1] = masks[0, 2, 2] = masks[0, 2, 3] = 1
    maps = np.zeros((2, 8, 8), np.float32)
    maps[0, 1, 1] = 3.0
    maps[1] = np.linspace(0, 1, 64).reshape(8, 8)
    _, pro, _ = metrics.pro_curve_points(masks, maps)
    assert pro[1] == pytest.approx(1 / 3)  # 4-connectivity would give mean(1, 0) = 1/2
    for limit in (0.3, 0.01):
        assert metrics.aupro(masks, maps, limit) == pytest.approx(
            brute_force_aupro(masks, maps, limit), abs=1e-12
        )
    # Equal weight per region: a big and a small region, only the small one detected.
    big_small = np.zeros((1, 10, 10), np.uint8)
    big_small[0, :5, :5] = 1
    big_small[0, 8, 8] = 1
    m2 = np.zeros((1, 10, 10), np.float32)
    m2[0, 8, 8] = 1.0
    fpr2, pro2, _ = metrics.pro_curve_points(big_small, m2)
    assert (fpr2[1], pro2[1]) == pytest.approx((0.0, 0.5))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("levels", [0, 3])
def test_reference_aupro_matches_transcription(seed, levels):
    masks, maps = random_case(seed, n=4, h=16, w=16, levels=levels)
    for limit in (0.3, 0.01):
        assert metrics.aupro_reference(masks, maps, limit) == pytest.approx(
            transcribed_reference_aupro(masks, maps, limit), abs=1e-12
        )


def test_reference_aupro_with_fewer_ok_pixels_than_thresholds():
    # N_ok < 100: int-cast linspace repeats positions.
    masks = np.ones((1, 9, 9), np.uint8)
    masks[0, 0, :] = 0
    masks[0, 4, :] = 0
    masks[0, 8, :] = 0
    maps = np.random.default_rng(0).random((1, 9, 9)).astype(np.float32)
    assert metrics.aupro_reference(masks, maps, 0.3) == pytest.approx(
        transcribed_reference_aupro(masks, maps, 0.3), abs=1e-12
    )


def test_reference_underestimates_exact_at_small_limit():
    masks, maps = random_case(11, n=4, h=40, w=40)
    exact = metrics.aupro(masks, maps, 0.01)
    ref = metrics.aupro_reference(masks, maps, 0.01)
    assert ref < exact


def test_perfect_and_inverted_maps():
    masks, _ = random_case(3)
    perfect = masks.astype(np.float32) + 0.01 * np.random.default_rng(0).random(masks.shape)
    assert metrics.pixel_auroc(masks, perfect) == 1.0
    assert metrics.aupro(masks, perfect, 0.3) == pytest.approx(1.0)
    assert metrics.aupro(masks, perfect, 0.01) == pytest.approx(1.0)
    assert metrics.pixel_auroc(masks, -perfect) == 0.0
    assert metrics.aupro(masks, -perfect, 0.3) == 0.0


def test_evaluate_class_bundles_the_metrics():
    masks, maps = random_case(5, n=5)
    labels = masks.reshape(5, -1).any(axis=1).astype(int)
    scores = maps.reshape(5, -1).max(axis=1)
    for method, fn in (("exact", metrics.aupro), ("reference", metrics.aupro_reference)):
        got = metrics.evaluate_class(labels, scores, masks, maps, aupro_method=method)
        assert got.i_auroc == pytest.approx(roc_auc_score(labels, scores))
        assert got.p_auroc == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
        assert got.aupro_30 == pytest.approx(fn(masks, maps, 0.3))
        assert got.aupro_01 == pytest.approx(fn(masks, maps, 0.01))
        assert (got.n_good, got.n_defect) == (1, 4)
        assert got.notes == []
        assert got.aupro_method == method
        assert set(got.values()) == {"i_auroc", "p_auroc", "aupro_30", "aupro_01"}


def test_undefined_metrics_are_nan_with_a_note():
    masks = np.zeros((3, 6, 6), np.uint8)
    maps = np.random.default_rng(0).random((3, 6, 6))
    got = metrics.evaluate_class([0, 0, 0], [0.1, 0.2, 0.3], masks, maps)
    assert math.isnan(got.i_auroc) and math.isnan(got.p_auroc)
    assert math.isnan(got.aupro_30) and math.isnan(got.aupro_01)
    assert "I-AUROC undefined: the test split has no defective sample" in got.notes
    assert any("no defect pixel" in n for n in got.notes)
    masks[:, 2, 2] = 1
    got = metrics.evaluate_class([1, 1, 1], [0.1, 0.2, 0.3], masks, maps)
    assert math.isnan(got.i_auroc) and not math.isnan(got.aupro_30)
    assert "I-AUROC undefined: the test split has no good sample" in got.notes
    assert math.isnan(metrics.image_auroc([1, 1], [0.1, 0.2]))


def test_defect_image_with_empty_mask_is_noted():
    masks = np.zeros((2, 6, 6), np.uint8)
    maps = np.random.default_rng(0).random((2, 6, 6))
    got = metrics.evaluate_class([0, 1], [0.1, 0.2], masks, maps)
    assert any("[1] have empty masks" in n for n in got.notes)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: metrics.image_auroc([0, 1], [0.1]), "labels has shape"),
        (lambda: metrics.image_auroc([0, 2], [0.1, 0.2]), "must be binary"),
        (lambda: metrics.image_auroc([0, 1], [0.1, np.nan]), "non-finite"),
        (lambda: metrics.pixel_auroc(np.zeros((4, 4)), np.zeros((4, 4))), "3 dimensions"),
        (lambda: metrics.aupro(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), 0.0), "fpr_limit"),
        (
            lambda: metrics.evaluate_class([0], [0.1], np.ones((1, 2, 2)), np.zeros((1, 2, 2))),
            "labelled good",
        ),
        (
            lambda: metrics.evaluate_class(
                [0, 1], [0.1, 0.2], np.ones((1, 2, 2)), np.ones((1, 2, 2))
            ),
            "labels has 2 images",
        ),
        (
            lambda: metrics.evaluate_class(
                [0], [0.1], np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), "x"
            ),
            "aupro_method",
        ),
        (lambda: metrics.pro_curve_points(np.zeros((1, 3, 3)), np.zeros((1, 3, 3))), "region"),
    ],
)
def test_bad_input_raises(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_real_cable_gland_masks():
    if not SAMPLE.is_dir():
        pytest.skip(f"{SAMPLE} not present")
    gt_files = sorted((SAMPLE / "cable_gland/test").glob("*/gt/*.png"))
    if not gt_files:
        pytest.skip(f"no gt masks under {SAMPLE}")
    # Every 8th pixel keeps the real region shapes at 50x50, small enough for brute force.
    masks = np.stack([np.array(Image.open(f))[::8, ::8] > 0 for f in gt_files]).astype(np.uint8)
    labels = masks.reshape(len(masks), -1).any(axis=1).astype(int)
    assert labels.sum() >= 1 and (labels == 0).sum() >= 1
    rng = np.random.default_rng(0)
    maps = np.round((masks + rng.normal(0, 0.8, masks.shape)) * 6) / 6  # ~40 distinct levels
    scores = maps.reshape(len(maps), -1).max(axis=1)
    got = metrics.evaluate_class(labels, scores, masks, maps)
    assert got.p_auroc == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert got.aupro_30 == pytest.approx(brute_force_aupro(masks, maps, 0.3), abs=1e-12)
    assert got.aupro_01 == pytest.approx(brute_force_aupro(masks, maps, 0.01), abs=1e-12)
    ref = metrics.aupro_reference(masks, maps, 0.3)
    assert ref == pytest.approx(transcribed_reference_aupro(masks, maps, 0.3), abs=1e-12)
