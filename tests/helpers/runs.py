"""`main.py` runs in subprocesses on the tiny config, and what they leave to compare.

The fault and determinism tests run the same small training: one class, 4 epochs of 2 batches
with a checkpoint after every batch (`FAULT_RUN`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from lsfa_jax.adaptation.checkpointing import load_adaptor_params
from lsfa_jax.data import synthetic
from tests.helpers import tiny_config

REPO = Path(__file__).resolve().parents[2]
CONFIG_FILE = REPO / "tests" / "helpers" / "tiny_config.py"
FAULT_RUN = {
    "adaptation.num_steps": 8,
    "report.num_overlays": 0,
    "report.plots": False,
}


def run_config(
    classes: str = "box", overrides: Mapping[str, Any] = FAULT_RUN
) -> tuple[list[str], ml_collections.ConfigDict]:
    """The main.py arguments choosing the tiny config with `overrides` (dotted keys), and the
    config they build, in-process."""
    args = [f"--config={CONFIG_FILE}:{classes}"]
    args += [f"--config.{key}={value}" for key, value in overrides.items()]
    config = tiny_config.get_config(classes)
    config.update_from_flattened_dict(dict(overrides))
    return args, config


def generate_raw(folder: Path, config: ml_collections.ConfigDict) -> Path:
    """Generates the raw dataset once, so concurrent runs only read it."""
    raw = folder / "raw"
    syn = synthetic.SyntheticConfig.from_mapping(config.data.synthetic.to_dict())
    synthetic.generate_dataset(raw, syn)
    assert synthetic.is_generated(raw, syn)
    return raw


def start_run(args: list[str], raw: Path, workdir: Path) -> tuple[subprocess.Popen, Path]:
    """Starts `main.py` with its own process group; stdout and stderr go to a log beside
    workdir, whose path is returned with the process."""
    log = workdir.parent / f"{workdir.name}.{int(time.monotonic() * 1e6)}.log"
    handle = log.open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "main.py",
            *args,
            f"--workdir={workdir}",
            f"--config.data_dir={raw}",
            "--verbose",  # the markers the tests wait for are INFO records
        ],
        cwd=REPO,
        stdout=handle,
        stderr=subprocess.STDOUT,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"},
        start_new_session=True,
    )
    handle.close()
    return process, log


def finish(process: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    """Waits for the run, asserts it succeeded and returns its log."""
    process.wait(timeout=timeout)
    text = log.read_text()
    assert process.returncode == 0, text[-3000:]
    return text


def kill_at(process: subprocess.Popen, log: Path, marker: str, delay: float) -> str:
    """SIGKILLs the run `delay` s after `marker` first appears in its log; returns the log."""
    deadline = time.monotonic() + 300
    while marker not in log.read_text():
        assert process.poll() is None, f"ended before {marker!r}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{marker!r} never appeared"
        time.sleep(0.02)
    time.sleep(delay)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run finished before it was killed"
    return log.read_text()


def flatten(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """{"/a/b": leaf} of a nested dict of arrays, keys sorted."""
    if isinstance(tree, dict):
        out = {}
        for key in sorted(tree):
            out.update(flatten(tree[key], f"{prefix}/{key}"))
        return out
    return {prefix: np.asarray(tree)}


def run_outputs(workdir: Path) -> dict[str, object]:
    """What a run of class box produces: scores, metrics, thresholds, banks, the final adaptor
    params and the digest of the final training state."""
    outputs: dict[str, object] = {
        name: (workdir / name).read_text()
        for name in (
            "scores/box.json",
            "results/results.json",
            "results/thresholds.json",
            "model/box/fusion.json",
        )
    }
    for modality in ("rgb", "xyz"):
        with np.load(workdir / "model" / "box" / f"{modality}.npz") as bank:
            outputs.update({f"bank/{modality}/{k}": bank[k] for k in bank.files})
    checkpoints = workdir / "adaptation" / "checkpoints"
    params = load_adaptor_params(checkpoints)
    # The SHA-256 the trainer stores with each step covers the whole TrainState (optimizer,
    # banks, rng, data position), not only the parameters.
    last = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    outputs["state_digest"] = (checkpoints / str(last) / "digest" / "metadata").read_text()
    outputs.update({f"params{k}": v for k, v in flatten(params).items()})
    return outputs


def assert_same_outputs(expected: dict, actual: dict) -> None:
    """Bit-identical: same keys, equal arrays and texts."""
    assert sorted(expected) == sorted(actual)
    for key, value in expected.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(actual[key], value, err_msg=key)
        else:
            assert actual[key] == value, key
