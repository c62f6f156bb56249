"""The inference program of one class of a model folder, as one pure function.

  rgb  (B, S, S, 3) uint8, the prepared image at the model's image size S
  xyz  (B, S, S, 3) float32 metres, the prepared organized cloud (plane-removed when the model
       was trained so: `lsfa_jax.data.preprocess.prepare_sample` runs first, outside)
  -> score_<setting> (B,) float32 and map_<setting> (B, S, S) float32 for every setting the model
     has (RGB, 3D and RGB+3D; named score_rgb, score_3d, score_fused...), and anomalous (B,) bool:
     the main setting's score > its stored threshold.

Inside: ImageNet normalisation, the DINO ViT, Point-MAE on the packed valid points (FPS, kNN
groups, 3-NN interpolation, the patch grid), the adaptors (method lsfa), PatchCore's kNN against
the class's banks, the image score rule, map upsampling and blur, and the fusion. These are the
library functions the in-process predict runs, so the JAX program gives its numbers.

Method fpfh: FPFH features are computed by open3d on the host, so the program starts from them,
`xyz_features` (B, G*G, 33) float32 (`features.fpfh.fpfh_patch_features`), and scores them.

`onnx=True` swaps the steps ONNX has no counterpart for with formulations that give the same
result: the bank search is one chunked float32 matmul + argmin (the nearest row, its distance
from the differences, as the screened search certifies it) instead of the bfloat16 screen with
its lax.switch, the stable argsort that packs the valid points is a cumulative-sum scatter, and
bfloat16 banks are widened to float32 (exactly); the graph takes one sample (B = 1). The JAX
export keeps onnx=False.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lsfa_jax.features.patch_grid import (
    pack_valid_points,
    project_points_to_grid,
    valid_point_mask,
)
from lsfa_jax.fusion import Fusion, LinearFuser
from lsfa_jax.model_folder import ClassModel
from lsfa_jax.models import point_mae, vit
from lsfa_jax.models.adaptors import AdaptorSettings, apply_adaptors
from lsfa_jax.patchcore.bank import MemoryBank
from lsfa_jax.patchcore.knn import nearest_neighbours
from lsfa_jax.patchcore.normalisation import normalise
from lsfa_jax.patchcore.scorer import (
    ScoringSettings,
    _score_images,
    anomaly_map,
    patchcore_image_score,
)

# Output names per setting (ONNX and npz keys cannot hold "+").
SETTING_KEYS = {"RGB": "rgb", "3D": "3d", "RGB+3D": "fused"}
SETTING_OF_MODALITY = {"rgb": "RGB", "xyz": "3D"}
# ImageNet statistics, as `data.pipeline` (not imported: it pulls in TensorFlow).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class ClassProgram:
    """Static description of one class's program (hashable: it is a jit static argument)."""

    method: str
    class_name: str
    modalities: tuple[str, ...]
    image_size: int
    grid_size: int
    scoring: ScoringSettings
    main_setting: str
    threshold: float
    fusion: str | None = None  # zscore | minmax | ocsvm
    rgb_cfg: vit.ViTConfig | None = None
    point_cfg: tuple[tuple[str, Any], ...] | None = None
    adaptors: AdaptorSettings | None = None
    fpfh_dim: int = 33

    @property
    def settings(self) -> tuple[str, ...]:
        out = tuple(SETTING_OF_MODALITY[m] for m in sorted(self.modalities))
        return (*out, "RGB+3D") if self.fusion is not None else out

    def input_specs(self, batch: int | Any) -> dict[str, jax.ShapeDtypeStruct]:
        """Input name -> (shape, dtype) for a batch size (an int or a symbolic dimension)."""
        size = self.image_size
        if self.method == "fpfh":
            patches = self.grid_size * self.grid_size
            return {
                "xyz_features": jax.ShapeDtypeStruct((batch, patches, self.fpfh_dim), "float32")
            }
        return {
            "rgb": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8),
            "xyz": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
        }

    def output_names(self) -> tuple[str, ...]:
        keys = [SETTING_KEYS[s] for s in self.settings]
        return (*(f"score_{k}" for k in keys), *(f"map_{k}" for k in keys), "anomalous")


def fusion_arrays(fused: Fusion | None) -> dict[str, np.ndarray]:
    """The stored fusion as float32 constants: loc / scale per modality and level (zscore,
    minmax) or the fuser's coefficients (ocsvm)."""
    if fused is None:
        return {}
    out = {}
    for level_name, level in (("image", fused.image), ("pixel", fused.pixel)):
        if isinstance(level, LinearFuser):
            out[f"{level_name}_coef"] = np.asarray(
                [level.coef[0], level.coef[1] * level.rgb_factor], np.float32
            )
        else:
            for m, normaliser in level.items():
                out[f"{level_name}_{m}"] = np.asarray(
                    [normaliser.loc, normaliser.scale], np.float32
                )
    return out


def class_program(
    *,
    method: str,
    class_name: str,
    modalities: tuple[str, ...],
    run: Any,
    scoring: ScoringSettings,
    model: ClassModel,
    adaptors: AdaptorSettings | None,
) -> ClassProgram:
    """The ClassProgram of a model folder's class (`run`: the model's run config)."""
    main = "RGB+3D" if model.fusion is not None else SETTING_OF_MODALITY[modalities[0]]
    rgb_cfg = point_cfg = None
    if method != "fpfh":
        rgb_cfg = vit.vit_config({**run.rgb_backbone.to_dict(), "img_size": run.data.image_size})
        point_cfg = tuple(
            (k, tuple(v) if isinstance(v, list | tuple) else v)
            for k, v in sorted(run.point_backbone.to_dict().items())
        )
    return ClassProgram(
        method=method,
        class_name=class_name,
        modalities=tuple(sorted(modalities)),
        image_size=int(run.data.image_size),
        grid_size=int(run.grid_size),
        scoring=scoring,
        main_setting=main,
        threshold=model.thresholds[main].image,
        fusion=None if model.fusion is None else model.fusion.method,
        rgb_cfg=rgb_cfg,
        point_cfg=point_cfg,
        adaptors=adaptors,
    )


def normalise_rgb(rgb_uint8: jax.Array) -> jax.Array:
    """uint8 (..., 3) -> float32 ImageNet-normalised, in the float32 operations of
    `data.pipeline.normalise_rgb`."""
    rgb = rgb_uint8.astype(jnp.float32) / jnp.float32(255.0)
    return (rgb - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


def pack_valid_points_by_cumsum(organized: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`patch_grid.pack_valid_points` without a sort: every point's place in the stable
    partition (valid first, raster order kept) from cumulative sums, then one scatter."""
    flat = organized.reshape(-1, 3)
    valid = valid_point_mask(flat)
    n_valid = jnp.sum(valid.astype(jnp.int32))
    before_valid = jnp.cumsum(valid.astype(jnp.int32)) - 1
    before_invalid = jnp.cumsum((~valid).astype(jnp.int32)) - 1
    place = jnp.where(valid, before_valid, n_valid + before_invalid)
    order = (
        jnp.zeros(flat.shape[:1], jnp.int32)
        .at[place]
        .set(jnp.arange(flat.shape[0], dtype=jnp.int32))
    )
    point_mask = jnp.arange(flat.shape[0]) < n_valid
    points = jnp.where(point_mask[:, None], flat[order], 0.0)
    return points, order, point_mask


def farthest_point_sampling_carried(
    points: jax.Array, point_mask: jax.Array, num_samples: int
) -> jax.Array:
    """`point_mae.farthest_point_sampling` with the cloud in the loop state instead of captured
    by the loop body (jax2onnx lowers a Loop body's captured tracers only as constants); the
    same operations in the same order."""
    points = points.astype(jnp.float32)
    norm2 = points[:, 0] * points[:, 0] + points[:, 1] * points[:, 1] + points[:, 2] * points[:, 2]
    eligible = point_mask & (norm2 > point_mae.FPS_MIN_SQUARED_NORM)
    indices = jnp.zeros((num_samples,), jnp.int32)
    min_distance = jnp.full(points.shape[:1], point_mae.FPS_INIT_DISTANCE, jnp.float32)

    def step(i, carry):
        indices, min_distance, points, eligible = carry
        last = points[indices[i - 1]]
        distance = point_mae.squared_distances(points, last[None])[:, 0]
        min_distance = jnp.where(eligible, jnp.minimum(min_distance, distance), min_distance)
        chosen = jnp.argmax(jnp.where(eligible, min_distance, -1.0)).astype(jnp.int32)
        return indices.at[i].set(chosen), min_distance, points, eligible

    indices, *_ = jax.lax.fori_loop(1, num_samples, step, (indices, min_distance, points, eligible))
    return indices


def point_patch_features(
    encoder: point_mae.PointMAEEncoder,
    variables: Mapping[str, Any],
    organized: jax.Array,
    grid_size: int,
    onnx: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """(S, S, 3) cloud -> ((G*G, C) Point-MAE patch features, (G*G,) foreground), the steps of
    `features.point_mae_grid.point_mae_patch_grid`."""
    pack = pack_valid_points_by_cumsum if onnx else pack_valid_points
    points, pixel_index, point_mask = pack(organized.astype(jnp.float32))
    fps = farthest_point_sampling_carried if onnx else point_mae.farthest_point_sampling
    centre_idx = fps(points, point_mask, encoder.num_group)
    centres = points[centre_idx]
    _, neighbourhoods = point_mae.knn_group(points, point_mask, centres, encoder.group_size)
    centre_features = encoder.apply(variables, neighbourhoods, centres)
    point_features = point_mae.interpolate_to_points(points, point_mask, centres, centre_features)
    return project_points_to_grid(
        point_features, pixel_index, point_mask, organized.shape[:2], grid_size
    )


def _score_by_matmul(
    bank: MemoryBank, queries: jax.Array, settings: ScoringSettings
) -> tuple[jax.Array, jax.Array]:
    """`scorer._score_images` with the float32 matmul + argmin search (ONNX path)."""
    features = bank.features.astype(jnp.float32)
    batch, n_patches, dim = queries.shape
    grid = math.isqrt(n_patches)

    def one_image(image_queries):
        image_queries = normalise(image_queries, bank.stats)
        _, idx = nearest_neighbours(image_queries, features, bank.valid, k=1, bank_chunk=4096)
        idx = idx[:, 0]
        dist = jnp.sqrt(jnp.sum(jnp.square(image_queries - features[idx]), axis=-1))
        score = patchcore_image_score(
            image_queries,
            features,
            dist,
            idx,
            dim,
            bank_valid=bank.valid,
            reweight=settings.reweight,
            bank_chunk=4096,
        )
        return score, dist

    scores, patch_scores = jax.lax.map(one_image, queries)
    sigma = float(settings.sigma) if settings.blur == "gaussian" else None
    maps = anomaly_map(
        patch_scores.reshape(batch, grid, grid), out_size=settings.out_size, sigma=sigma
    )
    return scores, maps


def score_modality(
    bank: MemoryBank, queries: jax.Array, settings: ScoringSettings, onnx: bool = False
) -> tuple[jax.Array, jax.Array]:
    """(B, P, D) features -> image scores (B,) and maps (B, S, S), as `scorer.score_batch`."""
    if settings.blur == "pil":
        raise ValueError(
            "the model's maps use the host-side PIL blur (patchcore.blur=pil), which cannot be "
            "exported; use a model scored with patchcore.blur=gaussian or none"
        )
    if onnx:
        return _score_by_matmul(bank, queries, settings)
    return _score_images(
        bank,
        queries,
        None,
        out_size=settings.out_size,
        reweight=settings.reweight,
        sigma=float(settings.sigma) if settings.blur == "gaussian" else None,
        bank_chunk=4096,
        search=settings.search,
        approximate_dim=min(settings.approximate_dim, bank.features.shape[1]),
    )


def _fuse(program: ClassProgram, constants: Mapping[str, jax.Array], level: str, values):
    if program.fusion == "ocsvm":
        coef = constants[f"{level}_coef"]
        return values["xyz"] * coef[0] + values["rgb"] * coef[1]
    normalised = [
        (values[m] - constants[f"{level}_{m}"][0]) / constants[f"{level}_{m}"][1]
        for m in sorted(values)
    ]
    return sum(normalised[1:], normalised[0]) / jnp.float32(len(normalised))


def patch_features(
    program: ClassProgram, variables: Mapping[str, Any], inputs: Mapping[str, jax.Array], onnx
) -> dict[str, jax.Array]:
    """The features PatchCore scores, {modality: (B, G*G, D)}."""
    if program.method == "fpfh":
        return {"xyz": inputs["xyz_features"].astype(jnp.float32)}
    rgb, rgb_cls = vit.dino_patch_grid(
        variables["rgb_backbone"],
        normalise_rgb(inputs["rgb"]),
        model_cfg=program.rgb_cfg,
        return_cls=True,
    )
    encoder = point_mae.point_mae_encoder(dict(program.point_cfg))
    single = functools.partial(
        point_patch_features,
        encoder,
        variables["point_backbone"],
        grid_size=program.grid_size,
        onnx=onnx,
    )
    if onnx:
        # The ONNX graph takes one sample (jax2onnx's Scan over the batch does not load in
        # onnxruntime); the loader runs a batch sample by sample.
        xyz = single(inputs["xyz"][0])[0][None]
    else:
        xyz, _ = jax.lax.map(single, inputs["xyz"])
    if program.adaptors is None:
        return {"rgb": rgb, "xyz": xyz}
    settings = program.adaptors
    rgb, xyz = apply_adaptors(
        variables["adaptors"],
        rgb,
        xyz,
        rgb_cls,
        structure=settings.structure,
        rgb_heads=settings.rgb_heads,
        xyz_heads=settings.xyz_heads,
        prepend_cls=settings.prepend_cls,
    )
    return {"rgb": rgb, "xyz": xyz}


def run_class(
    program: ClassProgram,
    variables: Mapping[str, Any],
    inputs: Mapping[str, jax.Array],
    *,
    onnx: bool = False,
) -> dict[str, jax.Array]:
    """The program: inputs (module docstring) -> {output name: array}.

    variables: {"rgb_backbone", "point_backbone", "adaptors" (method lsfa), "banks"
    {modality: MemoryBank}, "fusion" (`fusion_arrays`)}.
    """
    features = patch_features(program, variables, inputs, onnx)
    per_modality = {
        m: score_modality(variables["banks"][m], features[m], program.scoring, onnx)
        for m in program.modalities
    }
    outputs = {}
    for m, (scores, maps) in per_modality.items():
        outputs[SETTING_OF_MODALITY[m]] = (scores, maps)
    if program.fusion is not None:
        constants = variables["fusion"]
        outputs["RGB+3D"] = (
            _fuse(program, constants, "image", {m: v[0] for m, v in per_modality.items()}),
            _fuse(program, constants, "pixel", {m: v[1] for m, v in per_modality.items()}),
        )
    named = {}
    for setting in program.settings:
        named[f"score_{SETTING_KEYS[setting]}"] = outputs[setting][0]
    for setting in program.settings:
        named[f"map_{SETTING_KEYS[setting]}"] = outputs[setting][1]
    named["anomalous"] = outputs[program.main_setting][0] > jnp.float32(program.threshold)
    return named
