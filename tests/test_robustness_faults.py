"""Faults: a run killed with SIGKILL and started again ends exactly like an uninterrupted run.

The end-to-end test runs `main.py` (train_eval, method lsfa, a tiny synthetic config) in
subprocesses: an uninterrupted reference run, and a run in a second workdir that is killed at a
seeded random point of adaptor training (possibly in the middle of a checkpoint save) and
restarted to completion. Scores, metrics, memory banks and adaptor parameters must be
bit-identical to the reference, and the restart must reuse the finished work (cached features,
the latest complete checkpoint). The in-process tests cover what a kill can leave
behind in each writer: feature-cache temp folders, TFDS `incomplete.*` folders, orbax temp
checkpoints; temp result files are covered with their writer in test_atomic_io.py.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from lsfa_jax.adaptation.checkpointing import Checkpointer, load_adaptor_params
from lsfa_jax.data import pipeline, prepare
from lsfa_jax.features import cache
from tests.helpers.runs import (
    assert_same_outputs,
    finish,
    generate_raw,
    kill_at,
    run_config,
    run_outputs,
    start_run,
)

SEED = 20240917  # picks the kill points; fixed so a failure can be reproduced


@pytest.mark.slow
def test_killed_and_restarted_run_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    args, config = run_config()
    raw = generate_raw(tmp_path, config)
    rng = random.Random(SEED)
    kill_step = rng.randint(2, 6)  # of 8 training steps; >= 2 so a complete checkpoint exists
    kill_delay = rng.uniform(0.0, 0.15)  # a training step takes about 0.2 s

    reference, reference_log = start_run(args, raw, tmp_path / "reference")
    killed, killed_log = start_run(args, raw, tmp_path / "killed")
    # Inside adaptor training, just after the save of checkpoint `kill_step` started.
    kill_at(killed, killed_log, f"Saving checkpoint at step {kill_step}", kill_delay)
    assert not (tmp_path / "killed" / "results").exists()
    # Completion.
    final, final_log = start_run(args, raw, tmp_path / "killed")
    final_text = finish(final, final_log)
    finish(reference, reference_log)

    # The restart reused the finished work: features from the cache, training resumed.
    for split in ("train", "validation", "test"):
        assert f"Features of box/{split}: cached at" in final_text
    # From the checkpoint before the one being saved at the kill, that one, or (the kill came a
    # little later) the next one.
    resumed = [int(s) for s in _resumed_steps(final_text)]
    assert len(resumed) == 1 and kill_step - 1 <= resumed[0] <= kill_step + 1, final_text[-2000:]
    assert_same_outputs(run_outputs(tmp_path / "reference"), run_outputs(tmp_path / "killed"))
    # One entry per split; hidden temp folders a kill may leave are never read.
    features = tmp_path / "killed" / "cache" / "features"
    entries = [p.name.split("-")[1] for p in features.iterdir() if not p.name.startswith(".")]
    assert sorted(entries) == ["test", "train", "validation"]


def _resumed_steps(text: str) -> list[str]:
    marker = "Resumed adaptation from step "
    return [line.split(marker)[1].split()[0] for line in text.splitlines() if marker in line]


# --- what a kill leaves behind, writer by writer (in process) -----------------------------------


def _fake_prepared(monkeypatch: pytest.MonkeyPatch, batches: list[dict]) -> dict[str, str]:
    """A stand-in pipeline of fixed batches, so the cache can be tested without TFDS."""
    count = sum(len(b["file_id"]) for b in batches)
    monkeypatch.setattr(cache.pipeline, "num_examples", lambda prepared, c, s: count)
    monkeypatch.setattr(
        cache.pipeline, "make_batches", lambda prepared, c, s, b: iter([dict(x) for x in batches])
    )
    return {"box": "/prepared/box"}


def _batches() -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {
            "xyz": rng.normal(size=(2, 4, 3)).astype(np.float32),
            "file_id": np.array([f"train/good/{2 * i:03d}", f"train/good/{2 * i + 1:03d}"]),
            "label": np.zeros(2, np.int32),
            "defect_type": np.array(["good", "good"]),
        }
        for i in range(3)
    ]


def test_feature_cache_interrupted_midway_leaves_no_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = _batches()
    prepared = _fake_prepared(monkeypatch, batches)
    calls = []

    def interrupted(batch: dict) -> dict:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what Ctrl-C does half-way through the split
        return {"xyz": batch["xyz"] * 2}

    with pytest.raises(KeyboardInterrupt):
        cache.split_features(interrupted, "fp", prepared, "box", "train", tmp_path, batch_size=2)
    assert list((tmp_path / "features").iterdir()) == []

    entry = cache.split_features(
        lambda b: {"xyz": b["xyz"] * 2}, "fp", prepared, "box", "train", tmp_path, batch_size=2
    )
    expected = np.concatenate([b["xyz"] for b in batches]) * 2
    np.testing.assert_array_equal(entry.arrays["xyz"], expected)
    assert entry.file_id == [f"train/good/{i:03d}" for i in range(6)]


def test_feature_cache_ignores_what_a_sigkill_leaves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL skips the cleanup: a temp folder with partial arrays (and even a meta.json) stays.

    It is never read: entries are found only under their final name, renamed into place last.
    """
    batches = _batches()
    prepared = _fake_prepared(monkeypatch, batches)
    key = cache.entry_key("fp", prepared["box"], "box", "train")
    leftover = tmp_path / "features" / f".box-train-{key}.abc123"
    leftover.mkdir(parents=True)
    np.save(leftover / "xyz.npy", np.full((6, 2, 4, 3), 7.0, np.float32))
    (leftover / "meta.json").write_text('{"file_id": [], "arr')

    entry = cache.split_features(
        lambda b: {"xyz": b["xyz"]}, "fp", prepared, "box", "train", tmp_path, batch_size=2
    )
    np.testing.assert_array_equal(entry.arrays["xyz"], np.concatenate([b["xyz"] for b in batches]))
    assert entry.path.name == f"box-train-{key}"


def test_feature_cache_entry_finished_meanwhile_by_another_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs with one --config.cache_dir compute the same entry; the later one must not fail."""
    batches = _batches()
    prepared = _fake_prepared(monkeypatch, batches)

    def extract(batch: dict) -> dict:
        if not (tmp_path / "other").exists():  # the other run completes the entry now
            (tmp_path / "other").mkdir()
            cache.split_features(
                lambda b: {"xyz": b["xyz"]}, "fp", prepared, "box", "train", tmp_path / "other"
            )
            key = cache.entry_key("fp", prepared["box"], "box", "train")
            os.replace(
                tmp_path / "other" / "features" / f"box-train-{key}",
                tmp_path / "features" / f"box-train-{key}",
            )
        return {"xyz": batch["xyz"]}

    entry = cache.split_features(extract, "fp", prepared, "box", "train", tmp_path, batch_size=2)
    np.testing.assert_array_equal(entry.arrays["xyz"], np.concatenate([b["xyz"] for b in batches]))
    assert [p.name for p in (tmp_path / "features").iterdir()] == [entry.path.name]


def test_prepare_redoes_a_build_killed_midway(synthetic_root: Path, tmp_path: Path) -> None:
    """A TFDS build killed before its rename leaves `incomplete.*`; the next run rebuilds."""
    data_cfg = ml_collections.ConfigDict(
        dict(
            name="mvtec3d",
            data_dir=str(tmp_path / "mvtec"),
            classes="bagel",
            image_size=32,
            preprocess=False,
            num_workers=1,
            seed=0,
        )
    )
    (tmp_path / "mvtec").mkdir()
    (tmp_path / "mvtec" / "bagel").symlink_to(synthetic_root / "torus")
    reference = prepare.prepare_dataset(data_cfg, tmp_path / "reference")

    key = prepare.cache_key(data_cfg, "bagel")
    inside = Path(reference["bagel"]).relative_to(prepare.cache_entry(tmp_path / "reference", key))
    version_dir = prepare.cache_entry(tmp_path / "killed", key) / inside
    incomplete = version_dir.parent / f"incomplete.XYZ_{version_dir.name}"
    incomplete.mkdir(parents=True)
    (incomplete / "mvtec3d-train.tfrecord-00000-of-00001").write_bytes(b"half a record")
    rebuilt = prepare.prepare_dataset(data_cfg, tmp_path / "killed")
    assert rebuilt["bagel"] == str(version_dir)
    for split in ("train", "validation", "test"):
        first = list(pipeline.make_batches(reference, "bagel", split, 16))
        again = list(pipeline.make_batches(rebuilt, "bagel", split, 16))
        assert len(first) == len(again) == 1
        for name in ("rgb", "xyz", "mask", "label", "file_id"):
            np.testing.assert_array_equal(again[0][name], first[0][name], err_msg=name)


def test_orbax_ignores_a_checkpoint_killed_while_saving(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    checkpointer = Checkpointer(directory)
    state = {"params": {"w": np.arange(8, dtype=np.float32)}, "step": np.asarray(2, np.int32)}
    checkpointer.save(2, state)
    checkpointer.close()
    # What a kill during the save of step 3 leaves: orbax's temp folder, never renamed.
    partial = directory / "3.orbax-checkpoint-tmp-1234"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\x00" * 10)

    checkpointer = Checkpointer(directory)
    assert checkpointer.latest_step() == 2
    restored = checkpointer.restore(state)
    checkpointer.close()
    np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
    np.testing.assert_array_equal(load_adaptor_params(directory)["w"], state["params"]["w"])
