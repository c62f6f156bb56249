"""Orbax checkpoints of the whole adaptation TrainState (atomic: orbax writes to a temporary
folder and renames it when complete).

Layout: `<workdir>/checkpoints/<step>/{state,digest}/...`, one folder per saved step, the newest
`keep` kept. `digest` holds a SHA-256 over every saved array (path, dtype, shape, bytes), checked
on every restore, so a corrupted data file raises instead of restoring different numbers. The
state is saved as a nested dict (`flax.serialization.to_state_dict`), so `load_adaptor_params`
can read the parameters without knowing the model or optimizer.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

from lsfa_jax.errors import InputNotFoundError, UserError


class CheckpointCorruptError(UserError, ValueError):
    """A checkpoint's arrays do not match the digest saved with them."""


def tree_digest(tree: Any) -> str:
    """SHA-256 hex digest of a pytree's leaves: key path, dtype, shape and C-order bytes."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{array.dtype.str}|{array.shape}|".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def _verify(tree: Any, saved: Any, where: Path) -> None:
    digest = saved.get("sha256") if isinstance(saved, dict) else None
    if digest != tree_digest(tree):
        raise CheckpointCorruptError(
            f"{where}: checkpoint data do not match their saved SHA-256 digest (corrupted file?)"
        )


class Checkpointer:
    """Saves and restores a TrainState-like pytree under `directory`, keeping the newest `keep`."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        self.directory = Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        """Saves `state` as step `step` and waits until it is on disk. The arrays are saved as
        they are placed (replicated over a run's mesh), so in a multi-process run every process
        takes part in the write (orbax's multi-host protocol) and the checkpoint restores on
        any other set of devices."""
        tree = serialization.to_state_dict(state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(tree),
            digest=ocp.args.JsonSave({"sha256": tree_digest(tree)}),
        )
        self._manager.save(step, args=args)
        self._manager.wait_until_finished()

    def restore(self, template: Any, step: int | None = None) -> Any:
        """The state saved at `step` (default: latest), with the structure and shardings of
        `template`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"checkpointing.py: no checkpoint in {self.directory}")
        target = jax.tree.map(
            ocp.utils.to_shape_dtype_struct, serialization.to_state_dict(template)
        )
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target), digest=ocp.args.JsonRestore()
        )
        restored = self._manager.restore(step, args=args)
        _verify(restored["state"], restored["digest"], self.directory / str(step))
        return serialization.from_state_dict(template, restored["state"])

    def close(self) -> None:
        self._manager.close()


def load_adaptor_params(path: str | os.PathLike, step: int | None = None) -> dict:
    """Adaptor/head parameters from a checkpoint folder as numpy arrays, on any devices (a
    checkpoint written by a multi-process run included).

    `path` is either the checkpoints folder (the latest or the given step is read) or one
    step folder inside it.
    """
    path = Path(path).resolve()
    if not path.is_dir():
        raise InputNotFoundError(f"{path}: no such checkpoint folder")
    if (path / "state").is_dir():
        directory, step = path.parent, int(path.name) if step is None else step
    else:
        directory = path
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise InputNotFoundError(f"{path}: no checkpoint steps found")
    try:
        # Restored as host arrays of the saved shapes and dtypes: the arrays were saved as
        # placed on the training run's devices, which this process need not have.
        saved = ocp.StandardCheckpointer().metadata(directory / str(step) / "state")
        target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), saved.item_metadata)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target), digest=ocp.args.JsonRestore()
        )
        restored = manager.restore(step, args=args)
    finally:
        manager.close()
    state = restored["state"]
    _verify(state, restored["digest"], directory / str(step))
    if "params" not in state:
        raise KeyError(f"{directory}/{step}: checkpoint has no 'params' entry")
    return jax.tree.map(np.asarray, state["params"])
