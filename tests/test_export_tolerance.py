"""The export's fused-output tolerance is the per-modality tolerance carried through the
stored fusion: worst-case per-modality errors at the tolerance reach it, and never exceed it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from lsfa_jax.export import artifacts


def _fuse(method: str, fusion: dict, level: str, values: dict) -> np.ndarray:
    if method == "ocsvm":
        coef = fusion[f"{level}_coef"].astype(np.float64)
        return values["xyz"] * coef[0] + values["rgb"] * coef[1]
    normalised = [
        (values[m] - fusion[f"{level}_{m}"][0]) / fusion[f"{level}_{m}"][1] for m in values
    ]
    return sum(normalised) / len(normalised)


@pytest.mark.parametrize("method", ["zscore", "ocsvm"])
def test_fused_tolerance_is_the_carried_worst_case(method: str) -> None:
    rng = np.random.default_rng(0)
    program = SimpleNamespace(fusion=method, modalities=("rgb", "xyz"))
    if method == "ocsvm":
        fusion = {f"{lv}_coef": np.float32([30.0, -7.0]) for lv in ("image", "pixel")}
    else:
        fusion = {
            f"{lv}_{m}": np.float32([loc, scale])
            for lv in ("image", "pixel")
            for m, loc, scale in (("rgb", 2.0, 0.05), ("xyz", 0.5, 0.3))
        }
    values = {
        "score": {"rgb": rng.normal(2.0, 0.02, 4), "xyz": rng.normal(0.5, 0.02, 4)},
        "map": {"rgb": rng.normal(2.0, 0.02, (4, 8, 8)), "xyz": rng.normal(0.5, 0.02, (4, 8, 8))},
    }
    expected = {}
    for kind, level in (("score", "image"), ("map", "pixel")):
        expected[f"{kind}_rgb"], expected[f"{kind}_3d"] = values[kind]["rgb"], values[kind]["xyz"]
        expected[f"{kind}_fused"] = _fuse(method, fusion, level, values[kind])
    expected["anomalous"] = expected["score_fused"] > 0
    tolerance = 1e-6
    allowed = artifacts.allowed_errors(program, fusion, expected, tolerance)
    assert allowed["anomalous"] == 0
    assert allowed["score_rgb"] == allowed["map_3d"] == tolerance
    for kind, level in (("score", "image"), ("map", "pixel")):
        # Each modality's output off by exactly its tolerance, in the direction that moves the
        # fused value most.
        gains = artifacts.fusion_gains(program, fusion)[level]
        moved = {}
        for m, key in (("rgb", "rgb"), ("xyz", "3d")):
            step = tolerance * max(1.0, np.max(np.abs(expected[f"{kind}_{key}"])))
            probe = _fuse(method, fusion, level, {**values[kind], m: values[kind][m] + 1.0})
            sign = np.sign(probe - expected[f"{kind}_fused"])
            moved[m] = values[kind][m] + step * sign
            assert gains[m] == pytest.approx(
                np.max(np.abs(probe - expected[f"{kind}_fused"])), rel=1e-6
            )
        error = artifacts.max_relative_error(
            {f"{kind}_fused": _fuse(method, fusion, level, moved)},
            {f"{kind}_fused": expected[f"{kind}_fused"]},
        )[f"{kind}_fused"]
        fused = f"{kind}_fused"
        # The worst case reaches the carried part exactly (the fusion's own rounding is what
        # the remaining `tolerance` is for).
        assert error == pytest.approx(allowed[fused] - tolerance, rel=1e-6)
        assert error > 3 * tolerance  # small scales and large coefficients amplify
