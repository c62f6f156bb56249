"""A model folder's class as deployment artifacts: the serialized JAX program (CPU + CUDA),
the ONNX graph, example inputs with the in-process outputs, and their signature.

  <export>/<class>/model.jaxexport      jax.export, lowered for cpu and cuda, symbolic batch B
  <export>/<class>/model.onnx           the same program for onnxruntime (`inference` onnx=True)
  <export>/<class>/signature.json       inputs / outputs (name, shape, dtype), threshold, opset,
                                        tolerances, what prepares the inputs
  <export>/<class>/example_inputs.npz   keyed by the programs' input names
  <export>/<class>/expected_outputs.npz the in-process predict outputs of those inputs, keyed by
                                        the output names
  <export>/<class>/load.py, README.txt  the standalone loader and how to use each file
"""

from __future__ import annotations

import dataclasses
import io
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from lsfa_jax.data import synthetic
from lsfa_jax.data.pipeline import normalise_rgb as pipeline_normalise_rgb
from lsfa_jax.evaluators import class_eval
from lsfa_jax.export import inference, load
from lsfa_jax.features.source import FeatureSource, feature_source
from lsfa_jax.fusion import Fusion
from lsfa_jax.model_folder import ModelInfo, load_bank, load_class_model
from lsfa_jax.models.adaptors import AdaptorSettings
from lsfa_jax.patchcore.bank import with_search_index
from lsfa_jax.patchcore.scorer import ScoringSettings
from lsfa_jax.patchcore.search_choice import in_graph_search

ONNX_OPSET = 17
ONNX_BATCH = 1  # the ONNX graph's fixed batch size (`load.OnnxProgram` runs larger batches)
# max |exported - in-process| <= tolerance * max(1, max |in-process|) for each modality's
# outputs; the fused outputs get what that becomes through the stored fusion (`allowed_errors`).
TOLERANCES = {"jax": 1e-6, "onnx": 1e-4}
INPUT_DOCS = {
    "rgb": "uint8 RGB image at the model's image size, as prepared for training",
    "xyz": "float32 organized cloud in metres, (0, 0, 0) where missing; resized and "
    "plane-removed as the training data (lsfa_jax.data.preprocess.prepare_sample)",
    "xyz_features": "float32 FPFH patch features (lsfa_jax.features.fpfh.fpfh_patch_features)",
}


class ExportError(ValueError):
    """The model cannot be exported as asked; the message says why and what to change."""


@dataclasses.dataclass
class ClassExport:
    """What is exported of one class: its program, its constants and the feature source that
    computes the in-process reference."""

    program: inference.ClassProgram
    variables: dict[str, Any]
    source: FeatureSource
    adaptors: tuple[dict, AdaptorSettings] | None
    banks: dict
    fusion: Fusion | None
    # The model's patchcore.search ("model"), the in-graph search the program runs for it
    # ("program") and why ("why"); None: the program runs the model's own search.
    knn_search: dict[str, str] | None = None


def program_search(scoring: ScoringSettings) -> tuple[ScoringSettings, dict[str, str]]:
    """The scoring settings of the exported program, and the statement of its search: faiss
    runs on the host and cannot be part of a program, so faiss becomes exact, and auto the
    in-graph search auto picks on this machine (exact where that is faiss); both give the same
    nearest rows (`search_choice.in_graph_search`)."""
    choice = in_graph_search(scoring.search)
    statement = {"model": scoring.search, "program": choice.search, "why": choice.reason}
    return dataclasses.replace(scoring, search=choice.search), statement


def open_class(
    model_dir: Path,
    info: ModelInfo,
    run: ml_collections.ConfigDict,
    class_name: str,
    adaptors: tuple[dict, AdaptorSettings] | None,
    cache_root: Path,
) -> ClassExport:
    """The class's program and constants: backbones, adaptors, banks (with their search index),
    fusion."""
    scoring, knn_search = program_search(ScoringSettings.from_mapping(info.scoring))
    if knn_search["model"] != knn_search["program"]:
        logging.info(
            "export %s: patchcore.search=%s runs as %s in the program: %s",
            class_name,
            knn_search["model"],
            knn_search["program"],
            knn_search["why"],
        )
    stored = load_class_model(model_dir / class_name / "fusion.json")
    banks = {}
    for m in info.modalities:
        bank = load_bank(model_dir / class_name / f"{m}.npz")
        if scoring.search == "approximate":
            bank = with_search_index(bank, min(scoring.approximate_dim, bank.features.shape[1]))
        banks[m] = bank
    program = inference.class_program(
        method=info.method,
        class_name=class_name,
        modalities=tuple(info.modalities),
        run=run,
        scoring=scoring,
        model=stored,
        adaptors=None if adaptors is None else adaptors[1],
    )
    if info.method == "fpfh":
        program = dataclasses.replace(program, fpfh_dim=int(banks["xyz"].features.shape[1]))
    source = feature_source(run, {}, cache_root)
    variables: dict[str, Any] = {"banks": banks, "fusion": inference.fusion_arrays(stored.fusion)}
    if source.backbones is not None:
        variables["rgb_backbone"] = source.backbones.rgb_params
        variables["point_backbone"] = source.backbones.point_variables
    if adaptors is not None:
        variables["adaptors"] = jax.tree.map(jnp.asarray, adaptors[0])
    return ClassExport(program, variables, source, adaptors, banks, stored.fusion, knn_search)


def example_inputs(
    export: ClassExport, prepared: Mapping[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """The examples, as the program takes them: the user's samples when given (`prepared`:
    `jobs.inputs.prepared_inputs`, with "rgb_uint8", "xyz" and "file_id"), else two generated
    samples (one good, one with a geometric and colour defect) at the model's image size."""
    if prepared is None:
        cfg = synthetic.SyntheticConfig(classes=("box",), image_size=export.program.image_size)
        kinds = ("good", "both")
        samples = [synthetic.render_sample(cfg, "box", "test", kind, 0) for kind in kinds]
        prepared = {
            "rgb_uint8": np.stack([s["rgb"] for s in samples]),
            "xyz": np.stack([s["xyz"] for s in samples]),
            "file_id": np.asarray(kinds),
        }
    xyz = np.asarray(prepared["xyz"], np.float32)
    if export.program.method != "fpfh":
        return {"rgb": np.asarray(prepared["rgb_uint8"], np.uint8), "xyz": xyz}
    features = export.source.extract_in_batches({"xyz": xyz, "file_id": prepared["file_id"]})
    return {"xyz_features": np.asarray(features["xyz"], np.float32)}


def in_process_outputs(
    export: ClassExport, inputs: Mapping[str, np.ndarray], batch_size: int
) -> dict[str, np.ndarray]:
    """The outputs `mode=predict` computes for these inputs (features in batches, adaptors,
    scoring, fusion, threshold), under the program's output names; the fused scores and maps,
    float64 on the host, are rounded to the program's float32."""
    program = export.program
    if program.method == "fpfh":
        features = {"xyz": inputs["xyz_features"]}
    else:
        batch = {
            "rgb": pipeline_normalise_rgb(inputs["rgb"]),
            "xyz": inputs["xyz"],
            "file_id": np.asarray([f"example_{i}" for i in range(len(inputs["rgb"]))]),
        }
        features = export.source.extract_in_batches(batch)
    arrays = class_eval.features_to_score(features, program.modalities, export.adaptors, batch_size)
    per_modality = class_eval.score_modalities(export.banks, arrays, program.scoring, "export")
    settings = class_eval.setting_outputs(per_modality, export.fusion)
    out = {}
    for kind, position in (("score", 0), ("map", 1)):
        for setting in program.settings:
            value = np.asarray(settings[setting][position], np.float32)
            out[f"{kind}_{inference.SETTING_KEYS[setting]}"] = value
    out["anomalous"] = np.asarray(settings[program.main_setting][0] > program.threshold)
    return out


def _program_fn(export: ClassExport, onnx: bool):
    program, variables = export.program, export.variables
    names = list(program.input_specs(1))

    def run(*arrays):
        outputs = inference.run_class(
            program, variables, dict(zip(names, arrays, strict=True)), onnx=onnx
        )
        return tuple(outputs[n] for n in program.output_names())

    return run


def _symbolic_specs(program: inference.ClassProgram) -> list[jax.ShapeDtypeStruct]:
    (batch,) = jax.export.symbolic_shape("B")
    return list(program.input_specs(batch).values())


def export_jax(export: ClassExport) -> bytes:
    """The serialized program, lowered for CPU and CUDA, symbolic batch size."""
    exported = jax.export.export(jax.jit(_dict_fn(export)), platforms=("cpu", "cuda"))(
        dict(zip(export.program.input_specs(1), _symbolic_specs(export.program), strict=True))
    )
    return bytes(exported.serialize())


def _dict_fn(export: ClassExport):
    program, variables = export.program, export.variables

    def run(inputs):
        return inference.run_class(program, variables, inputs)

    return run


def export_onnx(export: ClassExport) -> bytes:
    """The ONNX graph of the program (onnx=True formulations) for one sample, inputs and
    outputs named as the JAX program's."""
    from jax2onnx import to_onnx

    program = export.program
    model = to_onnx(
        _program_fn(export, onnx=True),
        list(program.input_specs(ONNX_BATCH).values()),
        model_name=f"lsfa_{program.class_name}",
        opset=ONNX_OPSET,
        input_names=list(program.input_specs(1)),
        output_names=list(program.output_names()),
    )
    return model.SerializeToString()


def _spec_json(name: str, shape, dtype, doc: str = "") -> dict[str, Any]:
    return {
        "name": name,
        "shape": [d if isinstance(d, int) else None for d in shape],
        "dtype": np.dtype(dtype).name,
        "doc": doc,
    }


def signature(
    export: ClassExport, outputs: Mapping[str, np.ndarray], examples: str
) -> dict[str, Any]:
    """signature.json; `examples` says what the example inputs are."""
    program = export.program
    return {
        "format": load.SIGNATURE_FORMAT,
        "class": program.class_name,
        "examples": examples,
        "method": program.method,
        "settings": list(program.settings),
        "main_setting": program.main_setting,
        "threshold": program.threshold,
        "verdict": f"anomalous = score_{inference.SETTING_KEYS[program.main_setting]} > threshold",
        "inputs": [
            _spec_json(n, (None, *s.shape[1:]), s.dtype, INPUT_DOCS[n])
            for n, s in program.input_specs(1).items()
        ],
        "outputs": [
            _spec_json(n, (None, *outputs[n].shape[1:]), outputs[n].dtype)
            for n in program.output_names()
        ],
        "knn_search": export.knn_search or program_search(program.scoring)[1],
        "onnx_opset": ONNX_OPSET,
        "onnx_batch": ONNX_BATCH,
        "tolerances": {
            kind: allowed_errors(program, export.variables["fusion"], outputs, tolerance)
            for kind, tolerance in TOLERANCES.items()
        },
        "tolerance_rule": (
            "per output: max |out - expected| / max(1, max |expected|) <= the value given; "
            "each modality's outputs at the program's tolerance, the fused ones at it plus that "
            "tolerance carried through the fusion's 1 / scale, the verdicts exactly"
        ),
        "prepare": (
            "FPFH features: lsfa_jax.features.fpfh.fpfh_patch_features (open3d, host)"
            if program.method == "fpfh"
            else "lsfa_jax.data.preprocess.prepare_sample (resize; plane removal with open3d "
            "when the model was trained with data.preprocess=True)"
        ),
    }


def _npz(arrays: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def write_class_export(target: Path, files: Mapping[str, bytes], overwrite: bool) -> None:
    """Writes the files into a temporary sibling folder, then renames it to `target`: a reader
    sees the old folder or the complete new one, never a part."""
    if target.exists() and not overwrite:
        raise ExportError(
            f"{target}: export folder exists; remove it or pass --config.overwrite=True"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    staging.chmod(0o755)  # mkdtemp makes it private; the export is meant to be shared
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        if target.exists():
            retired = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-old-"))
            target.rename(retired / target.name)
            staging.rename(target)
            shutil.rmtree(retired)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _output_key(modality: str) -> str:
    return inference.SETTING_KEYS[inference.SETTING_OF_MODALITY[modality]]


def fusion_gains(program: inference.ClassProgram, fusion: Mapping[str, np.ndarray]):
    """{level: {modality: |d fused / d modality value|}} of the stored fusion (level image for
    scores, pixel for maps): 1 / (n scale) for zscore and minmax, the coefficient for ocsvm."""
    if program.fusion is None:
        return {}
    gains = {}
    for level in ("image", "pixel"):
        if program.fusion == "ocsvm":
            coef = np.abs(np.asarray(fusion[f"{level}_coef"], np.float64))
            gains[level] = {"xyz": float(coef[0]), "rgb": float(coef[1])}
        else:
            n = len(program.modalities)
            gains[level] = {
                m: 1.0 / (n * abs(float(fusion[f"{level}_{m}"][1]))) for m in program.modalities
            }
    return gains


def allowed_errors(
    program: inference.ClassProgram,
    fusion: Mapping[str, np.ndarray],
    expected: Mapping[str, np.ndarray],
    tolerance: float,
) -> dict[str, float]:
    """Per output, the largest `max_relative_error` accepted: `tolerance` for each modality's
    scores and maps, 0 for the verdicts, and for the fused outputs `tolerance` plus the
    per-modality tolerance carried through the fusion. The fusion divides each modality's
    value by its normaliser's scale, so one float32 rounding of a score (1e-7 of it) moves
    the fused score by 1e-7 / scale: no float32 program can match the fused outputs closer."""
    allowed = {}
    for name, want in expected.items():
        allowed[name] = 0.0 if want.dtype == bool else tolerance
    gains = fusion_gains(program, fusion)
    for kind, level in (("score", "image"), ("map", "pixel")):
        fused = f"{kind}_{inference.SETTING_KEYS['RGB+3D']}"
        if fused not in expected:
            continue
        carried = sum(
            gain * tolerance * max(1.0, float(np.max(np.abs(expected[f"{kind}_{_output_key(m)}"]))))
            for m, gain in gains[level].items()
        )
        allowed[fused] = tolerance + carried / max(1.0, float(np.max(np.abs(expected[fused]))))
    return allowed


def max_relative_error(outputs: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]):
    """{name: max |out - expected| / max(1, max |expected|)} (verdicts: mismatch count)."""
    errors = {}
    for name, want in expected.items():
        got = np.asarray(outputs[name])
        if want.dtype == bool:
            errors[name] = float(np.sum(got != want))
            continue
        scale = max(1.0, float(np.max(np.abs(want))))
        errors[name] = float(np.max(np.abs(got.astype(np.float64) - want))) / scale
    return errors


def readme_text(sig: Mapping[str, Any], parity: Mapping[str, Mapping[str, float]]) -> str:
    """README.txt of a class's export folder."""
    inputs = "\n".join(
        f"  {s['name']:13s} {s['dtype']:8s} {['B' if d is None else d for d in s['shape']]}: "
        f"{s['doc']}"
        for s in sig["inputs"]
    )
    outputs = "\n".join(
        f"  {s['name']:13s} {s['dtype']:8s} {['B' if d is None else d for d in s['shape']]}"
        for s in sig["outputs"]
    )
    names = ", ".join(f"{s['name']}=..." for s in sig["inputs"])
    tolerances = "\n".join(
        f"  {kind}: " + ", ".join(f"{k} {v:.2g}" for k, v in allowed.items())
        for kind, allowed in sig["tolerances"].items()
    )
    measured = "\n".join(
        f"  {kind}: " + ", ".join(f"{k} {v:.2g}" for k, v in errors.items())
        for kind, errors in parity.items()
    )
    return f"""lsfa-jax export of class {sig["class"]!r} (method {sig["method"]})

Inputs (B: any batch size >= 1):
{inputs}
Prepare them first with {sig["prepare"]}.

Outputs:
{outputs}
{sig["verdict"]} (threshold {sig["threshold"]!r}, setting {sig["main_setting"]}).
Nearest-neighbour search in the programs: {sig["knn_search"]["program"]} (the model's
patchcore.search={sig["knn_search"]["model"]}; {sig["knn_search"]["why"]}).

model.jaxexport  needs jax and numpy only (CPU or CUDA jaxlib; lowered for both):
    from load import load_program            # load.py of this folder
    program = load_program("path/to/this/folder")
    outputs = program({names})

model.onnx       needs onnxruntime and numpy (opset {sig["onnx_opset"]}):
    import onnxruntime, numpy as np
    session = onnxruntime.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
    example = dict(np.load("example_inputs.npz"))
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, example)))
  or load.load_onnx_program(folder), which checks the inputs first.

example_inputs.npz / expected_outputs.npz: {sig["examples"]} and the outputs the
in-process predict of lsfa-jax gives for them, keyed by the input and output names.
Tolerances ({sig["tolerance_rule"]}):
{tolerances}
Measured at export (max |out - expected| / max(1, max |expected|); anomalous: mismatches):
{measured}
"""
