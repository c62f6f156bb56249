"""Own parts: the MVTec 3D-AD layout with any class and defect names (dataset name `folder`).

  <root>/<class>/train/good/{rgb,xyz}/<stem>.{png|jpg, tif|tiff}
  <root>/<class>/validation/good/{rgb,xyz}/...          optional
  <root>/<class>/test/<good | any defect name>/{rgb,xyz[,gt]}/...

rgb and xyz files pair by stem (extensions in any case); a stem that appears twice in one
folder (`001.png` and `001.jpg`) is an error. Ground-truth masks (`gt/<stem>.png`) are optional
for the whole dataset: without them a class gets image metrics only. Without a validation folder
a seeded fraction of train/good is held out as the validation split, which fits the fusion and
the thresholds. Every problem raises `DataError` naming the path.
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path

import numpy as np
from absl import logging

from lsfa_jax.data.mvtec3d import GOOD, SPLITS, DataError, SampleFiles

RGB_SUFFIXES = (".png", ".jpg", ".jpeg")
XYZ_SUFFIXES = (".tif", ".tiff")
MASK_SUFFIXES = (".png",)


def folder_classes(root: str | Path) -> tuple[str, ...]:
    """Every subfolder of `root` that holds train/good, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found (config.data_dir)")
    classes = tuple(sorted(p.name for p in root.iterdir() if (p / "train" / GOOD).is_dir()))
    if not classes:
        raise DataError(
            f"{root}: no class folder with train/good inside; see data/README.md for the layout"
        )
    return classes


def _files_by_stem(folder: Path, suffixes: tuple[str, ...], what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: {what} folder not found")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in suffixes:
            continue
        if path.stem in found:
            raise DataError(
                f"{folder}: two files with the stem {path.stem!r} ({found[path.stem].name}, "
                f"{path.name}); keep one"
            )
        found[path.stem] = path
    return found


def _list_type(class_dir: Path, split: str, defect_type: str) -> list[SampleFiles]:
    type_dir = class_dir / split / defect_type
    rgb = _files_by_stem(type_dir / "rgb", RGB_SUFFIXES, "rgb")
    xyz = _files_by_stem(type_dir / "xyz", XYZ_SUFFIXES, "xyz")
    if rgb.keys() != xyz.keys():
        only_rgb = sorted(rgb.keys() - xyz.keys())
        only_xyz = sorted(xyz.keys() - rgb.keys())
        raise DataError(
            f"{type_dir}: rgb and xyz files do not pair up by name "
            f"(rgb without xyz: {only_rgb[:5]}, xyz without rgb: {only_xyz[:5]})"
        )
    masks = {}
    if defect_type != GOOD and (type_dir / "gt").is_dir():
        masks = _files_by_stem(type_dir / "gt", MASK_SUFFIXES, "gt")
    return [
        SampleFiles(
            class_name=class_dir.name,
            split=split,
            defect_type=defect_type,
            file_id=f"{split}/{defect_type}/{stem}",
            rgb_path=rgb[stem],
            xyz_path=xyz[stem],
            gt_path=masks.get(stem),
        )
        for stem in sorted(rgb)
    ]


def held_out(class_name: str, n_train: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the train/good samples held out as validation: round(fraction * n),
    at least 2 and leaving at least 1 for training, chosen by (seed, class name)."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"config.data.validation_fraction={fraction}: must be in (0, 1)")
    count = min(max(2, round(fraction * n_train)), n_train - 1)
    if count < 2:
        raise DataError(
            f"{class_name}: train/good has {n_train} samples; holding out a validation split "
            "needs at least 3 (or add a validation/good folder)"
        )
    rng = np.random.default_rng([seed, zlib.crc32(class_name.encode("utf-8"))])
    return np.sort(rng.permutation(n_train)[:count])


def list_folder_samples(
    root: str | Path, class_name: str, split: str, *, validation_fraction: float, seed: int
) -> list[SampleFiles]:
    """Samples of one class and split, sorted by (defect type, stem); see the module docstring."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    class_dir = Path(root) / class_name
    if not (class_dir / "train" / GOOD).is_dir():
        raise DataError(f"{class_dir / 'train' / GOOD}: folder not found (every class needs it)")
    if split == "test":
        test_dir = class_dir / "test"
        if not test_dir.is_dir():
            raise DataError(f"{test_dir}: folder not found")
        types = sorted(p.name for p in test_dir.iterdir() if p.is_dir())
        samples = [s for t in types for s in _list_type(class_dir, "test", t)]
        _check_masks(test_dir, samples)
        return samples
    if split == "validation" and (class_dir / "validation" / GOOD).is_dir():
        return _list_type(class_dir, "validation", GOOD)
    train = _list_type(class_dir, "train", GOOD)
    if not train:
        raise DataError(f"{class_dir / 'train' / GOOD}: no samples")
    if (class_dir / "validation" / GOOD).is_dir():
        return train
    chosen = set(held_out(class_name, len(train), validation_fraction, seed).tolist())
    if split == "validation":
        logging.warning(
            "%s: no validation/good folder: %d of %d train/good samples are held out as the "
            "validation split (data.validation_fraction=%g, seed %d) for fusion and thresholds",
            class_dir,
            len(chosen),
            len(train),
            validation_fraction,
            seed,
        )
        # A held-out sample's file id keeps its real folder (train/good/<stem>).
        return [dataclasses.replace(s, split="validation") for i, s in enumerate(train) if i in chosen]
    return [s for i, s in enumerate(train) if i not in chosen]


def _check_masks(test_dir: Path, samples: list[SampleFiles]) -> None:
    """Masks for all defective test samples or for none: half a set would skew pixel metrics."""
    defects = [s for s in samples if s.defect_type != GOOD]
    missing = [s for s in defects if s.gt_path is None]
    if missing and len(missing) != len(defects):
        names = [str(s.rgb_path.parent.parent / "gt" / f"{s.rgb_path.stem}.png") for s in missing]
        raise DataError(
            f"{test_dir}: {len(defects) - len(missing)} defective samples have masks but "
            f"{len(missing)} do not, e.g. {names[:3]}; add the missing masks or remove every gt/"
        )


def has_masks(samples: list[SampleFiles]) -> bool:
    """True when the defective samples have masks (and there is at least one)."""
    defects = [s for s in samples if s.defect_type != GOOD]
    return bool(defects) and all(s.gt_path is not None for s in defects)
