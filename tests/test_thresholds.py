"""Threshold rules (fusion.choose_threshold, f1_optimal_threshold) against brute force, and
undefined values written as null / n/a, never NaN."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import f1_score

from lsfa_jax import fusion
from lsfa_jax.atomic_io import atomic_write_json
from lsfa_jax.reports import tables


def brute_force_best_f1(labels: np.ndarray, scores: np.ndarray) -> float:
    """The best F1 of `scores > t` over every t that changes the decision (sklearn's F1)."""
    values = np.unique(scores)
    candidates = np.r_[values[0] - 1.0, values]
    return max(f1_score(labels, scores > t, zero_division=0.0) for t in candidates)


@pytest.mark.parametrize("seed", range(8))
def test_f1_optimal_threshold_reaches_the_brute_force_best(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    # Rounded scores: ties between normal and anomalous entries must be handled.
    scores = np.round(rng.normal(labels * rng.uniform(0, 2), 1.0), 1)
    t = fusion.f1_optimal_threshold(labels, scores)
    best = brute_force_best_f1(labels, scores)
    assert f1_score(labels, scores > t) == pytest.approx(best, abs=1e-12)
    # The highest threshold of that F1: no higher cut (at the next score) does as well.
    higher = scores[scores > t]
    if higher.size:
        assert f1_score(labels, scores > higher.min(), zero_division=0.0) < best - 1e-12


def test_f1_optimal_threshold_on_pixels_and_edge_cases() -> None:
    masks = np.zeros((2, 4, 4), np.uint8)
    masks[0, :2, :2] = 1
    maps = masks * 3.0 + 0.5
    maps[1, 0, 0] = 2.0  # one normal pixel scored between
    t = fusion.f1_optimal_threshold(masks, maps)
    assert 2.0 <= t < 3.5 and t == pytest.approx(2.75)
    everything = fusion.f1_optimal_threshold(np.array([1, 1, 0]), np.array([5.0, 5.0, 5.0]))
    assert np.all(np.array([5.0, 5.0, 5.0]) > everything)  # all tied: flag all (F1 0.8)
    with pytest.raises(ValueError, match="both normal and anomalous"):
        fusion.f1_optimal_threshold(np.zeros(3), np.arange(3.0))


def test_choose_threshold_rules() -> None:
    normal = np.arange(100.0)
    labels = np.r_[np.zeros(10), np.ones(5)]
    scores = np.r_[np.arange(10.0), 20 + np.arange(5.0)]
    auto = fusion.choose_threshold("auto", normal, labels=labels, scores=scores)
    assert auto.rule == "f1" and 9.0 < auto.value < 20.0
    assert "15 validation samples (5 anomalous)" in auto.description
    fallback = fusion.choose_threshold("auto", normal, labels=np.zeros(4), scores=np.arange(4.0))
    assert fallback.rule == "quantile" and fallback.value == np.quantile(normal, 0.99)
    fpr = fusion.choose_threshold("fpr", normal, target_fpr=0.05)
    assert np.mean(normal > fpr.value) <= 0.05 and np.mean(normal >= fpr.value) > 0.05
    manual = fusion.choose_threshold("manual", normal, value=1.5)
    assert (manual.value, manual.rule) == (1.5, "manual")
    with pytest.raises(ValueError, match="needs validation samples with anomalies"):
        fusion.choose_threshold("f1", normal)
    with pytest.raises(ValueError, match="manual needs a finite value"):
        fusion.choose_threshold("manual", normal)
    with pytest.raises(ValueError, match="not in"):
        fusion.choose_threshold("best", normal)


def _strict(text: str):
    def reject(name: str):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=reject)


def test_json_holds_null_for_undefined_values(tmp_path) -> None:
    path = atomic_write_json(
        tmp_path / "a.json", {"x": math.nan, "y": [np.float32("inf"), np.float64(2.5)], "z": 1}
    )
    assert _strict(path.read_text()) == {"x": None, "y": [None, 2.5], "z": 1}


def test_threshold_table_shows_na_and_the_rule(tmp_path) -> None:
    stats = fusion.precision_recall_at(5.0, np.array([0, 1]), np.array([0.0, 1.0]))
    assert math.isnan(stats.precision)  # nothing flagged
    paths = tables.write_threshold_table(
        {
            "3D": {
                "box": {
                    "threshold": 5.0,
                    "precision": stats.precision,
                    "recall": stats.recall,
                    "rule": "0.99 quantile of 4 normal validation samples",
                }
            }
        },
        tmp_path,
    )
    md = paths["md"].read_text()
    assert "nan" not in md.lower() and "| box | 5 | n/a | 0.000 | 0.99 quantile" in md
    doc = _strict(paths["json"].read_text())
    assert doc["settings"]["3D"]["box"]["precision"] is None
    assert doc["settings"]["3D"]["box"]["rule"].startswith("0.99 quantile")
    assert "nan" not in paths["csv"].read_text().lower()
