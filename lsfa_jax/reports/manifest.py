"""Run manifest: config, package versions, devices, weights hashes, seeds, per-stage cost.

Written as JSON (atomically) beside the results so a number can be traced to what produced it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import importlib.metadata
import os
import platform
import resource
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lsfa_jax.atomic_io import atomic_write_json

# name in the manifest -> distributions that provide it (the first installed one is reported).
PACKAGES = {
    "jax": ("jax",),
    "jaxlib": ("jaxlib",),
    "flax": ("flax",),
    "optax": ("optax",),
    "orbax": ("orbax-checkpoint",),
    "numpy": ("numpy",),
    "tensorflow": ("tensorflow", "tensorflow-cpu"),
    "open3d": ("open3d", "open3d-cpu"),
}


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (checkpoints can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def package_versions() -> dict[str, str | None]:
    """Installed versions (None when not installed) plus the Python version."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name, dists in PACKAGES.items():
        versions[name] = None
        for dist in dists:
            try:
                versions[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def _jsonable(value: Any) -> Any:
    if hasattr(value, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def peak_host_memory_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024


def device_memory() -> list[dict[str, Any]]:
    """Per JAX device: bytes in use and peak, where the backend reports them (not on CPU)."""
    import jax

    out = []
    for d in jax.local_devices():  # other processes' memory is not visible here
        stats = d.memory_stats() or {}
        out.append(
            {
                "device": str(d),
                "bytes_in_use": stats.get("bytes_in_use"),
                "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
            }
        )
    return out


def devices() -> list[dict[str, Any]]:
    """The JAX devices of the run, every process's (`process` tells whose)."""
    import jax

    return [
        {"id": d.id, "platform": d.platform, "kind": d.device_kind, "process": d.process_index}
        for d in jax.devices()
    ]


def _process_index() -> int:
    import jax

    return jax.process_index()


def _process_count() -> int:
    import jax

    return jax.process_count()


@dataclasses.dataclass
class RunManifest:
    """Collects what a run used and cost; `write(path)` stores it as JSON.

    Usage:
      manifest = RunManifest(config)
      manifest.add_weights("rgb", path, random_init=False)
      with manifest.stage("fit"):
          ...
      manifest.write(workdir / "manifest.json")
    """

    config: Any = None
    seeds: dict[str, int] = dataclasses.field(default_factory=dict)
    weights: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    stages: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    created: str = dataclasses.field(
        default_factory=lambda: datetime.datetime.now(datetime.UTC).isoformat()
    )

    def add_weights(
        self, name: str, path: str | os.PathLike | None, *, random_init: bool
    ) -> dict[str, Any]:
        """Records a weights file with its SHA-256, or random initialisation (path None)."""
        if path is None:
            if not random_init:
                raise ValueError(f"manifest: weights {name!r} have no file and are not random")
            entry = {"name": name, "path": None, "sha256": None, "random_init": True}
        else:
            p = Path(path)
            if not p.is_file():
                raise FileNotFoundError(f"manifest: weights file {p} for {name!r} does not exist")
            entry = {
                "name": name,
                "path": str(p.resolve()),
                "bytes": p.stat().st_size,
                "sha256": sha256_file(p),
                "random_init": random_init,
            }
        self.weights.append(entry)
        return entry

    def set_seed(self, name: str, seed: int) -> None:
        self.seeds[name] = int(seed)

    @contextlib.contextmanager
    def stage(self, name: str, devices_used: int | None = None) -> Iterator[dict[str, Any]]:
        """Times a stage and records peak host (and device) memory after it, and, when given,
        `devices_used`: the devices its batches were split over (0: it ran on the host only).

        The record is kept also when the stage raises ("ok": False), then the error propagates.
        """
        record: dict[str, Any] = {"name": name, "ok": False}
        if devices_used is not None:
            record["devices_used"] = int(devices_used)
        start = time.perf_counter()
        try:
            yield record
            record["ok"] = True
        finally:
            record["seconds"] = time.perf_counter() - start
            record["peak_host_memory_bytes"] = peak_host_memory_bytes()
            record["device_memory"] = device_memory()
            self.stages.append(record)

    def to_dict(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "argv": list(sys.argv),
            "config": _jsonable(self.config),
            "versions": package_versions(),
            "devices": devices(),
            "process": {"index": _process_index(), "count": _process_count()},
            "seeds": dict(self.seeds),
            "weights": list(self.weights),
            "stages": list(self.stages),
            "peak_host_memory_bytes": peak_host_memory_bytes(),
            "extra": _jsonable(self.extra),
        }

    def write(self, path: str | os.PathLike) -> Path:
        """Writes the manifest as JSON atomically; returns the path."""
        return atomic_write_json(path, self.to_dict())
