"""Scoring a class's splits against its banks, calibration on normal validation samples, and the
class's test metrics.

Settings: "RGB" and "3D" use one modality; "RGB+3D" fuses both after normalising each with the
statistics of the normal validation samples (paper 3.4; `config.fusion`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
from jax.sharding import Mesh

from lsfa_jax import fusion, metrics
from lsfa_jax.data import pipeline
from lsfa_jax.features.cache import SplitFeatures
from lsfa_jax.model_folder import ClassModel, Thresholds
from lsfa_jax.models.adaptors import AdaptorSettings, adapt_features
from lsfa_jax.patchcore.bank import MemoryBank
from lsfa_jax.patchcore.scorer import ScoringSettings, score_features
from lsfa_jax.patchcore.sharding import score_features_sharded
from lsfa_jax.reports import overlays

SETTING_OF_MODALITY = {"rgb": "RGB", "xyz": "3D"}
FUSED = "RGB+3D"

Outputs = dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (scores (N,), maps (N, S, S))


@dataclasses.dataclass(frozen=True)
class LabelledSplit:
    """What the metrics need of a test split besides the scores, in the features' order.

    masks (N, S, S) uint8, or None when the dataset has no ground-truth masks; rgb (N, S, S, 3)
    uint8 for the overlays; labels (N,) 0 good / 1 defect.
    """

    file_id: list[str]
    labels: np.ndarray
    defect_types: list[str]
    masks: np.ndarray | None
    rgb: np.ndarray


def read_labelled_split(
    prepared: Mapping[str, str], class_name: str, features: SplitFeatures, batch_size: int
) -> LabelledSplit:
    """Ground truth and RGB of a prepared test split, checked to be in the features' order."""
    masks, rgb, ids = [], [], []
    for batch in pipeline.make_batches(prepared, class_name, "test", batch_size):
        masks.append(batch["mask"])
        rgb.append(batch["rgb_uint8"])
        ids += [str(v) for v in batch["file_id"]]
    if ids != features.file_id:
        raise RuntimeError(f"{class_name}: test features and images are not in the same order")
    return LabelledSplit(
        file_id=ids,
        labels=np.asarray(features.label),
        defect_types=list(features.defect_type),
        masks=np.concatenate(masks) if pipeline.has_masks(prepared, class_name) else None,
        rgb=np.concatenate(rgb),
    )


@dataclasses.dataclass(frozen=True)
class ThresholdOutcome:
    """A stored image threshold applied to a test split: its precision and recall there, with
    the rules (and the pixel threshold) for the report."""

    threshold: float
    precision: float
    recall: float
    rule: str
    pixel_threshold: float | None
    pixel_rule: str

    def to_json(self) -> dict[str, float | str]:
        """The threshold table's row (`reports.tables.write_threshold_table`)."""
        out = dataclasses.asdict(self)
        if self.pixel_threshold is None:
            del out["pixel_threshold"], out["pixel_rule"]
        return out


@dataclasses.dataclass
class ClassResult:
    """One class's test results, per setting: metrics and their notes, the stored threshold with
    its precision and recall on test, per-defect metrics, ROC / PRO curves and the outputs."""

    metrics: dict[str, dict[str, float]]
    notes: dict[str, list[str]]
    thresholds: dict[str, ThresholdOutcome]
    per_defect: dict[str, dict[str, dict[str, float]]]
    curves: dict[str, tuple]
    outputs: Outputs

    @property
    def main_setting(self) -> str:
        """The setting predictions and overlays use: RGB+3D when both modalities exist."""
        return FUSED if FUSED in self.outputs else "3D"


def features_to_score(
    arrays: Mapping[str, np.ndarray],
    modalities: tuple[str, ...],
    adaptors: tuple[dict, AdaptorSettings] | None,
    batch_size: int,
    precision: str = "highest",
    mesh: Mesh | None = None,
) -> dict[str, np.ndarray]:
    """The features PatchCore scores: the backbones' own, or adapted by (params, settings) with
    the adaptors' layers under the policy named `precision`, split over `mesh`."""
    if adaptors is None:
        return {m: arrays[m] for m in modalities}
    return adapt_features(*adaptors, arrays, batch_size, precision, mesh)


def score_modalities(
    banks: Mapping[str, MemoryBank],
    features: Mapping[str, np.ndarray],
    settings: ScoringSettings,
    what: str,
    mesh: Mesh | None = None,
    shard_bank: bool = False,
) -> Outputs:
    """{modality: (N, P, C)} -> {modality: (scores, maps)} against each modality's bank,
    split over `mesh` (default: every device): the batches, and with `shard_bank` the banks'
    rows too (`patchcore.sharding`; the same scores)."""
    score = score_features_sharded if shard_bank else score_features
    return {
        m: score(banks[m], features[m], settings, f"{what}/{m}", mesh=mesh) for m in sorted(banks)
    }


def setting_outputs(per_modality: Outputs, fused: fusion.Fusion | None) -> Outputs:
    """Per-modality outputs -> per-setting outputs (RGB, 3D and, with a fusion, RGB+3D)."""
    out = {SETTING_OF_MODALITY[m]: v for m, v in per_modality.items()}
    if fused is not None:
        out[FUSED] = fusion.fuse_modalities(fused, per_modality)
    return out


def class_thresholds(
    scores: np.ndarray,
    maps: np.ndarray,
    settings: fusion.ThresholdSettings,
    *,
    labels: np.ndarray | None = None,
    masks: np.ndarray | None = None,
) -> Thresholds:
    """The image and pixel thresholds of one setting from its validation outputs: scores (N,),
    maps (N, S, S), with labels (N,) / masks (N, S, S) when the split holds defects."""
    normal = slice(None) if labels is None else np.asarray(labels) == 0
    image = fusion.choose_threshold(
        settings.rule,
        scores[normal],
        labels=labels,
        scores=scores,
        quantile=settings.quantile,
        target_fpr=settings.target_fpr,
        value=settings.value,
    )
    pixel = fusion.choose_threshold(
        settings.pixel_rule,
        maps[normal],
        labels=masks,
        scores=maps,
        quantile=settings.pixel_quantile,
        target_fpr=settings.pixel_target_fpr,
        value=settings.pixel_value,
        what="pixels",
    )
    return Thresholds(
        image=image.value,
        rule=image.rule,
        description=image.description,
        pixel=pixel.value,
        pixel_rule=pixel.rule,
        pixel_description=pixel.description,
    )


def calibrate_class(
    validation: Outputs,
    *,
    fusion_method: str,
    thresholds: fusion.ThresholdSettings,
    labels: np.ndarray | None = None,
    masks: np.ndarray | None = None,
) -> ClassModel:
    """Fusion, decision thresholds and map colour scales from the validation samples'
    per-modality outputs (normal ones, unless `labels` (N,) marks defects among them; `masks`
    (N, S, S) are their ground truth)."""
    normal = slice(None) if labels is None else np.asarray(labels) == 0
    fused = None
    if len(validation) == 2:
        fused = fusion.fit_fusion(
            {m: v[0][normal] for m, v in validation.items()},
            {m: v[1][normal] for m, v in validation.items()},
            fusion_method,
        )
    per_setting = setting_outputs(validation, fused)
    records = {
        s: class_thresholds(v[0], v[1], thresholds, labels=labels, masks=masks)
        for s, v in per_setting.items()
    }
    scales = {s: overlays.fixed_scale(v[1][normal]) for s, v in per_setting.items()}
    return ClassModel(fusion=fused, thresholds=records, map_scale=scales)


def test_class(model: ClassModel, test: Outputs, split: LabelledSplit) -> ClassResult:
    """Metrics of the test split's per-modality outputs under the class model's fusion and
    thresholds."""
    per_setting = setting_outputs(test, model.fusion)
    labels = np.asarray(split.labels)
    result = ClassResult({}, {}, {}, {}, {}, per_setting)
    for setting, (scores, maps) in per_setting.items():
        class_metrics = metrics.evaluate_class(labels, scores, split.masks, maps)
        result.metrics[setting] = class_metrics.values()
        result.notes[setting] = list(class_metrics.notes)
        result.per_defect[setting] = metrics.per_defect_metrics(
            split.defect_types, labels, scores, split.masks, maps
        )
        stored = model.thresholds[setting]
        stats = fusion.precision_recall_at(stored.image, labels, scores)
        result.thresholds[setting] = ThresholdOutcome(
            threshold=stored.image,
            precision=float(stats.precision),
            recall=float(stats.recall),
            rule=stored.description or stored.rule,
            pixel_threshold=stored.pixel,
            pixel_rule=stored.pixel_description,
        )
        if len(set(labels.tolist())) == 2:
            roc = metrics.roc_curve_points(labels, scores)[:2]
            pro = (
                metrics.pro_curve_points(split.masks, maps)[:2] if split.masks is not None else None
            )
            result.curves[setting] = (roc, pro)
    return result
