"""Multi-process runs: `jax.distributed` set up from `config.distributed` or the environment.

One process runs per machine (or per group of its accelerators); together they form one JAX
runtime whose `jax.devices()` holds every process's devices, so the run's mesh
(`lsfa_jax.mesh.make_mesh`) spans all of them and every stage splits its batches over it. Each
process reads the same data, places and computes only its own rows of each batch, and gathers
the outputs, so every process holds the same features, parameters, banks and scores. Checkpoints
are written by all processes together (orbax's multi-host protocol) into one folder, which must
be on a filesystem every process sees.

Settings (a config key wins over its environment variable):

  config.distributed.coordinator_address   JAX_COORDINATOR_ADDRESS   host:port of process 0
  config.distributed.num_processes          JAX_NUM_PROCESSES         number of processes
  config.distributed.process_id             JAX_PROCESS_ID            this process's index
  config.distributed.local_device_ids       JAX_LOCAL_DEVICE_IDS      devices of this process

On CPU the collectives between processes use gloo (`jax_cpu_collectives_implementation`).
`initialize_from_config` must run before anything touches a JAX device; main.py calls it first.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from lsfa_jax.errors import UserError

ENV = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
    "local_device_ids": "JAX_LOCAL_DEVICE_IDS",
}


class DistributedConfigError(UserError, ValueError):
    """`config.distributed` / the JAX_* variables do not describe a valid multi-process run."""


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """One process's part of a multi-process run."""

    coordinator_address: str
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None = None
    initialization_timeout: int = 300


def _value(config: Mapping[str, Any], environ: Mapping[str, str], key: str, unset: Any) -> Any:
    value = config.get(key, unset)
    if value != unset:
        return value, f"config.distributed.{key}"
    if environ.get(ENV[key], "") != "":
        return environ[ENV[key]], ENV[key]
    return unset, f"config.distributed.{key}"


def _integer(value: Any, where: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedConfigError(f"{where}={value!r}: expected an integer") from None


def distributed_settings(
    config: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None
) -> DistributedSettings | None:
    """The multi-process settings of `config.distributed` (or the environment), or None for a
    single-process run (no coordinator and at most one process)."""
    config = {} if config is None else dict(config)
    environ = os.environ if environ is None else environ
    address, address_from = _value(config, environ, "coordinator_address", "")
    count, count_from = _value(config, environ, "num_processes", 0)
    index, index_from = _value(config, environ, "process_id", -1)
    devices, devices_from = _value(config, environ, "local_device_ids", "")
    count, index = _integer(count, count_from), _integer(index, index_from)
    if not address and count <= 1:
        return None
    if not address:
        raise DistributedConfigError(
            f"{count_from}={count}: a multi-process run needs the coordinator's host:port; set "
            f"--config.distributed.coordinator_address (or {ENV['coordinator_address']})"
        )
    if ":" not in str(address):
        raise DistributedConfigError(
            f"{address_from}={address!r}: expected host:port of process 0, e.g. 10.0.0.1:1234"
        )
    if count < 1:
        raise DistributedConfigError(
            f"{count_from}={count}: set the number of processes with "
            f"--config.distributed.num_processes (or {ENV['num_processes']})"
        )
    if not 0 <= index < count:
        raise DistributedConfigError(
            f"{index_from}={index}: each process needs its index 0 .. {count - 1}; set "
            f"--config.distributed.process_id (or {ENV['process_id']})"
        )
    ids = None
    if str(devices).strip():
        ids = tuple(_integer(d, devices_from) for d in str(devices).split(","))
    timeout = _integer(config.get("initialization_timeout", 300), "initialization_timeout")
    return DistributedSettings(str(address), count, index, ids, timeout)


def initialize(settings: DistributedSettings) -> None:
    """Joins this process to the run (blocks until all `num_processes` have joined)."""
    import jax

    # gloo is jax 0.10's default for CPU collectives; set here so a CPU run never depends on it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=settings.coordinator_address,
        num_processes=settings.num_processes,
        process_id=settings.process_id,
        local_device_ids=list(settings.local_device_ids) if settings.local_device_ids else None,
        initialization_timeout=settings.initialization_timeout,
    )


def initialize_from_config(config: Any, environ: Mapping[str, str] | None = None) -> bool:
    """`initialize` when `config.distributed` (or the environment) describes a multi-process
    run; True if it did. Call before any JAX computation."""
    section = config.get("distributed") if hasattr(config, "get") else None
    if section is not None and hasattr(section, "to_dict"):
        section = section.to_dict()
    settings = distributed_settings(section, environ)
    if settings is None:
        return False
    initialize(settings)
    return True
