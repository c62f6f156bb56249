"""mode=convert: torch-layout checkpoints -> orbax folders that load to the same parameters."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from configs.synthetic import get_config
from lsfa_jax.features.extract import WeightsError, load_backbones
from lsfa_jax.jobs import run_job
from lsfa_jax.models import point_mae, vit


def _torch_layout_files(tmp_path: Path, config) -> tuple[Path, Path]:
    """Random weights saved as .npz under the official torch key names."""
    rng = np.random.default_rng(0)
    rgb_cfg = vit.vit_config({**config.rgb_backbone.to_dict(), "img_size": 224})
    rgb = {
        k: rng.normal(size=s).astype(np.float32)
        for k, s in vit.expected_torch_shapes(rgb_cfg).items()
    }
    encoder = point_mae.point_mae_encoder(config.point_backbone)
    point = {}
    for key, (_, shape) in point_mae._torch_layout(encoder).items():
        value = rng.normal(size=shape).astype(np.float32)
        point[key] = np.abs(value) + 0.5 if key.endswith("running_var") else value
    np.savez(tmp_path / "rgb.npz", **rgb)
    np.savez(tmp_path / "point.npz", **point)
    return tmp_path / "rgb.npz", tmp_path / "point.npz"


def test_convert_writes_orbax_that_loads_identically(tmp_path: Path) -> None:
    config = get_config()
    config.allow_random_init = False
    rgb_file, point_file = _torch_layout_files(tmp_path, config)
    config.mode = "convert"
    config.rgb_weights, config.point_weights = str(rgb_file), str(point_file)
    run_job(config, tmp_path / "work")

    direct = load_backbones(config)
    config.rgb_weights = str(tmp_path / "work" / "converted" / "rgb")
    config.point_weights = str(tmp_path / "work" / "converted" / "point")
    converted = load_backbones(config)
    assert not any(converted.random_init.values())
    for a, b in (
        (direct.rgb_params, converted.rgb_params),
        (direct.point_variables, converted.point_variables),
    ):
        leaves_a, tree_a = jax.tree.flatten(a)
        leaves_b, tree_b = jax.tree.flatten(b)
        assert tree_a == tree_b
        for x, y in zip(leaves_a, leaves_b, strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_missing_weights_are_refused_without_allow_random_init() -> None:
    config = get_config()
    config.allow_random_init = False
    with pytest.raises(WeightsError, match="rgb_weights is not set"):
        load_backbones(config)
