"""mode=predict: scores new samples with a saved model folder.

`--config.checkpoint` names the model folder (`<workdir>/model`, movable); `--config.input` a
sample or a folder of them (`lsfa_jax.jobs.inputs`).
`--config.data.classes` names the class whose banks to use (needed when the model has several).
Each sample is prepared as the model's training data were (its image size, plane removal and
seeds; `data.xyz_scale` of this run converts the input's unit), scored per modality, fused with
the stored fusion, and compared with the stored threshold. When the inputs sit in defect folders
(`test/cut/xyz/000.tiff`), their labels are known and the metrics are reported as well.
Writes `predictions.json` / `predictions.csv` and per sample, in `predictions/`, the raw
anomaly map at the input's resolution (`<name>_map.tiff`, float32), the predicted mask
(`<name>_mask.png`, map > the stored pixel threshold) and an overlay on the model's fixed
colour scale (`<name>_overlay.png`); names keep the defect folder (`cut_000`).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import ml_collections
import numpy as np
from PIL import Image

from lsfa_jax import console
from lsfa_jax.atomic_io import atomic_write_json, atomic_write_text
from lsfa_jax.data import folder, mvtec3d
from lsfa_jax.evaluators import class_eval, outputs
from lsfa_jax.features.source import feature_source
from lsfa_jax.jobs.common import ConfigError, model_adaptors, open_model
from lsfa_jax.jobs.inputs import UNLABELLED, find_samples, prepared_inputs, sample_name
from lsfa_jax.model_folder import load_bank, load_class_model
from lsfa_jax.patchcore.scorer import ScoringSettings
from lsfa_jax.precision import config_policy
from lsfa_jax.reports import overlays, tables


def choose_class(classes: tuple[str, ...], wanted: str, model_dir: Path) -> str:
    if wanted in ("", "all"):
        if len(classes) != 1:
            raise ConfigError(
                f"{model_dir} holds classes {list(classes)}: choose one with "
                "--config.data.classes=NAME"
            )
        return classes[0]
    if wanted not in classes:
        raise ConfigError(f"config.data.classes={wanted!r}: the model holds {list(classes)}")
    return wanted


def labelled_split(
    samples: list[mvtec3d.SampleFiles], inputs: dict[str, np.ndarray]
) -> class_eval.LabelledSplit | None:
    """The inputs as a labelled split when every sample's folder says good or defect."""
    if any(s.defect_type == UNLABELLED for s in samples):
        return None
    labels = np.asarray([int(s.defect_type != mvtec3d.GOOD) for s in samples], np.int32)
    return class_eval.LabelledSplit(
        file_id=[s.file_id for s in samples],
        labels=labels,
        defect_types=[s.defect_type for s in samples],
        masks=inputs["mask"] if folder.has_masks(samples) else None,
        rgb=inputs["rgb_uint8"],
    )


def write_predictions(workdir: Path, rows: list[dict]) -> None:
    atomic_write_json(workdir / "predictions.json", rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(workdir / "predictions.csv", buffer.getvalue())


def run_predict(config: ml_collections.ConfigDict, workdir: Path) -> list[dict]:
    if not config.input:
        raise ConfigError("mode=predict needs --config.input=<sample or folder>")
    model_dir, info, run = open_model(config)
    class_name = choose_class(info.classes, config.data.classes, model_dir)
    stored = load_class_model(model_dir / class_name / "fusion.json")
    banks = {m: load_bank(model_dir / class_name / f"{m}.npz") for m in info.modalities}
    samples = find_samples(Path(config.input))
    console.stage(
        "scoring %d inputs from %s with class %s of %s",
        len(samples),
        config.input,
        class_name,
        model_dir,
    )
    inputs = prepared_inputs(run, samples)
    source = feature_source(run, {}, workdir)
    features = source.extract_in_batches(inputs)
    arrays = class_eval.features_to_score(
        features,
        tuple(info.modalities),
        model_adaptors(model_dir, info),
        run.batch_size,
        config_policy(run),
    )
    scoring = ScoringSettings.from_mapping(info.scoring)
    per_modality = class_eval.score_modalities(
        banks, arrays, scoring, "scoring", shard_bank=config.patchcore.shard_bank
    )
    settings = class_eval.setting_outputs(per_modality, stored.fusion)
    main = class_eval.FUSED if class_eval.FUSED in settings else "3D"
    threshold = stored.thresholds[main].image
    pixel_threshold = stored.thresholds[main].pixel
    rule = stored.thresholds[main].description
    vmin, vmax = stored.map_scale[main]
    scores, maps = settings[main]
    labelled = labelled_split(samples, inputs) is not None
    rows = []
    console.stage("writing maps, masks and overlays to %s", workdir / "predictions")
    for i, files in enumerate(samples):
        name = sample_name(files)
        with Image.open(files.rgb_path) as original:
            input_size = (original.height, original.width)
        written = overlays.save_prediction_files(
            workdir / "predictions",
            name,
            inputs["rgb_uint8"][i],
            np.asarray(maps[i]),
            input_size=input_size,
            title=overlays.verdict_title(name, float(scores[i]), threshold),
            note=f"image threshold: {rule}" if rule else "",
            vmin=vmin,
            vmax=vmax,
            pixel_threshold=pixel_threshold,
            gt_mask=inputs["mask"][i] if labelled else None,
        )
        image_path = written["overlay"]
        rows.append(
            {
                "input": str(files.xyz_path),
                "name": name,
                "defect_type": files.defect_type,
                "class": class_name,
                "setting": main,
                "score": float(scores[i]),
                "threshold": threshold,
                "anomalous": bool(scores[i] > threshold),
                "map_vmin": vmin,
                "map_vmax": vmax,
                **{f"score_{s}": float(v[0][i]) for s, v in settings.items()},
                "image": str(image_path),
                "map": str(written["map"]),
                "mask": str(written["mask"]) if "mask" in written else None,
                "pixel_threshold": pixel_threshold,
            }
        )
    write_predictions(workdir, rows)
    for row in rows:
        verdict = "FAIL (anomalous)" if row["anomalous"] else "pass"
        print(f"{row['input']}: {row['score']:.4f} -> {verdict}")
    split = labelled_split(samples, inputs)
    if split is not None:
        results = outputs.RunResults()
        results.add(class_name, class_eval.test_class(stored, per_modality, split))
        outputs.write_run_reports(
            results, workdir / "results", method=info.method, dataset=run.data.name
        )
        print(tables.format_console_table(results.metrics, notes=results.notes))
        print(f"Metrics of the labelled inputs: {workdir / 'results' / 'results.md'}")
    print(f"\nPredictions: {workdir / 'predictions.csv'}; images: {workdir / 'predictions'}")
    return rows
