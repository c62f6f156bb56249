"""The deployable model a run leaves behind: what `mode=predict` needs to score new samples.

  <workdir>/model/model.json            method, settings, classes, feature fingerprint, config
  <workdir>/model/<class>/<modality>.npz memory bank rows (in the bank's dtype), validity mask
                                        and feature stats
  <workdir>/model/<class>/fusion.json   the RGB+3D fusion (fitted on normal validation samples),
                                        the decision threshold and the anomaly-map colour scale
                                        of each setting
The adaptor parameters stay in the run's orbax checkpoint folder, named in model.json.
Every file is written atomically.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from lsfa_jax import fusion
from lsfa_jax.atomic_io import atomic_write_bytes, atomic_write_json
from lsfa_jax.patchcore.bank import MemoryBank, with_search_index
from lsfa_jax.patchcore.normalisation import FeatureStats

# npz has no bfloat16: such rows are stored as their uint16 bit patterns plus the dtype name.
BANK_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ClassModel(NamedTuple):
    """fusion.json of one class: fusion (None with one modality), {setting: threshold record},
    {setting: (vmin, vmax)} colour scale of its anomaly maps."""

    fusion: fusion.Fusion | None
    thresholds: dict[str, dict[str, float]]
    map_scale: dict[str, tuple[float, float]]


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
        raise FileNotFoundError(f"{path}: memory bank not found (was the run completed?)")
    with np.load(path) as data:
        dtype = str(data["dtype"]) if "dtype" in data else "float32"
        if dtype not in BANK_DTYPES:
            raise ValueError(f"{path}: bank dtype {dtype!r} not in {sorted(BANK_DTYPES)}")
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
            "thresholds": model.thresholds,
            "map_scale": {s: list(v) for s, v in model.map_scale.items()},
        },
    )


def load_class_model(path: Path) -> ClassModel:
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (was the run completed?)")
    record = json.loads(path.read_text())
    if "map_scale" not in record:
        raise ValueError(
            f"{path}: no map_scale (the anomaly-map colour scale), so the model folder was "
            "written by an older version; run mode=eval with the same checkpoint to rebuild it"
        )
    stored = record["fusion"]
    return ClassModel(
        fusion=None if stored is None else fusion.fusion_from_dict(stored, where=str(path)),
        thresholds=record["thresholds"],
        map_scale={s: (float(v[0]), float(v[1])) for s, v in record["map_scale"].items()},
    )


def save_model_info(model_dir: Path, info: dict[str, Any]) -> None:
    atomic_write_json(model_dir / "model.json", info)


def load_model_info(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "model.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: not found. --config.checkpoint must name the `model` folder of a finished "
            "train_eval or eval run"
        )
    return json.loads(path.read_text())
