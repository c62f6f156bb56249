"""mode=export of a class trained on the real MVTec 3D-AD cable_gland samples (method fpfh: the
FPFH features stay on the host; the scorer, its maps and the verdict are exported), checked on
the real test samples given as the examples: the in-process outputs it ships are mode=predict's,
and both exported programs reproduce them within the stated tolerances."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from configs.mvtec3d import get_config as mvtec3d_config
from lsfa_jax.export import artifacts, load
from lsfa_jax.jobs import run_job

pytest.importorskip("jax2onnx")
pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow


def test_export_of_a_real_class_reproduces_predict_on_its_test_samples(
    mvtec_sample_root: Path, tmp_path: Path
) -> None:
    train = mvtec3d_config()
    train.update(method="fpfh", data_dir=str(mvtec_sample_root))
    train.data.classes = "cable_gland"
    run_job(train, tmp_path / "train")
    model = tmp_path / "train" / "model"
    samples = mvtec_sample_root / "cable_gland" / "test"

    predict = mvtec3d_config()
    predict.update(mode="predict", checkpoint=str(model), input=str(samples))
    run_job(predict, tmp_path / "predict")
    rows = json.loads((tmp_path / "predict" / "predictions.json").read_text())

    export = mvtec3d_config()
    export.update(mode="export", checkpoint=str(model), input=str(samples))
    run_job(export, tmp_path / "exported")
    folder = tmp_path / "exported" / "export" / "cable_gland"
    signature = json.loads((folder / load.SIGNATURE_FILE).read_text())
    assert signature["examples"] == f"the {len(rows)} samples of {samples}"
    inputs = dict(np.load(folder / "example_inputs.npz"))
    expected = dict(np.load(folder / "expected_outputs.npz"))
    assert inputs["xyz_features"].shape[0] == len(rows) == 6
    assert sorted(expected) == ["anomalous", "map_3d", "score_3d"]
    np.testing.assert_array_equal(np.float32([r["score"] for r in rows]), expected["score_3d"])
    np.testing.assert_array_equal([r["anomalous"] for r in rows], expected["anomalous"])
    assert expected["map_3d"].shape == (6, 224, 224)
    for kind, program in (
        ("jax", load.load_program(folder)),
        ("onnx", load.load_onnx_program(folder)),
    ):
        errors = artifacts.max_relative_error(program(**inputs), expected)
        allowed = signature["tolerances"][kind]
        assert allowed == {
            "score_3d": artifacts.TOLERANCES[kind],
            "map_3d": artifacts.TOLERANCES[kind],
            "anomalous": 0.0,
        }
        for name, value in errors.items():
            assert value <= allowed[name], (kind, name, value)
