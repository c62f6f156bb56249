"""The portable model folder a train_eval / eval run leaves behind, for `mode=test` and `predict`.

  <model>/model.json                 ModelInfo: format version, method, classes, settings, the
                                     training config, the backbone weights' SHA-256
  <model>/adaptors/params.npz        adaptor parameters (method lsfa), keys "a/b/kernel"
  <model>/<class>/<modality>.npz     memory bank rows (in the bank's dtype), mask, feature stats
  <model>/<class>/fusion.json        RGB+3D fusion, decision thresholds, map colour scale

Every path inside is relative, so the folder can be moved or copied anywhere. The backbone
weights stay where the user keeps them: the folder records their SHA-256 (and the training-time
path as a hint), and loading refuses weights whose hash differs. Every file is written atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lsfa_jax import fusion
from lsfa_jax.atomic_io import atomic_write_bytes, atomic_write_json
from lsfa_jax.errors import UserError
from lsfa_jax.patchcore.bank import MemoryBank, with_search_index
from lsfa_jax.patchcore.normalisation import FeatureStats
from lsfa_jax.reports.manifest import sha256_file

FORMAT_VERSION = 2
MODEL_FILE = "model.json"
ADAPTOR_FILE = Path("adaptors") / "params.npz"
# npz has no bfloat16: such rows are stored as their uint16 bit patterns plus the dtype name.
BANK_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ModelFolderError(UserError, ValueError):
    """A model folder is incomplete, of another format or method, or does not fit the inputs."""


@dataclasses.dataclass(frozen=True)
class WeightsRecord:
    """One backbone's weights as trained: SHA-256 of the file (None when randomly initialised),
    the path at training time (a hint only) and whether they were random."""

    sha256: str | None
    path: str | None
    random_init: bool


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """model.json. `config` is the whole training config (a plain dict); `adaptors` the adaptor
    settings (`models.adaptors.AdaptorSettings.to_dict()`) or None without adaptors; `scoring`
    the `patchcore.scorer.ScoringSettings` dict; `adaptor_sha256` the digest of params.npz."""

    method: str
    modalities: tuple[str, ...]
    classes: tuple[str, ...]
    feature_fingerprint: str
    weights: dict[str, WeightsRecord]
    scoring: dict[str, Any]
    config: dict[str, Any]
    adaptors: dict[str, Any] | None = None
    adaptor_sha256: str | None = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["modalities"] = list(self.modalities)
        record["classes"] = list(self.classes)
        return record

    @classmethod
    def from_json(cls, record: Mapping[str, Any], where: str) -> ModelInfo:
        version = record.get("format_version")
        if version != FORMAT_VERSION:
            age = "an older" if version is None or version < FORMAT_VERSION else "a newer"
            raise ModelFolderError(
                f"{where}: model folder format {version}, this version reads {FORMAT_VERSION}: "
                f"it was written by {age} lsfa-jax. "
                + (
                    "Re-run train_eval (or mode=eval with the adaptor checkpoint) to rebuild it"
                    if age == "an older"
                    else "Use the lsfa-jax version that wrote it"
                )
            )
        try:
            return cls(
                method=str(record["method"]),
                modalities=tuple(record["modalities"]),
                classes=tuple(record["classes"]),
                feature_fingerprint=str(record["feature_fingerprint"]),
                weights={k: WeightsRecord(**v) for k, v in record["weights"].items()},
                scoring=dict(record["scoring"]),
                config=dict(record["config"]),
                adaptors=record.get("adaptors"),
                adaptor_sha256=record.get("adaptor_sha256"),
                format_version=int(version),
            )
        except (KeyError, TypeError) as error:
            raise ModelFolderError(f"{where}: not a model record ({error!r})") from error


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """A setting's decision thresholds: on the image score and on map pixels, each with the
    rule that chose it and that rule's description (`fusion.choose_threshold`)."""

    image: float
    rule: str
    description: str
    pixel: float | None
    pixel_rule: str
    pixel_description: str

    def to_json(self) -> dict[str, Any]:
        return {
            "threshold": self.image,
            "rule": self.rule,
            "description": self.description,
            "pixel_threshold": self.pixel,
            "pixel_rule": self.pixel_rule,
            "pixel_description": self.pixel_description,
        }

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Thresholds:
        pixel = record.get("pixel_threshold")
        return cls(
            image=float(record["threshold"]),
            rule=str(record.get("rule", "")),
            description=str(record.get("description", "")),
            pixel=None if pixel is None else float(pixel),
            pixel_rule=str(record.get("pixel_rule", "")),
            pixel_description=str(record.get("pixel_description", "")),
        )


@dataclasses.dataclass(frozen=True)
class ClassModel:
    """fusion.json of one class: fusion (None with one modality), {setting: thresholds},
    {setting: (vmin, vmax)} colour scale of its anomaly maps."""

    fusion: fusion.Fusion | None
    thresholds: dict[str, Thresholds]
    map_scale: dict[str, tuple[float, float]]


def weights_digest(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a weights file, or of a folder's files (relative names and contents)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        digest.update(bytes.fromhex(sha256_file(file)))
    return digest.hexdigest()


def check_weights(info: ModelInfo, modality: str, path: str | None, where: Path) -> None:
    """Refuses weights other than the model's: a hash mismatch names both hashes."""
    record = info.weights[modality]
    if record.random_init:
        if path:
            raise ModelFolderError(
                f"{where}: the model was built with randomly initialised {modality} weights, "
                f"but config.{modality}_weights={path} is set; leave it empty"
            )
        return
    if not path:
        raise ModelFolderError(
            f"{where}: the model needs its {modality} backbone weights (sha256 {record.sha256}, "
            f"trained with {record.path}): set --config.{modality}_weights=/path/to/file"
        )
    if not Path(path).exists():
        raise ModelFolderError(f"config.{modality}_weights={path}: file not found")
    actual = weights_digest(path)
    if actual != record.sha256:
        raise ModelFolderError(
            f"config.{modality}_weights={path}: sha256 {actual} differs from the model's "
            f"{record.sha256} ({where}); give the weights the model was trained with"
        )


def save_bank(path: Path, bank: MemoryBank) -> None:
    """Writes the bank's rows in their own dtype (float32 or bfloat16), mask and stats."""
    dtype = jnp.dtype(bank.features.dtype).name
    if dtype not in BANK_DTYPES:
        raise ValueError(f"{path}: bank dtype {dtype} not in {sorted(BANK_DTYPES)}")
    features = np.asarray(bank.features)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        features=features.view(np.uint16) if dtype == "bfloat16" else features,
        dtype=np.asarray(dtype),
        valid=np.asarray(bank.valid),
        mean=np.asarray(bank.stats.mean),
        std=np.asarray(bank.stats.std),
    )
    atomic_write_bytes(path, buffer.getvalue())


def load_bank(path: Path) -> MemoryBank:
    """The bank `save_bank` wrote, with its search index; files without a dtype entry hold
    float32 rows."""
    if not path.exists():
        raise ModelFolderError(f"{path}: memory bank not found (was the run completed?)")
    with np.load(path) as data:
        dtype = str(data["dtype"]) if "dtype" in data else "float32"
        if dtype not in BANK_DTYPES:
            raise ModelFolderError(f"{path}: bank dtype {dtype!r} not in {sorted(BANK_DTYPES)}")
        features = data["features"]
        if dtype == "bfloat16":
            features = features.view(jnp.bfloat16)
        bank = MemoryBank(
            features=jnp.asarray(features, BANK_DTYPES[dtype]),
            valid=jnp.asarray(data["valid"]),
            stats=FeatureStats(mean=jnp.asarray(data["mean"]), std=jnp.asarray(data["std"])),
        )
    return with_search_index(bank)


def save_class_model(path: Path, model: ClassModel) -> None:
    atomic_write_json(
        path,
        {
            "fusion": None if model.fusion is None else fusion.fusion_to_dict(model.fusion),
            "thresholds": {s: t.to_json() for s, t in model.thresholds.items()},
            "map_scale": {s: list(v) for s, v in model.map_scale.items()},
        },
    )


def load_class_model(path: Path) -> ClassModel:
    if not path.exists():
        raise ModelFolderError(f"{path}: not found (was the run completed?)")
    record = json.loads(path.read_text())
    if "map_scale" not in record:
        raise ModelFolderError(
            f"{path}: no map_scale (the anomaly-map colour scale), so the model folder was "
            "written by an older version; run mode=eval with the same checkpoint to rebuild it"
        )
    stored = record["fusion"]
    return ClassModel(
        fusion=None if stored is None else fusion.fusion_from_dict(stored, where=str(path)),
        thresholds={s: Thresholds.from_json(t) for s, t in record["thresholds"].items()},
        map_scale={s: (float(v[0]), float(v[1])) for s, v in record["map_scale"].items()},
    )


def _params_npz(params: Mapping[str, Any]) -> bytes:
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in sorted(flat.items())})
    return buffer.getvalue()


def save_adaptor_params(model_dir: Path, params: Mapping[str, Any]) -> str:
    """Copies the adaptor parameters into the folder; returns the file's SHA-256."""
    data = _params_npz(params)
    atomic_write_bytes(model_dir / ADAPTOR_FILE, data)
    return hashlib.sha256(data).hexdigest()


def load_adaptor_params(model_dir: Path, info: ModelInfo) -> dict:
    """The adaptor parameters (nested dict of numpy arrays), checked against their digest."""
    path = model_dir / ADAPTOR_FILE
    if not path.is_file():
        raise ModelFolderError(f"{path}: adaptor parameters missing (incomplete model folder)")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != info.adaptor_sha256:
        raise ModelFolderError(f"{path}: contents do not match the digest in {MODEL_FILE}")
    with np.load(io.BytesIO(data)) as arrays:
        flat = {k: np.asarray(arrays[k]) for k in arrays.files}
    return traverse_util.unflatten_dict(flat, sep="/")


def save_model_info(model_dir: Path, info: ModelInfo) -> None:
    """Written last by a run: a folder without model.json is incomplete."""
    atomic_write_json(model_dir / MODEL_FILE, info.to_json())


def load_model_info(model_dir: Path) -> ModelInfo:
    """model.json of a complete folder: format, files of every class and the adaptors checked."""
    path = model_dir / MODEL_FILE
    if not model_dir.is_dir():
        raise ModelFolderError(f"--config.checkpoint={model_dir}: no such model folder")
    if not path.is_file():
        hint = ""
        if (model_dir / "checkpoints").is_dir() or any(model_dir.glob("*/state")):
            hint = " (this is an adaptor checkpoint folder: use it with mode=eval)"
        raise ModelFolderError(
            f"{path}: not found. --config.checkpoint must name the `model` folder of a finished "
            f"train_eval or eval run{hint}"
        )
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelFolderError(f"{path}: unreadable ({error})") from error
    info = ModelInfo.from_json(record, str(path))
    missing = [
        str(model_dir / c / name)
        for c in info.classes
        for name in [*(f"{m}.npz" for m in info.modalities), "fusion.json"]
        if not (model_dir / c / name).is_file()
    ]
    if info.adaptors is not None and not (model_dir / ADAPTOR_FILE).is_file():
        missing.append(str(model_dir / ADAPTOR_FILE))
    if missing:
        raise ModelFolderError(f"{model_dir}: incomplete model folder, missing {missing}")
    return info
