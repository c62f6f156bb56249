"""mode=test: evaluates a saved model folder on a labelled dataset, rebuilding nothing.

`--config.checkpoint` names the model folder (`<workdir>/model` of a train_eval / eval run, which
may have been moved); the data are read as the config's dataset (`--config.data_dir`, classes
default to the model's). Only the test split is prepared: no training data are needed. The
backbones, preprocessing, scoring, fusion and thresholds are the model's, so on the same data the
numbers equal those of the run that wrote it. Writes the same results, curves, per-defect and
threshold reports as train_eval.
"""

from __future__ import annotations

import time
from pathlib import Path

import ml_collections

from lsfa_jax import console
from lsfa_jax.evaluators import class_eval, outputs
from lsfa_jax.features.source import feature_source
from lsfa_jax.jobs.common import (
    cache_dir,
    model_adaptors,
    model_classes,
    open_model,
    prepared_dataset,
)
from lsfa_jax.mesh import make_mesh
from lsfa_jax.model_folder import load_bank, load_class_model
from lsfa_jax.patchcore.scorer import ScoringSettings
from lsfa_jax.patchcore.search_choice import resolve_search
from lsfa_jax.precision import config_policy
from lsfa_jax.reports import tables
from lsfa_jax.reports.manifest import RunManifest


def run_test(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """Evaluates the model folder; returns {setting: {class: metrics}}."""
    started = time.time()
    model_dir, info, run = open_model(config)
    classes = model_classes(info, run)
    manifest = RunManifest(run.to_dict())
    with manifest.stage("prepare"):
        prepared = prepared_dataset(run, workdir, splits=("test",))
    mesh = make_mesh()
    source = feature_source(run, prepared, cache_dir(run, workdir), mesh)
    adaptors = model_adaptors(model_dir, info)
    scoring = ScoringSettings.from_mapping(info.scoring)
    manifest.extra["knn_search"] = resolve_search(scoring.search).to_dict()  # what ran here
    results = outputs.RunResults()
    for class_name in classes:
        console.stage("%s: scores, metrics, images -> %s", class_name, workdir / "images")
        with manifest.stage(f"test/{class_name}", devices_used=mesh.size):
            banks = {m: load_bank(model_dir / class_name / f"{m}.npz") for m in info.modalities}
            model = load_class_model(model_dir / class_name / "fusion.json")
            features = source.split(class_name, "test")
            arrays = class_eval.features_to_score(
                features.arrays,
                tuple(info.modalities),
                adaptors,
                run.batch_size,
                config_policy(run),
                mesh,
            )
            test = class_eval.score_modalities(
                banks, arrays, scoring, f"{class_name} test", mesh, config.patchcore.shard_bank
            )
            split = class_eval.read_labelled_split(prepared, class_name, features, run.batch_size)
            result = class_eval.test_class(model, test, split)
            outputs.write_class_outputs(
                workdir,
                class_name,
                result,
                split,
                model,
                num_overlays=run.report.num_overlays,
                draw_plots=run.report.plots,
            )
        results.add(class_name, result)
    paths = outputs.write_run_reports(
        results, workdir / "results", method=info.method, dataset=run.data.name
    )
    manifest.write(workdir / "results" / "manifest.json")
    print(tables.format_console_table(results.metrics, notes=results.notes, dataset=run.data.name))
    print(
        f"\nResults of model {model_dir}: {paths['md']}\n"
        f"Total time: {time.time() - started:.0f} s\n"
        f"Report (tables, curves, images): {paths['html']}"
    )
    return results.metrics
