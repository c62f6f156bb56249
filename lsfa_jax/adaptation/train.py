"""LSFA adaptor training (paper Algorithm 1): loss, optimizer step, then bank update, per batch.

Data interface: `batches_fn(epoch)` returns an iterable of dicts with `rgb` (B,P,rgb_dim),
`xyz` (B,P,xyz_dim), `fg` (B,P) bool, `class_id` (B,) int32, optionally `rgb_cls` (B,rgb_dim)
or None, and `rgb_rot` (B,P,rgb_dim) when w_rot > 0. It must be deterministic given `epoch`:
a resumed run skips the batches of the current epoch that were already consumed.

`cfg` is the run's `config.adaptation`; every key, its default and where the default comes from
are in configs/base.py (`python main.py --config=configs/mvtec3d.py --config.mode=keys` lists
them). The loss settings among them are read once into `losses.LossConfig`.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from lsfa_jax.adaptation.banks import Bank, bank_push, init_bank
from lsfa_jax.adaptation.checkpointing import Checkpointer
from lsfa_jax.adaptation.losses import BANK_NAMES, LossConfig, lsfa_loss
from lsfa_jax.atomic_io import atomic_write_text
from lsfa_jax.mesh import make_mesh, replicate, shard_rows
from lsfa_jax.models.adaptors import LSFAModel, init_lsfa_params, lsfa_model
from lsfa_jax.summaries import SummaryWriter

Batch = Mapping[str, Any]


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs. `step` counts consumed batches; (epoch, batch_index) is
    the data position: the next batch is batch `batch_index` of `batches_fn(epoch)`."""

    params: Any
    opt_state: Any
    banks: dict[str, Bank]
    rng: jax.Array
    step: jax.Array
    epoch: jax.Array
    batch_index: jax.Array


def build_model(cfg: ml_collections.ConfigDict) -> LSFAModel:
    """The LSFAModel described by `cfg`, its layers under the policy `cfg.precision`."""
    return lsfa_model(
        cfg.precision,
        rgb_dim=cfg.rgb_dim,
        xyz_dim=cfg.xyz_dim,
        proj_dim=cfg.proj_dim,
        structure=cfg.structure,
        rgb_heads=cfg.rgb_heads,
        xyz_heads=cfg.xyz_heads,
    )


def bank_fill(banks: Mapping[str, Bank]) -> dict[str, float]:
    """{bank name: filled fraction}, averaged over the per-class banks."""
    return {
        name: float(np.mean(np.asarray(bank.count)) / bank.features.shape[1])
        for name, bank in banks.items()
    }


def make_optimizer(
    cfg: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    """AdamW with the learning-rate schedule of `lr_schedule`, wrapped in optax.MultiSteps
    (gradients averaged over accum_steps batches per update)."""
    schedule = lr_schedule(cfg, total_steps)
    tx = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return optax.MultiSteps(tx, every_k_schedule=cfg.accum_steps)


def lr_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Learning rate per optimizer update over a run of `total_steps` batches.

    Linear warm-up from 0 over min(warmup_steps, updates // 2) updates, then a half-cosine to 0
    over `lr_decay_steps` updates, or over the rest of the run when lr_decay_steps is 0. The cap
    keeps short runs (few-shot, smoke tests) the same shape as the default 2-epoch run, whose
    warm-up is its first epoch: warm up over the first half, decay to 0 by the end.
    """
    updates = max(1, total_steps // cfg.accum_steps)
    warmup = min(int(cfg.warmup_steps), updates // 2)
    decay = int(cfg.get("lr_decay_steps", 0)) or updates - warmup
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=warmup + max(decay, 1),
        end_value=0.0,
    )


def init_banks(cfg: ml_collections.ConfigDict, num_classes: int) -> dict[str, Bank]:
    """Empty local and global banks for both modalities."""
    K = num_classes if cfg.banks_per_class else 1
    dtype = jnp.dtype(cfg.bank_dtype)
    dims = dict(rgb=cfg.rgb_dim, xyz=cfg.xyz_dim)
    sizes = dict(local=cfg.local_bank_size, global_=cfg.global_bank_size)
    return {
        name: init_bank(K, sizes["local" if "local" in name else "global_"], dims[name[:3]], dtype)
        for name in BANK_NAMES
    }


def init_train_state(
    cfg: ml_collections.ConfigDict, num_classes: int, total_steps: int
) -> TrainState:
    """Fresh parameters (PyTorch-default init from cfg.seed), optimizer state and empty banks."""
    root = jax.random.PRNGKey(cfg.seed)
    params = init_lsfa_params(build_model(cfg), jax.random.fold_in(root, 0), cfg.num_patches)
    return TrainState(
        params=params,
        opt_state=make_optimizer(cfg, total_steps).init(params),
        banks=init_banks(cfg, num_classes),
        rng=jax.random.fold_in(root, 1),
        # Distinct buffers: the jitted step donates its input state.
        step=jnp.zeros((), jnp.int32),
        epoch=jnp.zeros((), jnp.int32),
        batch_index=jnp.zeros((), jnp.int32),
    )


def push_banks(banks: Mapping[str, Bank], push: Mapping[str, jax.Array]) -> dict[str, Bank]:
    """Eq. 7 after the loss: local banks get the masked patches, global banks one row per sample."""
    ids = push["bank_ids"]
    out = {}
    for mod in ("rgb", "xyz"):
        f = push[f"{mod}_local"]
        B, P, C = f.shape
        out[f"{mod}_local"] = bank_push(
            banks[f"{mod}_local"],
            f.reshape(B * P, C),
            push[f"{mod}_mask"].reshape(B * P),
            jnp.repeat(ids, P),
        )
        out[f"{mod}_global"] = bank_push(
            banks[f"{mod}_global"], push[f"{mod}_global"], push["global_mask"], ids
        )
    return out


def make_train_step(
    model: LSFAModel, cfg: ml_collections.ConfigDict, mesh: Mesh, total_steps: int
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Jitted (state, batch) -> (state, loss terms); see `_make_train_step`. Steps built from
    equal settings are shared, so a resumed run in the same process does not recompile."""
    return _make_train_step(model, cfg.to_json(sort_keys=True), mesh, total_steps)


@functools.lru_cache(maxsize=8)
def _make_train_step(model: LSFAModel, cfg_json: str, mesh: Mesh, total_steps: int):
    """Jitted (state, batch) -> (state, loss terms), data-parallel over `mesh`'s 'data' axis.

    The batch is split over devices, state (params, optimizer, banks) is replicated. The loss is
    a mean over the global batch, so the partitioner inserts the gradient all-reduce, and the
    banks are updated from the features of the whole global batch, identically everywhere.
    """
    cfg = ml_collections.ConfigDict(json.loads(cfg_json))
    tx = make_optimizer(cfg, total_steps)
    loss_cfg = LossConfig.from_config(cfg)
    use_cls = bool(cfg.prepend_cls)

    def train_step(state: TrainState, batch: Batch):
        batch = dict(batch)
        if not use_cls:
            batch["rgb_cls"] = None
        key = jax.random.fold_in(state.rng, state.step)
        grad_fn = jax.value_and_grad(lsfa_loss, has_aux=True)
        (_, aux), grads = grad_fn(
            state.params, model, batch, state.banks, state.step, key, loss_cfg
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        banks = push_banks(state.banks, aux["push"])
        new = state.replace(params=params, opt_state=opt_state, banks=banks, step=state.step + 1)
        return new, aux["terms"]

    replicated = NamedSharding(mesh, PartitionSpec())
    split = NamedSharding(mesh, PartitionSpec("data"))
    return jax.jit(
        train_step,
        in_shardings=(replicated, split),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )


def check_batch(batch: Batch, cfg: ml_collections.ConfigDict, num_devices: int) -> dict:
    """The batch as a dict of arrays, after checking keys, shapes and divisibility."""
    missing = [k for k in ("rgb", "xyz", "fg", "class_id") if k not in batch]
    if missing:
        raise KeyError(f"train.py: batch lacks {missing}; has {sorted(batch)}")
    B, P, Ci = np.shape(batch["rgb"])
    expected = dict(xyz=(B, P, cfg.xyz_dim), fg=(B, P), class_id=(B,))
    bad = {k: np.shape(batch[k]) for k, s in expected.items() if np.shape(batch[k]) != s}
    if Ci != cfg.rgb_dim or bad:
        raise ValueError(f"train.py: batch shapes rgb={(B, P, Ci)} {bad}; expected {expected}")
    if cfg.batch_size != B or B % num_devices:
        raise ValueError(
            f"train.py: batch size {B} must equal cfg.batch_size={cfg.batch_size} and be "
            f"divisible by the {num_devices} devices"
        )
    out = {k: batch[k] for k in ("rgb", "xyz", "fg", "class_id")}
    out["rgb_cls"] = batch.get("rgb_cls")
    if batch.get("rgb_rot") is not None:
        out["rgb_rot"] = batch["rgb_rot"]
    return out


def _count_batches(batches_fn: Callable[[int], Iterable[Batch]]) -> int:
    batches = batches_fn(0)
    return len(batches) if hasattr(batches, "__len__") else sum(1 for _ in batches)


def train_adaptors(
    cfg: ml_collections.ConfigDict,
    batches_fn: Callable[[int], Iterable[Batch]],
    workdir: str | os.PathLike,
    *,
    num_classes: int,
    resume: bool = True,
    steps_per_epoch: int | None = None,
    mesh: Mesh | None = None,
) -> TrainState:
    """Trains the adaptors and heads on `mesh` (default: every device of every process; each
    process places its rows of every batch, `lsfa_jax.mesh`); checkpoints to
    `<workdir>/checkpoints`, TensorBoard events to `<workdir>/tensorboard`, the config to
    `<workdir>/adaptation_config.json`.

    With `resume` the latest checkpoint (params, optimizer, banks, rng, step, data position) is
    restored, and the run ends with the same parameters as an uninterrupted one.
    `steps_per_epoch` is only needed when cfg.num_steps is 0; when omitted it is counted by
    iterating `batches_fn(0)` once.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = mesh or make_mesh()
    if cfg.num_steps > 0:
        total = int(cfg.num_steps)
    else:
        total = int(cfg.num_epochs) * (steps_per_epoch or _count_batches(batches_fn))
    if total < 1:
        raise ValueError("train.py: nothing to train (num_steps/num_epochs/batches give 0 steps)")
    atomic_write_text(workdir / "adaptation_config.json", cfg.to_json(indent=2))

    state = replicate(mesh, init_train_state(cfg, num_classes, total))
    checkpointer = Checkpointer(workdir / "checkpoints", keep=cfg.keep_checkpoints)
    if resume and checkpointer.latest_step() is not None:
        state = checkpointer.restore(state)
        logging.info("Resumed adaptation from step %d", int(state.step))
    train_step = make_train_step(build_model(cfg), cfg, mesh, total)
    writer = SummaryWriter(workdir / "tensorboard")
    schedule = lr_schedule(cfg, total)

    def position(epoch: int, index: int) -> dict[str, jax.Array]:
        # Placed like the rest of the state, so the jitted step sees one input sharding.
        return replicate(mesh, dict(epoch=np.int32(epoch), batch_index=np.int32(index)))

    step, epoch, index = int(state.step), int(state.epoch), int(state.batch_index)
    bar = tqdm(total=total, initial=step, desc="lsfa adaptation", dynamic_ncols=True)
    try:
        while step < total:
            consumed = 0
            for batch in itertools.islice(batches_fn(epoch), index, None):
                batch = shard_rows(mesh, check_batch(batch, cfg, mesh.size))
                state, terms = train_step(state, batch)
                step, index, consumed = step + 1, index + 1, consumed + 1
                state = state.replace(**position(epoch, index))
                bar.update(1)
                if step % cfg.log_every == 0 or step == total:
                    values = {k: float(v) for k, v in terms.items()}
                    logged = {f"adaptation/{k}": v for k, v in values.items()}
                    logged["adaptation/learning_rate"] = float(
                        schedule((step - 1) // cfg.accum_steps)
                    )
                    logged |= {f"bank_fill/{k}": v for k, v in bank_fill(state.banks).items()}
                    writer.scalars(logged, step)
                    bar.set_postfix(loss=f"{values['total']:.4f}")
                    logging.info(
                        "step %d: %s", step, " ".join(f"{k}={v:.4f}" for k, v in values.items())
                    )
                if step % cfg.checkpoint_every == 0 and step < total:
                    checkpointer.save(step, state)
                if step >= total:
                    break
            else:
                if consumed == 0 and index == 0:
                    raise ValueError(f"train.py: batches_fn({epoch}) yielded no batches")
                epoch, index = epoch + 1, 0
                state = state.replace(**position(epoch, index))
        if checkpointer.latest_step() != step:
            checkpointer.save(step, state)
    finally:
        bar.close()
        writer.close()
        checkpointer.close()
    return state
