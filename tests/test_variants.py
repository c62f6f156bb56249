"""Every paper-row variant of the configs trains: 2 steps on tiny synthetic features, and the loss
terms its overrides switch off are exactly 0 while the others are active."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from configs import base, mvtec3d, synthetic
from lsfa_jax.adaptation.train import (
    build_model,
    check_batch,
    init_train_state,
    make_mesh,
    make_train_step,
)
from lsfa_jax.data.few_shot import few_shot_indices
from lsfa_jax.jobs.adaptor_training import training_indices
from lsfa_jax.jobs.run_evaluation import bank_indices

B, P, CI, CP = 4, 9, 8, 12
# The few-shot variants change the training set, not the train step (tested below).
TRAINED = [
    v
    for v in base.VARIANTS
    if mvtec3d.get_config(v).method == "lsfa" and not mvtec3d.get_config(v).adaptation.few_shot
]
# Term -> the weights that switch it off (its own and its family's).
OFF_BY = {
    "la": ("w_la", "lambda_clc"),
    "ga": ("w_ga", "lambda_clc"),
    "lc_rgb": ("w_lc", "w_ifc"),
    "lc_xyz": ("w_lc", "w_ifc"),
    "gc_rgb": ("w_gc", "w_ifc"),
    "gc_xyz": ("w_gc", "w_ifc"),
    "rot": ("w_rot",),
}


def tiny(cfg):
    """The variant's adaptation settings at test sizes (weights and switches untouched)."""
    cfg = cfg.copy_and_resolve_references()
    cfg.update(dict(rgb_dim=CI, xyz_dim=CP, num_patches=P, proj_dim=6, rgb_heads=2, xyz_heads=2))
    cfg.update(dict(batch_size=B, kmeans_clusters=2, kmeans_iters=2, num_steps=2))
    cfg.update(dict(local_bank_size=min(cfg.local_bank_size, 64), global_bank_size=6))
    cfg.ifc_min_bank_fill = min(cfg.ifc_min_bank_fill, 0.1)  # so IFC can start at step 2
    cfg.ifc_warmup_steps = min(cfg.ifc_warmup_steps, 1)
    cfg.accum_steps = 1
    return cfg


def batch(rng):
    rgb = rng.normal(size=(B, P, CI)).astype(np.float32)
    return dict(
        rgb=rgb,
        xyz=rng.normal(size=(B, P, CP)).astype(np.float32),
        fg=rng.random((B, P)) < 0.8,
        class_id=np.array([0, 1, 0, 1], np.int32),
        rgb_cls=rng.normal(size=(B, CI)).astype(np.float32),
        rgb_rot=(rgb[:, ::-1] + 0.1 * rng.normal(size=rgb.shape)).astype(np.float32),
    )


@pytest.mark.slow  # one train-step compilation per variant
@pytest.mark.parametrize("variant", TRAINED)
def test_variant_trains_two_steps_with_its_terms_off(variant):
    cfg = tiny(mvtec3d.get_config(variant).adaptation)
    mesh = make_mesh()
    # Placed as train_adaptors places it, so both steps run one compiled program.
    replicated = NamedSharding(mesh, PartitionSpec())
    state = jax.device_put(init_train_state(cfg, num_classes=2, total_steps=2), replicated)
    step = make_train_step(build_model(cfg), cfg, mesh, 2)
    rng = np.random.default_rng(0)
    for _ in range(2):
        state, terms = step(state, check_batch(batch(rng), cfg, mesh.size))
    terms = {k: float(v) for k, v in terms.items()}  # the second step: IFC banks are filled
    assert np.isfinite(terms["total"])
    for term, switches in OFF_BY.items():
        if any(cfg[s] == 0 for s in switches):
            assert terms[term] == 0.0, (variant, term)
        else:
            assert terms[term] > 0, (variant, term)


def test_tables_4_and_6_switch_the_other_family_off():
    for variant in ("la_only", "ga_only"):
        assert mvtec3d.get_config(variant).adaptation.w_ifc == 0
    for variant in ("lc_only", "gc_only"):
        assert mvtec3d.get_config(variant).adaptation.lambda_clc == 0
    reference = mvtec3d.get_config("reference").adaptation
    assert reference.prepend_cls and reference.w_rot > 0


@pytest.mark.parametrize("variant", list(base.VARIANTS))
def test_synthetic_config_accepts_every_variant(variant):
    want, got = mvtec3d.get_config(variant), synthetic.get_config(variant)
    for key, value in base.VARIANTS[variant].items():
        a, b = want, got
        for part in key.split("."):
            a, b = a[part], b[part]
        assert a == b == value
    with pytest.raises(ValueError, match="unknown variant"):
        synthetic.get_config("nope")


class _Split:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def test_few_shot_training_and_banks_use_the_same_samples_keyed_by_class_name():
    config = mvtec3d.get_config("fewshot5")
    sizes = {"bagel": 40, "tire": 12, "foam": 30}
    pairs = training_indices({c: _Split(n) for c, n in sizes.items()}, 5, config.seed)
    # The class order (which only picks the adaptation bank) does not change a class's draw.
    reordered = training_indices(
        {c: _Split(sizes[c]) for c in ("foam", "bagel", "tire")}, 5, config.seed
    )
    for c, name in enumerate(sizes):
        trained = sorted(i for cc, i in pairs if cc == c)
        banked = bank_indices(config, name, sizes[name]).tolist()
        assert trained == banked == few_shot_indices(name, sizes[name], 5, config.seed).tolist()
        assert len(set(banked)) == 5 and max(banked) < sizes[name]
    assert sorted(i for cc, i in reordered if cc == 1) == sorted(i for cc, i in pairs if cc == 0)
    assert (
        few_shot_indices("bagel", 40, 5, 1).tolist() != few_shot_indices("bagel", 40, 5, 0).tolist()
    )
    # Without few-shot the banks take every sample (or the max_train_samples cap).
    full = mvtec3d.get_config()
    assert bank_indices(full, "bagel", 40).tolist() == list(range(40))
    full.patchcore.max_train_samples = 7
    assert bank_indices(full, "bagel", 40).tolist() == list(range(7))
    with pytest.raises(ValueError, match="tire"):
        few_shot_indices("tire", 12, 13, 0)
