"""train_eval / eval: features -> (adaptors) -> PatchCore banks -> scores -> fusion -> reports.

Per class and modality a PatchCore memory bank is built from the training patches (adapted by
the LSFA adaptors for method=lsfa, raw for method=raw, FPFH for method=fpfh); validation and test
samples are scored against it. Settings: "RGB" and "3D" use one modality; "RGB+3D" averages the
two modalities' scores after normalising each with statistics of the normal validation samples
(paper 3.4; `config.fusion`). The reference's OCSVM fusion is `config.fusion.method=ocsvm`.
Bank rows are stored in `config.patchcore.bank_dtype` (float32 or bfloat16).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from lsfa_jax import fusion, metrics
from lsfa_jax.adaptation.checkpointing import load_adaptor_params
from lsfa_jax.atomic_io import atomic_write_json, atomic_write_text
from lsfa_jax.data import pipeline
from lsfa_jax.data.few_shot import few_shot_indices
from lsfa_jax.features.cache import SplitFeatures
from lsfa_jax.jobs.common import ConfigError, cache_dir, selected_classes
from lsfa_jax.jobs.features import FeatureSource, feature_source
from lsfa_jax.jobs.model_store import (
    BANK_DTYPES,
    ClassModel,
    save_bank,
    save_class_model,
    save_model_info,
)
from lsfa_jax.jobs.prepare import prepared_dataset
from lsfa_jax.jobs.train import train_lsfa
from lsfa_jax.models.adaptors import apply_adaptors
from lsfa_jax.patchcore.bank import (
    MemoryBank,
    build_memory_bank,
    padded_bank_size,
    with_search_index,
)
from lsfa_jax.patchcore.coreset import coreset_size
from lsfa_jax.patchcore.scorer import score_batch
from lsfa_jax.reports import overlays, paper_results, plots, tables
from lsfa_jax.reports.manifest import RunManifest

SETTING_OF_MODALITY = {"rgb": "RGB", "xyz": "3D"}
FUSED = "RGB+3D"


class Adaptors:
    """Trained adaptor parameters and how to apply them (inference: local features only)."""

    def __init__(self, params: dict, cfg: ml_collections.ConfigDict):
        self.params = jax.tree.map(jnp.asarray, params)
        self.cfg = cfg

    def apply(self, split: SplitFeatures, batch_size: int) -> dict[str, np.ndarray]:
        """Adapted rgb and xyz features of a whole split, (N, P, C) float32 each.

        Every call sees a full batch (the last one is padded by repeating its final sample), so
        the jitted adaptors compile once whatever the split size; results are written into
        preallocated arrays rather than concatenated, so the library is held once.
        """
        count = len(split)
        out = {m: np.empty((count, *split.arrays[m].shape[1:]), np.float32) for m in ("rgb", "xyz")}
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            chunk = {m: np.asarray(split.arrays[m][start:stop]) for m in ("rgb", "rgb_cls", "xyz")}
            if stop - start < batch_size:
                pad = batch_size - (stop - start)
                chunk = {
                    m: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for m, v in chunk.items()
                }
            out_rgb, out_xyz = apply_adaptors(
                self.params,
                jnp.asarray(chunk["rgb"]),
                jnp.asarray(chunk["xyz"]),
                jnp.asarray(chunk["rgb_cls"]),
                structure=self.cfg.structure,
                rgb_heads=self.cfg.rgb_heads,
                xyz_heads=self.cfg.xyz_heads,
                prepend_cls=bool(self.cfg.prepend_cls),
            )
            out["rgb"][start:stop] = np.asarray(out_rgb)[: stop - start]
            out["xyz"][start:stop] = np.asarray(out_xyz)[: stop - start]
        return out


def trained_adaptation_config(
    checkpoint: str, config: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
    """The adaptation settings a checkpoint was trained with (`adaptation_config.json`, saved by
    training next to the checkpoints folder); the fused qkv kernels do not depend on the head
    count, so applying a checkpoint with other settings would silently change the features."""
    path = Path(checkpoint).resolve()
    candidates = [
        path.parent / "adaptation_config.json",
        path.parent.parent / "adaptation_config.json",
    ]
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        raise ConfigError(
            f"{checkpoint}: no adaptation_config.json beside the checkpoints folder; cannot tell "
            "which adaptor structure and head counts it was trained with"
        )
    trained = ml_collections.ConfigDict(json.loads(found.read_text()))
    cfg = ml_collections.ConfigDict(config.adaptation.to_dict())
    for key in ("structure", "rgb_heads", "xyz_heads", "prepend_cls"):
        if cfg[key] != trained[key]:
            logging.warning(
                "%s: using %s=%r from the checkpoint's training config (config says %r)",
                checkpoint,
                key,
                trained[key],
                cfg[key],
            )
        cfg[key] = trained[key]
    return cfg


def split_arrays(
    split: SplitFeatures, modalities: tuple[str, ...], adaptors: Adaptors | None, batch: int
) -> dict[str, np.ndarray]:
    if adaptors is None:
        return {m: split.arrays[m] for m in modalities}
    return adaptors.apply(split, batch)


def score_split(
    bank: MemoryBank, features: np.ndarray, config: ml_collections.ConfigDict, desc: str
) -> tuple[np.ndarray, np.ndarray]:
    """(N, P, C) features -> image scores (N,) and maps (N, S, S), in batches of fixed size.

    The last batch is padded to the full batch size so the jitted scorer compiles once. The
    bank's search index for `config.patchcore.search` is computed here once if it lacks it.
    """
    size = config.batch_size
    search = config.patchcore.search
    approximate_dim = min(config.patchcore.approximate_dim, bank.features.shape[1])
    if search != "exact":
        bank = with_search_index(bank, approximate_dim if search == "approximate" else None)
    scores, maps = [], []
    for start in tqdm(range(0, len(features), size), desc=desc, unit="batch", leave=False):
        chunk = np.asarray(features[start : start + size], np.float32)
        real = len(chunk)
        if real < size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - real, axis=0)])
        batch_scores, batch_maps = score_batch(
            bank,
            jnp.asarray(chunk),
            out_size=config.data.image_size,
            reweight=config.patchcore.reweight,
            blur=config.patchcore.blur,
            sigma=config.patchcore.blur_sigma,
            search=search,
            approximate_dim=approximate_dim,
        )
        scores.append(np.asarray(batch_scores)[:real])
        maps.append(np.asarray(batch_maps)[:real])
    return np.concatenate(scores), np.concatenate(maps)


def test_images(prepared: dict[str, str], class_name: str, config) -> dict[str, np.ndarray]:
    """Ground truth and RGB of the test split, in the same (sorted) order as the features."""
    masks, rgb, ids = [], [], []
    for batch in pipeline.make_batches(prepared, class_name, "test", config.batch_size):
        masks.append(batch["mask"])
        rgb.append(batch["rgb_uint8"])
        ids += [str(v) for v in batch["file_id"]]
    return {"mask": np.concatenate(masks), "rgb": np.concatenate(rgb), "file_id": ids}


def fuse_split(
    fused: fusion.Fusion, per_modality: dict[str, tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """{modality: (scores (N,), maps (N, S, S))} -> fused scores (N,) and maps (N, S, S)."""
    return (
        fused.fuse_scores({m: v[0] for m, v in per_modality.items()}),
        fused.fuse_maps({m: v[1] for m, v in per_modality.items()}),
    )


def per_defect_metrics(
    defect_types: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray,
    maps: np.ndarray,
) -> dict[str, dict[str, float]]:
    """I-AUROC and AUPRO@0.3 of the good test samples against each defect type alone."""
    out = {}
    for defect in sorted(set(defect_types[labels == 1].tolist())):
        keep = (labels == 0) | (defect_types == defect)
        if not np.any(labels[keep] == 0):
            continue
        out[defect] = {
            "i_auroc": metrics.image_auroc(labels[keep], scores[keep]),
            "aupro_30": metrics.aupro(masks[keep], maps[keep], 0.3),
            "n": int(np.sum(defect_types == defect)),
        }
    return out


def write_per_defect(per_defect: dict, out_dir: Path) -> Path:
    """results/per_defect.{json,md}: {class: {setting: {defect: metrics}}}."""
    atomic_write_json(out_dir / "per_defect.json", per_defect)
    lines = ["# Per defect type (good test samples vs one defect type)", ""]
    lines += [
        "| class | setting | defect type | n | I-AUROC | AUPRO@0.3 |",
        "|---|---|---|---|---|---|",
    ]
    for class_name, settings in per_defect.items():
        for setting, defects in settings.items():
            for defect, values in defects.items():
                lines.append(
                    f"| {class_name} | {setting} | {defect} | {values['n']} | "
                    f"{values['i_auroc']:.3f} | {values['aupro_30']:.3f} |"
                )
    path = out_dir / "per_defect.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def load_or_train_adaptors(
    config: ml_collections.ConfigDict,
    source: FeatureSource,
    classes: tuple[str, ...],
    workdir: Path,
    manifest: RunManifest,
) -> tuple[Adaptors, str]:
    if config.mode == "eval":
        if not config.checkpoint:
            raise ConfigError("mode=eval with method=lsfa needs --config.checkpoint=<folder>")
        logging.info("Loading adaptors from %s", config.checkpoint)
        params = load_adaptor_params(config.checkpoint)
        cfg = trained_adaptation_config(config.checkpoint, config)
        return Adaptors(params, cfg), str(config.checkpoint)
    # Issue 14: classes by name (few-shot draws are keyed by name); rotated-image features for
    # the rotation term.
    train = {c: source.split(c, "train") for c in classes}
    rotated = {c: source.rotated_train(c) for c in classes} if config.adaptation.w_rot else None
    with manifest.stage("adaptation"):
        params, cfg = train_lsfa(config, train, workdir, rotated)
    return Adaptors(params, cfg), str(workdir / "adaptation" / "checkpoints")


def bank_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
    """`config.patchcore.bank_dtype` (float32 | bfloat16) as a dtype."""
    name = config.patchcore.bank_dtype
    if name not in BANK_DTYPES:
        raise ConfigError(f"config.patchcore.bank_dtype={name!r}: use one of {sorted(BANK_DTYPES)}")
    return jnp.dtype(BANK_DTYPES[name])


SEARCHES = ("screened", "exact", "approximate")


def check_patchcore_config(config: ml_collections.ConfigDict) -> None:
    """Fails before any work on a bad `config.patchcore` setting."""
    bank_dtype(config)
    patchcore = config.patchcore
    if patchcore.search not in SEARCHES:
        raise ConfigError(f"config.patchcore.search={patchcore.search!r}: use one of {SEARCHES}")
    if patchcore.approximate_dim < 1:
        raise ConfigError(
            f"config.patchcore.approximate_dim={patchcore.approximate_dim}: must be >= 1"
        )
    if patchcore.max_train_samples < 0:
        raise ConfigError(
            f"config.patchcore.max_train_samples={patchcore.max_train_samples}: must be >= 0 "
            "(0: every training sample)"
        )


def bank_samples(config: ml_collections.ConfigDict, n_train: int) -> int:
    """Number of training samples of a class that go into its banks (`bank_sample_indices`)."""
    few_shot = int(config.adaptation.get("few_shot", 0))
    if few_shot > 0:
        return min(few_shot, n_train)
    cap = config.patchcore.max_train_samples
    return min(n_train, cap) if cap > 0 else n_train


def bank_sample_indices(
    config: ml_collections.ConfigDict, class_name: str, n_train: int
) -> np.ndarray:
    """Issue 14: indices of the training samples of a class that go into its banks: the
    few-shot samples the adaptors were trained on (`adaptation.few_shot` > 0, paper 4.4), else
    the first `patchcore.max_train_samples` (0: all)."""
    few_shot = int(config.adaptation.get("few_shot", 0))
    if few_shot > 0:
        return few_shot_indices(class_name, n_train, few_shot, config.seed)
    cap = config.patchcore.max_train_samples
    return np.arange(min(n_train, cap) if cap > 0 else n_train)


def bank_padded_size(source: FeatureSource, classes, ratio: float) -> int:
    """One padded bank size for every class, so the scorer compiles once per modality."""
    rows = [
        bank_samples(source.config, len(source.split(c, "train"))) * source.config.grid_size**2
        for c in classes
    ]
    return padded_bank_size(coreset_size(max(rows), ratio), 4096)


def evaluate_one_class(
    config: ml_collections.ConfigDict,
    class_index: int,
    class_name: str,
    source: FeatureSource,
    adaptors: Adaptors | None,
    padded: dict[str, int],
    out: Path,
) -> dict:
    """Banks, scores, fusion, metrics, thresholds and images of one class."""
    splits = {s: source.split(class_name, s) for s in ("train", "validation", "test")}
    if len(splits["validation"]) < 2:
        raise ConfigError(
            f"{class_name}: the validation split has {len(splits['validation'])} samples; "
            "score normalisation and thresholds need at least 2 normal validation samples"
        )
    arrays = {
        s: split_arrays(f, source.modalities, adaptors, config.batch_size)
        for s, f in splits.items()
    }
    images = test_images(source.prepared, class_name, config)
    if images["file_id"] != splits["test"].file_id:
        raise RuntimeError(f"{class_name}: test features and images are not in the same order")
    labels = splits["test"].label
    val_out, test_out = {}, {}
    bank_rows = bank_sample_indices(config, class_name, len(splits["train"]))  # issue 14
    for modality in source.modalities:
        library = np.asarray(arrays["train"][modality][bank_rows], np.float32)
        library = library.reshape(-1, library.shape[-1])
        ratio = (
            config.patchcore.rgb_coreset_ratio
            if modality == "rgb"
            else config.patchcore.coreset_ratio
        )
        logging.info("%s/%s: coreset of %d library rows", class_name, modality, len(library))
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed), class_index * 2 + len(val_out))
        bank = build_memory_bank(
            library,
            ratio=ratio,
            key=key,
            eps=config.patchcore.projection_eps,
            padded_size=padded[modality],
            dtype=bank_dtype(config),
            progress=True,
        )
        save_bank(out / "model" / class_name / f"{modality}.npz", bank)
        val_out[modality] = score_split(
            bank, arrays["validation"][modality], config, f"{class_name}/{modality} validation"
        )
        test_out[modality] = score_split(
            bank, arrays["test"][modality], config, f"{class_name}/{modality} test"
        )

    settings = {SETTING_OF_MODALITY[m]: test_out[m] for m in source.modalities}
    val_settings = {SETTING_OF_MODALITY[m]: val_out[m] for m in source.modalities}
    fused = None
    if len(source.modalities) == 2:
        # Paper 3.4 (zscore / minmax) or the reference's OCSVM, fitted on normal validation data.
        fused = fusion.fit_fusion(
            {m: v[0] for m, v in val_out.items()},
            {m: v[1] for m, v in val_out.items()},
            config.fusion.method,
        )
        settings[FUSED] = fuse_split(fused, test_out)
        val_settings[FUSED] = fuse_split(fused, val_out)
    map_scale = {s: overlays.fixed_scale(v[1]) for s, v in val_settings.items()}

    result = {"metrics": {}, "notes": {}, "thresholds": {}, "curves": {}, "per_defect": {}}
    defect_types = np.asarray(splits["test"].defect_type)
    for setting, (scores, maps) in settings.items():
        class_metrics = metrics.evaluate_class(labels, scores, images["mask"], maps)
        result["per_defect"][setting] = per_defect_metrics(
            defect_types, labels, scores, images["mask"], maps
        )
        result["metrics"][setting] = class_metrics.values()
        result["notes"][setting] = list(class_metrics.notes)
        threshold = fusion.calibrate_threshold(
            val_settings[setting][0], quantile=config.fusion.threshold_quantile
        )
        stats = fusion.precision_recall_at(threshold, labels, scores)
        result["thresholds"][setting] = {
            "threshold": float(threshold),
            "precision": float(stats.precision),
            "recall": float(stats.recall),
        }
        if len(set(labels.tolist())) == 2:
            fpr, tpr, _ = metrics.roc_curve_points(labels, scores)
            pro_fpr, pro, _ = metrics.pro_curve_points(images["mask"], maps)
            result["curves"][setting] = ((fpr, tpr), (pro_fpr, pro))
    save_class_model(
        out / "model" / class_name / "fusion.json",
        ClassModel(fusion=fused, thresholds=result["thresholds"], map_scale=map_scale),
    )
    main_setting = FUSED if FUSED in settings else "3D"
    atomic_write_json(
        out / "scores" / f"{class_name}.json",
        {
            "file_id": images["file_id"],
            "label": labels.tolist(),
            "defect_type": splits["test"].defect_type,
            **{s: v[0].tolist() for s, v in settings.items()},
        },
    )
    if config.report.num_overlays > 0:
        overlays.save_class_overlays(
            out / "images" / class_name,
            class_name,
            images["rgb"],
            images["mask"],
            settings[main_setting][1],
            labels,
            settings[main_setting][0],
            k=config.report.num_overlays,
            sample_names=[i.replace("/", "_") for i in images["file_id"]],
            scale=map_scale[main_setting],
        )
    if config.report.plots and result["curves"]:
        plots.plot_roc(
            out / "plots" / f"{class_name}_roc.png",
            {s: c[0] for s, c in result["curves"].items()},
            title=f"{class_name}: ROC",
            aucs={s: result["metrics"][s]["i_auroc"] for s in result["curves"]},
        )
        plots.plot_pro(
            out / "plots" / f"{class_name}_pro.png",
            {s: c[1] for s, c in result["curves"].items()},
            title=f"{class_name}: PRO",
            aupros={s: result["metrics"][s]["aupro_30"] for s in result["curves"]},
        )
    return result


def run_evaluation(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """The whole protocol for the configured classes; returns {setting: {class: metrics}}."""
    started = time.time()
    manifest = RunManifest(config.to_dict())
    manifest.set_seed("seed", config.seed)
    classes = selected_classes(config)
    check_patchcore_config(config)  # a bad setting fails before any work
    with manifest.stage("prepare"):
        prepared = prepared_dataset(config, workdir)
    source = feature_source(config, prepared, cache_dir(config, workdir))
    if source.backbones is not None:
        for modality, path in source.backbones.weight_files.items():
            is_random = source.backbones.random_init[modality]
            manifest.add_weights(modality, None if is_random else path, random_init=is_random)
    with manifest.stage("features"):
        for class_name in classes:
            for split in ("train", "validation", "test"):
                source.split(class_name, split)
    adaptors, adaptor_path = None, ""
    if config.method == "lsfa":
        adaptors, adaptor_path = load_or_train_adaptors(config, source, classes, workdir, manifest)
    padded = {
        m: bank_padded_size(
            source,
            classes,
            config.patchcore.rgb_coreset_ratio if m == "rgb" else config.patchcore.coreset_ratio,
        )
        for m in source.modalities
    }

    results: dict = {}
    notes: dict = {}
    thresholds: dict = {}
    per_defect: dict = {}
    for index, class_name in enumerate(classes):
        with manifest.stage(f"evaluate/{class_name}"):
            result = evaluate_one_class(
                config, index, class_name, source, adaptors, padded, workdir
            )
        per_defect[class_name] = result["per_defect"]
        for setting, values in result["metrics"].items():
            results.setdefault(setting, {})[class_name] = values
            notes.setdefault(setting, {})[class_name] = result["notes"][setting]
            thresholds.setdefault(setting, {})[class_name] = result["thresholds"][setting]

    save_model_info(
        workdir / "model",
        {
            "method": config.method,
            "modalities": list(source.modalities),
            "classes": list(classes),
            "feature_fingerprint": source.fingerprint(),
            "adaptors": adaptor_path,
            "config": config.to_dict(),
        },
    )
    paper_method = config.method if config.data.name in paper_results.DATASETS else None
    paths = tables.write_result_tables(
        results,
        workdir / "results",
        notes=notes,
        paper_method=paper_method,
        dataset=config.data.name,
    )
    tables.write_threshold_table(thresholds, workdir / "results", dataset=config.data.name)
    write_per_defect(per_defect, workdir / "results")
    manifest.write(workdir / "results" / "manifest.json")
    print(tables.format_console_table(results, notes=notes, dataset=config.data.name))
    random_note = ""
    if source.backbones is not None and any(source.backbones.random_init.values()):
        random_note = " (RANDOMLY INITIALISED backbones: not the paper's features)"
    print(
        f"\nResults{random_note}: {paths['md']}\n"
        f"Anomaly-map overlays: {workdir / 'images'}\nCurves: {workdir / 'plots'}\n"
        f"Model for mode=predict: {workdir / 'model'}\n"
        f"Total time: {time.time() - started:.0f} s"
    )
    return results
