"""Property-based checks of the metrics on random shapes and values (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from lsfa_jax import metrics

SETTINGS = settings(max_examples=50, deadline=None)


@st.composite
def labelled_scores(draw, min_size: int = 2, max_size: int = 60, distinct: bool = False):
    n = draw(st.integers(min_size, max_size))
    labels = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    assume(0 < labels.sum() < n)
    elements = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
    scores = np.array(
        draw(st.lists(elements, min_size=n, max_size=n, unique=distinct)), dtype=np.float64
    )
    return labels, scores


@st.composite
def masks_and_maps(draw):
    n = draw(st.integers(1, 3))
    h = draw(st.integers(2, 9))
    w = draw(st.integers(2, 9))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    density = draw(st.floats(0.05, 0.6))
    masks = (rng.random((n, h, w)) < density).astype(np.uint8)
    assume(0 < masks.sum() < masks.size)
    levels = draw(st.sampled_from([0, 2, 5]))  # 0 = continuous; otherwise many ties
    maps = rng.normal(size=(n, h, w)) + draw(st.floats(0, 3)) * masks
    if levels:
        maps = np.round(maps * levels) / levels
    return masks, maps


@SETTINGS
@given(labelled_scores())
def test_auroc_in_unit_interval_and_matches_sklearn(case):
    labels, scores = case
    got = metrics.image_auroc(labels, scores)
    assert 0.0 <= got <= 1.0
    assert got == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@SETTINGS
@given(labelled_scores(), st.sampled_from(["exp", "cube", "affine"]))
def test_auroc_invariant_to_strictly_increasing_transforms(case, transform):
    labels, scores = case
    # Map to a small range first so each transform stays strictly increasing in float64.
    x = scores / 1e3
    transformed = {"exp": np.exp(x), "cube": x**3 + x, "affine": 3.0 * x + 7.0}[transform]
    assume(np.array_equal(np.argsort(x, kind="stable"), np.argsort(transformed, kind="stable")))
    assume(len(np.unique(x)) == len(np.unique(transformed)))
    assert metrics.image_auroc(labels, transformed) == metrics.image_auroc(labels, scores)


@SETTINGS
@given(labelled_scores(distinct=True))
def test_auroc_of_negated_scores_is_complement(case):
    labels, scores = case
    assert metrics.image_auroc(labels, -scores) == pytest.approx(
        1.0 - metrics.image_auroc(labels, scores), abs=1e-12
    )


@SETTINGS
@given(masks_and_maps(), st.sampled_from([0.3, 0.01, 1.0]))
def test_aupro_in_unit_interval(case, limit):
    masks, maps = case
    for fn in (metrics.aupro, metrics.aupro_reference):
        got = fn(masks, maps, limit)
        assert 0.0 <= got <= 1.0 + 1e-12
    p = metrics.pixel_auroc(masks, maps)
    assert 0.0 <= p <= 1.0


@SETTINGS
@given(masks_and_maps())
def test_pro_curve_monotone_from_origin_to_one(case):
    masks, maps = case
    fpr, pro, thresholds = metrics.pro_curve_points(masks, maps)
    assert (fpr[0], pro[0]) == (0.0, 0.0) and (fpr[-1], pro[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-12)
    assert np.all(np.diff(thresholds) < 0)


@SETTINGS
@given(masks_and_maps(), st.floats(0.0, 1.0))
def test_perfect_maps_give_one(case, noise):
    masks, maps = case
    # Defect pixels all score above every OK pixel, whatever happens within each class.
    perfect = masks * 10.0 + noise * np.tanh(maps)
    assert metrics.pixel_auroc(masks, perfect) == 1.0
    for limit in (0.3, 0.01):
        assert metrics.aupro(masks, perfect, limit) == pytest.approx(1.0, abs=1e-12)
        assert metrics.aupro_reference(masks, perfect, limit) == pytest.approx(1.0, abs=1e-12)


@SETTINGS
@given(masks_and_maps())
def test_exact_aupro_invariant_to_increasing_transform(case):
    masks, maps = case
    assert metrics.aupro(masks, np.arctan(maps) * 2.0 + 1.0, 0.3) == pytest.approx(
        metrics.aupro(masks, maps, 0.3), abs=1e-12
    )
