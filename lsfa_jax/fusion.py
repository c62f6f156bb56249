"""Fusion of the RGB and 3D anomaly scores, and decision-threshold calibration.

Paper §3.4: the final score (image or pixel) is the average of the two modalities' scores. The
raw PatchCore scores of the modalities live on different scales, so each modality is first
normalised with statistics of scores of normal samples (training or validation):
z-score (default) or min-max. The reference code instead fuses with a one-class SVM
(docs/method.md#fusion-and-thresholds); `fit_ocsvm_fuser` / `ocsvm_fuse` reproduce it. `fit_fusion`
fits either kind as one
`Fusion` of a class; `fusion_to_dict` / `fusion_from_dict` store it with the model.

Decision rule everywhere: a sample (or pixel) is anomalous iff its score > threshold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
from numpy.typing import ArrayLike
from sklearn.linear_model import SGDOneClassSVM

NORMALISATION_METHODS = ("zscore", "minmax")
FUSION_METHODS = (*NORMALISATION_METHODS, "ocsvm")
# docs/method.md#fusion-and-thresholds: the reference fuser sees [s_xyz, 0.1 * s_rgb].
REFERENCE_RGB_FACTOR = 0.1


@dataclasses.dataclass(frozen=True)
class ScoreNormaliser:
    """Affine map x -> (x - loc) / scale of one modality, fitted on normal scores.

    zscore: loc = mean, scale = std (population, ddof = 0); minmax: loc = min, scale = max - min.
    """

    method: str
    loc: float
    scale: float
    n_fit: int

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.loc) / self.scale


def _finite_array(where: str, name: str, x: ArrayLike) -> np.ndarray:
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"{where}: {name} has dtype {x.dtype}; expected a numeric array")
    if x.size == 0:
        raise ValueError(f"{where}: {name} is empty")
    bad = ~np.isfinite(x)
    if bad.any():
        raise ValueError(f"{where}: {name} has {int(bad.sum())} non-finite values (nan or inf)")
    return x


def _fit_one(where: str, modality: str, values: np.ndarray, method: str) -> ScoreNormaliser:
    values = values.astype(np.float64, copy=False)
    if method == "zscore":
        loc, scale = float(values.mean()), float(values.std())
    else:
        loc, scale = float(values.min()), float(values.max() - values.min())
    if not scale > 0.0:
        raise ValueError(
            f"{where}: the normal scores of modality {modality!r} are constant ({loc}); "
            "they cannot be normalised"
        )
    return ScoreNormaliser(method=method, loc=loc, scale=scale, n_fit=int(values.size))


def _check_method(where: str, method: str) -> None:
    if method not in NORMALISATION_METHODS:
        raise ValueError(f"{where}: method {method!r} not in {NORMALISATION_METHODS}")


def fit_normaliser(
    scores_by_modality: Mapping[str, np.ndarray], method: str = "zscore"
) -> dict[str, ScoreNormaliser]:
    """Per-modality normalisers from image scores of normal samples.

    scores_by_modality: {modality: (N_m,) scores}. Returns {modality: ScoreNormaliser}.
    """
    where = "fusion.fit_normaliser"
    _check_method(where, method)
    if not scores_by_modality:
        raise ValueError(f"{where}: no modality given")
    out = {}
    for modality, scores in scores_by_modality.items():
        scores = _finite_array(where, f"scores[{modality!r}]", scores)
        if scores.ndim != 1:
            raise ValueError(f"{where}: scores[{modality!r}] must be 1-D; got {scores.shape}")
        out[modality] = _fit_one(where, modality, scores, method)
    return out


def fit_map_normaliser(
    maps_by_modality: Mapping[str, np.ndarray],
    method: str = "zscore",
    max_pixels: int = 1_000_000,
    seed: int = 0,
) -> dict[str, ScoreNormaliser]:
    """Per-modality normalisers from the pixels of anomaly maps of normal samples.

    maps_by_modality: {modality: (N, H, W) maps}. At most `max_pixels` pixels per modality,
    drawn uniformly without replacement with `seed`, enter the statistics (all when fewer).
    """
    where = "fusion.fit_map_normaliser"
    _check_method(where, method)
    if not maps_by_modality:
        raise ValueError(f"{where}: no modality given")
    if max_pixels < 1:
        raise ValueError(f"{where}: max_pixels must be >= 1; got {max_pixels}")
    out = {}
    for modality, maps in maps_by_modality.items():
        maps = _finite_array(where, f"maps[{modality!r}]", maps)
        if maps.ndim != 3:
            raise ValueError(f"{where}: maps[{modality!r}] must be (N, H, W); got {maps.shape}")
        flat = maps.ravel()
        if flat.size > max_pixels:
            rng = np.random.default_rng(seed)
            flat = flat[rng.choice(flat.size, size=max_pixels, replace=False)]
        out[modality] = _fit_one(where, modality, flat, method)
    return out


def _fuse(
    where: str,
    values_by_modality: Mapping[str, np.ndarray],
    normaliser: Mapping[str, ScoreNormaliser],
    ndim: int,
) -> np.ndarray:
    if set(values_by_modality) != set(normaliser):
        raise ValueError(
            f"{where}: modalities {sorted(values_by_modality)} do not match the normaliser's "
            f"{sorted(normaliser)}"
        )
    arrays = {m: _finite_array(where, repr(m), v) for m, v in values_by_modality.items()}
    shapes = {m: a.shape for m, a in arrays.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"{where}: the modalities' shapes differ: {shapes}")
    first = next(iter(arrays.values()))
    if first.ndim != ndim:
        raise ValueError(f"{where}: expected {ndim}-D arrays; got shape {first.shape}")
    return np.mean([normaliser[m](a) for m, a in arrays.items()], axis=0)


def fuse_scores(
    scores_by_modality: Mapping[str, np.ndarray], normaliser: Mapping[str, ScoreNormaliser]
) -> np.ndarray:
    """Mean over modalities of the normalised image scores: {m: (N,)} -> (N,) float64."""
    return _fuse("fusion.fuse_scores", scores_by_modality, normaliser, ndim=1)


def fuse_maps(
    maps_by_modality: Mapping[str, np.ndarray], normaliser: Mapping[str, ScoreNormaliser]
) -> np.ndarray:
    """Mean over modalities of the normalised maps: {m: (N, H, W)} -> (N, H, W) float64."""
    return _fuse("fusion.fuse_maps", maps_by_modality, normaliser, ndim=3)


def fusion_vectors(
    xyz: np.ndarray, rgb: np.ndarray, rgb_factor: float = REFERENCE_RGB_FACTOR
) -> np.ndarray:
    """The reference fuser's inputs: xyz, rgb of equal shape (image (N,) or pixel (N, H, W))
    -> (M, 2) float64 rows [xyz, rgb_factor * rgb], M = xyz.size."""
    where = "fusion.fusion_vectors"
    xyz = _finite_array(where, "xyz", xyz)
    rgb = _finite_array(where, "rgb", rgb)
    if xyz.shape != rgb.shape:
        raise ValueError(f"{where}: xyz has shape {xyz.shape} but rgb has {rgb.shape}")
    return np.stack(
        [xyz.ravel().astype(np.float64), rgb_factor * rgb.ravel().astype(np.float64)], axis=1
    )


def fit_ocsvm_fuser(
    train_vectors: np.ndarray,
    nu: float = 0.5,
    max_iter: int = 1000,
    random_state: int = 42,
) -> SGDOneClassSVM:
    """The reference decision-level fuser (docs/method.md#fusion-and-thresholds): sklearn
    SGDOneClassSVM with its
    defaults and random_state 42, fitted on (M, 2) `fusion_vectors` of the training set."""
    where = "fusion.fit_ocsvm_fuser"
    train_vectors = _finite_array(where, "train_vectors", train_vectors)
    if train_vectors.ndim != 2 or train_vectors.shape[1] != 2:
        raise ValueError(f"{where}: train_vectors must be (M, 2); got {train_vectors.shape}")
    return SGDOneClassSVM(nu=nu, max_iter=max_iter, random_state=random_state).fit(train_vectors)


def ocsvm_fuse(
    fuser: SGDOneClassSVM,
    xyz: np.ndarray,
    rgb: np.ndarray,
    rgb_factor: float = REFERENCE_RGB_FACTOR,
) -> np.ndarray:
    """Fused scores `fuser.score_samples` (= vectors @ coef_, no intercept), shaped like xyz."""
    vectors = fusion_vectors(xyz, rgb, rgb_factor)
    return fuser.score_samples(vectors).reshape(np.shape(xyz))


@dataclasses.dataclass(frozen=True)
class LinearFuser:
    """A fitted reference fuser as what it computes: rows [xyz, rgb_factor * rgb] @ coef.

    sklearn's `SGDOneClassSVM.score_samples` is that product (no intercept), so keeping `coef`
    alone reproduces `ocsvm_fuse` without pickling the sklearn object.
    """

    coef: tuple[float, float]
    rgb_factor: float = REFERENCE_RGB_FACTOR

    def __call__(self, xyz: np.ndarray, rgb: np.ndarray) -> np.ndarray:
        """xyz, rgb of equal shape -> fused scores of that shape, float64."""
        vectors = fusion_vectors(xyz, rgb, self.rgb_factor)
        return (vectors @ np.asarray(self.coef, np.float64)).reshape(np.shape(xyz))


Level = Mapping[str, ScoreNormaliser] | LinearFuser


@dataclasses.dataclass(frozen=True)
class Fusion:
    """The RGB+3D fusion of one class, fitted on its normal validation samples.

    method zscore / minmax: `image` and `pixel` are {modality: ScoreNormaliser} (mean of the
    normalised modalities); ocsvm: each is a LinearFuser over (xyz, rgb).
    """

    method: str
    image: Level
    pixel: Level

    def fuse_scores(self, scores_by_modality: Mapping[str, np.ndarray]) -> np.ndarray:
        """{modality: (N,)} image scores -> (N,) float64."""
        return _apply_level("Fusion.fuse_scores", self.image, scores_by_modality, ndim=1)

    def fuse_maps(self, maps_by_modality: Mapping[str, np.ndarray]) -> np.ndarray:
        """{modality: (N, H, W)} anomaly maps -> (N, H, W) float64."""
        return _apply_level("Fusion.fuse_maps", self.pixel, maps_by_modality, ndim=3)


def _apply_level(
    where: str, level: Level, values_by_modality: Mapping[str, np.ndarray], ndim: int
) -> np.ndarray:
    if not isinstance(level, LinearFuser):
        return _fuse(where, values_by_modality, level, ndim)
    if set(values_by_modality) != {"rgb", "xyz"}:
        raise ValueError(f"{where}: ocsvm fuses rgb and xyz; got {sorted(values_by_modality)}")
    fused = level(values_by_modality["xyz"], values_by_modality["rgb"])
    if fused.ndim != ndim:
        raise ValueError(f"{where}: expected {ndim}-D arrays; got shape {fused.shape}")
    return fused


def fit_fusion(
    scores_by_modality: Mapping[str, np.ndarray],
    maps_by_modality: Mapping[str, np.ndarray],
    method: str = "zscore",
) -> Fusion:
    """Fusion of `method` (FUSION_METHODS) from normal samples' image scores {m: (N,)} and
    maps {m: (N, H, W)}; ocsvm needs exactly the modalities rgb and xyz."""
    if method in NORMALISATION_METHODS:
        return Fusion(
            method=method,
            image=fit_normaliser(scores_by_modality, method),
            pixel=fit_map_normaliser(maps_by_modality, method),
        )
    if method != "ocsvm":
        raise ValueError(f"fusion.fit_fusion: method {method!r} not in {FUSION_METHODS}")
    levels = []
    for values in (scores_by_modality, maps_by_modality):
        if set(values) != {"rgb", "xyz"}:
            raise ValueError(f"fusion.fit_fusion: ocsvm fuses rgb and xyz; got {sorted(values)}")
        fuser = fit_ocsvm_fuser(fusion_vectors(values["xyz"], values["rgb"]))
        levels.append(LinearFuser(coef=tuple(float(c) for c in fuser.coef_)))
    return Fusion(method=method, image=levels[0], pixel=levels[1])


def fuse_modalities(
    fused: Fusion, per_modality: Mapping[str, tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """{modality: (scores (N,), maps (N, S, S))} -> fused scores (N,) and maps (N, S, S)."""
    return (
        fused.fuse_scores({m: v[0] for m, v in per_modality.items()}),
        fused.fuse_maps({m: v[1] for m, v in per_modality.items()}),
    )


def _level_to_dict(level: Level) -> dict:
    if isinstance(level, LinearFuser):
        return {"coef": list(level.coef), "rgb_factor": level.rgb_factor}
    return {m: dataclasses.asdict(n) for m, n in level.items()}


def fusion_to_dict(fused: Fusion) -> dict:
    """JSON-ready record of `fused`; floats survive a JSON round trip exactly."""
    return {
        "method": fused.method,
        "image": _level_to_dict(fused.image),
        "pixel": _level_to_dict(fused.pixel),
    }


def _level_from_dict(method: str, record: Mapping) -> Level:
    if method == "ocsvm":
        level = LinearFuser(
            coef=tuple(float(c) for c in record["coef"]), rgb_factor=float(record["rgb_factor"])
        )
        if len(level.coef) != 2:
            raise ValueError(f"an ocsvm coef has 2 entries; got {len(level.coef)}")
        return level
    level = {m: ScoreNormaliser(**n) for m, n in record.items()}
    if not level or any(n.method != method or not n.scale > 0.0 for n in level.values()):
        raise ValueError(f"normalisers do not match method {method!r}: {level}")
    return level


def fusion_from_dict(record: Mapping, where: str = "fusion.fusion_from_dict") -> Fusion:
    """The Fusion `fusion_to_dict` described; `where` (e.g. the file read) names bad input."""
    method = record.get("method") if isinstance(record, Mapping) else None
    if method not in FUSION_METHODS:
        raise ValueError(f"{where}: not a fusion record: method {method!r} not in {FUSION_METHODS}")
    levels = {}
    for name in ("image", "pixel"):
        try:
            levels[name] = _level_from_dict(method, record[name])
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise ValueError(
                f"{where}: not a fusion record: bad {name!r} entry of a {method} fusion: {error!r}"
            ) from error
    return Fusion(method=method, **levels)


def calibrate_threshold(
    normal_scores: np.ndarray, quantile: float | None = 0.99, target_fpr: float | None = None
) -> float:
    """Decision threshold from scores of normal (validation) samples, any shape.

    quantile: the `quantile` of the normal scores (numpy linear interpolation).
    target_fpr (overrides quantile): the smallest threshold t, among the normal scores, whose
    false-positive rate on them, mean(normal > t), is <= target_fpr.
    """
    where = "fusion.calibrate_threshold"
    normal = _finite_array(where, "normal_scores", normal_scores).ravel().astype(np.float64)
    if target_fpr is not None:
        if not 0.0 <= target_fpr < 1.0:
            raise ValueError(f"{where}: target_fpr must be in [0, 1); got {target_fpr}")
        ordered = np.sort(normal)
        # At most floor(target_fpr * n) normal scores may exceed t: t = the value at that rank
        # from the top; ties at t only lower the false-positive count.
        allowed = int(np.floor(target_fpr * ordered.size))
        return float(ordered[ordered.size - 1 - allowed])
    if quantile is None or not 0.0 <= quantile <= 1.0:
        raise ValueError(
            f"{where}: quantile must be in [0, 1] (or give target_fpr); got {quantile}"
        )
    return float(np.quantile(normal, quantile))


@dataclasses.dataclass(frozen=True)
class ThresholdStats:
    """Confusion counts and rates at one threshold (anomalous iff score > threshold).

    precision is nan when nothing is flagged, recall when there is no defective sample, fpr
    when there is no good sample; `notes` then says so.
    """

    threshold: float
    precision: float
    recall: float
    f1: float
    fpr: float
    tp: int
    fp: int
    tn: int
    fn: int
    notes: list[str]


def precision_recall_at(threshold: float, labels: np.ndarray, scores: np.ndarray) -> ThresholdStats:
    """Precision, recall, F1 and FPR of `scores > threshold` against labels (1 = defect).

    labels, scores: equal shapes, e.g. (N,) images or (N, H, W) pixels.
    """
    where = "fusion.precision_recall_at"
    labels = np.asarray(labels)
    scores = _finite_array(where, "scores", scores)
    if labels.shape != scores.shape:
        raise ValueError(f"{where}: labels has shape {labels.shape} but scores has {scores.shape}")
    bad = (labels != 0) & (labels != 1)
    if bad.any():
        raise ValueError(f"{where}: labels must be 0/1; found {int(bad.sum())} other values")
    positive = labels == 1
    flagged = scores > threshold
    tp = int(np.sum(flagged & positive))
    fp = int(np.sum(flagged & ~positive))
    fn = int(np.sum(~flagged & positive))
    tn = int(np.sum(~flagged & ~positive))
    notes = []
    precision = tp / (tp + fp) if tp + fp else float("nan")
    if tp + fp == 0:
        notes.append("precision undefined: no sample is above the threshold")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    if tp + fn == 0:
        notes.append("recall undefined: no defective sample")
    fpr = fp / (fp + tn) if fp + tn else float("nan")
    if fp + tn == 0:
        notes.append("FPR undefined: no good sample")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    if tp + fp + fn == 0:
        notes.append("F1 undefined: no defective sample and nothing flagged")
    return ThresholdStats(
        threshold=float(threshold),
        precision=precision,
        recall=recall,
        f1=f1,
        fpr=fpr,
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        notes=notes,
    )


THRESHOLD_RULES = ("auto", "f1", "quantile", "fpr", "manual")


def f1_optimal_threshold(labels: ArrayLike, scores: ArrayLike) -> float:
    """The threshold t maximising F1 of `scores > t` against labels (1 = anomalous), any shape.

    Every distinct cut of the sorted scores is tried (O(n log n), so pixel maps fit too);
    t is the midpoint between the lowest flagged and the highest unflagged score (just below
    the minimum when everything is flagged). Among cuts of equal F1 the highest t wins (fewest
    false alarms). Needs at least one anomalous and one normal entry.
    """
    where = "fusion.f1_optimal_threshold"
    labels = np.asarray(labels).ravel()
    scores = _finite_array(where, "scores", scores).ravel().astype(np.float64)
    if labels.shape != scores.shape:
        raise ValueError(f"{where}: {labels.size} labels for {scores.size} scores")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError(f"{where}: labels must be 0/1")
    positives = int(labels.sum())
    if positives == 0 or positives == labels.size:
        raise ValueError(
            f"{where}: needs both normal and anomalous entries; got {positives} of "
            f"{labels.size} anomalous"
        )
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], labels[order].astype(np.int64)
    tp = np.cumsum(hits)
    fp = np.arange(1, ranked.size + 1) - tp
    # A cut may fall only between different scores: equal scores are flagged together.
    cut = np.r_[ranked[:-1] != ranked[1:], True]
    f1 = np.where(cut, 2 * tp / (tp + fp + positives), -1.0)
    k = int(np.argmax(f1))  # the first maximum: the fewest flagged, i.e. the highest t
    if k == ranked.size - 1:
        return float(np.nextafter(ranked[-1], -np.inf))
    return float((ranked[k] + ranked[k + 1]) / 2)


@dataclasses.dataclass(frozen=True)
class ThresholdChoice:
    """A decision threshold and the rule that gave it, for the model and the reports."""

    value: float
    rule: str  # f1 | quantile | fpr | manual
    description: str  # e.g. "F1-optimal on 12 validation samples (4 anomalous)"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def choose_threshold(
    rule: str,
    normal_scores: ArrayLike,
    *,
    labels: ArrayLike | None = None,
    scores: ArrayLike | None = None,
    quantile: float = 0.99,
    target_fpr: float = 0.01,
    value: float | None = None,
    what: str = "samples",
) -> ThresholdChoice:
    """The threshold of `rule` (THRESHOLD_RULES) for one class and setting.

    normal_scores: scores (or map pixels) of normal validation samples, any shape.
    labels, scores: validation entries with anomalies among them, for rule f1 (optional).
    rule auto: f1 when `labels` holds anomalous and normal entries, else quantile.
    quantile: the normal-quantile rule; fpr: the smallest threshold whose false-alarm rate on
    the normal scores is <= target_fpr; manual: `value` itself. `what` names the entries in the
    description ("samples", "pixels").
    """
    where = "fusion.choose_threshold"
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"{where}: rule {rule!r} not in {THRESHOLD_RULES}")
    normal = np.asarray(normal_scores)
    has_both = labels is not None and 0 < int(np.sum(np.asarray(labels) == 1)) < np.size(labels)
    if rule == "auto":
        rule = "f1" if has_both else "quantile"
    if rule == "f1":
        if not has_both:
            raise ValueError(
                f"{where}: rule f1 needs validation {what} with anomalies and normal ones; use "
                "quantile, fpr or manual"
            )
        n_bad = int(np.sum(np.asarray(labels) == 1))
        return ThresholdChoice(
            f1_optimal_threshold(labels, scores),
            "f1",
            f"F1-optimal on {np.size(labels)} validation {what} ({n_bad} anomalous)",
        )
    if rule == "quantile":
        return ThresholdChoice(
            calibrate_threshold(normal, quantile=quantile),
            "quantile",
            f"{quantile:g} quantile of {normal.size} normal validation {what}",
        )
    if rule == "fpr":
        return ThresholdChoice(
            calibrate_threshold(normal, target_fpr=target_fpr),
            "fpr",
            f"false-alarm rate <= {target_fpr:g} on {normal.size} normal validation {what}",
        )
    if value is None or not np.isfinite(value):
        raise ValueError(f"{where}: rule manual needs a finite value; got {value}")
    return ThresholdChoice(float(value), "manual", f"manual value {float(value):g}")


@dataclasses.dataclass(frozen=True)
class ThresholdSettings:
    """`config.fusion`'s threshold rules for images and pixels (fusion.THRESHOLD_RULES)."""

    rule: str
    quantile: float
    target_fpr: float
    value: float | None
    pixel_rule: str
    pixel_quantile: float
    pixel_target_fpr: float
    pixel_value: float | None

    @classmethod
    def from_config(cls, fusion_cfg: Mapping) -> ThresholdSettings:
        return cls(
            rule=fusion_cfg["threshold_rule"],
            quantile=float(fusion_cfg["threshold_quantile"]),
            target_fpr=float(fusion_cfg["threshold_target_fpr"]),
            value=fusion_cfg["threshold_value"],
            pixel_rule=fusion_cfg["pixel_threshold_rule"],
            pixel_quantile=float(fusion_cfg["pixel_threshold_quantile"]),
            pixel_target_fpr=float(fusion_cfg["pixel_threshold_target_fpr"]),
            pixel_value=fusion_cfg["pixel_threshold_value"],
        )
