"""mode=export: the serialized JAX program and the ONNX graph reproduce the in-process predict
outputs in a fresh process that imports only jax, numpy and onnxruntime; bad inputs are refused
with clear messages."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from configs.synthetic import get_config as synthetic_config
from lsfa_jax import model_folder
from lsfa_jax.export import artifacts, load
from lsfa_jax.jobs import run_job
from lsfa_jax.jobs.common import ConfigError
from lsfa_jax.patchcore.scorer import ScoringSettings
from tests.helpers.tiny import shrink

pytest.importorskip("jax2onnx")
pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow

FILES = {
    "model.jaxexport",
    "model.onnx",
    "signature.json",
    "example_inputs.npz",
    "expected_outputs.npz",
    "load.py",
    "README.txt",
}

# Run in a fresh interpreter: load.py from the export folder, onnxruntime on its own, and a
# check that nothing else of weight (flax, TensorFlow, the project) was imported.
FRESH_PROCESS = r"""
import json, sys
import numpy as np
import onnxruntime
folder = sys.argv[1]
sys.path.insert(0, folder)
from load import load_program
signature = json.load(open(f"{folder}/signature.json"))
inputs = dict(np.load(f"{folder}/example_inputs.npz"))
expected = dict(np.load(f"{folder}/expected_outputs.npz"))
session = onnxruntime.InferenceSession(f"{folder}/model.onnx", providers=["CPUExecutionProvider"])
graph_inputs = [i.name for i in session.get_inputs()]
graph_outputs = [o.name for o in session.get_outputs()]
assert sorted(graph_inputs) == sorted(inputs), (graph_inputs, list(inputs))
assert sorted(graph_outputs) == sorted(expected), (graph_outputs, list(expected))
count = len(next(iter(inputs.values())))
runs = [session.run(None, {k: v[i:i + 1] for k, v in inputs.items()}) for i in range(count)]
onnx_out = {n: np.concatenate([r[j] for r in runs]) for j, n in enumerate(graph_outputs)}
program = load_program(folder)
jax_out = program(**inputs)
def error(out):
    result = {}
    for name, want in expected.items():
        got = out[name]
        assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.dtype)
        if want.dtype == bool:
            result[name] = float(np.sum(got != want))
        else:
            result[name] = float(np.max(np.abs(got.astype(np.float64) - want))) / max(
                1.0, float(np.max(np.abs(want))))
    return result
heavy = ("flax", "tensorflow", "lsfa_jax", "torch", "jax2onnx")
heavy = sorted(m for m in heavy if m in sys.modules)
print(json.dumps({"jax": error(jax_out), "onnx": error(onnx_out), "heavy": heavy,
                  "platforms": list(program.platforms)}))
"""


def _train(tmp_path_factory: pytest.TempPathFactory, method: str) -> Path:
    root = tmp_path_factory.mktemp(f"export_{method}")
    config = shrink(synthetic_config())
    config.method = method
    config.data_dir = str(root / "data")
    config.data.classes = "box"
    config.data.synthetic.update(
        classes=("box",),
        image_size=64,
        num_train=6,
        num_validation=2,
        num_test_good=2,
        num_test_per_defect=1,
    )
    run_job(config, root / "train")
    return root / "train" / "model"


def _export_config(model: Path, **keys) -> object:
    config = synthetic_config()
    config.update(mode="export", checkpoint=str(model), **keys)
    return config


@pytest.fixture(scope="module", params=["lsfa", "fpfh"])
def exported(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """(method, model folder, export folder of class box)."""
    model = _train(tmp_path_factory, request.param)
    workdir = model.parent.parent / "exported"
    run_job(_export_config(model), workdir)
    return request.param, model, workdir / "export" / "box"


def test_fresh_process_reproduces_the_expected_outputs(exported) -> None:
    method, _, folder = exported
    assert {p.name for p in folder.iterdir()} == FILES
    signature = json.loads((folder / "signature.json").read_text())
    assert signature["onnx_opset"] == artifacts.ONNX_OPSET
    names = {"lsfa": ["rgb", "xyz"], "fpfh": ["xyz_features"]}[method]
    assert [s["name"] for s in signature["inputs"]] == names
    # Scored with search=auto (the default): the programs run auto's in-graph choice, said so.
    searched = signature["knn_search"]
    assert searched["model"] == "auto" and searched["program"] in ("screened", "exact")
    assert f"search in the programs: {searched['program']}" in (folder / "README.txt").read_text()
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(folder)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert errors["heavy"] == []
    assert errors["platforms"] == ["cpu", "cuda"]
    for kind in ("jax", "onnx"):
        allowed = signature["tolerances"][kind]
        assert allowed["anomalous"] == 0
        for name, value in errors[kind].items():
            assert value <= allowed[name], (kind, name, value, allowed[name])
            if name != "anomalous" and not name.endswith("fused"):
                assert allowed[name] == artifacts.TOLERANCES[kind]
    expected = dict(np.load(folder / "expected_outputs.npz"))
    settings = {"lsfa": ["rgb", "3d", "fused"], "fpfh": ["3d"]}[method]
    assert sorted(expected) == sorted(
        [*(f"score_{s}" for s in settings), *(f"map_{s}" for s in settings), "anomalous"]
    )
    assert expected[f"map_{settings[-1]}"].shape == (2, 32, 32)


def test_expected_outputs_are_what_predict_gives(exported, tmp_path: Path) -> None:
    """The examples written as files and scored by mode=predict give expected_outputs."""
    method, model, folder = exported
    if method == "fpfh":
        pytest.skip("fpfh examples are features; predict starts from files")
    inputs = dict(np.load(folder / "example_inputs.npz"))
    expected = dict(np.load(folder / "expected_outputs.npz"))
    samples = tmp_path / "samples"
    samples.mkdir()
    for i, (rgb, xyz) in enumerate(zip(inputs["rgb"], inputs["xyz"], strict=True)):
        Image.fromarray(rgb).save(samples / f"s{i}.png")
        tifffile.imwrite(samples / f"s{i}.tiff", xyz)
    config = synthetic_config()
    config.update(mode="predict", checkpoint=str(model), input=str(samples))
    run_job(config, tmp_path / "predict")
    rows = json.loads((tmp_path / "predict" / "predictions.json").read_text())
    np.testing.assert_array_equal(np.float32([r["score"] for r in rows]), expected["score_fused"])
    np.testing.assert_array_equal(np.float32([r["score_RGB"] for r in rows]), expected["score_rgb"])
    np.testing.assert_array_equal([r["anomalous"] for r in rows], expected["anomalous"])


def test_loader_refuses_bad_inputs_clearly(exported) -> None:
    method, _, folder = exported
    if method != "lsfa":
        pytest.skip("one method is enough")
    program = load.load_program(folder)
    inputs = dict(np.load(folder / "example_inputs.npz"))
    with pytest.raises(
        load.ExportedInputError, match=r"input 'rgb': dtype float32, expected uint8"
    ):
        program(rgb=inputs["rgb"].astype(np.float32), xyz=inputs["xyz"])
    with pytest.raises(load.ExportedInputError, match=r"input 'xyz': shape \(2, 16, 16, 3\)"):
        program(rgb=inputs["rgb"], xyz=inputs["xyz"][:, :16, :16])
    with pytest.raises(load.ExportedInputError, match=r"takes exactly \['rgb', 'xyz'\]"):
        program(rgb=inputs["rgb"])
    with pytest.raises(load.ExportedInputError, match="different batch sizes"):
        program(rgb=inputs["rgb"][:1], xyz=inputs["xyz"])
    one = program(rgb=inputs["rgb"][1:], xyz=inputs["xyz"][1:])  # batch 1 of a symbolic B
    expected = {k: v[1:] for k, v in np.load(folder / "expected_outputs.npz").items()}
    # Another batch size than the examples' changes the backbones' float32 rounding (measured
    # 3e-6 on the fused score, whose z-score divides by a small scale).
    errors = artifacts.max_relative_error(one, expected)
    assert max(errors.values()) <= 1e-5, errors


def test_export_refuses_existing_folders_unknown_classes_and_old_models(
    exported, tmp_path: Path
) -> None:
    method, model, folder = exported
    if method != "fpfh":
        pytest.skip("one method is enough")
    with pytest.raises(ConfigError, match=r"export folder exists; pass --config\.overwrite=True"):
        run_job(_export_config(model), folder.parent.parent)
    config = _export_config(model)
    config.data.classes = "torus"
    with pytest.raises(ConfigError, match=r"holds \['box'\], not \['torus'\]"):
        run_job(config, tmp_path / "unknown")
    old = tmp_path / "old_model"
    old.mkdir()
    record = json.loads((model / "model.json").read_text())
    (old / "model.json").write_text(json.dumps({**record, "format_version": 1}))
    with pytest.raises(model_folder.ModelFolderError, match=r"format 1.*older lsfa-jax"):
        run_job(_export_config(old), tmp_path / "old")


def test_export_folder_is_replaced_whole(tmp_path: Path) -> None:
    target = tmp_path / "export" / "box"
    artifacts.write_class_export(target, {"a": b"1", "b": b"2"}, overwrite=False)
    with pytest.raises(artifacts.ExportError, match="exists"):
        artifacts.write_class_export(target, {"a": b"3"}, overwrite=False)

    class Broken(dict):
        def items(self):
            yield "a", b"new"
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        artifacts.write_class_export(target, Broken(), overwrite=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == {"a": b"1", "b": b"2"}
    artifacts.write_class_export(target, {"c": b"4"}, overwrite=True)
    assert [p.name for p in target.iterdir()] == ["c"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["box"]


def test_a_faiss_model_exports_the_exact_search_and_says_so() -> None:
    scoring = ScoringSettings(
        out_size=32,
        reweight=True,
        blur="gaussian",
        sigma=4.0,
        search="faiss",
        approximate_dim=128,
        batch_size=2,
    )
    program, statement = artifacts.program_search(scoring)
    assert program == dataclasses.replace(scoring, search="exact")
    assert (statement["model"], statement["program"]) == ("faiss", "exact")
    assert "cannot be exported" in statement["why"]
