"""What every job needs: the class list, config checks, the work folders, logging to a file, the
prepared data, and the run config of a saved model."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jax.numpy as jnp
import ml_collections
from absl import logging

from lsfa_jax import console
from lsfa_jax.data import mvtec3d, prepare
from lsfa_jax.errors import UserError
from lsfa_jax.model_folder import (
    BANK_DTYPES,
    ModelInfo,
    check_weights,
    load_adaptor_params,
    load_model_info,
)
from lsfa_jax.models.adaptors import AdaptorSettings


class ConfigError(UserError, ValueError):
    """The config asks for something that cannot be done; the message says what to change."""


def selected_classes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """`config.data.classes` ("all" or comma-separated names) checked against the dataset."""
    try:
        return prepare.resolve_classes(config.data)
    except mvtec3d.DataError:
        raise
    except ValueError as error:
        raise ConfigError(f"config.data.classes: {error}") from error


def bank_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
    """`config.patchcore.bank_dtype` (float32 | bfloat16, checked by `validate`) as a dtype."""
    return jnp.dtype(BANK_DTYPES[config.patchcore.bank_dtype])


def prepare_workdir(workdir: str | os.PathLike) -> Path:
    """Creates the workdir, checks it is writable, and adds a log file there."""
    path = Path(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ConfigError(f"workdir {path}: not writable ({error.strerror or error})") from error
    console.add_log_file(path / "run.log")
    return path


def cache_dir(config: ml_collections.ConfigDict, workdir: Path) -> Path:
    """Where prepared data and cached features live (shared between runs when set explicitly)."""
    return Path(config.cache_dir) if config.cache_dir else workdir / "cache"


def raw_data_dir(config: ml_collections.ConfigDict, workdir: Path) -> str:
    """`config.data.data_dir`; for the synthetic dataset left empty, a folder of the cache (the
    generated data belongs to the run, never to the current directory)."""
    if config.data.data_dir or config.data.name != "synthetic":
        return config.data.data_dir
    return str(cache_dir(config, workdir) / "synthetic_raw")


def prepared_dataset(
    config: ml_collections.ConfigDict,
    workdir: Path,
    splits: tuple[str, ...] = mvtec3d.SPLITS,
) -> dict[str, str]:
    """class -> prepared dataset folder of `splits`, for the configured classes."""
    data_cfg = ml_collections.ConfigDict(config.data.to_dict())
    data_cfg.classes = ",".join(selected_classes(config))
    console.stage(
        "preparing data (%s, %s) into %s (done once, then found in the cache)",
        data_cfg.classes.replace(",", ", "),
        "/".join(splits),
        cache_dir(config, workdir) / "prepared",
    )
    data_cfg.data_dir = raw_data_dir(config, workdir)
    data_cfg.skip_bad_samples = bool(config.skip_bad_samples)
    return prepare.prepare_dataset(data_cfg, cache_dir(config, workdir), splits)


# What a test or predict run takes from its own command line; everything else (backbones,
# preprocessing, image size, grid, scoring, fusion, seeds) is the saved model's.
RUN_KEYS = (
    "mode",
    "checkpoint",
    "input",
    "skip_bad_samples",
    "data_dir",
    "cache_dir",
    "rgb_weights",
    "point_weights",
    "report",
    "distributed",
)
RUN_DATA_KEYS = ("name", "classes", "num_workers", "xyz_scale", "validation_fraction")


def model_run_config(
    info: ModelInfo, config: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
    """The saved model's training config with this run's data, inputs and report options."""
    run = ml_collections.ConfigDict(info.config)
    for key in RUN_KEYS:
        if key in config:
            run[key] = config[key]
    for key in RUN_DATA_KEYS:
        if key in config.data:
            run.data[key] = config.data[key]
    run.data.data_dir = config.data_dir
    if "synthetic" in config.data:
        run.data.synthetic = config.data.synthetic
    return run


def open_model(
    config: ml_collections.ConfigDict,
) -> tuple[Path, ModelInfo, ml_collections.ConfigDict]:
    """The model folder named by `config.checkpoint`, its record, and the run config (the
    model's settings with this run's data and inputs), with the backbone weights checked."""
    if not config.checkpoint:
        raise ConfigError(f"mode={config.mode} needs --config.checkpoint=<model folder>")
    model_dir = Path(config.checkpoint)
    info = load_model_info(model_dir)
    run = model_run_config(info, config)
    for modality in info.weights:
        check_weights(info, modality, run[f"{modality}_weights"], model_dir)
    logging.info("Model %s: method %s, classes %s", model_dir, info.method, ", ".join(info.classes))
    return model_dir, info, run


def model_adaptors(model_dir: Path, info: ModelInfo) -> tuple[dict, AdaptorSettings] | None:
    if info.adaptors is None:
        return None
    return load_adaptor_params(model_dir, info), AdaptorSettings.from_mapping(info.adaptors)


def model_classes(info: ModelInfo, run: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The classes asked for (default: all the model's), each one the model must hold."""
    if run.data.classes in ("", "all"):
        run.data.classes = ",".join(info.classes)
    classes = selected_classes(run)
    unknown = [c for c in classes if c not in info.classes]
    if unknown:
        raise ConfigError(
            f"config.data.classes: the model folder holds {list(info.classes)}, not {unknown}"
        )
    return classes
