"""What every job needs: the class list, the work folders, logging to a file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import ml_collections

from lsfa_jax import console
from lsfa_jax.data import prepare
from lsfa_jax.errors import UserError


class ConfigError(UserError, ValueError):
    """The config asks for something that cannot be done; the message says what to change."""


def selected_classes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """`config.data.classes` ("all" or comma-separated names) checked against the dataset."""
    try:
        return prepare.resolve_classes(config.data)
    except ValueError as error:
        raise ConfigError(f"config.data.classes: {error}") from error


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
