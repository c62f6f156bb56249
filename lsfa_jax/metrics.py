"""Anomaly-detection metrics on the host: I-AUROC, P-AUROC and AUPRO (exact and reference).

Conventions: label/mask 1 = defect (positive), 0 = good; a higher score means more anomalous.
All metrics sort the scores once and treat tied scores as one threshold step, so ties count
half in AUROC (sklearn's trapezoid / average-rank rule).

AUPRO comes in two flavours (docs/method.md#metrics):
- `aupro`: the exact integral of the PRO curve over every distinct threshold (score >= t).
- `aupro_reference`: the reference code's estimator (100 index-spaced thresholds over the sorted
  OK scores, strict '>'), for parity with published tables. It underestimates the exact value,
  by a lot at small FPR limits.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

# 8-connectivity inside each image, no connectivity across images of the (N, H, W) stack.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True

_REFERENCE_NUM_THRESHOLDS = 100


def _check_binary(name: str, where: str, x: np.ndarray) -> np.ndarray:
    if x.dtype == bool:
        return x
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"{where}: {name} has dtype {x.dtype}; expected bool or numeric 0/1")
    bad = (x != 0) & (x != 1)
    if bad.any():
        raise ValueError(
            f"{where}: {name} must be binary (0/1); found {int(bad.sum())} other values, "
            f"e.g. {x[bad].ravel()[0]!r}"
        )
    return x != 0


def _check_scores(name: str, where: str, x: np.ndarray) -> np.ndarray:
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"{where}: {name} has dtype {x.dtype}; expected a numeric array")
    finite = np.isfinite(x)
    if not finite.all():
        raise ValueError(
            f"{where}: {name} has {int((~finite).sum())} non-finite values (nan or inf)"
        )
    return x


def _validate_pair(
    where: str,
    truth_name: str,
    truth: ArrayLike,
    score_name: str,
    scores: ArrayLike,
    ndim: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    truth = np.asarray(truth)
    scores = np.asarray(scores)
    if truth.shape != scores.shape:
        raise ValueError(
            f"{where}: {truth_name} has shape {truth.shape} but {score_name} has {scores.shape}"
        )
    if ndim is not None and truth.ndim != ndim:
        raise ValueError(
            f"{where}: {truth_name} must have {ndim} dimensions; got shape {truth.shape}"
        )
    if truth.size == 0:
        raise ValueError(f"{where}: {truth_name} is empty")
    return _check_binary(truth_name, where, truth), _check_scores(score_name, where, scores)


@dataclasses.dataclass(frozen=True)
class _SortedScores:
    """Scores sorted once in descending order, grouped into runs of equal score.

    order: (M,) indices into the flat scores, descending score.
    group_end: (G,) exclusive end (in `order`) of each run of tied scores.
    thresholds: (G,) the score of each run, strictly decreasing.
    """

    order: np.ndarray
    group_end: np.ndarray
    thresholds: np.ndarray


def _sort_scores(scores: np.ndarray) -> _SortedScores:
    flat = scores.ravel()
    order = np.argsort(flat)[::-1]
    ordered = flat[order]
    group_end = np.append(np.flatnonzero(ordered[1:] != ordered[:-1]) + 1, ordered.size)
    return _SortedScores(order=order, group_end=group_end, thresholds=ordered[group_end - 1])


def _cumulative_at_groups(values: np.ndarray, sorted_scores: _SortedScores) -> np.ndarray:
    """(G,) running sum of `values` (flat, in score order) at the end of each tie group."""
    return np.cumsum(values.ravel()[sorted_scores.order])[sorted_scores.group_end - 1]


def _roc_counts(
    positive: np.ndarray, sorted_scores: _SortedScores
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Integer (tp, fp) counts per threshold (score >= t), plus totals (P, N)."""
    tp = _cumulative_at_groups(positive.astype(np.int64), sorted_scores)
    fp = sorted_scores.group_end.astype(np.int64) - tp
    return tp, fp, int(tp[-1]), int(fp[-1])


def _auroc_from_sorted(positive: np.ndarray, sorted_scores: _SortedScores) -> float:
    tp, fp, n_pos, n_neg = _roc_counts(positive, sorted_scores)
    if n_pos == 0 or n_neg == 0:
        return math.nan
    tp = np.concatenate([[0], tp])
    fp = np.concatenate([[0], fp])
    # Trapezoid in integer units: twice the area is sum dFP * (TP_prev + TP_next); exact in int64
    # for any realistic pixel count (< 3e9 pixels).
    twice_area = int(np.sum(np.diff(fp) * (tp[1:] + tp[:-1])))
    return twice_area / (2.0 * n_pos * n_neg)


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Exact I-AUROC. labels: (N,) 0/1 (1 = defect); scores: (N,) finite.

    Returns nan when the split has no defective or no good sample (see `evaluate_class`).
    """
    labels, scores = _validate_pair("metrics.image_auroc", "labels", labels, "scores", scores, 1)
    return _auroc_from_sorted(labels, _sort_scores(scores))


def pixel_auroc(masks: ArrayLike, maps: ArrayLike) -> float:
    """Exact P-AUROC over every pixel of every image. masks: (N, H, W) 0/1; maps: (N, H, W).

    Returns nan when there is no defect pixel or no good pixel.
    """
    masks, maps = _validate_pair("metrics.pixel_auroc", "masks", masks, "maps", maps, 3)
    return _auroc_from_sorted(masks, _sort_scores(maps))


def roc_curve_points(
    labels: ArrayLike, scores: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve at every distinct threshold (positive iff score >= threshold).

    labels, scores: equal shapes (e.g. (N,) image level or (N, H, W) pixel level).
    Returns (fpr, tpr, thresholds), each (G + 1,), starting at (0, 0) with threshold +inf and
    ending at (1, 1). Raises ValueError when either class is absent (the curve is undefined).
    """
    where = "metrics.roc_curve_points"
    labels, scores = _validate_pair(where, "labels", labels, "scores", scores, None)
    sorted_scores = _sort_scores(scores)
    tp, fp, n_pos, n_neg = _roc_counts(labels, sorted_scores)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"{where}: need both classes; got {n_pos} positive, {n_neg} negative")
    fpr = np.concatenate([[0.0], fp / n_neg])
    tpr = np.concatenate([[0.0], tp / n_pos])
    thresholds = np.concatenate([[np.inf], sorted_scores.thresholds.astype(np.float64)])
    return fpr, tpr, thresholds


def _label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """(N, H, W) int32 region ids (0 = OK pixel), ids unique across images; region count."""
    regions, n_regions = ndimage.label(masks, structure=_REGION_STRUCTURE)
    return regions, int(n_regions)


def _exact_pro_curve(
    regions: np.ndarray, n_regions: int, sorted_scores: _SortedScores
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact PRO curve, (G + 1,) arrays (fpr, pro, thresholds) from (0, 0, +inf) to (1, 1)."""
    region_size = np.bincount(regions.ravel(), minlength=n_regions + 1).astype(np.float64)
    # Each region pixel adds 1/|region| to its region's overlap; the mean over regions is the
    # running sum divided by the region count.
    weight = np.zeros(n_regions + 1)
    weight[1:] = 1.0 / region_size[1:]
    fp = _cumulative_at_groups((regions == 0).astype(np.int64), sorted_scores)
    overlap = _cumulative_at_groups(weight[regions], sorted_scores)
    fpr = np.concatenate([[0.0], fp / fp[-1]])
    pro = np.concatenate([[0.0], np.minimum(overlap / n_regions, 1.0)])
    # At the lowest threshold every pixel is positive: PRO is exactly 1 (the sum of the weights
    # only rounds to it).
    pro[-1] = 1.0
    thresholds = np.concatenate([[np.inf], sorted_scores.thresholds.astype(np.float64)])
    return fpr, pro, thresholds


def _check_fpr_limit(where: str, fpr_limit: float) -> float:
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"{where}: fpr_limit must be in (0, 1]; got {fpr_limit}")
    return fpr_limit


def _area_to_limit(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under the polyline (x ascending) on [x[0], limit], y linearly
    interpolated at `limit` inside the segment that crosses it."""
    x0, x1, y0, y1 = x[:-1], x[1:], y[:-1], y[1:]
    end = np.minimum(x1, limit)
    use = x0 < limit
    width = np.where(use, end - x0, 0.0)
    slope = np.divide(y1 - y0, x1 - x0, out=np.zeros_like(y0), where=x1 > x0)
    y_end = np.where(x1 > limit, y0 + slope * (end - x0), y1)
    return float(np.sum(width * (y0 + y_end)) / 2.0)


def _pro_inputs(
    where: str, masks: ArrayLike, maps: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    masks, maps = _validate_pair(where, "masks", masks, "maps", maps, 3)
    regions, n_regions = _label_regions(masks)
    return masks, maps, regions, n_regions


def pro_curve_points(
    masks: ArrayLike, maps: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact PRO curve. masks: (N, H, W) 0/1; maps: (N, H, W) finite.

    Regions are the 8-connected components of each mask; FPR is over all OK pixels of all
    images; PRO is the mean over all regions (equal weight) of the fraction of the region's
    pixels with score >= threshold. Returns (fpr, pro, thresholds), each (G + 1,), from
    (0, 0, +inf) to (1, 1). Raises ValueError when there is no region or no OK pixel.
    """
    where = "metrics.pro_curve_points"
    masks, maps, regions, n_regions = _pro_inputs(where, masks, maps)
    if n_regions == 0 or masks.all():
        raise ValueError(f"{where}: need at least one defect region and one OK pixel")
    return _exact_pro_curve(regions, n_regions, _sort_scores(maps))


def _aupro_exact_sorted(
    regions: np.ndarray, n_regions: int, sorted_scores: _SortedScores, limits: tuple[float, ...]
) -> list[float]:
    if n_regions == 0 or not (regions == 0).any():
        return [math.nan] * len(limits)
    fpr, pro, _ = _exact_pro_curve(regions, n_regions, sorted_scores)
    return [_area_to_limit(fpr, pro, limit) / limit for limit in limits]


def aupro(masks: ArrayLike, maps: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Exact normalised area under the PRO curve up to `fpr_limit` (see `pro_curve_points`).

    masks: (N, H, W) 0/1; maps: (N, H, W). Returns a value in [0, 1]; nan when there is no
    defect region or no OK pixel.
    """
    where = "metrics.aupro"
    fpr_limit = _check_fpr_limit(where, fpr_limit)
    _, maps, regions, n_regions = _pro_inputs(where, masks, maps)
    return _aupro_exact_sorted(regions, n_regions, _sort_scores(maps), (fpr_limit,))[0]


def _reference_pro_curve(
    regions: np.ndarray, n_regions: int, maps: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The reference estimator's curve (x ascending): (101,) fpr and pro, (1, 1) included."""
    ok_sorted = np.sort(maps[regions == 0])
    n_ok = ok_sorted.size
    positions = np.linspace(0, n_ok - 1, _REFERENCE_NUM_THRESHOLDS).astype(np.int64)
    thresholds = ok_sorted[positions]  # non-decreasing
    fpr = 1.0 - (positions + 1) / n_ok
    # For each region pixel, k = number of thresholds strictly below its score: it counts as
    # detected ('>') for threshold indices j < k. A (region, k) histogram with a reverse cumsum
    # over k then gives every region's detected-pixel count at every threshold.
    in_region = regions > 0
    region_id = regions[in_region] - 1
    k = np.searchsorted(thresholds, maps[in_region], side="left")
    n_t = _REFERENCE_NUM_THRESHOLDS
    hist = np.bincount(region_id * (n_t + 1) + k, minlength=n_regions * (n_t + 1))
    hist = hist.reshape(n_regions, n_t + 1)
    detected = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]  # (R, T): count with k > j
    region_size = hist.sum(axis=1, keepdims=True)
    pro = np.mean(detected / region_size, axis=0)
    fpr = np.concatenate([[1.0], fpr])
    pro = np.concatenate([[1.0], pro])
    ascending = np.argsort(fpr, kind="stable")
    return fpr[ascending], pro[ascending]


def _aupro_reference_labelled(
    regions: np.ndarray, n_regions: int, maps: np.ndarray, limits: tuple[float, ...]
) -> list[float]:
    if n_regions == 0 or not (regions == 0).any():
        return [math.nan] * len(limits)
    fpr, pro = _reference_pro_curve(regions, n_regions, maps)
    return [_area_to_limit(fpr, pro, limit) / limit for limit in limits]


def aupro_reference(masks: ArrayLike, maps: ArrayLike, fpr_limit: float = 0.3) -> float:
    """AUPRO as the reference code estimates it (docs/method.md#metrics), for parity with published
    tables.

    100 thresholds at positions linspace(0, N_ok - 1, 100) (cast to int) of the sorted OK
    scores; FPR = 1 - (pos + 1)/N_ok; PRO = mean over regions of the fraction of pixels with
    score > threshold; the point (1, 1) prepended; trapezoid to `fpr_limit` with linear
    interpolation there; divided by `fpr_limit`. masks, maps: (N, H, W). nan when there is no
    defect region or no OK pixel.
    """
    where = "metrics.aupro_reference"
    fpr_limit = _check_fpr_limit(where, fpr_limit)
    _, maps, regions, n_regions = _pro_inputs(where, masks, maps)
    return _aupro_reference_labelled(regions, n_regions, maps, (fpr_limit,))[0]


AUPRO_METHODS = ("exact", "reference")


@dataclasses.dataclass(frozen=True)
class ClassMetrics:
    """Metrics of one class's test split. A nan value always has a line in `notes` saying why.

    aupro_method: "exact" (`aupro`) or "reference" (`aupro_reference`), the estimator behind
    aupro_30 (FPR limit 0.3) and aupro_01 (FPR limit 0.01).
    """

    i_auroc: float
    p_auroc: float
    aupro_30: float
    aupro_01: float
    n_good: int
    n_defect: int
    notes: list[str]
    aupro_method: str = "exact"

    def values(self) -> dict[str, float]:
        """{"i_auroc", "p_auroc", "aupro_30", "aupro_01": float}, the keys `reports` uses."""
        return {
            "i_auroc": self.i_auroc,
            "p_auroc": self.p_auroc,
            "aupro_30": self.aupro_30,
            "aupro_01": self.aupro_01,
        }


def evaluate_class(
    labels: ArrayLike,
    scores: ArrayLike,
    masks: ArrayLike | None,
    maps: ArrayLike,
    aupro_method: str = "exact",
) -> ClassMetrics:
    """All metrics of one class. labels: (N,) 0/1; scores: (N,); masks, maps: (N, H, W).

    Sorts the pixels once for P-AUROC and exact AUPRO. A good image (label 0) must have an
    empty mask; a defective image with an empty mask is accepted and noted. `masks=None` (a
    dataset without ground-truth masks) gives the image metrics only; the pixel metrics are nan
    with a note saying why.
    """
    where = "metrics.evaluate_class"
    if aupro_method not in AUPRO_METHODS:
        raise ValueError(f"{where}: aupro_method {aupro_method!r} not in {AUPRO_METHODS}")
    labels, scores = _validate_pair(where, "labels", labels, "scores", scores, 1)
    if masks is None:
        return _image_metrics_only(labels, scores, aupro_method)
    masks, maps = _validate_pair(where, "masks", masks, "maps", maps, 3)
    if masks.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{where}: labels has {labels.shape[0]} images but masks has {masks.shape[0]}"
        )
    has_defect_pixels = masks.reshape(masks.shape[0], -1).any(axis=1)
    good_with_defect = np.flatnonzero(~labels & has_defect_pixels)
    if good_with_defect.size:
        raise ValueError(
            f"{where}: images {good_with_defect.tolist()} are labelled good but their masks "
            "have defect pixels"
        )
    n_defect = int(labels.sum())
    n_good = int(labels.size - n_defect)
    notes: list[str] = []
    empty_defects = np.flatnonzero(labels & ~has_defect_pixels)
    if empty_defects.size:
        notes.append(
            f"defective images {empty_defects.tolist()} have empty masks: they add no region "
            "and no positive pixel"
        )
    notes += _image_notes(n_good, n_defect)
    i_auroc = _auroc_from_sorted(labels, _sort_scores(scores))

    sorted_maps = _sort_scores(maps)
    n_defect_pixels = int(masks.sum())
    if n_defect_pixels == 0:
        notes.append("P-AUROC and AUPRO undefined: no defect pixel in any mask")
    elif n_defect_pixels == masks.size:
        notes.append("P-AUROC and AUPRO undefined: no good (OK) pixel in any mask")
    p_auroc = _auroc_from_sorted(masks, sorted_maps)
    regions, n_regions = _label_regions(masks)
    limits = (0.3, 0.01)
    if aupro_method == "exact":
        aupro_30, aupro_01 = _aupro_exact_sorted(regions, n_regions, sorted_maps, limits)
    else:
        aupro_30, aupro_01 = _aupro_reference_labelled(regions, n_regions, maps, limits)
    return ClassMetrics(
        i_auroc=i_auroc,
        p_auroc=p_auroc,
        aupro_30=aupro_30,
        aupro_01=aupro_01,
        n_good=n_good,
        n_defect=n_defect,
        notes=notes,
        aupro_method=aupro_method,
    )


def _image_notes(n_good: int, n_defect: int) -> list[str]:
    notes = []
    if n_defect == 0:
        notes.append("I-AUROC undefined: the test split has no defective sample")
    if n_good == 0:
        notes.append("I-AUROC undefined: the test split has no good sample")
    return notes


def _image_metrics_only(labels: np.ndarray, scores: np.ndarray, aupro_method: str) -> ClassMetrics:
    n_defect = int(labels.sum())
    n_good = int(labels.size - n_defect)
    notes = _image_notes(n_good, n_defect)
    notes.append("P-AUROC and AUPRO not computed: the dataset has no ground-truth masks")
    nan = float("nan")
    return ClassMetrics(
        i_auroc=_auroc_from_sorted(labels, _sort_scores(scores)),
        p_auroc=nan,
        aupro_30=nan,
        aupro_01=nan,
        n_good=n_good,
        n_defect=n_defect,
        notes=notes,
        aupro_method=aupro_method,
    )


def per_defect_metrics(
    defect_types: ArrayLike,
    labels: ArrayLike,
    scores: ArrayLike,
    masks: ArrayLike | None,
    maps: ArrayLike,
) -> dict[str, dict[str, float]]:
    """I-AUROC and AUPRO@0.3 of the good test samples against each defect type alone.

    defect_types, labels, scores: (N,); masks (or None: no AUPRO), maps: (N, H, W).
    Returns {defect type: {"i_auroc", "aupro_30", "n"}}; a type is left out when there is no
    good sample to compare with.
    """
    defect_types = np.asarray(defect_types)
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    maps = np.asarray(maps)
    out = {}
    for defect in sorted(set(defect_types[labels == 1].tolist())):
        keep = (labels == 0) | (defect_types == defect)
        if not np.any(labels[keep] == 0):
            continue
        out[defect] = {
            "i_auroc": image_auroc(labels[keep], scores[keep]),
            "aupro_30": float("nan") if masks is None else aupro(masks[keep], maps[keep], 0.3),
            "n": int(np.sum(defect_types == defect)),
        }
    return out
