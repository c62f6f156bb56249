"""Determinism: the same config and seed on the same machine give bit-identical results on CPU.

Two `main.py` runs (train_eval, method lsfa, the tiny synthetic config of the fault tests) with
separate workdirs and caches, run side by side, must agree bit for bit on the cached features,
the adaptor parameters of every checkpoint, the memory banks, the scores and every metric and
threshold. What differs on GPU is in docs/what_happens_when.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lsfa_jax.adaptation.checkpointing import load_adaptor_params
from tests.helpers.runs import (
    assert_same_outputs,
    finish,
    flatten,
    generate_raw,
    run_config,
    run_outputs,
    start_run,
)


def cached_features(workdir: Path) -> dict[str, np.ndarray]:
    """split/array -> cached feature array (entry names hold the workdir-specific key)."""
    out = {}
    for entry in sorted((workdir / "cache" / "features").iterdir()):
        split = entry.name.split("-")[1]
        out.update({f"{split}/{npy.stem}": np.load(npy) for npy in sorted(entry.glob("*.npy"))})
    return out


def checkpoint_params(workdir: Path) -> dict[str, np.ndarray]:
    """step/leaf path -> adaptor parameters of every kept checkpoint, plus the SHA-256 of its
    whole training state (optimizer, banks, rng) that the trainer saves with it."""
    directory = workdir / "adaptation" / "checkpoints"
    out = {}
    for step in sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()):
        params = load_adaptor_params(directory, step=step)
        out.update({f"{step}/params{k}": v for k, v in flatten(params).items()})
        digest = json.loads((directory / str(step) / "digest" / "metadata").read_text())
        out[f"{step}/state_sha256"] = np.asarray(digest["sha256"])
    return out


def _snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_two_runs_with_the_same_seed_are_bit_identical(tmp_path: Path) -> None:
    args, config = run_config()
    raw = generate_raw(tmp_path, config)
    raw_before = _snapshot(raw)
    runs = [start_run(args, raw, tmp_path / name) for name in ("first", "second")]
    for process, log in runs:
        finish(process, log)
    assert _snapshot(raw) == raw_before  # the input dataset is never modified

    first, second = tmp_path / "first", tmp_path / "second"
    assert_same_outputs(run_outputs(first), run_outputs(second))
    assert_same_outputs(cached_features(first), cached_features(second))
    steps = checkpoint_params(first)
    assert len({k.split("/")[0] for k in steps}) == config.adaptation.keep_checkpoints
    assert_same_outputs(steps, checkpoint_params(second))
    # Training moved the parameters between the kept steps, so their equality is not trivial.
    step_ids = sorted({int(k.split("/")[0]) for k in steps})
    oldest, newest = step_ids[0], step_ids[-1]
    leaves = [k.split("/", 1)[1] for k in steps if k.startswith(f"{oldest}/params")]
    assert any(not np.array_equal(steps[f"{oldest}/{k}"], steps[f"{newest}/{k}"]) for k in leaves)
