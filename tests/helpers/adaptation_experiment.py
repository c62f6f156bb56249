"""The controlled feature model of benchmarks/bench_adaptation.py: data whose answer is known,
and one run of raw PatchCore or of the adaptors trained on it.

Frozen "pretrained" features of each patch are a fixed random linear mix of
  - a shared code z (CODE_DIM dims) that both modalities see: normal samples vary in the first
    USED_DIM code directions only, defects change the others;
  - large modality-specific nuisance (NUISANCE_DIM dims per modality, std NUISANCE_STD): the
    domain gap, which differs between the modalities and carries nothing about defects.
Anomalous test images shift a 3x3 block of patches by SHIFT along one direction:
  positive case     a code direction normal samples do not use (what a defect changes);
  negative control  a nuisance direction of the RGB modality (normal samples vary along it), so
                    compacting the normal feature distribution cannot help.

Runs per case and seed: raw (PatchCore on the frozen features), step0 (the adaptors at their
initialisation, no training), ifc_only, clc_only, full; each with the project's own train step
(adaptation.train.make_train_step: losses, AdamW, dynamic banks), PatchCore banks, scorer and
metrics. Reported: I-AUROC and P-AUROC of the RGB modality (the one both anomalies affect), the
anomaly/normal patch-score contrast (mean anomalous-block patch score minus mean normal-image
patch score, over the std of the latter), and a CLC probe: top-1 cross-modal patch retrieval
accuracy of the projected features H_I(F_I) -> H_P(F_P) over NORMAL test patches, against
chance 1/N. Mean and std over seeds, at the default learning rate (3e-4) and at the best of a
small sweep (chosen on the mean test I-AUROC, so optimistic).
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from configs.base import get_base_config
from lsfa_jax import metrics
from lsfa_jax.adaptation.train import (
    build_model,
    init_train_state,
    make_mesh,
    make_train_step,
)
from lsfa_jax.models.adaptors import apply_adaptors
from lsfa_jax.patchcore.bank import build_memory_bank
from lsfa_jax.patchcore.scorer import score_batch

GRID = 8  # 8 x 8 patches per image
P = GRID * GRID
OUT = 32  # anomaly map side (4 pixels per patch)
CODE_DIM, USED_DIM = 8, 4
NUISANCE_DIM, NUISANCE_STD = 16, 2.0
RGB_DIM, XYZ_DIM = 32, 48
SHIFT = 3.0
BLOCK = 3  # anomalous block side, in patches
RUNS = ("raw", "step0", "ifc_only", "clc_only", "full")
CASES = ("positive", "negative")


@dataclasses.dataclass(frozen=True)
class Data:
    train: dict[str, np.ndarray]  # rgb (N,P,Ci), xyz (N,P,Cp)
    test: dict[str, np.ndarray]
    labels: np.ndarray  # (M,) 1 = anomalous image
    patch_labels: np.ndarray  # (M, P) bool
    masks: np.ndarray  # (M, OUT, OUT) uint8


def make_data(case: str, seed: int, n_train: int = 64, n_test: int = 120) -> Data:
    """The feature model of the module docstring; half of the test images are anomalous."""
    rng = np.random.default_rng((seed, 7))
    mix_rgb = rng.normal(size=(CODE_DIM + NUISANCE_DIM, RGB_DIM)) / np.sqrt(RGB_DIM)
    mix_xyz = rng.normal(size=(CODE_DIM + NUISANCE_DIM, XYZ_DIM)) / np.sqrt(XYZ_DIM)

    def sample(n):
        z = np.zeros((n, P, CODE_DIM))
        z[..., :USED_DIM] = rng.normal(size=(n, P, USED_DIM))
        z[..., USED_DIM:] = 0.05 * rng.normal(size=(n, P, CODE_DIM - USED_DIM))
        nuis_rgb = NUISANCE_STD * rng.normal(size=(n, P, NUISANCE_DIM))
        nuis_xyz = NUISANCE_STD * rng.normal(size=(n, P, NUISANCE_DIM))
        return z, nuis_rgb, nuis_xyz

    def features(z, nuis_rgb, nuis_xyz):
        rgb = np.concatenate([z, nuis_rgb], -1) @ mix_rgb
        xyz = np.concatenate([z, nuis_xyz], -1) @ mix_xyz
        return dict(rgb=rgb.astype(np.float32), xyz=xyz.astype(np.float32))

    train = features(*sample(n_train))
    z, nuis_rgb, nuis_xyz = sample(n_test)
    labels = (np.arange(n_test) >= n_test // 2).astype(np.int32)
    patch_labels = np.zeros((n_test, GRID, GRID), bool)
    for i in np.flatnonzero(labels):
        r, c = rng.integers(0, GRID - BLOCK + 1, size=2)
        patch_labels[i, r : r + BLOCK, c : c + BLOCK] = True
    patch_labels = patch_labels.reshape(n_test, P)
    if case == "positive":
        z[..., USED_DIM] += SHIFT * patch_labels
    else:
        # Along a nuisance direction; SHIFT * NUISANCE_STD keeps it as far out as the
        # positive case's shift is in units of the normal spread it competes with.
        nuis_rgb[..., 0] += SHIFT * NUISANCE_STD * patch_labels
    test = features(z, nuis_rgb, nuis_xyz)
    pix = patch_labels.reshape(n_test, GRID, 1, GRID, 1)
    masks = np.broadcast_to(pix, (n_test, GRID, OUT // GRID, GRID, OUT // GRID))
    return Data(train, test, labels, patch_labels, masks.reshape(n_test, OUT, OUT).astype(np.uint8))


def adaptation_config(run: str, lr: float, steps: int, **overrides) -> ml_collections.ConfigDict:
    """Project defaults (loss weights, schedule shape, CLC temperature), sized to this data."""
    cfg = get_base_config().adaptation.copy_and_resolve_references()
    cfg.update(dict(rgb_dim=RGB_DIM, xyz_dim=XYZ_DIM, num_patches=P, proj_dim=32, rgb_heads=4))
    cfg.update(dict(xyz_heads=4, batch_size=8, num_steps=steps, lr=lr, prepend_cls=False))
    cfg.update(dict(local_bank_size=2048, global_bank_size=32, kmeans_clusters=4))
    if run == "ifc_only":
        cfg.lambda_clc = 0.0
    elif run == "clc_only":
        cfg.w_ifc = 0.0
    cfg.update(overrides)
    return cfg


def train(data: Data, cfg: ml_collections.ConfigDict, seed: int) -> dict:
    """Adaptor parameters after cfg.num_steps steps of the project's train step."""
    mesh = make_mesh(jax.local_devices()[:1])
    init_cfg = ml_collections.ConfigDict(cfg.to_dict())
    init_cfg.seed = seed
    replicated = NamedSharding(mesh, PartitionSpec())
    state = jax.device_put(init_train_state(init_cfg, 1, cfg.num_steps), replicated)
    # The seed lives in the state (parameters, rng), so one compiled step serves every seed.
    step = make_train_step(build_model(cfg), cfg, mesh, cfg.num_steps)
    n = len(data.train["rgb"])
    order_rng = np.random.default_rng((seed, 11))
    fg = np.ones((cfg.batch_size, P), bool)
    class_id = np.zeros(cfg.batch_size, np.int32)
    order = np.empty(0, int)
    for _ in range(cfg.num_steps):
        if len(order) < cfg.batch_size:
            order = np.concatenate([order, order_rng.permutation(n)])
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        batch = dict(
            rgb=data.train["rgb"][idx],
            xyz=data.train["xyz"][idx],
            fg=fg,
            class_id=class_id,
            rgb_cls=None,
        )
        state, _ = step(state, batch)
    return jax.device_get(state.params)


def init_params(cfg: ml_collections.ConfigDict, seed: int) -> dict:
    init_cfg = ml_collections.ConfigDict(cfg.to_dict())
    init_cfg.seed = seed
    return jax.device_get(init_train_state(init_cfg, 1, 1).params)


def adapt(params, cfg, split: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rgb, xyz = apply_adaptors(
        params,
        jnp.asarray(split["rgb"]),
        jnp.asarray(split["xyz"]),
        structure=cfg.structure,
        rgb_heads=cfg.rgb_heads,
        xyz_heads=cfg.xyz_heads,
    )
    return dict(rgb=np.asarray(rgb), xyz=np.asarray(xyz))


def probe(params, cfg, split: dict[str, np.ndarray], normal: np.ndarray) -> float:
    """Top-1 accuracy of retrieving each normal test patch's point projection from its RGB
    projection (cosine similarity) among all normal test patches."""
    model = build_model(cfg)
    f = adapt(params, cfg, {k: v[normal] for k, v in split.items()})
    q = model.apply({"params": params}, jnp.asarray(f["rgb"]), method="project_rgb")
    k = model.apply({"params": params}, jnp.asarray(f["xyz"]), method="project_xyz")
    q, k = np.asarray(q).reshape(-1, q.shape[-1]), np.asarray(k).reshape(-1, k.shape[-1])
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    return float(np.mean(np.argmax(q @ k.T, axis=1) == np.arange(len(q))))


def evaluate(train_feat: np.ndarray, test_feat: np.ndarray, data: Data, seed: int) -> dict:
    """PatchCore (project defaults: coreset 10 %, reweighting, Gaussian blur) on one modality."""
    library = train_feat.reshape(-1, train_feat.shape[-1])
    bank = build_memory_bank(library, ratio=0.1, key=jax.random.PRNGKey(seed), pad_multiple=256)
    scores, maps = [], []
    for start in range(0, len(test_feat), 8):
        s, m = score_batch(
            bank, jnp.asarray(test_feat[start : start + 8]), out_size=OUT, sigma=1.0, bank_chunk=256
        )
        scores.append(np.asarray(s))
        maps.append(np.asarray(m))
    scores, maps = np.concatenate(scores), np.concatenate(maps)
    patch = maps[:, OUT // GRID // 2 :: OUT // GRID, OUT // GRID // 2 :: OUT // GRID]
    patch = patch.reshape(len(maps), P)
    normal = patch[data.labels == 0].ravel()
    contrast = (patch[data.patch_labels].mean() - normal.mean()) / normal.std()
    return dict(
        i_auroc=metrics.image_auroc(data.labels, scores),
        p_auroc=metrics.pixel_auroc(data.masks, maps),
        contrast=float(contrast),
    )


def run_one(case: str, run: str, seed: int, lr: float, steps: int, **overrides) -> dict:
    data = make_data(case, seed)
    cfg = adaptation_config(run, lr, steps, **overrides)
    if run == "raw":
        out = evaluate(data.train["rgb"], data.test["rgb"], data, seed)
        out["probe"] = float("nan")
        return out
    params = init_params(cfg, seed) if run == "step0" else train(data, cfg, seed)
    train_feat, test_feat = adapt(params, cfg, data.train), adapt(params, cfg, data.test)
    out = evaluate(train_feat["rgb"], test_feat["rgb"], data, seed)
    out["probe"] = probe(params, cfg, data.test, data.labels == 0)
    return out


def experiment(
    seeds, lrs, steps: int, cases=CASES, runs=RUNS, **overrides
) -> dict[tuple[str, str, float], list[dict]]:
    """(case, run, lr) -> per-seed results. raw and step0 do not train: run once, at lrs[0]."""
    results: dict[tuple[str, str, float], list[dict]] = {}
    # lr and run outermost: each (lr, run) compiles one train step, shared by cases and seeds.
    for lr, run, case in itertools.product(lrs, runs, cases):
        if run in ("raw", "step0") and lr != lrs[0]:
            continue
        results[(case, run, lr)] = [run_one(case, run, s, lr, steps, **overrides) for s in seeds]
    return results
