"""Loads an exported lsfa-jax class program; needs only jax and numpy (onnxruntime for ONNX).

This file imports nothing of lsfa-jax, so it can be copied next to an export folder and used on
a machine without the project:

    import numpy as np
    from load import load_program

    program = load_program("export/box")           # model.jaxexport + signature.json
    example = np.load("export/box/example_inputs.npz")
    outputs = program(rgb=example["rgb"], xyz=example["xyz"])
    print(outputs["score_fused"], outputs["anomalous"])

`load_onnx_program` runs model.onnx with onnxruntime behind the same checks and call (the
graph takes one sample; larger batches run sample by sample).
Inputs must have the signature's dtype and shape (any batch size >= 1 where the shape says
null); anything else raises `ExportedInputError` naming the input, before any computation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

JAX_FILE = "model.jaxexport"
ONNX_FILE = "model.onnx"
SIGNATURE_FILE = "signature.json"
SIGNATURE_FORMAT = 1


class ExportedInputError(ValueError):
    """Inputs that do not match the exported program's signature."""


def read_signature(folder: str | Path) -> dict[str, Any]:
    """signature.json of an export folder: inputs and outputs (name, shape, dtype), class,
    threshold, tolerances."""
    path = Path(folder) / SIGNATURE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; is {folder} an lsfa-jax export folder?")
    signature = json.loads(path.read_text())
    if signature.get("format") != SIGNATURE_FORMAT:
        raise ValueError(
            f"{path}: signature format {signature.get('format')}, this loader reads "
            f"{SIGNATURE_FORMAT}; use the load.py written with that export"
        )
    return signature


def check_inputs(signature: Mapping[str, Any], inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inputs as numpy arrays, checked against the signature (names, dtypes, shapes and one
    batch size for all)."""
    expected = {spec["name"]: spec for spec in signature["inputs"]}
    if set(inputs) != set(expected):
        raise ExportedInputError(
            f"inputs {sorted(inputs)} given; the program of class {signature['class']!r} takes "
            f"exactly {sorted(expected)}"
        )
    arrays, batch = {}, {}
    for name, spec in expected.items():
        array = np.asarray(inputs[name])
        shape = ["B" if d is None else d for d in spec["shape"]]
        if array.dtype != np.dtype(spec["dtype"]):
            raise ExportedInputError(
                f"input {name!r}: dtype {array.dtype}, expected {spec['dtype']} of shape "
                f"{shape} ({spec['doc']}); convert it first"
            )
        fits = array.ndim == len(shape) and all(
            d == "B" or d == n for d, n in zip(shape, array.shape, strict=True)
        )
        if not fits or (array.ndim and array.shape[0] < 1):
            raise ExportedInputError(
                f"input {name!r}: shape {array.shape}, expected {shape} with B >= 1 ({spec['doc']})"
            )
        arrays[name], batch[name] = array, array.shape[0]
    if len(set(batch.values())) > 1:
        raise ExportedInputError(f"inputs have different batch sizes: {batch}")
    return arrays


class ExportedProgram:
    """The serialized JAX program of one class (CPU or CUDA, whichever jax runs on)."""

    def __init__(self, folder: str | Path):
        import jax

        self.folder = Path(folder)
        self.signature = read_signature(folder)
        path = self.folder / JAX_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found")
        self._exported = jax.export.deserialize(bytearray(path.read_bytes()))
        self._call = jax.jit(self._exported.call)

    @property
    def platforms(self) -> tuple[str, ...]:
        return tuple(self._exported.platforms)

    def __call__(self, **inputs: Any) -> dict[str, np.ndarray]:
        arrays = check_inputs(self.signature, inputs)
        outputs = self._call(arrays)
        return {name: np.asarray(value) for name, value in outputs.items()}


class OnnxProgram:
    """model.onnx of one class under onnxruntime (CPU), with the same checks and call."""

    def __init__(self, folder: str | Path, providers: tuple[str, ...] = ("CPUExecutionProvider",)):
        import onnxruntime

        self.folder = Path(folder)
        self.signature = read_signature(folder)
        path = self.folder / ONNX_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found")
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: its graph-cleanup warnings are noise
        self.session = onnxruntime.InferenceSession(
            str(path), sess_options=options, providers=list(providers)
        )
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, **inputs: Any) -> dict[str, np.ndarray]:
        arrays = check_inputs(self.signature, inputs)
        step = int(self.signature["onnx_batch"])
        count = len(next(iter(arrays.values())))
        if count % step:
            raise ExportedInputError(f"batch size {count} is not a multiple of {step}")
        # The graph has a fixed batch size: larger batches run in slices of it.
        runs = [
            self.session.run(self.output_names, {k: v[i : i + step] for k, v in arrays.items()})
            for i in range(0, count, step)
        ]
        return {
            name: np.concatenate([run[j] for run in runs])
            for j, name in enumerate(self.output_names)
        }


def load_program(folder: str | Path) -> ExportedProgram:
    return ExportedProgram(folder)


def load_onnx_program(folder: str | Path) -> OnnxProgram:
    return OnnxProgram(folder)
