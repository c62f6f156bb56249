"""LSFA losses (paper 3.2-3.3, Eqs. 2-9) as pure functions over explicit arrays.

Notation: B samples, P patches, E projection dim, C feature dim. Masks replace ragged sets:
`fg` (B, P) marks foreground patches. All reductions are means over the valid entries (the
paper's Eqs. 5-6 write sums; a mean keeps the scale independent of the batch size and of the
number of foreground patches, as the reference code does).

Total (Eq. 9): L = w_ifc * [w_lc * (L_LC^I + L_LC^P) + w_gc * (L_GC^I + L_GC^P)]
                 + lambda * (w_la * L_LA + w_ga * L_GA) + w_rot * L_rot.
Paper defaults: all w = 1 except w_rot = 0, lambda = 0.6. The reference code's variant is
lambda = 1, w_la = 1, w_ga = 0.1, w_rot = 0.05, w_ifc = 0.9, w_gc = 0.4, capped distances,
InfoNCE scaled by 2T, IFC only after 60 steps and for samples whose class RGB bank is (nearly)
full. L_rot is the reference's local-rotation term: it needs the DINO features of the
block-rotated image in the batch (`rgb_rot`, (B, P, Ci), no CLS).

A term whose weight is 0 (w_la, w_ga, w_rot, w_lc, w_gc, or a whole family through lambda_clc /
w_ifc) is not computed and is reported as exactly 0, so an ablation costs less and its logs show
which terms were off.

CLC logits. The paper's Eqs. 2-3 are raw inner products <F'_I, F'_P>. The reference code, like
MoCo v3, L2-normalises the projections and divides by T = 1, so every logit lies in [-1, 1] and
InfoNCE over N patches can fall at most about 2 nats below its chance level log N: the local
term barely moves and gives the adaptors little signal. `clc_normalize` (default True) and
`clc_temperature` (default 1.0) keep the reference's form by default, because it is the only
public implementation and raw inner products of unbounded projections can make the logits
explode; `clc_temperature` < 1 (e.g. 0.1) widens the range to [-1/T, 1/T], and
`clc_normalize=False` gives the paper's raw inner products (divided by `clc_temperature`).
`benchmarks/bench_adaptation.py` measures the effect of each (docs/adaptation_evidence.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lsfa_jax.adaptation.banks import Bank, nearest_rows
from lsfa_jax.adaptation.kmeans import global_feature
from lsfa_jax.batching import map_in_chunks

BANK_NAMES = ("rgb_local", "xyz_local", "rgb_global", "xyz_global")
_NEG = -1e30  # finite "minus infinity": fully masked rows stay NaN-free in the backward pass


def _l2_normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _infonce_rows(
    a: jax.Array, b: jax.Array, mask: jax.Array, temperature: float, chunk_size: int | None
) -> jax.Array:
    """Mean over valid rows i of -log softmax_j(<a_i, b_j> / T)[i], j over valid rows of b.

    a, b (N, E) already normalised, mask (N,). With `chunk_size` the (N, N) logits are built
    `chunk_size` rows at a time (`batching.map_in_chunks`), and each chunk is rematerialised in
    the backward pass, so at most (chunk_size, N) logits exist at once.
    """

    def row(row_i):
        a_i, b_i, m_i = row_i
        logits = jnp.matmul(a_i, b.T, precision=jax.lax.Precision.HIGHEST) / temperature
        lse = jax.nn.logsumexp(jnp.where(mask, logits, _NEG))
        pos = jnp.sum(a_i * b_i) / temperature
        return jnp.where(m_i, lse - pos, 0.0)

    per_row = map_in_chunks(row, (a, b, mask), chunk_size, remat=True)
    return jnp.sum(per_row) / jnp.maximum(jnp.sum(mask), 1)


def symmetric_infonce(
    a: jax.Array,
    b: jax.Array,
    mask: jax.Array,
    temperature: float = 1.0,
    scale_by_2t: bool = False,
    chunk_size: int | None = None,
    normalize: bool = True,
) -> jax.Array:
    """0.5 * (InfoNCE(a->b) + InfoNCE(b->a)) over the valid rows; a, b (N, E), mask (N,).

    Positive of row i is row i of the other modality; embeddings are L2-normalised first unless
    `normalize` is False (the paper's raw inner products). `scale_by_2t` multiplies by 2T as the
    reference (MoCo v3) code does. 0 when no row is valid.
    """
    if normalize:
        a, b = _l2_normalize(a), _l2_normalize(b)
    else:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    loss = 0.5 * (
        _infonce_rows(a, b, mask, temperature, chunk_size)
        + _infonce_rows(b, a, mask, temperature, chunk_size)
    )
    return loss * (2.0 * temperature) if scale_by_2t else loss


def clc_local_loss(
    q: jax.Array,
    k: jax.Array,
    fg: jax.Array,
    temperature: float = 1.0,
    scale_by_2t: bool = False,
    chunk_size: int | None = 4096,
    normalize: bool = True,
) -> jax.Array:
    """L_LA (Eq. 2): patch-level cross-modal InfoNCE over the foreground patches of the batch.

    q = H_I(F_I) (B, P, E), k = H_P(F_P) (B, P, E), fg (B, P) bool. Positive: same sample and
    location; negatives: every other foreground patch of the batch. Symmetric; scalar.
    """
    B, P, E = q.shape
    return symmetric_infonce(
        q.reshape(B * P, E),
        k.reshape(B * P, E),
        fg.reshape(B * P),
        temperature,
        scale_by_2t,
        chunk_size,
        normalize,
    )


def clc_global_loss(
    g_img: jax.Array,
    g_pt: jax.Array,
    temperature: float = 1.0,
    valid: jax.Array | None = None,
    scale_by_2t: bool = False,
    normalize: bool = True,
) -> jax.Array:
    """L_GA (Eq. 3): InfoNCE between projected instance features g_img, g_pt (B, E); symmetric.

    `valid` (B,) drops samples (e.g. without foreground) from both rows and negatives.
    """
    if valid is None:
        valid = jnp.ones(g_img.shape[:1], bool)
    return symmetric_infonce(g_img, g_pt, valid, temperature, scale_by_2t, None, normalize)


def random_subset(fg: jax.Array, divisor: int, key: jax.Array) -> jax.Array:
    """A uniformly random subset of |F| // divisor foreground patches: fg (B, P) -> (B, P) bool.

    Static shapes: random keys, background pushed last, the |F| // divisor smallest ranks kept.
    """
    flat = fg.reshape(-1)
    u = jnp.where(flat, jax.random.uniform(key, flat.shape), 2.0)
    rank = jnp.argsort(jnp.argsort(u))
    return (rank < jnp.sum(flat) // divisor).reshape(fg.shape)


def rotation_loss(
    q: jax.Array,
    q_rot: jax.Array,
    subset: jax.Array,
    temperature: float = 1.0,
    scale_by_2t: bool = False,
    chunk_size: int | None = 4096,
) -> jax.Array:
    """L_rot (reference code, docs/method.md#rotation-loss): one-directional InfoNCE from the
    projected RGB
    features q (B, P, E) to those of the locally rotated image q_rot (B, P, E) over the patches
    in `subset` (B, P), which are also the only negatives. Positions index the foreground
    through the mask (the reference's raw-position indexing is a bug, same section)."""
    B, P, E = q.shape
    a, b = _l2_normalize(q.reshape(B * P, E)), _l2_normalize(q_rot.reshape(B * P, E))
    loss = _infonce_rows(a, b, subset.reshape(B * P), temperature, chunk_size)
    return loss * (2.0 * temperature) if scale_by_2t else loss


def feature_distance(
    x: jax.Array, y: jax.Array, capped: bool = False, cap: float = 50.0
) -> jax.Array:
    """L2 distance |x - y| over the last axis (differences, not the expansion).

    `capped`: the reference's sqrt(clip(d2, 1e-12, cap)) (gradient 0 beyond sqrt(cap)); otherwise
    sqrt(max(d2, 1e-12)), which keeps the gradient finite at d = 0.
    """
    d2 = jnp.sum((x.astype(jnp.float32) - y.astype(jnp.float32)) ** 2, axis=-1)
    return jnp.sqrt(jnp.clip(d2, 1e-12, cap) if capped else jnp.maximum(d2, 1e-12))


def ifc_local_loss(
    x: jax.Array,
    mask: jax.Array,
    bank: Bank,
    bank_ids: jax.Array,
    capped: bool = False,
    cap: float = 50.0,
    chunk_size: int = 8192,
) -> jax.Array:
    """L_LC (Eq. 5): distance of each valid feature to its nearest filled row of its bank.

    x (B, P, C), mask (B, P), bank_ids (B,) which buffer of `bank` sample b searches (its class,
    or 0 for a shared bank). Per sample the mean over its valid patches, then the mean over
    samples with at least one valid patch and a non-empty buffer; 0 when there is none.
    """
    nearest, has_any = nearest_rows(bank, x, bank_ids, chunk_size)
    d = feature_distance(x, nearest, capped, cap)
    mask = mask & has_any[:, None]
    per_sample = jnp.sum(jnp.where(mask, d, 0.0), axis=1) / jnp.maximum(mask.sum(axis=1), 1)
    sample_ok = mask.any(axis=1)
    return jnp.sum(jnp.where(sample_ok, per_sample, 0.0)) / jnp.maximum(sample_ok.sum(), 1)


def ifc_global_loss(
    g: jax.Array,
    bank: Bank,
    bank_ids: jax.Array,
    valid: jax.Array | None = None,
    capped: bool = False,
    cap: float = 50.0,
    chunk_size: int = 8192,
) -> jax.Array:
    """L_GC (Eq. 6): mean over valid samples of the distance of g (B, C) to its nearest bank row."""
    if valid is None:
        valid = jnp.ones(g.shape[:1], bool)
    return ifc_local_loss(g[:, None, :], valid[:, None], bank, bank_ids, capped, cap, chunk_size)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Static loss settings (hashable, so it can close over a jitted step). The fields are keys of
    `config.adaptation`; their defaults and meanings are in configs/base.py."""

    lambda_clc: float
    w_la: float
    w_ga: float
    w_ifc: float
    w_lc: float
    w_gc: float
    w_rot: float
    rot_subset_divisor: int
    clc_temperature: float
    clc_normalize: bool
    scale_by_2t: bool
    capped_distance: bool
    distance_cap: float
    ifc_warmup_steps: int
    ifc_min_bank_fill: float
    banks_per_class: bool
    rgb_local_all_patches: bool
    global_method: str
    kmeans_clusters: int
    kmeans_iters: int
    clc_chunk_size: int
    nn_chunk_size: int

    def __post_init__(self):
        if not self.clc_temperature > 0:
            raise ValueError(
                f"adaptation.clc_temperature={self.clc_temperature}: must be > 0 (1.0: reference)"
            )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Any) -> LossConfig:
        """Reads the fields of this class from `config.adaptation`; each must be there."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in cfg]
        if missing:
            raise KeyError(f"config.adaptation lacks the loss settings {missing}")
        return cls(**{n: cfg[n] for n in names})


def lsfa_loss(
    params: Any,
    model: Any,
    batch: Mapping[str, Any],
    banks: Mapping[str, Bank],
    step: jax.Array,
    key: jax.Array,
    cfg: LossConfig,
) -> tuple[jax.Array, dict[str, Any]]:
    """Total LSFA loss (Eq. 9) for one batch and what to push into the banks afterwards.

    batch: rgb (B,P,Ci), xyz (B,P,Cp), fg (B,P) bool, class_id (B,) int, optional rgb_cls (B,Ci)
    and rgb_rot (B,P,Ci) (features of the block-rotated image, needed when cfg.w_rot > 0).
    banks: `BANK_NAMES` -> Bank (features from earlier steps only). Returns (loss, aux) with
    aux["terms"] the scalar terms for logging and aux["push"] the detached features and masks.
    """
    if cfg.w_rot and batch.get("rgb_rot") is None:
        raise KeyError("losses.py: w_rot > 0 needs the rotated-image features batch['rgb_rot']")
    fg = jnp.asarray(batch["fg"], bool)
    B = fg.shape[0]
    f_img, f_pt = model.apply({"params": params}, batch["rgb"], batch["xyz"], batch.get("rgb_cls"))
    f_img, f_pt = f_img.astype(jnp.float32), f_pt.astype(jnp.float32)
    q = model.apply({"params": params}, f_img, method="project_rgb").astype(jnp.float32)
    k = model.apply({"params": params}, f_pt, method="project_xyz").astype(jnp.float32)

    keys = jax.random.split(key, 2 * B).reshape(2, B, -1)

    def globals_of(f, ks):
        fn = lambda x, m, kk: global_feature(
            x, m, cfg.global_method, cfg.kmeans_clusters, cfg.kmeans_iters, kk
        )
        return jax.vmap(fn)(f, fg, ks)

    g_img, g_pt = globals_of(f_img, keys[0]), globals_of(f_pt, keys[1])
    has_fg = fg.any(axis=1)
    zero = jnp.zeros((), jnp.float32)
    # Static weights: a term weighted 0 is skipped (and reported as 0), see the module docstring.
    clc_on, ifc_on = cfg.lambda_clc != 0, cfg.w_ifc != 0
    contrast = dict(
        temperature=cfg.clc_temperature, scale_by_2t=cfg.scale_by_2t, normalize=cfg.clc_normalize
    )

    la = ga = zero
    if clc_on and cfg.w_la:
        la = clc_local_loss(q, k, fg, chunk_size=cfg.clc_chunk_size, **contrast)
    if clc_on and cfg.w_ga:
        g_q = model.apply({"params": params}, g_img, method="project_rgb")
        g_k = model.apply({"params": params}, g_pt, method="project_xyz")
        ga = clc_global_loss(g_q, g_k, valid=has_fg, **contrast)

    bank_ids = batch["class_id"].astype(jnp.int32) if cfg.banks_per_class else jnp.zeros(B, int)
    rgb_bank = banks["rgb_local"]
    needed = max(1, math.ceil(cfg.ifc_min_bank_fill * rgb_bank.features.shape[1]))
    eligible = (rgb_bank.count[bank_ids] >= needed) & (step >= cfg.ifc_warmup_steps)
    rgb_mask = jnp.ones_like(fg) if cfg.rgb_local_all_patches else fg
    dist = dict(capped=cfg.capped_distance, cap=cfg.distance_cap, chunk_size=cfg.nn_chunk_size)
    lc_rgb = lc_xyz = gc_rgb = gc_xyz = zero
    if ifc_on and cfg.w_lc:
        lc_rgb = ifc_local_loss(f_img, rgb_mask & eligible[:, None], rgb_bank, bank_ids, **dist)
        lc_xyz = ifc_local_loss(f_pt, fg & eligible[:, None], banks["xyz_local"], bank_ids, **dist)
    if ifc_on and cfg.w_gc:
        g_ok = has_fg & eligible
        gc_rgb = ifc_global_loss(g_img, banks["rgb_global"], bank_ids, g_ok, **dist)
        gc_xyz = ifc_global_loss(g_pt, banks["xyz_global"], bank_ids, g_ok, **dist)

    clc = cfg.w_la * la + cfg.w_ga * ga
    ifc = cfg.w_lc * (lc_rgb + lc_xyz) + cfg.w_gc * (gc_rgb + gc_xyz)
    total = cfg.w_ifc * ifc + cfg.lambda_clc * clc
    rot = zero
    if cfg.w_rot:
        f_rot = model.apply({"params": params}, batch["rgb_rot"], method="adapt_rgb")
        q_rot = model.apply({"params": params}, f_rot, method="project_rgb").astype(jnp.float32)
        subset = random_subset(fg, cfg.rot_subset_divisor, jax.random.fold_in(key, 1))
        rot = rotation_loss(
            q, q_rot, subset, cfg.clc_temperature, cfg.scale_by_2t, cfg.clc_chunk_size
        )
        total = total + cfg.w_rot * rot
    terms = dict(
        total=total,
        clc=clc,
        ifc=ifc,
        la=la,
        ga=ga,
        rot=rot,
        lc_rgb=lc_rgb,
        lc_xyz=lc_xyz,
        gc_rgb=gc_rgb,
        gc_xyz=gc_xyz,
        ifc_eligible=jnp.sum(eligible).astype(jnp.float32),
    )
    push = dict(
        rgb_local=f_img,
        xyz_local=f_pt,
        rgb_global=g_img,
        xyz_global=g_pt,
        rgb_mask=rgb_mask,
        xyz_mask=fg,
        global_mask=has_fg,
        bank_ids=bank_ids,
    )
    return total, dict(terms=terms, push=jax.tree.map(jax.lax.stop_gradient, push))
