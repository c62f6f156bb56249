"""The model folder: banks keep dtype and bits; fusion.json round trip; old folders refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import get_base_config
from lsfa_jax import fusion
from lsfa_jax import model_folder as model_store
from lsfa_jax.jobs.common import ConfigError, bank_dtype
from lsfa_jax.jobs.validate import validate
from lsfa_jax.patchcore.bank import build_memory_bank


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bank_round_trip_keeps_dtype_padding_and_bits(tmp_path: Path, dtype) -> None:
    library = np.random.default_rng(0).normal(size=(200, 12)).astype(np.float32)
    bank = build_memory_bank(
        library, ratio=0.1, key=jax.random.PRNGKey(0), padded_size=64, dtype=dtype
    )
    assert bank.features.dtype == dtype and bank.features.shape == (64, 12)
    path = tmp_path / "model" / "box" / "rgb.npz"
    model_store.save_bank(path, bank)
    loaded = model_store.load_bank(path)
    assert loaded.features.dtype == dtype
    np.testing.assert_array_equal(
        np.asarray(loaded.features).view(np.uint8), np.asarray(bank.features).view(np.uint8)
    )
    np.testing.assert_array_equal(loaded.valid, bank.valid)
    assert int(loaded.valid.sum()) == 20
    np.testing.assert_array_equal(loaded.stats.mean, bank.stats.mean)
    np.testing.assert_array_equal(loaded.stats.std, bank.stats.std)
    jax.tree.map(np.testing.assert_array_equal, loaded.index, bank.index)
    assert sorted(p.name for p in path.parent.iterdir()) == ["rgb.npz"]


def test_bank_file_without_dtype_holds_float32(tmp_path: Path) -> None:
    """Bank files written before the dtype entry existed: float32 rows, read as such."""
    path = tmp_path / "xyz.npz"
    features = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.savez(path, features=features, valid=np.ones(4, bool), mean=np.zeros(3), std=np.ones(3))
    loaded = model_store.load_bank(path)
    assert loaded.features.dtype == jnp.float32
    np.testing.assert_array_equal(loaded.features, features)


def test_bank_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(model_store.ModelFolderError, match=r"missing\.npz: memory bank not found"):
        model_store.load_bank(tmp_path / "missing.npz")
    path = tmp_path / "f16.npz"
    np.savez(
        path,
        features=np.zeros((2, 2), np.float16),
        dtype=np.asarray("float16"),
        valid=np.ones(2, bool),
        mean=np.zeros(2),
        std=np.ones(2),
    )
    with pytest.raises(ValueError, match=r"f16\.npz: bank dtype 'float16' not in"):
        model_store.load_bank(path)


def _class_model(method: str | None) -> model_store.ClassModel:
    rng = np.random.default_rng(1)
    fused = None
    if method is not None:
        fused = fusion.fit_fusion(
            {"rgb": rng.normal(size=5), "xyz": rng.normal(size=5)},
            {"rgb": rng.normal(size=(2, 4, 4)), "xyz": rng.normal(size=(2, 4, 4))},
            method,
        )
    thresholds = {
        "3D": model_store.Thresholds(0.25, "quantile", "0.99 quantile", float("nan"), "f1", "")
    }
    return model_store.ClassModel(fused, thresholds, {"3D": (0.125, 2.5), "RGB+3D": (-1.0, 3.0)})


@pytest.mark.parametrize("method", [None, "zscore", "ocsvm"])
def test_class_model_round_trip(tmp_path: Path, method: str | None) -> None:
    model = _class_model(method)
    path = tmp_path / "fusion.json"
    model_store.save_class_model(path, model)
    loaded = model_store.load_class_model(path)
    assert loaded.fusion == model.fusion
    assert loaded.map_scale == model.map_scale
    assert loaded.thresholds["3D"] == dataclasses.replace(model.thresholds["3D"], pixel=None)
    # Undefined is null in the (strict) JSON, None when read back.
    assert json.loads(path.read_text())["thresholds"]["3D"]["pixel_threshold"] is None
    assert "NaN" not in path.read_text()


def test_model_folder_of_an_older_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fusion.json"
    model_store.save_class_model(path, _class_model("zscore"))
    record = json.loads(path.read_text())
    del record["map_scale"]
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"fusion\.json: no map_scale.*run mode=eval"):
        model_store.load_class_model(path)


def test_bank_dtype_setting() -> None:
    config = get_base_config()
    assert bank_dtype(config) == jnp.float32
    config.patchcore.bank_dtype = "bfloat16"
    assert bank_dtype(config) == jnp.bfloat16
    config.patchcore.bank_dtype = "float16"
    with pytest.raises(ConfigError, match=r"config\.patchcore\.bank_dtype='float16'"):
        validate(config)
