"""Fusion objects: fitting, the stored record round trip, and rejection of bad records."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import SGDOneClassSVM

from lsfa_jax import fusion


def normal_data(seed: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    scores = {"rgb": rng.normal(0.4, 0.05, 12), "xyz": rng.normal(20.0, 3.0, 12)}
    maps = {"rgb": rng.gamma(2.0, 1.0, (3, 8, 8)), "xyz": rng.normal(5.0, 2.0, (3, 8, 8))}
    return scores, maps


@pytest.mark.parametrize("method", ["zscore", "minmax", "ocsvm"])
def test_restored_fusion_gives_the_same_fused_scores(method: str) -> None:
    val_scores, val_maps = normal_data(0)
    test_scores, test_maps = normal_data(1)
    fitted = fusion.fit_fusion(val_scores, val_maps, method)
    # Through JSON text, as fusion.json is written and read.
    restored = fusion.fusion_from_dict(json.loads(json.dumps(fusion.fusion_to_dict(fitted))))
    assert restored == fitted
    np.testing.assert_array_equal(
        restored.fuse_scores(test_scores), fitted.fuse_scores(test_scores)
    )
    np.testing.assert_array_equal(restored.fuse_maps(test_maps), fitted.fuse_maps(test_maps))


@pytest.mark.parametrize("method", ["zscore", "minmax"])
def test_normalising_fusion_matches_the_functions(method: str) -> None:
    val_scores, val_maps = normal_data(2)
    test_scores, test_maps = normal_data(3)
    fitted = fusion.fit_fusion(val_scores, val_maps, method)
    image = fusion.fit_normaliser(val_scores, method)
    pixel = fusion.fit_map_normaliser(val_maps, method)
    np.testing.assert_array_equal(
        fitted.fuse_scores(test_scores), fusion.fuse_scores(test_scores, image)
    )
    np.testing.assert_array_equal(fitted.fuse_maps(test_maps), fusion.fuse_maps(test_maps, pixel))


def test_ocsvm_fusion_is_sklearn_score_samples() -> None:
    val_scores, val_maps = normal_data(4)
    test_scores, test_maps = normal_data(5)
    fitted = fusion.fit_fusion(val_scores, val_maps, "ocsvm")
    for values, level, shape in (
        (val_scores, test_scores, (12,)),
        (val_maps, test_maps, (3, 8, 8)),
    ):
        train = np.stack([values["xyz"].ravel(), 0.1 * values["rgb"].ravel()], axis=1)
        svm = SGDOneClassSVM(random_state=42).fit(train)
        rows = np.stack([level["xyz"].ravel(), 0.1 * level["rgb"].ravel()], axis=1)
        want = svm.score_samples(rows).reshape(shape)
        got = fitted.fuse_scores(level) if len(shape) == 1 else fitted.fuse_maps(level)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_bad_records_and_inputs_are_named() -> None:
    val_scores, val_maps = normal_data(6)
    record = fusion.fusion_to_dict(fusion.fit_fusion(val_scores, val_maps, "zscore"))
    with pytest.raises(
        ValueError, match=r"model/box/fusion.json: not a fusion record: bad 'pixel' entry"
    ):
        fusion.fusion_from_dict({**record, "pixel": None}, where="model/box/fusion.json")
    with pytest.raises(ValueError, match="bad 'image' entry of a zscore fusion: KeyError"):
        fusion.fusion_from_dict({"method": "zscore", "pixel": record["pixel"]})
    with pytest.raises(ValueError, match="method 'rank' not in"):
        fusion.fusion_from_dict({**record, "method": "rank"})
    with pytest.raises(ValueError, match="do not match method 'minmax'"):
        fusion.fusion_from_dict({**record, "method": "minmax"})
    ocsvm = fusion.fusion_to_dict(fusion.fit_fusion(val_scores, val_maps, "ocsvm"))
    with pytest.raises(ValueError, match="2 entries"):
        fusion.fusion_from_dict({**ocsvm, "image": {"coef": [1.0], "rgb_factor": 0.1}})
    with pytest.raises(ValueError, match="method 'mean' not in"):
        fusion.fit_fusion(val_scores, val_maps, "mean")
    with pytest.raises(ValueError, match="ocsvm fuses rgb and xyz"):
        fusion.fit_fusion({"rgb": val_scores["rgb"]}, {"rgb": val_maps["rgb"]}, "ocsvm")
    fitted = fusion.fit_fusion(val_scores, val_maps, "ocsvm")
    with pytest.raises(ValueError, match="ocsvm fuses rgb and xyz"):
        fitted.fuse_scores({"xyz": val_scores["xyz"]})
    with pytest.raises(ValueError, match="expected 3-D"):
        fitted.fuse_maps(val_scores)
