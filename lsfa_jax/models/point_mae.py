"""Point-MAE encoder (Flax linen), FPS / kNN grouping, 3-NN interpolation, checkpoint conversion.

Reference behaviour: docs/method.md#point-mae-features-and-the-grid (architecture, grouping,
numerics) and docs/method.md#checkpoint-layouts (checkpoint layout, conversion rules). Every
distance here is computed from coordinate
differences, never from the ||a||^2 + ||b||^2 - 2ab expansion: in float32 with coordinates in
metres around z = 0.65 the expansion changes kNN neighbour sets and interpolation weights.

Clouds have a static padded length N with a (N,) bool `point_mask`; the valid points come first
(see `features.patch_grid.pack_valid_points`).

Small clouds: `check_cloud` (host side, before any jitted call) raises when a cloud has fewer
valid points than `group_size`, since a group would have to contain padding. A cloud with
`group_size <= n_valid < num_group` is accepted: once every eligible point has been chosen, all
running distances are 0 and FPS returns an already chosen centre again (the lowest-index
eligible point, or the kernel's tie choice with fps_ties="pointnet2"), as the pointnet2 kernel
does. Duplicated centres give duplicated groups and tokens; 3-NN interpolation then weights the
identical centres equally.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lsfa_jax.batching import map_in_chunks
from lsfa_jax.models import checkpoint_io
from lsfa_jax.models.transformer import EncoderBlock
from lsfa_jax.precision import PINNED, policy

# pointnet2 FPS never selects points with squared norm at or below this value.
FPS_MIN_SQUARED_NORM = 1e-3
# pointnet2 FPS initial running minimum squared distance.
FPS_INIT_DISTANCE = 1e10
# Added to squared distances in the 3-NN inverse-distance weights.
INTERPOLATION_EPS = 1e-8

# pointnet2's FPS kernel runs one block of at most this many threads per cloud.
FPS_CUDA_MAX_THREADS = 512

# Encoder fields a `model_cfg` may set (the `point_backbone` config uses exactly these names).
CONFIG_FIELDS = (
    "num_group",
    "group_size",
    "trans_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "out_layers",
    "fps_ties",
    "batchnorm",
)
FPS_TIES = ("lowest", "pointnet2")
BATCHNORMS = ("running", "batch")


def squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
    """(..., A, 3), (..., B, 3) -> (..., A, B) float32 squared distances from differences.

    Written as dx*dx + dy*dy + dz*dz so the summation order is fixed and matches a plain
    numpy / torch reference bit for bit.
    """
    diff = a[..., :, None, :] - b[..., None, :, :]
    return diff[..., 0] * diff[..., 0] + diff[..., 1] * diff[..., 1] + diff[..., 2] * diff[..., 2]


def check_cloud(n_valid: int, num_group: int, group_size: int, name: str) -> None:
    """Host-side check that a cloud can be grouped; `name` identifies the sample in the error.

    Raises ValueError when n_valid < group_size (a group would need padding points). Clouds with
    group_size <= n_valid < num_group are allowed; FPS then repeats centres (module docstring).
    """
    if group_size < 1 or num_group < 1:
        raise ValueError(f"{name}: num_group={num_group} and group_size={group_size} must be >= 1")
    if n_valid < group_size:
        raise ValueError(
            f"{name}: only {n_valid} valid points, fewer than group_size={group_size}; "
            "a kNN group cannot be formed"
        )


def _pointnet2_argmax(values: jax.Array, eligible: jax.Array, n_points: jax.Array) -> jax.Array:
    """Index the pointnet2 CUDA kernel picks as the maximum of `values` (N,) over `eligible`.

    The kernel runs T threads, T the largest power of two <= n_points (the number of points it
    is given: the valid points, padding excluded) and at most 512. Thread t scans
    points t, t + T, t + 2T, ... and keeps the first strictly larger value (so the lowest index
    of its stripe on ties); then a tree reduction halves the threads, slot i keeping slot i + s
    only when that value is strictly larger. On ties between stripes the winner is therefore
    the slot that survives the tree, not the lowest index: e.g. with 512 threads, tied points in
    stripes 72 and 368 give 368 (368 reaches slot 0 through 112, 48 and 16 before 72 does).
    """
    n = values.shape[0]
    powers = 2 ** jnp.arange(FPS_CUDA_MAX_THREADS.bit_length(), dtype=jnp.int32)
    threads = jnp.max(jnp.where(powers <= jnp.maximum(n_points, 1), powers, 1))
    index = jnp.arange(n, dtype=jnp.int32)
    slot = index % threads
    v = jnp.where(eligible, values, -1.0)
    slots = FPS_CUDA_MAX_THREADS
    best = jax.ops.segment_max(v, slot, num_segments=slots)  # -inf for slots >= threads
    first = jnp.where(eligible & (v == best[slot]), index, n)
    best_index = jax.ops.segment_min(first, slot, num_segments=slots)
    best_index = jnp.where(best_index >= n, 0, best_index)  # a thread with no candidate: 0
    best = jnp.where(jnp.arange(slots) < threads, jnp.maximum(best, -1.0), -jnp.inf)
    step = slots // 2
    while step >= 1:
        take = best[step : 2 * step] > best[:step]
        best = best.at[:step].set(jnp.where(take, best[step : 2 * step], best[:step]))
        best_index = best_index.at[:step].set(
            jnp.where(take, best_index[step : 2 * step], best_index[:step])
        )
        step //= 2
    return best_index[0].astype(jnp.int32)


def farthest_point_sampling(
    points: jax.Array, point_mask: jax.Array, num_samples: int, ties: str = "lowest"
) -> jax.Array:
    """Farthest point sampling as pointnet2's CUDA kernel (used by Point-MAE, M3DM and LSFA).

    The first centre is index 0; the running minimum squared distance starts at 1e10; points
    with ||p||^2 <= 1e-3 or point_mask False are never selected; each step takes the argmax of
    the running minimum. Ties: `ties="lowest"` (default) takes the lowest index, which is not
    always the kernel's choice; `ties="pointnet2"` reproduces the kernel's per-thread stripes
    and tree reduction (`_pointnet2_argmax`). Exact ties are rare on real clouds, so the two
    agree there; they differ on lattice-like clouds.

    Args:
      points: (N, 3) float32.
      point_mask: (N,) bool.
      num_samples: static number of centres.
      ties: "lowest" | "pointnet2" (static).

    Returns:
      (num_samples,) int32 indices into points.
    """
    if ties not in FPS_TIES:
        raise ValueError(f"farthest_point_sampling: ties={ties!r}; use one of {FPS_TIES}")
    points = points.astype(jnp.float32)
    norm2 = points[:, 0] * points[:, 0] + points[:, 1] * points[:, 1] + points[:, 2] * points[:, 2]
    eligible = point_mask & (norm2 > FPS_MIN_SQUARED_NORM)
    n_points = jnp.sum(point_mask)
    indices = jnp.zeros((num_samples,), jnp.int32)
    min_distance = jnp.full(points.shape[:1], FPS_INIT_DISTANCE, jnp.float32)

    def step(i, carry):
        indices, min_distance = carry
        last = points[indices[i - 1]]
        distance = squared_distances(points, last[None])[:, 0]
        min_distance = jnp.where(eligible, jnp.minimum(min_distance, distance), min_distance)
        if ties == "pointnet2":
            chosen = _pointnet2_argmax(min_distance, eligible, n_points)
        else:
            # jnp.argmax returns the first maximal index, the lowest-index tie rule.
            chosen = jnp.argmax(jnp.where(eligible, min_distance, -1.0)).astype(jnp.int32)
        return indices.at[i].set(chosen), min_distance

    indices, _ = jax.lax.fori_loop(1, num_samples, step, (indices, min_distance))
    return indices


def knn_group(
    points: jax.Array,
    point_mask: jax.Array,
    centres: jax.Array,
    group_size: int,
    chunk_size: int = 256,
) -> tuple[jax.Array, jax.Array]:
    """Exact kNN of every centre among the valid points, sorted by distance.

    Args:
      points: (N, 3) float32; point_mask: (N,) bool (masked points are never neighbours).
      centres: (G, 3) float32.
      group_size: static k.
      chunk_size: centres processed at once (memory is chunk_size x N float32).

    Returns:
      idx (G, k) int32 sorted by squared distance (ties to the lower index), and the
      neighbourhoods (G, k, 3) = points[idx] - centre.
    """
    points = points.astype(jnp.float32)
    centres = centres.astype(jnp.float32)

    def nearest(centre):
        distance = squared_distances(centre[None], points)[0]
        distance = jnp.where(point_mask, distance, jnp.inf)
        return jax.lax.top_k(-distance, group_size)[1].astype(jnp.int32)

    idx = map_in_chunks(nearest, centres, chunk_size)
    neighbourhoods = points[idx] - centres[:, None, :]
    return idx, neighbourhoods


def interpolate_to_points(
    points: jax.Array,
    point_mask: jax.Array,
    centres: jax.Array,
    centre_features: jax.Array,
    chunk_size: int = 2048,
) -> jax.Array:
    """3-NN inverse squared distance interpolation of centre features onto every point.

    w_j = 1 / (d_j^2 + 1e-8) over the 3 nearest centres, normalised to sum to 1.

    Args:
      points: (N, 3); point_mask: (N,) bool (masked rows of the result are 0).
      centres: (G, 3) with G >= 3; centre_features: (G, C).
      chunk_size: points processed at once (memory is chunk_size x G float32).

    Returns:
      (N, C) float32 point features.
    """
    points = points.astype(jnp.float32)
    centres = centres.astype(jnp.float32)

    def interpolate(point):
        distance = squared_distances(point[None], centres)[0]
        neg_distance, idx = jax.lax.top_k(-distance, 3)
        weights = 1.0 / (-neg_distance + INTERPOLATION_EPS)
        weights = weights / jnp.sum(weights)
        return jnp.einsum("k,kc->c", weights, centre_features[idx], precision=PINNED)

    features = map_in_chunks(interpolate, points, chunk_size)
    return jnp.where(point_mask[:, None], features, 0.0)


class MiniPointNet(nn.Module):
    """Point-MAE group `Encoder`: (..., G, k, 3) centred neighbourhoods -> (..., G, C) tokens.

    Conv1d(k=1) layers are Dense layers on the last axis. BatchNorm uses the checkpoint's running
    statistics (`batchnorm="running"`, LSFA's eval mode) or, with "batch", the statistics of the
    input over all its leading axes (M3DM, which never calls eval(); it extracts one cloud at a
    time, so the statistics are those of one cloud's groups and points).
    """

    encoder_channel: int
    dtype: Any = jnp.float32
    precision: jax.lax.Precision = PINNED
    batchnorm: str = "running"

    @nn.compact
    def __call__(self, neighbourhoods: jax.Array) -> jax.Array:
        running = self.batchnorm == "running"
        batch_norm = lambda name: nn.BatchNorm(
            use_running_average=running,
            epsilon=1e-5,
            use_fast_variance=False,
            dtype=self.dtype,
            name=name,
        )
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, precision=self.precision, name=name)
        h = dense(128, "first_conv_0")(neighbourhoods)
        h = nn.relu(batch_norm("first_conv_1")(h))
        h = dense(256, "first_conv_3")(h)
        # The group's global feature goes first in the concatenation, then the local one.
        pooled = jnp.broadcast_to(jnp.max(h, axis=-2, keepdims=True), h.shape)
        h = jnp.concatenate([pooled, h], axis=-1)
        h = dense(512, "second_conv_0")(h)
        h = nn.relu(batch_norm("second_conv_1")(h))
        h = dense(self.encoder_channel, "second_conv_3")(h)
        return jnp.max(h, axis=-2).astype(jnp.float32)


class PointMAEEncoder(nn.Module):
    """Point-MAE encoder in eval mode, M3DM/LSFA feature taps.

    `num_group`, `group_size` and `fps_ties` describe the grouping that feeds it (used by the
    callers). `batchnorm`: "running" (default, LSFA) or "batch" (M3DM); call it through
    `encode`, which handles the batch-statistics case. M3DM's active drop-path (0.1) is not
    reproduced: it is random.
    Call with neighbourhoods (..., G, k, 3) (centred) and centres (..., G, 3) (absolute);
    returns (..., G, len(out_layers) * trans_dim) float32: the outputs of blocks `out_layers`,
    each through the shared final LayerNorm, concatenated in that order. `dtype` and `precision`
    are those of the dense layers and attention einsums (`lsfa_jax.precision`); the residual
    stream stays float32.
    """

    num_group: int = 1024
    group_size: int = 128
    trans_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4
    out_layers: tuple[int, ...] = (3, 7, 11)
    dtype: Any = jnp.float32
    precision: jax.lax.Precision = PINNED
    fps_ties: str = "lowest"
    batchnorm: str = "running"

    @nn.compact
    def __call__(self, neighbourhoods: jax.Array, centres: jax.Array) -> jax.Array:
        dtype, precision = self.dtype, self.precision
        x = MiniPointNet(
            self.trans_dim, dtype, precision, batchnorm=self.batchnorm, name="encoder"
        )(neighbourhoods)
        dense = functools.partial(nn.Dense, dtype=dtype, precision=precision)
        pos = dense(128, name="pos_embed_0")(centres)
        pos = dense(self.trans_dim, name="pos_embed_2")(nn.gelu(pos, approximate=False))
        pos = pos.astype(jnp.float32)
        final_norm = nn.LayerNorm(1e-5, dtype=dtype, name="norm")
        # Point-MAE's blocks: no qkv bias, LayerNorm eps 1e-5.
        block = functools.partial(
            EncoderBlock,
            self.num_heads,
            self.mlp_ratio,
            qkv_bias=False,
            ln_eps=1e-5,
            dtype=dtype,
            precision=precision,
        )
        taps = []
        for i in range(self.depth):
            x = block(name=f"blocks_{i}")(x + pos)
            if i in self.out_layers:
                taps.append(final_norm(x).astype(jnp.float32))
        return jnp.concatenate(taps, axis=-1)


def encode(
    encoder: PointMAEEncoder,
    variables: Mapping[str, Any],
    neighbourhoods: jax.Array,
    centres: jax.Array,
) -> jax.Array:
    """`encoder.apply` for either BatchNorm mode: with batch statistics Flax updates the
    running averages, which are dropped here (the checkpoint's statistics stay as loaded)."""
    if encoder.batchnorm == "batch":
        out, _ = encoder.apply(variables, neighbourhoods, centres, mutable=["batch_stats"])
        return out
    return encoder.apply(variables, neighbourhoods, centres)


def point_mae_encoder(
    model_cfg: Mapping[str, Any] | Any, precision: str = "highest"
) -> PointMAEEncoder:
    """Builds the encoder from a config (ConfigDict or mapping) with keys from CONFIG_FIELDS,
    its layers under the precision policy named `precision` (`lsfa_jax.precision`)."""
    cfg = dict(model_cfg)
    unknown = sorted(set(cfg) - set(CONFIG_FIELDS))
    if unknown:
        raise ValueError(f"point_backbone config: unknown keys {unknown}; allowed {CONFIG_FIELDS}")
    if "out_layers" in cfg:
        cfg["out_layers"] = tuple(int(i) for i in cfg["out_layers"])
    layers = policy(precision)
    encoder = PointMAEEncoder(**cfg, dtype=layers.dtype, precision=layers.precision)
    if encoder.fps_ties not in FPS_TIES or encoder.batchnorm not in BATCHNORMS:
        raise ValueError(
            f"point_backbone config: fps_ties={encoder.fps_ties!r} (use one of {FPS_TIES}), "
            f"batchnorm={encoder.batchnorm!r} (use one of {BATCHNORMS})"
        )
    bad = [i for i in encoder.out_layers if not 0 <= i < encoder.depth]
    if bad or not encoder.out_layers:
        raise ValueError(
            f"point_backbone config: out_layers {encoder.out_layers} must be non-empty "
            f"and within [0, depth={encoder.depth})"
        )
    if encoder.num_group < 3 or encoder.group_size < 1:
        raise ValueError(
            f"point_backbone config: num_group={encoder.num_group} must be >= 3 (3-NN "
            f"interpolation) and group_size={encoder.group_size} >= 1"
        )
    if encoder.trans_dim % encoder.num_heads:
        raise ValueError(
            f"point_backbone config: trans_dim={encoder.trans_dim} is not divisible by "
            f"num_heads={encoder.num_heads}"
        )
    return encoder


def init_random_point_mae_variables(key: jax.Array, model_cfg: Mapping[str, Any] | Any) -> dict:
    """Random {'params', 'batch_stats'} for the configured encoder (for demos and tests)."""
    encoder = point_mae_encoder(model_cfg)
    neighbourhoods = jnp.zeros((1, encoder.group_size, 3), jnp.float32)
    centres = jnp.zeros((1, 3), jnp.float32)
    return dict(encoder.init(key, neighbourhoods, centres))


# ----------------------------------------------------------------------------- conversion

# Checkpoint entries that belong to the MAE decoder / masking and are not part of the encoder.
IGNORED_PREFIXES = ("mask_token", "decoder_pos_embed.", "MAE_decoder.", "increase_dim.")


def _torch_layout(encoder: PointMAEEncoder) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """torch key -> (Flax path (collection, *names), torch shape) for every encoder tensor."""
    layout: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {}
    c = encoder.trans_dim

    def linear(torch_name, flax_path, out_dim, in_dim, conv=False, bias=True):
        weight_shape = (out_dim, in_dim, 1) if conv else (out_dim, in_dim)
        layout[f"{torch_name}.weight"] = (("params", *flax_path, "kernel"), weight_shape)
        if bias:
            layout[f"{torch_name}.bias"] = (("params", *flax_path, "bias"), (out_dim,))

    def norm(torch_name, flax_path, dim, batch=False):
        layout[f"{torch_name}.weight"] = (("params", *flax_path, "scale"), (dim,))
        layout[f"{torch_name}.bias"] = (("params", *flax_path, "bias"), (dim,))
        if batch:
            layout[f"{torch_name}.running_mean"] = (("batch_stats", *flax_path, "mean"), (dim,))
            layout[f"{torch_name}.running_var"] = (("batch_stats", *flax_path, "var"), (dim,))

    linear("encoder.first_conv.0", ("encoder", "first_conv_0"), 128, 3, conv=True)
    norm("encoder.first_conv.1", ("encoder", "first_conv_1"), 128, batch=True)
    linear("encoder.first_conv.3", ("encoder", "first_conv_3"), 256, 128, conv=True)
    linear("encoder.second_conv.0", ("encoder", "second_conv_0"), 512, 512, conv=True)
    norm("encoder.second_conv.1", ("encoder", "second_conv_1"), 512, batch=True)
    linear("encoder.second_conv.3", ("encoder", "second_conv_3"), c, 512, conv=True)
    linear("pos_embed.0", ("pos_embed_0",), 128, 3)
    linear("pos_embed.2", ("pos_embed_2",), c, 128)
    hidden = int(c * encoder.mlp_ratio)
    for i in range(encoder.depth):
        t, f = f"blocks.blocks.{i}", f"blocks_{i}"
        norm(f"{t}.norm1", (f, "norm1"), c)
        linear(f"{t}.attn.qkv", (f, "attn", "qkv"), 3 * c, c, bias=False)
        linear(f"{t}.attn.proj", (f, "attn", "proj"), c, c)
        norm(f"{t}.norm2", (f, "norm2"), c)
        linear(f"{t}.mlp.fc1", (f, "mlp", "fc1"), hidden, c)
        linear(f"{t}.mlp.fc2", (f, "mlp", "fc2"), c, hidden)
    norm("norm", ("norm",), c)
    return layout


def _encoder_name(key: str) -> str:
    """Point-MAE loader rule: drop every 'module.', then a leading 'MAE_encoder.'/'base_model.'."""
    key = key.replace("module.", "")
    for prefix in ("MAE_encoder.", "base_model."):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _checked_encoder_state(
    state: Mapping[str, Any], model_cfg: Mapping[str, Any] | Any, source: str
) -> tuple[dict[str, np.ndarray], dict]:
    """The checkpoint's arrays under encoder names and the encoder's torch layout, after the
    strict key and shape check."""
    encoder = point_mae_encoder(model_cfg)
    if "base_model" in state:
        state = state["base_model"]
    renamed: dict[str, np.ndarray] = {}
    for key, value in checkpoint_io.flatten_state_dict(state).items():
        name = _encoder_name(key)
        if name.endswith("num_batches_tracked"):
            continue
        if name in renamed:
            raise checkpoint_io.CheckpointError(
                f"{source}: two checkpoint keys map to encoder key {name!r}"
            )
        renamed[name] = value
    layout = _torch_layout(encoder)
    checkpoint_io.strict_match(
        renamed,
        {k: shape for k, (_, shape) in layout.items()},
        ignore_prefixes=IGNORED_PREFIXES,
        source=source,
    )
    return renamed, layout


def point_mae_params_from_state_dict(
    state: Mapping[str, Any], *, model_cfg: Mapping[str, Any] | Any, source: str
) -> dict:
    """Converts a Point-MAE torch state dict to Flax {'params', 'batch_stats'}.

    Args:
      state: a whole `pretrain.pth` ({'base_model': {...}, 'optimizer': ..., ...}) or a bare
        state dict; nested dicts are flattened with '.'; values are array-likes (numpy).
      model_cfg: encoder config (see `point_mae_encoder`).
      source: file name used in error messages.

    Raises:
      checkpoint_io.CheckpointError listing every missing, unexpected or wrongly shaped key.
    """
    renamed, layout = _checked_encoder_state(state, model_cfg, source)
    variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
    for key, (path, shape) in layout.items():
        value = renamed[key].astype(np.float32)
        if path[-1] == "kernel":
            value = value.reshape(shape[:2]).T  # (out, in[, 1]) -> (in, out)
        node = variables
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = jnp.asarray(value)
    return variables


def check_point_mae_checkpoint(path: str | os.PathLike, model_cfg: Mapping[str, Any] | Any) -> None:
    """The checks of `load_point_mae_variables` on a file's keys and shapes only
    (`checkpoint_io.read_header`), for a check before any long work; orbax folders are checked
    when loaded."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        _checked_encoder_state(checkpoint_io.read_header(path), model_cfg, path)


def load_point_mae_variables(path: str | os.PathLike, model_cfg: Mapping[str, Any] | Any) -> dict:
    """Loads encoder variables from a torch checkpoint (.pth/.safetensors/.npz) or an orbax dir.

    Torch-layout files go through `checkpoint_io.load_state_dict` and
    `point_mae_params_from_state_dict`; an orbax directory holds already converted
    {'params', 'batch_stats'} and is checked against the configured encoder's shapes.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        expected = jax.eval_shape(
            lambda: init_random_point_mae_variables(jax.random.key(0), model_cfg)
        )
        variables = checkpoint_io.load_orbax(path)
        checkpoint_io.strict_match(
            checkpoint_io.flatten_state_dict(variables, sep="/"),
            {
                "/".join(k.key for k in key_path): leaf.shape
                for key_path, leaf in jax.tree_util.tree_leaves_with_path(expected)
            },
            source=path,
        )
        return jax.tree.map(jnp.asarray, variables)
    state = checkpoint_io.load_state_dict(path)
    return point_mae_params_from_state_dict(state, model_cfg=model_cfg, source=path)


def count_parameters(variables: Mapping[str, Any], collections: Sequence[str] = ("params",)) -> int:
    """Number of scalars in the given variable collections."""
    return sum(int(np.size(v)) for c in collections for v in jax.tree.leaves(variables[c]))
