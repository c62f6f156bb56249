"""Builds the prepared datasets once, in a cache keyed by everything that changes their content.

Cache layout: <cache_dir>/prepared/<kind>-<class>-<key>/<builder>/<class>/<version>/, where key
hashes (dataset kind, class, raw folder, image size, preprocessing on/off and its parameters,
seed, synthetic config, CODE_VERSION). TFDS writes into a temporary `.incomplete` folder and
renames it when done, so a half-built entry is never found; an interrupted build is redone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from pathlib import Path

import ml_collections
from absl import logging

from lsfa_jax.atomic_io import atomic_write_json
from lsfa_jax.data import eyecandies, folder, mvtec3d, synthetic

# Bump when a change in this package changes the prepared arrays.
CODE_VERSION = 1
DATASETS = ("mvtec3d", "synthetic", "eyecandies", "folder")


def plane_params(data_cfg: ml_collections.ConfigDict):
    """The `preprocess.PlaneRemovalParams` of `config.data`, or None when preprocessing is off."""
    if not data_cfg.preprocess:
        return None
    from lsfa_jax.data import preprocess  # open3d: imported only when data is prepared

    return preprocess.PlaneRemovalParams(**data_cfg.plane.to_dict())


def synthetic_config(data_cfg: ml_collections.ConfigDict) -> synthetic.SyntheticConfig:
    return synthetic.SyntheticConfig.from_mapping(data_cfg.synthetic.to_dict())


def resolve_classes(data_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    """`data_cfg.classes` as a tuple; "all" (or empty) means every class of the dataset."""
    if data_cfg.name == "mvtec3d":
        known = mvtec3d.MVTEC3D_CLASSES
    elif data_cfg.name == "synthetic":
        known = synthetic_config(data_cfg).classes
    elif data_cfg.name == "eyecandies":
        known = eyecandies.EYECANDIES_CLASSES
    elif data_cfg.name == "folder":
        known = folder.folder_classes(data_cfg.data_dir)
    else:
        raise ValueError(f"unknown dataset name {data_cfg.name!r}; expected one of {DATASETS}")
    classes = data_cfg.classes
    if isinstance(classes, str):
        classes = known if classes in ("all", "") else tuple(classes.split(","))
    classes = tuple(classes) or known
    unknown = [c for c in classes if c not in known]
    if unknown:
        raise ValueError(f"unknown {data_cfg.name} classes {unknown}; known: {known}")
    return classes


def cache_key(
    data_cfg: ml_collections.ConfigDict,
    class_name: str,
    splits: tuple[str, ...] = mvtec3d.SPLITS,
) -> dict:
    """Everything the prepared arrays of one class depend on (JSON-serialisable)."""
    plane = plane_params(data_cfg)
    key = dict(
        kind=data_cfg.name,
        class_name=class_name,
        data_dir=str(Path(data_cfg.data_dir).resolve()),
        image_size=int(data_cfg.image_size),
        preprocess=plane is not None,
        plane=dataclasses.asdict(plane) if plane is not None else None,
        seed=int(data_cfg.seed),
        synthetic=synthetic_config(data_cfg).to_json() if data_cfg.name == "synthetic" else None,
        skip_bad_samples=bool(data_cfg.get("skip_bad_samples", False)),
        code_version=CODE_VERSION,
    )
    if data_cfg.name == "eyecandies":
        # Only Eyecandies keys carry it, so MVTec 3D-AD cache entries keep their digests.
        key["eyecandies_conversion"] = eyecandies.CONVERSION
    if data_cfg.name == "folder":
        key["validation_fraction"] = float(data_cfg.validation_fraction)
        key["xyz_scale"] = float(data_cfg.xyz_scale)
    if tuple(splits) != mvtec3d.SPLITS:
        key["splits"] = list(splits)
    return key


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cache_entry(cache_dir: str | Path, key: dict) -> Path:
    return Path(cache_dir) / "prepared" / f"{key['kind']}-{key['class_name']}-{key_digest(key)}"


def converted_eyecandies(src: Path, dst: Path, classes: tuple[str, ...]) -> Path:
    """Eyecandies in the MVTec 3D-AD layout under `dst`, converted once per class.

    A class counts as converted only when its marker file exists (written last), so an
    interrupted conversion is redone. `dst` should name the conversion
    (`eyecandies.CONVERSION`) so that a changed conversion never reuses older files.
    """
    for class_name in classes:
        marker = dst / class_name / "CONVERTED.json"
        if marker.is_file():
            continue
        logging.info("eyecandies/%s: converting %s to the MVTec layout in %s", class_name, src, dst)
        counts = eyecandies.convert_eyecandies(src, dst, (class_name,))
        atomic_write_json(
            marker,
            {"source": str(src.resolve()), "conversion": eyecandies.CONVERSION, "counts": counts},
            sort_keys=True,
        )
    return dst


def prepare_dataset(
    data_cfg: ml_collections.ConfigDict,
    cache_dir: str | Path,
    splits: tuple[str, ...] = mvtec3d.SPLITS,
) -> dict[str, str]:
    """Prepares `splits` of every class of `config.data` (or finds them in the cache).

    For `name="synthetic"` the raw dataset is first generated under `data_dir` when missing.

    Returns:
      class name -> prepared dataset folder, for `tfds.builder_from_directory` / `pipeline`.
    """
    # TensorFlow and open3d load here, not at import: the checks before a run stay fast.
    import tensorflow_datasets as tfds

    from lsfa_jax.data import tfds_builders

    if not data_cfg.data_dir:
        raise ValueError("config.data.data_dir is empty: set it to the raw dataset folder")
    raw_root = Path(data_cfg.data_dir)
    classes = resolve_classes(data_cfg)
    workers = tfds_builders.resolve_workers(int(data_cfg.num_workers))
    if data_cfg.name == "synthetic":
        syn = synthetic_config(data_cfg)
        if not synthetic.is_generated(raw_root, syn):
            logging.info("generating the synthetic dataset in %s", raw_root)
            synthetic.generate_dataset(raw_root, syn, num_workers=workers)
    elif not raw_root.is_dir():
        label = {"mvtec3d": "MVTec 3D-AD", "eyecandies": "Eyecandies"}.get(data_cfg.name, "dataset")
        raise mvtec3d.DataError(f"{raw_root}: {label} folder not found (config.data.data_dir)")
    if data_cfg.name == "eyecandies":
        converted = Path(cache_dir) / f"eyecandies_mvtec-{eyecandies.CONVERSION}"
        raw_root = converted_eyecandies(raw_root, converted, classes)

    # One bar per split comes from the builders; TFDS's own nested bars would garble it.
    tfds.disable_progress_bar()
    builder_cls = tfds_builders.BUILDERS[
        "mvtec3d" if data_cfg.name == "eyecandies" else data_cfg.name
    ]
    layout = "folder" if data_cfg.name == "folder" else "mvtec3d"
    prepared = {}
    with contextlib.ExitStack() as stack:
        pool = None
        for class_name in classes:
            key = cache_key(data_cfg, class_name, splits)
            entry = cache_entry(cache_dir, key)
            entry.mkdir(parents=True, exist_ok=True)
            atomic_write_json(entry / "key.json", key, sort_keys=True)
            config = tfds_builders.PreparedConfig(
                # TFDS reserves the plain class names for the default configs.
                name=f"{class_name}_{key_digest(key)}",
                class_name=class_name,
                image_size=key["image_size"],
                plane=plane_params(data_cfg),
                seed=key["seed"],
                skip_bad_samples=key["skip_bad_samples"],
                layout=layout,
                validation_fraction=float(key.get("validation_fraction", 0.2)),
                xyz_scale=float(key.get("xyz_scale", 1.0)),
                splits=tuple(splits),
            )
            builder = builder_cls(config=config, data_dir=entry)
            if (Path(builder.data_dir) / "dataset_info.json").is_file():
                logging.info("%s/%s: prepared data found in %s", data_cfg.name, class_name, entry)
            else:
                logging.info(
                    "%s/%s: preparing from %s into %s (image_size=%d, preprocess=%s, %d workers)",
                    data_cfg.name,
                    class_name,
                    raw_root,
                    entry,
                    key["image_size"],
                    key["preprocess"],
                    workers,
                )
                if pool is None and workers > 1:
                    pool = stack.enter_context(tfds_builders.make_pool(workers))
                builder = builder_cls(config=config, data_dir=entry, pool=pool)
                builder.download_and_prepare(
                    download_config=tfds.download.DownloadConfig(manual_dir=str(raw_root))
                )
            prepared[class_name] = str(builder.data_dir)
    return prepared
