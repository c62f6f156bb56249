"""The one device mesh of a run and the moves between host batches and that mesh.

Every device stage (feature extraction, adaptor training and application, PatchCore scoring)
runs on a 1-D mesh with the axis `data`: batches are split along their first axis, parameters
and banks are replicated. The mesh spans the devices of every process (`jax.devices()`), so a
multi-process run (`lsfa_jax.distributed`) uses the same code: each process places only the rows
of the batch that belong to its own devices, and gathers the outputs back on every process.

In a 1-D mesh over `jax.devices()` the devices of one process are consecutive, so a process
owns one contiguous block of every batch (`process_rows`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D `data` mesh over `devices` (default: every device of every process)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def split(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA))


def process_rows(mesh: Mesh, rows: int) -> slice:
    """The rows of a (rows, ...) batch split over `mesh` that this process's devices hold."""
    if rows % mesh.size:
        raise ValueError(f"mesh.py: {rows} rows do not split over {mesh.size} devices")
    mine = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
    if not mine or mine != list(range(mine[0], mine[-1] + 1)):
        raise ValueError(f"mesh.py: this process's devices are not one block of {mesh}")
    per_device = rows // mesh.size
    return slice(mine[0] * per_device, (mine[-1] + 1) * per_device)


def shard_rows(mesh: Mesh, tree: Any) -> Any:
    """Host arrays with the same global leading size B (a multiple of mesh.size) -> global
    arrays split along axis 0. Each process transfers only its own rows."""
    sharding = split(mesh)

    def place(leaf: Any) -> jax.Array:
        leaf = np.asarray(leaf)
        local = leaf[process_rows(mesh, leaf.shape[0])]
        return jax.make_array_from_process_local_data(sharding, local, leaf.shape)

    return jax.tree.map(place, tree)


def replicate(mesh: Mesh, tree: Any) -> Any:
    """Arrays equal on every process -> global arrays replicated on every device of `mesh`."""
    sharding = replicated(mesh)

    def place(leaf: Any) -> jax.Array:
        if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
            return leaf
        leaf = np.asarray(leaf)
        return jax.make_array_from_process_local_data(sharding, leaf, leaf.shape)

    return jax.tree.map(place, tree)


def to_host(tree: Any) -> Any:
    """Global arrays -> numpy arrays of their full value, on every process."""

    def fetch(leaf: Any) -> np.ndarray:
        if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable:
            return np.asarray(leaf)
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))

    return jax.tree.map(fetch, tree)


@functools.lru_cache(maxsize=64)
def data_parallel(
    fn: Callable, mesh: Mesh, replicated_args: int, num_args: int, **static: Any
) -> Callable:
    """jit(fn(..., **static)) split over `mesh`: the first `replicated_args` of its `num_args`
    positional arguments (parameters, banks) are replicated, the others and every output are
    split along axis 0. Each device runs `fn` on its own rows, so a sample's result does not
    depend on the device count.

    Cached per (fn, mesh, counts, static), so `fn` must be a module-level function and the
    static keyword values hashable; the jitted function keeps `fn`'s name, so compilation logs
    name the stage.
    """
    in_specs = tuple(
        PartitionSpec() if i < replicated_args else PartitionSpec(DATA) for i in range(num_args)
    )
    mapped = jax.shard_map(
        functools.partial(fn, **static),
        mesh=mesh,
        in_specs=in_specs,
        out_specs=PartitionSpec(DATA),
        # The stages' loops (FPS, chunked kNN scans) start from constants and update them from
        # per-device rows; no value is reduced across devices, so the varying-axis check that
        # would ask for a pcast on every such carry adds nothing.
        check_vma=False,
    )
    mapped.__name__ = fn.__name__
    return jax.jit(mapped)
