"""train_eval / eval: features -> (adaptors) -> PatchCore banks -> scores -> fusion -> reports,
and the portable model folder (`lsfa_jax.model_folder`) that test and predict use.

Per class and modality a memory bank is built from the training patches (adapted by the LSFA
adaptors for method=lsfa, raw for method=raw, FPFH for method=fpfh); validation and test samples
are scored against it (`evaluators`). mode=eval rebuilds the banks with a saved adaptor
checkpoint; mode=test evaluates a saved model folder without rebuilding anything.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from lsfa_jax import console, fusion
from lsfa_jax.adaptation.checkpointing import load_adaptor_params
from lsfa_jax.evaluators import banks as bank_eval
from lsfa_jax.evaluators import class_eval, outputs
from lsfa_jax.features.source import FeatureSource, feature_source
from lsfa_jax.jobs.adaptor_training import train_lsfa
from lsfa_jax.jobs.common import (
    ConfigError,
    bank_dtype,
    cache_dir,
    prepared_dataset,
    selected_classes,
)
from lsfa_jax.mesh import make_mesh
from lsfa_jax.model_folder import (
    MODEL_FILE,
    ModelInfo,
    WeightsRecord,
    save_adaptor_params,
    save_bank,
    save_class_model,
    save_model_info,
    weights_digest,
)
from lsfa_jax.models.adaptors import AdaptorSettings
from lsfa_jax.patchcore.scorer import ScoringSettings
from lsfa_jax.patchcore.search_choice import resolve_search
from lsfa_jax.precision import config_policy
from lsfa_jax.reports import tables
from lsfa_jax.reports.manifest import RunManifest


def trained_adaptor_settings(checkpoint: str, config: ml_collections.ConfigDict) -> AdaptorSettings:
    """The adaptor settings a checkpoint was trained with (`adaptation_config.json`, saved by
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
    trained = AdaptorSettings.from_mapping(json.loads(found.read_text()))
    for key, value in trained.to_dict().items():
        if config.adaptation[key] != value:
            logging.warning(
                "%s: using %s=%r from the checkpoint's training config (config says %r)",
                checkpoint,
                key,
                value,
                config.adaptation[key],
            )
    return trained


def load_or_train_adaptors(
    config: ml_collections.ConfigDict,
    source: FeatureSource,
    classes: tuple[str, ...],
    workdir: Path,
    manifest: RunManifest,
    mesh: Mesh,
) -> tuple[dict, AdaptorSettings]:
    """mode=eval: the checkpoint's parameters; train_eval: trains them on every class, data
    parallel over `mesh`."""
    if config.mode == "eval":
        if not config.checkpoint:
            raise ConfigError("mode=eval with method=lsfa needs --config.checkpoint=<folder>")
        if (Path(config.checkpoint) / MODEL_FILE).is_file():
            raise ConfigError(
                f"--config.checkpoint={config.checkpoint} is a model folder: evaluate it with "
                "--config.mode=test (mode=eval rebuilds the banks from an adaptor checkpoint, "
                "<workdir>/adaptation/checkpoints)"
            )
        logging.info("Loading adaptors from %s", config.checkpoint)
        params = load_adaptor_params(config.checkpoint)
        return params, trained_adaptor_settings(config.checkpoint, config)
    # Classes by name: few-shot draws are keyed by the class name. The rotation term (w_rot)
    # needs DINO features of the block-rotated training images.
    train = {c: source.split(c, "train") for c in classes}
    rotated = {c: source.rotated_train(c) for c in classes} if config.adaptation.w_rot else None
    with manifest.stage("adaptation", devices_used=mesh.size):
        params, cfg = train_lsfa(config, train, workdir, rotated, mesh=mesh)
    return params, AdaptorSettings.from_mapping(cfg)


def bank_indices(config: ml_collections.ConfigDict, class_name: str, n_train: int):
    """`evaluators.banks.bank_sample_indices` with the run's settings."""
    return bank_eval.bank_sample_indices(
        class_name,
        n_train,
        few_shot=int(config.adaptation.few_shot),
        max_train_samples=int(config.patchcore.max_train_samples),
        seed=int(config.seed),
    )


def coreset_ratio(config: ml_collections.ConfigDict, modality: str) -> float:
    patchcore = config.patchcore
    return patchcore.rgb_coreset_ratio if modality == "rgb" else patchcore.coreset_ratio


def evaluate_one_class(
    config: ml_collections.ConfigDict,
    class_name: str,
    source: FeatureSource,
    adaptors: tuple[dict, AdaptorSettings] | None,
    padded: dict[str, int],
    out: Path,
    mesh: Mesh | None = None,
) -> class_eval.ClassResult:
    """Banks, scores, fusion, metrics, thresholds and images of one class; saves its model.
    Adaptors and scoring run data parallel over `mesh` (default: every device)."""
    splits = {s: source.split(class_name, s) for s in ("train", "validation", "test")}
    if len(splits["validation"]) < 2:
        raise ConfigError(
            f"{class_name}: the validation split has {len(splits['validation'])} samples; "
            "score normalisation and thresholds need at least 2 normal validation samples"
        )
    arrays = {
        s: class_eval.features_to_score(
            f.arrays, source.modalities, adaptors, config.batch_size, config_policy(config), mesh
        )
        for s, f in splits.items()
    }
    bank_rows = bank_indices(config, class_name, len(splits["train"]))
    banks = bank_eval.build_class_banks(
        class_name,
        {m: arrays["train"][m][bank_rows] for m in source.modalities},
        ratios={m: coreset_ratio(config, m) for m in source.modalities},
        padded=padded,
        seed=config.seed,
        eps=config.patchcore.projection_eps,
        dtype=bank_dtype(config),
        mesh=mesh if config.patchcore.shard_bank else None,
    )
    for modality, bank in banks.items():
        save_bank(out / "model" / class_name / f"{modality}.npz", bank)
    scoring = ScoringSettings.from_config(config)
    shard = bool(config.patchcore.shard_bank)
    validation = class_eval.score_modalities(
        banks, arrays["validation"], scoring, f"{class_name} validation", mesh, shard
    )
    test = class_eval.score_modalities(
        banks, arrays["test"], scoring, f"{class_name} test", mesh, shard
    )
    model = class_eval.calibrate_class(
        validation,
        fusion_method=config.fusion.method,
        thresholds=fusion.ThresholdSettings.from_config(config.fusion),
        labels=np.asarray(splits["validation"].label),
    )
    save_class_model(out / "model" / class_name / "fusion.json", model)
    split = class_eval.read_labelled_split(
        source.prepared, class_name, splits["test"], config.batch_size
    )
    result = class_eval.test_class(model, test, split)
    outputs.write_class_outputs(
        out,
        class_name,
        result,
        split,
        model,
        num_overlays=config.report.num_overlays,
        draw_plots=config.report.plots,
    )
    return result


def weights_records(source: FeatureSource) -> dict[str, WeightsRecord]:
    """SHA-256 of each backbone's weights, for the model folder."""
    if source.backbones is None:
        return {}
    records = {}
    for modality, path in source.backbones.weight_files.items():
        if source.backbones.random_init[modality]:
            records[modality] = WeightsRecord(sha256=None, path=None, random_init=True)
        else:
            resolved = str(Path(path).resolve())
            records[modality] = WeightsRecord(weights_digest(path), resolved, random_init=False)
    return records


def run_evaluation(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """The whole protocol for the configured classes; returns {setting: {class: metrics}}."""
    started = time.time()
    manifest = RunManifest(config.to_dict())
    manifest.set_seed("seed", config.seed)
    classes = selected_classes(config)
    with manifest.stage("prepare"):
        prepared = prepared_dataset(config, workdir)
    mesh = make_mesh()  # every device of every process: each stage splits its batches over it
    source = feature_source(config, prepared, cache_dir(config, workdir), mesh)
    if source.backbones is not None:
        for modality, path in source.backbones.weight_files.items():
            is_random = source.backbones.random_init[modality]
            manifest.add_weights(modality, None if is_random else path, random_init=is_random)
    console.stage("extracting %s features into %s", config.method, cache_dir(config, workdir))
    with manifest.stage("features", devices_used=source.devices_used):
        for class_name in classes:
            for split in ("train", "validation", "test"):
                source.split(class_name, split)
    adaptors = None
    if config.method == "lsfa":
        adaptors = load_or_train_adaptors(config, source, classes, workdir, manifest, mesh)
    padded = {}
    for modality in source.modalities:
        rows = [
            len(bank_indices(config, c, len(source.split(c, "train")))) * config.grid_size**2
            for c in classes
        ]
        padded[modality] = bank_eval.bank_padded_size(rows, coreset_ratio(config, modality))

    # What ran for patchcore.search (auto picks one per machine: the same scores, not the
    # same time).
    manifest.extra["knn_search"] = resolve_search(config.patchcore.search).to_dict()
    results = outputs.RunResults()
    for class_name in classes:
        console.stage(
            "%s: memory banks, scores, thresholds, images -> %s", class_name, workdir / "images"
        )
        with manifest.stage(f"evaluate/{class_name}", devices_used=mesh.size):
            result = evaluate_one_class(config, class_name, source, adaptors, padded, workdir, mesh)
        results.add(class_name, result)

    model_dir = workdir / "model"
    adaptor_sha256 = None if adaptors is None else save_adaptor_params(model_dir, adaptors[0])
    save_model_info(
        model_dir,
        ModelInfo(
            method=config.method,
            modalities=tuple(source.modalities),
            classes=tuple(classes),
            feature_fingerprint=source.fingerprint(),
            weights=weights_records(source),
            scoring=ScoringSettings.from_config(config).to_dict(),
            config=config.to_dict(),
            adaptors=None if adaptors is None else adaptors[1].to_dict(),
            adaptor_sha256=adaptor_sha256,
        ),
    )
    paths = outputs.write_run_reports(
        results, workdir / "results", method=config.method, dataset=config.data.name
    )
    manifest.write(workdir / "results" / "manifest.json")
    print(
        tables.format_console_table(results.metrics, notes=results.notes, dataset=config.data.name)
    )
    random_note = ""
    if source.backbones is not None and any(source.backbones.random_init.values()):
        random_note = " (RANDOMLY INITIALISED backbones: not the paper's features)"
    print(
        f"\nResults{random_note}: {paths['md']}\n"
        f"Model for mode=test / predict (movable): {model_dir}\n"
        f"Total time: {time.time() - started:.0f} s\n"
        f"Report (tables, curves, images): {paths['html']}"
    )
    return results.metrics
