"""Orbax checkpoints of the whole adaptation TrainState (atomic: orbax writes to a temporary
folder and renames it when complete).

Layout: `<workdir>/checkpoints/<step>/state/...`, one folder per saved step, the newest `keep`
kept. The state is saved as a nested dict (`flax.serialization.to_state_dict`), so
`load_adaptor_params` can read the parameters without knowing the model or optimizer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization


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
        """Saves `state` as step `step` and waits until it is on disk."""
        tree = serialization.to_state_dict(state)
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree)))
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
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        return serialization.from_state_dict(template, restored["state"])

    def close(self) -> None:
        self._manager.close()


def load_adaptor_params(path: str | os.PathLike, step: int | None = None) -> dict:
    """Adaptor/head parameters from a checkpoint folder as numpy arrays.

    `path` is either the checkpoints folder (the latest or the given step is read) or one
    step folder inside it.
    """
    path = Path(path).resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    if (path / "state").is_dir():
        directory, step = path.parent, int(path.name) if step is None else step
    else:
        directory = path
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{path}: no checkpoint steps found")
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    finally:
        manager.close()
    state = restored["state"]
    if "params" not in state:
        raise KeyError(f"{directory}/{step}: checkpoint has no 'params' entry")
    return jax.tree.map(np.asarray, state["params"])
