"""End to end through `jobs.run_job`: train -> save -> eval from checkpoint -> predict, and the
FPFH baseline's expected behaviour on the synthetic defect kinds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lsfa_jax.jobs import run_job
from tests.helpers.runs import generate_raw, run_config

pytestmark = pytest.mark.slow


def _scores(workdir: Path) -> dict:
    return json.loads((workdir / "scores" / "box.json").read_text())


def test_train_save_eval_predict_reproduce_scores(tmp_path: Path) -> None:
    _, config = run_config()
    raw = generate_raw(tmp_path, config)
    config.data_dir = str(raw)
    config.cache_dir = str(tmp_path / "cache")

    trained = tmp_path / "train"
    run_job(config, trained)
    first = _scores(trained)
    assert set(first) >= {"RGB", "3D", "RGB+3D", "file_id", "label"}
    assert (trained / "results" / "results.json").exists()
    assert (trained / "results" / "per_defect.json").exists()

    config.mode = "eval"
    config.checkpoint = str(trained / "adaptation" / "checkpoints")
    evaluated = tmp_path / "eval"
    run_job(config, evaluated)
    second = _scores(evaluated)
    for setting in ("RGB", "3D", "RGB+3D"):
        np.testing.assert_array_equal(second[setting], first[setting])

    config.mode = "predict"
    config.checkpoint = str(trained / "model")
    config.input = str(raw / "box" / "test")
    predicted = tmp_path / "predict"
    run_job(config, predicted)
    rows = json.loads((predicted / "predictions.json").read_text())
    assert len(rows) == len(first["file_id"])
    # Same preprocessing (off here), features, banks and fusion: the scores of the test run.
    np.testing.assert_allclose([r["score"] for r in rows], first["RGB+3D"], rtol=1e-5, atol=1e-6)
    assert all(Path(r["image"]).exists() for r in rows)
    assert all(r["anomalous"] == (r["score"] > r["threshold"]) for r in rows)


def test_fpfh_finds_geometric_defects_not_colour_ones(tmp_path: Path) -> None:
    _, config = run_config()
    config.method = "fpfh"
    config.data.image_size = 224
    config.grid_size = 56
    config.data.synthetic.update(
        image_size=224, num_train=6, num_validation=2, num_test_good=4, num_test_per_defect=4
    )
    raw = generate_raw(tmp_path, config)
    config.data_dir = str(raw)
    run_job(config, tmp_path / "work")
    per_defect = json.loads((tmp_path / "work" / "results" / "per_defect.json").read_text())
    found = per_defect["box"]["3D"]
    assert found["geometric"]["i_auroc"] >= 0.9 and found["geometric"]["aupro_30"] >= 0.9
    assert found["both"]["i_auroc"] >= 0.9
    # Colour-only defects leave the geometry flat: FPFH cannot see them.
    assert found["colour"]["i_auroc"] <= 0.8
