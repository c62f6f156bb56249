"""Tiny raw-feature evaluations end to end: bfloat16 banks against float32 banks, and predict's
anomaly-map colours on the scale stored with the model."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from lsfa_jax import model_folder as model_store
from lsfa_jax.evaluators import class_eval
from lsfa_jax.jobs import run_evaluation, run_predict
from lsfa_jax.reports import overlays
from tests.helpers.tiny import tiny_evaluation_config

pytestmark = pytest.mark.slow

I_AUROC_TOL = 0.02
AUPRO_TOL = 0.02
P_AUROC_TOL = 0.005


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same evaluation (method raw, two synthetic classes) with float32 and bfloat16 banks."""
    root = tmp_path_factory.mktemp("bank_dtype")
    out = {"root": root}
    for dtype in ("float32", "bfloat16"):
        config = tiny_evaluation_config(root / "raw")
        config.cache_dir = str(root / "cache")
        config.patchcore.bank_dtype = dtype
        out[dtype] = (config, root / dtype, run_evaluation.run_evaluation(config, root / dtype))
    return out


def test_bank_files_keep_the_configured_dtype(runs: dict) -> None:
    for dtype, want in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        _, workdir, _ = runs[dtype]
        for class_name in ("sphere_cap", "torus"):
            for modality in ("rgb", "xyz"):
                bank = model_store.load_bank(workdir / "model" / class_name / f"{modality}.npz")
                assert bank.features.dtype == want, (dtype, class_name, modality)


def test_bfloat16_banks_keep_the_metrics(runs: dict) -> None:
    """Per class and setting, |bfloat16 - float32| <= 0.02 for I-AUROC and AUPRO@0.3 and
    <= 0.005 for P-AUROC.

    Why these bounds: bfloat16 keeps 8 significant bits, so a stored bank row moves by about
    2^-9 of its norm and a nearest-neighbour distance by less than 1%. P-AUROC ranks every pixel
    of every test map, so such shifts reorder only a few near-tied pixel pairs: 0.005. I-AUROC
    and AUPRO are computed from a handful of test images here (5 per class), so one reordered
    pair or a region's overlap moving is a large step; 0.02 still fails on any swap of an image
    pair (one swap among 2 x 3 pairs moves I-AUROC by 0.17), so it demands the same ranking.
    """
    base, bf16 = runs["float32"][2], runs["bfloat16"][2]
    assert set(base) == set(bf16) == {"RGB", "3D", "RGB+3D"}
    for setting, per_class in base.items():
        assert set(per_class) == {"sphere_cap", "torus"}
        for class_name, values in per_class.items():
            other = bf16[setting][class_name]
            where = f"{setting}/{class_name}"
            assert abs(other["i_auroc"] - values["i_auroc"]) <= I_AUROC_TOL, where
            assert abs(other["aupro_30"] - values["aupro_30"]) <= AUPRO_TOL, where
            assert abs(other["p_auroc"] - values["p_auroc"]) <= P_AUROC_TOL, where


def _heat_panel(path: Path, size: int) -> np.ndarray:
    image = np.asarray(Image.open(path))
    return image[overlays.TITLE_HEIGHT :, size : 2 * size]


def test_predict_colours_mean_the_same_score_in_separate_calls(
    runs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two samples (same pixels, so the blend with RGB is the same) predicted in separate calls
    whose maps share the scores of most pixels but differ in range: equal scores get equal
    colours, because both images use the scale stored with the model, not each call's range."""
    config, workdir, _ = runs["float32"]
    size = config.data.image_size
    source = runs["root"] / "raw" / "sphere_cap" / "test" / "good"
    inputs = {}
    for name in ("a", "b"):
        folder = runs["root"] / f"input_{name}"
        folder.mkdir()
        shutil.copy(source / "rgb" / "000.png", folder / f"{name}.png")
        shutil.copy(source / "xyz" / "000.tiff", folder / f"{name}.tiff")
        inputs[name] = folder
    stored = model_store.load_class_model(workdir / "model" / "sphere_cap" / "fusion.json")
    vmin, vmax = stored.map_scale["RGB+3D"]
    ramp = np.linspace(vmin, vmax, size * size).reshape(1, size, size)
    region = np.zeros((1, size, size), bool)
    region[:, : size // 2, : size // 2] = True
    # Per-modality maps X give the fused map (an affine function of X, the same in every call).
    maps = {"a": np.where(region, 0.5 * ramp, ramp), "b": np.where(region, 5.0 * ramp, ramp)}
    original = class_eval.score_features

    def controlled_maps(bank, features, settings, desc, **kwargs):
        scores, _ = original(bank, features, settings, desc, **kwargs)
        return scores, maps[current]

    monkeypatch.setattr(class_eval, "score_features", controlled_maps)
    config.mode = "predict"
    config.checkpoint = str(workdir / "model")
    config.data.classes = "sphere_cap"
    panels, rows = {}, {}
    for current in ("a", "b"):
        config.input = str(inputs[current])
        (row,) = run_predict.run_predict(config, runs["root"] / f"predict_{current}")
        rows[current] = row
        panels[current] = _heat_panel(Path(row["image"]), size)
    for row in rows.values():
        assert (row["map_vmin"], row["map_vmax"]) == (vmin, vmax)
    # The predicted-mask contour (map > the pixel threshold) follows each call's map, so its
    # pixels are left out of the colour comparison.
    contour = np.zeros(region[0].shape, bool)
    for panel in panels.values():
        contour |= np.all(panel == overlays.PRED_RGB, axis=-1)
    same = ~region[0] & ~contour
    assert same.sum() > 0.5 * same.size
    np.testing.assert_array_equal(panels["a"][same], panels["b"][same])
    assert np.any(panels["a"][region[0]] != panels["b"][region[0]])
