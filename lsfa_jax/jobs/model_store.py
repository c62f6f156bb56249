"""The deployable model a run leaves behind: what `mode=predict` needs to score new samples.

  <workdir>/model/model.json            method, settings, classes, feature fingerprint, config
  <workdir>/model/<class>/<modality>.npz memory bank rows, validity mask and feature stats
  <workdir>/model/<class>/fusion.json   score normalisers (from normal validation samples) and
                                        the decision threshold of each setting
The adaptor parameters stay in the run's orbax checkpoint folder, named in model.json.
Every file is written atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from lsfa_jax.jobs.common import write_json_atomic
from lsfa_jax.patchcore.bank import MemoryBank
from lsfa_jax.patchcore.normalisation import FeatureStats


def save_bank(path: Path, bank: MemoryBank) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npz")
    os.close(fd)
    try:
        np.savez(
            tmp,
            features=np.asarray(bank.features.astype(jnp.float32)),
            valid=np.asarray(bank.valid),
            mean=np.asarray(bank.stats.mean),
            std=np.asarray(bank.stats.std),
        )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_bank(path: Path) -> MemoryBank:
    if not path.exists():
        raise FileNotFoundError(f"{path}: memory bank not found (was the run completed?)")
    with np.load(path) as data:
        return MemoryBank(
            features=jnp.asarray(data["features"]),
            valid=jnp.asarray(data["valid"]),
            stats=FeatureStats(mean=jnp.asarray(data["mean"]), std=jnp.asarray(data["std"])),
        )


def save_model_info(model_dir: Path, info: dict[str, Any]) -> None:
    write_json_atomic(model_dir / "model.json", info)


def load_model_info(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "model.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: not found. --config.checkpoint must name the `model` folder of a finished "
            "train_eval or eval run"
        )
    return json.loads(path.read_text())
