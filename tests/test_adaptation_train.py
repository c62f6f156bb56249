"""Adaptor training: loss goes down, resume == uninterrupted (bitwise), accumulation, few-shot."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.base import REFERENCE_CODE
from lsfa_jax.adaptation.checkpointing import (
    CheckpointCorruptError,
    Checkpointer,
    load_adaptor_params,
)
from lsfa_jax.adaptation.losses import LossConfig, lsfa_loss
from lsfa_jax.adaptation.train import (
    build_model,
    init_train_state,
    lr_schedule,
    make_optimizer,
    train_adaptors,
)
from tests.helpers.configs import adaptation_defaults

B, P, CI, CP = 4, 9, 8, 12


def tiny_config(**overrides):
    cfg = adaptation_defaults()
    cfg.update(
        dict(
            rgb_dim=CI,
            xyz_dim=CP,
            num_patches=P,
            proj_dim=6,
            rgb_heads=2,
            xyz_heads=2,
            batch_size=B,
            warmup_steps=1,
            local_bank_size=50,
            global_bank_size=6,
            kmeans_clusters=2,
            kmeans_iters=3,
            clc_chunk_size=16,
            nn_chunk_size=32,
            checkpoint_every=2,
            log_every=1,
            lr=3e-3,
        )
    )
    cfg.update(overrides)
    return cfg


def synthetic_batches(num_batches=3, seed=0):
    """Point features are a fixed linear map of the RGB features plus noise, so the two
    modalities share structure that the adaptors can align."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(CI, CP)).astype(np.float32) / np.sqrt(CI)
    data = []
    for _ in range(num_batches):
        rgb = rng.normal(size=(B, P, CI)).astype(np.float32)
        xyz = (rgb @ W + 0.1 * rng.normal(size=(B, P, CP))).astype(np.float32)
        data.append(
            dict(
                rgb=rgb,
                xyz=xyz,
                fg=rng.random((B, P)) < 0.8,
                class_id=np.array([0, 1, 0, 1], np.int32),
                rgb_cls=rng.normal(size=(B, CI)).astype(np.float32),
            )
        )

    def batches_fn(epoch):
        # Deterministic per epoch: a different but fixed order each epoch.
        order = np.random.default_rng(100 + epoch).permutation(num_batches)
        return [data[i] for i in order]

    return batches_fn


# One configuration for all training runs here, so the jitted step is compiled once.
TRAIN_CFG = dict(num_steps=12, accum_steps=2, lr=1e-2)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted run: (workdir, final state)."""
    workdir = tmp_path_factory.mktemp("full")
    cfg = tiny_config(**TRAIN_CFG)
    state = train_adaptors(cfg, synthetic_batches(), workdir, num_classes=2, resume=False)
    return workdir, state


@pytest.mark.slow
def test_training_lowers_the_loss(full_run):
    tmp_path, state = full_run
    cfg = tiny_config(**TRAIN_CFG)
    batches_fn = synthetic_batches()
    # The run stops right after batch 3 of epoch 3 (4 epochs of 3 batches).
    assert int(state.step) == 12 and int(state.epoch) == 3 and int(state.batch_index) == 3
    init = init_train_state(cfg, 2, 12)
    model = build_model(cfg)
    loss_cfg = LossConfig.from_config(cfg)
    batch = batches_fn(0)[0]
    # Same batch, same (final) banks: only the parameters differ.
    evaluate = jax.jit(
        lambda p: lsfa_loss(p, model, batch, state.banks, 100, jax.random.PRNGKey(0), loss_cfg)[0]
    )
    before, after = float(evaluate(init.params)), float(evaluate(state.params))
    assert after < 0.9 * before, (before, after)
    # Banks: 3 distinct batches x 2 samples of each class, 9 patches each, so local RGB
    # banks saw 12 steps x 18 rows and are full (50); global banks keep the last 6.
    np.testing.assert_array_equal(np.asarray(state.banks["rgb_local"].count), [50, 50])
    np.testing.assert_array_equal(np.asarray(state.banks["rgb_global"].count), [6, 6])
    # The saved parameters load without the model or optimizer.
    loaded = load_adaptor_params(tmp_path / "checkpoints")
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    from_step_dir = load_adaptor_params(tmp_path / "checkpoints" / "12")
    assert jax.tree.structure(from_step_dir) == jax.tree.structure(loaded)
    # Resuming a finished run changes nothing.
    again = train_adaptors(cfg, batches_fn, tmp_path, num_classes=2)
    assert int(again.step) == 12
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class SimulatedCrashError(RuntimeError):
    pass


def test_resume_after_interruption_equals_uninterrupted(full_run, tmp_path):
    _, full = full_run
    cfg = tiny_config(**TRAIN_CFG)
    batches_fn = synthetic_batches()

    consumed = []

    def failing_fn(epoch):
        for batch in batches_fn(epoch):
            if len(consumed) == 5:
                raise SimulatedCrashError("simulated crash while loading batch 6")
            consumed.append(epoch)
            yield batch

    with pytest.raises(SimulatedCrashError):
        train_adaptors(cfg, failing_fn, tmp_path / "resumed", num_classes=2, steps_per_epoch=3)
    ckpt = Checkpointer(tmp_path / "resumed" / "checkpoints")
    assert ckpt.latest_step() == 4
    ckpt.close()
    resumed = train_adaptors(cfg, batches_fn, tmp_path / "resumed", num_classes=2)
    assert int(resumed.step) == 12
    full_leaves = jax.tree_util.tree_leaves_with_path(full)
    resumed_leaves = jax.tree.leaves(resumed)
    for (path, a), b in zip(full_leaves, resumed_leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), jax.tree_util.keystr(path))


@pytest.mark.slow
def test_gradient_accumulation_is_a_mean_update():
    cfg = tiny_config(accum_steps=2, warmup_steps=0, lr=1e-2)
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    g1, g2 = {"w": jnp.array([0.5, 1.0, -1.0])}, {"w": jnp.array([1.5, -3.0, 0.0])}
    tx = make_optimizer(cfg, total_steps=20)
    state = tx.init(params)
    u1, state = tx.update(g1, state, params)
    assert np.all(np.asarray(u1["w"]) == 0)  # no update after the first micro-batch
    u2, _ = tx.update(g2, state, params)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 0, 10, 0.0)
    ref = optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01)
    mean = {"w": (g1["w"] + g2["w"]) / 2}
    want, _ = ref.update(mean, ref.init(params), params)
    np.testing.assert_allclose(np.asarray(u2["w"]), np.asarray(want["w"]), rtol=1e-6)


def test_lr_schedule_short_runs_warm_up_then_decay_and_reference_stays_near_peak():
    # Few-shot sized run: 12 updates, warmup_steps=332 is capped at half the run.
    cfg = tiny_config(warmup_steps=332, lr=3e-4)
    lr = [float(lr_schedule(cfg, 12)(u)) for u in range(13)]
    np.testing.assert_allclose(lr[:7], 3e-4 * np.arange(7) / 6, rtol=1e-6)
    assert lr[6] == pytest.approx(3e-4) and lr[12] == pytest.approx(0.0, abs=1e-12)
    assert np.all(np.diff(lr[6:]) < 0)
    # The default 2-epoch run: warm-up over the first epoch, cosine to 0 at the end.
    full = [float(lr_schedule(tiny_config(warmup_steps=332, lr=3e-4), 664)(u)) for u in (332, 664)]
    assert full == pytest.approx([3e-4, 0.0], rel=1e-6, abs=1e-12)  # float32 schedule
    # The reference variant: 41 updates of 16 batches, 20 warm-up updates, then about 3e-4.
    ref = tiny_config(lr=3e-4, **{k: v for k, v in REFERENCE_CODE.items() if k in (
        "accum_steps", "warmup_steps", "lr_decay_steps")})  # fmt: skip
    sched = lr_schedule(ref, 664)
    assert float(sched(10)) == pytest.approx(1.5e-4)
    assert min(float(sched(u)) for u in range(20, 42)) > 0.999 * 3e-4


def test_bad_batches_are_rejected(tmp_path):
    cfg = tiny_config(num_steps=1)

    def wrong_dim(epoch):
        batch = synthetic_batches()(epoch)[0]
        return [dict(batch, xyz=batch["xyz"][..., :5])]

    with pytest.raises(ValueError, match="batch shapes"):
        train_adaptors(cfg, wrong_dim, tmp_path, num_classes=2)


def test_corrupted_checkpoint_is_detected(tmp_path):
    params = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    directory = tmp_path / "checkpoints"
    checkpointer = Checkpointer(directory)
    checkpointer.save(3, {"params": {"w": params}, "step": np.int32(3)})
    template = {"params": {"w": jnp.zeros((64, 8))}, "step": jnp.int32(0)}
    np.testing.assert_array_equal(np.asarray(checkpointer.restore(template)["params"]["w"]), params)
    checkpointer.close()
    np.testing.assert_array_equal(load_adaptor_params(directory)["w"], params)
    data = max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    content = bytearray(data.read_bytes())
    content[len(content) // 2] ^= 0xFF
    data.write_bytes(bytes(content))
    with pytest.raises(CheckpointCorruptError, match=str(directory / "3")):
        load_adaptor_params(directory)
    with pytest.raises(CheckpointCorruptError):
        Checkpointer(directory).restore(template)
