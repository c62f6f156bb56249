"""Fusion and threshold helpers against direct numpy / sklearn computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.linear_model import SGDOneClassSVM
from sklearn.metrics import f1_score, precision_score, recall_score

from lsfa_jax import fusion


def normal_scores(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"rgb": rng.normal(0.4, 0.05, 50), "xyz": rng.normal(20.0, 3.0, 50)}


def test_zscore_fusion_is_mean_of_standardised_scores():
    train = normal_scores()
    norm = fusion.fit_normaliser(train)
    assert norm["rgb"].loc == pytest.approx(np.mean(train["rgb"]))
    assert norm["xyz"].scale == pytest.approx(np.std(train["xyz"]))
    rng = np.random.default_rng(1)
    test = {"rgb": rng.normal(0.5, 0.1, 7), "xyz": rng.normal(25.0, 5.0, 7)}
    expected = (
        (test["rgb"] - train["rgb"].mean()) / train["rgb"].std()
        + (test["xyz"] - train["xyz"].mean()) / train["xyz"].std()
    ) / 2
    np.testing.assert_allclose(fusion.fuse_scores(test, norm), expected, rtol=1e-12)


def test_minmax_fusion():
    train = normal_scores(2)
    norm = fusion.fit_normaliser(train, method="minmax")
    test = {"rgb": np.array([0.3, 0.6]), "xyz": np.array([10.0, 30.0])}
    span = {m: train[m].max() - train[m].min() for m in train}
    expected = np.mean([(test[m] - train[m].min()) / span[m] for m in ("rgb", "xyz")], axis=0)
    np.testing.assert_allclose(fusion.fuse_scores(test, norm), expected, rtol=1e-12)
    # The normal training scores span exactly [0, 1] per modality.
    scaled = norm["xyz"](train["xyz"])
    assert (scaled.min(), scaled.max()) == (0.0, 1.0)


def test_map_normaliser_uses_all_pixels_when_few_and_a_subsample_otherwise():
    rng = np.random.default_rng(3)
    maps = {"rgb": rng.gamma(2.0, 1.0, (4, 16, 16)), "xyz": rng.normal(5, 2, (4, 16, 16))}
    full = fusion.fit_map_normaliser(maps)
    assert full["rgb"].loc == pytest.approx(maps["rgb"].mean())
    assert full["rgb"].scale == pytest.approx(maps["rgb"].std())
    assert full["rgb"].n_fit == maps["rgb"].size
    sub = fusion.fit_map_normaliser(maps, max_pixels=500, seed=1)
    assert sub["rgb"].n_fit == 500
    assert sub["rgb"].loc != full["rgb"].loc
    assert sub["rgb"].loc == pytest.approx(full["rgb"].loc, abs=0.2)
    again = fusion.fit_map_normaliser(maps, max_pixels=500, seed=1)
    assert again == sub
    fused = fusion.fuse_maps(maps, full)
    expected = np.mean([(maps[m] - maps[m].mean()) / maps[m].std() for m in maps], axis=0)
    np.testing.assert_allclose(fused, expected, rtol=1e-10, atol=1e-12)
    assert fused.shape == (4, 16, 16)


def test_fusion_input_errors():
    norm = fusion.fit_normaliser(normal_scores())
    with pytest.raises(ValueError, match="do not match"):
        fusion.fuse_scores({"rgb": np.zeros(3)}, norm)
    with pytest.raises(ValueError, match="shapes differ"):
        fusion.fuse_scores({"rgb": np.zeros(3), "xyz": np.zeros(4)}, norm)
    with pytest.raises(ValueError, match="non-finite"):
        fusion.fuse_scores({"rgb": np.array([np.nan]), "xyz": np.zeros(1)}, norm)
    with pytest.raises(ValueError, match="constant"):
        fusion.fit_normaliser({"rgb": np.ones(5)})
    with pytest.raises(ValueError, match="method"):
        fusion.fit_normaliser(normal_scores(), method="rank")
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        fusion.fit_map_normaliser({"rgb": np.zeros((4, 4))})
    with pytest.raises(ValueError, match="3-D"):
        fusion.fuse_maps({"rgb": np.zeros(3), "xyz": np.zeros(3)}, norm)


def test_ocsvm_fuser_is_the_reference_setup():
    rng = np.random.default_rng(4)
    xyz, rgb = rng.gamma(3.0, 1.0, (6, 5, 5)), rng.gamma(3.0, 4.0, (6, 5, 5))
    vectors = fusion.fusion_vectors(xyz, rgb)
    np.testing.assert_array_equal(vectors[:, 0], xyz.ravel())
    np.testing.assert_allclose(vectors[:, 1], 0.1 * rgb.ravel())
    fuser = fusion.fit_ocsvm_fuser(vectors)
    direct = SGDOneClassSVM(random_state=42).fit(np.stack([xyz.ravel(), 0.1 * rgb.ravel()], 1))
    np.testing.assert_allclose(fuser.coef_, direct.coef_)
    fused = fusion.ocsvm_fuse(fuser, xyz, rgb)
    assert fused.shape == xyz.shape
    # score_samples is the linear combination with no intercept (notes §5.6).
    np.testing.assert_allclose(fused, xyz * fuser.coef_[0] + 0.1 * rgb * fuser.coef_[1])
    with pytest.raises(ValueError, match=r"\(M, 2\)"):
        fusion.fit_ocsvm_fuser(np.zeros((5, 3)))


@pytest.mark.parametrize("q", [0.5, 0.9, 0.99, 1.0])
def test_quantile_threshold(q):
    s = normal_scores()["xyz"]
    assert fusion.calibrate_threshold(s, quantile=q) == np.quantile(s, q)


@pytest.mark.parametrize("f", [0.0, 0.01, 0.05, 0.1, 0.33])
@pytest.mark.parametrize("ties", [False, True])
def test_target_fpr_threshold_is_the_smallest_meeting_the_target(f, ties):
    s = np.random.default_rng(5).normal(size=60)
    if ties:
        s = np.round(s * 2) / 2
    t = fusion.calibrate_threshold(s, target_fpr=f)
    assert np.mean(s > t) <= f
    candidates = [c for c in np.unique(s) if np.mean(s > c) <= f]
    assert t == min(candidates)


def test_precision_recall_matches_sklearn():
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 2, 80)
    scores = rng.normal(size=80) + labels
    for t in (-0.5, 0.3, 1.0):
        got = fusion.precision_recall_at(t, labels, scores)
        pred = (scores > t).astype(int)
        assert got.precision == pytest.approx(precision_score(labels, pred))
        assert got.recall == pytest.approx(recall_score(labels, pred))
        assert got.f1 == pytest.approx(f1_score(labels, pred))
        assert got.fpr == pytest.approx(np.mean(pred[labels == 0]))
        assert got.tp + got.fp + got.tn + got.fn == 80
        assert got.notes == []
    # A score equal to the threshold is not flagged.
    at = fusion.precision_recall_at(1.0, np.array([1, 0]), np.array([1.0, 0.0]))
    assert (at.tp, at.fn) == (0, 1)


def test_precision_recall_undefined_cases_are_noted():
    got = fusion.precision_recall_at(10.0, np.array([0, 0]), np.array([0.1, 0.2]))
    assert math.isnan(got.precision) and math.isnan(got.recall) and math.isnan(got.f1)
    assert got.fpr == 0.0
    assert "precision undefined: no sample is above the threshold" in got.notes
    assert "recall undefined: no defective sample" in got.notes
    with pytest.raises(ValueError, match="0/1"):
        fusion.precision_recall_at(0.0, np.array([2, 0]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="target_fpr"):
        fusion.calibrate_threshold(np.arange(5.0), target_fpr=1.0)
