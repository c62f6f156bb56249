"""mode=predict: score new samples with the model a train_eval / eval run left behind.

`--config.checkpoint` names that run's `model` folder; `--config.input` is one of
  - an xyz tiff (its rgb png is found by the MVTec rule: .../xyz/NNN.tiff -> .../rgb/NNN.png, or
    a png with the same stem beside it),
  - a folder in the MVTec 3D-AD layout (any folder with rgb/ and xyz/ below it, searched
    recursively), or
  - a folder of plain pairs NAME.png + NAME.tiff.
`--config.data.classes` names the class whose banks to use (needed when the model has several).
Each sample is preprocessed and resized as in training, scored per modality, fused with the
run's stored fusion, and compared with the run's threshold. Writes `predictions.json` /
`predictions.csv` and one anomaly-map image per sample, drawn on the colour scale stored with the
model (`overlays.fixed_scale`), so a colour means the same score in every image and call.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from lsfa_jax.adaptation.checkpointing import load_adaptor_params
from lsfa_jax.atomic_io import atomic_write_json, atomic_write_text
from lsfa_jax.data import mvtec3d, prepare, preprocess
from lsfa_jax.data.pipeline import IMAGENET_MEAN, IMAGENET_STD
from lsfa_jax.features.cache import SplitFeatures
from lsfa_jax.jobs.common import ConfigError
from lsfa_jax.jobs.evaluate import (
    FUSED,
    SETTING_OF_MODALITY,
    Adaptors,
    fuse_split,
    score_split,
    trained_adaptation_config,
)
from lsfa_jax.jobs.features import feature_source
from lsfa_jax.jobs.model_store import load_bank, load_class_model, load_model_info
from lsfa_jax.reports import overlays


def find_pairs(path: Path) -> list[tuple[Path, Path]]:
    """(rgb png, xyz tiff) pairs named by `config.input` (module docstring)."""
    if not path.exists():
        raise FileNotFoundError(f"config.input={path}: no such file or folder")
    tiffs = [path] if path.is_file() else sorted(p for p in path.rglob("*.tif*") if p.is_file())
    pairs = []
    for tiff in tiffs:
        candidates = [tiff.with_suffix(".png")]
        if tiff.parent.name == "xyz":
            candidates.insert(0, tiff.parent.parent / "rgb" / f"{tiff.stem}.png")
        rgb = next((c for c in candidates if c.exists()), None)
        if rgb is None:
            raise FileNotFoundError(f"{tiff}: no rgb image found (looked for {candidates})")
        pairs.append((rgb, tiff))
    if not pairs:
        raise FileNotFoundError(f"config.input={path}: no xyz .tiff files found")
    return pairs


def prepared_inputs(
    config: ml_collections.ConfigDict, pairs: list[tuple[Path, Path]]
) -> dict[str, np.ndarray]:
    params = prepare.plane_params(config.data)
    rgb, rgb_uint8, xyz, names = [], [], [], []
    for rgb_path, xyz_path in tqdm(pairs, desc="preparing inputs", unit="sample"):
        name = str(xyz_path)
        files = mvtec3d.SampleFiles("input", "predict", "unknown", name, rgb_path, xyz_path, None)
        sample = preprocess.prepare_sample(files, config.data.image_size, params, config.seed)
        if sample.num_nonfinite:
            logging.warning("%s: %d NaN/inf points treated as missing", name, sample.num_nonfinite)
        image = sample.rgb.astype(np.float32) / 255.0
        rgb.append((image - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD))
        rgb_uint8.append(sample.rgb)
        xyz.append(sample.xyz)
        names.append(name)
    return {
        "rgb": np.stack(rgb).astype(np.float32),
        "rgb_uint8": np.stack(rgb_uint8),
        "xyz": np.stack(xyz),
        "file_id": np.asarray(names),
    }


def run_predict(config: ml_collections.ConfigDict, workdir: Path) -> list[dict]:
    if not config.checkpoint:
        raise ConfigError("mode=predict needs --config.checkpoint=<run workdir>/model")
    if not config.input:
        raise ConfigError("mode=predict needs --config.input=<sample or folder>")
    model_dir = Path(config.checkpoint)
    info = load_model_info(model_dir)
    if info["method"] != config.method:
        raise ConfigError(
            f"{model_dir}: the model was built with method={info['method']}, the config says "
            f"method={config.method}"
        )
    classes = info["classes"]
    wanted = config.data.classes
    if wanted in ("", "all"):
        if len(classes) != 1:
            raise ConfigError(
                f"{model_dir} holds classes {classes}: choose one with --config.data.classes=NAME"
            )
        class_name = classes[0]
    elif wanted in classes:
        class_name = wanted
    else:
        raise ConfigError(f"config.data.classes={wanted!r}: the model holds {classes}")

    # Read first: a model folder from an older version fails before any work.
    stored = load_class_model(model_dir / class_name / "fusion.json")
    inputs = prepared_inputs(config, find_pairs(Path(config.input)))
    source = feature_source(config, {}, workdir)
    if source.fingerprint() != info["feature_fingerprint"]:
        raise ConfigError(
            f"{model_dir}: its features came from other backbones or weights than the config's "
            "(compare rgb_weights, point_weights and the backbone sizes with the training run)"
        )
    batch = {**inputs, "label": np.zeros(len(inputs["file_id"]), np.int32)}
    features = source.extract(batch)
    split = SplitFeatures(
        arrays=features,
        file_id=list(inputs["file_id"]),
        label=batch["label"],
        defect_type=["unknown"] * len(batch["label"]),
        path=Path(config.input),
    )
    arrays = {m: features[m] for m in source.modalities}
    if info["method"] == "lsfa":
        params = load_adaptor_params(info["adaptors"])
        cfg = trained_adaptation_config(info["adaptors"], config)
        arrays = Adaptors(params, cfg).apply(split, config.batch_size)

    per_modality = {
        m: score_split(
            load_bank(model_dir / class_name / f"{m}.npz"), arrays[m], config, f"scoring {m}"
        )
        for m in source.modalities
    }
    settings = {SETTING_OF_MODALITY[m]: v for m, v in per_modality.items()}
    main_setting = "3D"
    if len(source.modalities) == 2:
        main_setting = FUSED
        settings[FUSED] = fuse_split(stored.fusion, per_modality)
    threshold = stored.thresholds[main_setting]["threshold"]
    vmin, vmax = stored.map_scale[main_setting]
    scores, maps = settings[main_setting]
    rows = []
    for i, name in enumerate(inputs["file_id"]):
        stem = Path(str(name)).name
        image_path = workdir / "predictions" / f"{i:04d}_{Path(stem).stem}.png"
        overlays.save_overlay_png(
            image_path,
            inputs["rgb_uint8"][i],
            np.zeros(maps.shape[1:], np.uint8),
            np.asarray(maps[i]),
            title=f"{stem}: score {float(scores[i]):.3f} (threshold {threshold:.3f})",
            vmin=vmin,
            vmax=vmax,
        )
        rows.append(
            {
                "input": str(name),
                "class": class_name,
                "setting": main_setting,
                "score": float(scores[i]),
                "threshold": float(threshold),
                "anomalous": bool(scores[i] > threshold),
                "map_vmin": vmin,
                "map_vmax": vmax,
                **{f"score_{s}": float(v[0][i]) for s, v in settings.items()},
                "image": str(image_path),
            }
        )
    atomic_write_json(workdir / "predictions.json", rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(workdir / "predictions.csv", buffer.getvalue())
    for row in rows:
        verdict = "FAIL (anomalous)" if row["anomalous"] else "pass"
        print(f"{row['input']}: {row['score']:.4f} -> {verdict}")
    print(f"\nPredictions: {workdir / 'predictions.csv'}; images: {workdir / 'predictions'}")
    return rows
