"""MVTec 3D-AD layout: classes, splits, file listing and the raw readers (docs/method.md#data-layout-and-readers).

Layout of one class folder:
  train/good/{rgb,xyz}/NNN.{png,tiff}, validation/good/{rgb,xyz}/...,
  test/<defect or good>/{rgb,xyz,gt}/NNN.{png,tiff,png}, calibration/camera_parameters.json.

Readers return host numpy arrays: rgb uint8 (H, W, 3), xyz float32 (H, W, 3) in metres with
(0, 0, 0) = missing, gt bool (H, W). Bad files raise `DataError` naming the file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import tifffile
from absl import logging
from PIL import Image

from lsfa_jax.errors import UserError

MVTEC3D_CLASSES = (
    "bagel",
    "cable_gland",
    "carrot",
    "cookie",
    "dowel",
    "foam",
    "peach",
    "potato",
    "rope",
    "tire",
)
SPLITS = ("train", "validation", "test")
GOOD = "good"
# PIL modes that convert('RGB') / convert('L') map without rescaling (8-bit data).
_RGB_MODES = frozenset({"RGB", "RGBA", "L", "P"})
_GT_MODES = frozenset({"L", "1", "P"})


class DataError(UserError, ValueError):
    """A dataset file or folder is missing or malformed; the message names it."""


@dataclasses.dataclass(frozen=True)
class SampleFiles:
    """The files of one sample. `gt_path` is None for good samples (zero mask)."""

    class_name: str
    split: str
    defect_type: str
    file_id: str  # "<split>/<defect_type>/<stem>", e.g. "test/cut/003"
    rgb_path: Path
    xyz_path: Path
    gt_path: Path | None


def _detail(error: Exception, path: Path) -> str:
    """The library's error text without the path (the message names the file once, first)."""
    return str(error).replace(str(path), Path(path).name)


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DataError(f"{path}: {what} folder not found")


def _list_stems(folder: Path, suffix: str) -> dict[str, Path]:
    _require_dir(folder, "sample")
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix == suffix and p.is_file()}


def list_samples(root: str | Path, class_name: str, split: str) -> list[SampleFiles]:
    """Lists the samples of one class and split, sorted by (defect type, file stem).

    Defect types of the test split are its folder names, sorted; train and validation hold only
    `good`. rgb and xyz files must pair up one to one by stem, and test defects need a gt file.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    root = Path(root)
    _require_dir(root, "dataset root")
    split_dir = root / class_name / split
    _require_dir(root / class_name, f"class {class_name!r}")
    _require_dir(split_dir, f"split {split!r}")
    if split == "test":
        defect_types = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    else:
        defect_types = [GOOD]
    samples = []
    for defect_type in defect_types:
        type_dir = split_dir / defect_type
        rgb = _list_stems(type_dir / "rgb", ".png")
        xyz = _list_stems(type_dir / "xyz", ".tiff")
        if rgb.keys() != xyz.keys():
            only_rgb = sorted(rgb.keys() - xyz.keys())
            only_xyz = sorted(xyz.keys() - rgb.keys())
            raise DataError(
                f"{type_dir}: rgb and xyz files do not line up "
                f"(only in rgb: {only_rgb[:5]}, only in xyz: {only_xyz[:5]})"
            )
        for stem in sorted(rgb):
            gt_path = None
            if defect_type != GOOD:
                gt_path = type_dir / "gt" / f"{stem}.png"
                if not gt_path.is_file():
                    raise DataError(f"{gt_path}: ground-truth mask missing")
            samples.append(
                SampleFiles(
                    class_name=class_name,
                    split=split,
                    defect_type=defect_type,
                    file_id=f"{split}/{defect_type}/{stem}",
                    rgb_path=rgb[stem],
                    xyz_path=xyz[stem],
                    gt_path=gt_path,
                )
            )
    if split == "train" and not samples:
        raise DataError(f"{split_dir}: the train split holds no samples")
    return samples


def _open_image(path: Path, modes: frozenset[str], target_mode: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in modes:
                raise DataError(
                    f"{path}: unsupported image mode {image.mode!r}; "
                    f"expected one of {sorted(modes)}"
                )
            return np.asarray(image.convert(target_mode))
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: unreadable or truncated image ({_detail(e, path)})") from e


def read_rgb(path: str | Path) -> np.ndarray:
    """8-bit image -> uint8 (H, W, 3), converted to RGB as the reference loader does."""
    return _open_image(Path(path), _RGB_MODES, "RGB")


def read_xyz_counted(path: str | Path) -> tuple[np.ndarray, int]:
    """Organized cloud tiff -> (float32 (H, W, 3), number of points with a NaN/inf coordinate).

    float64 tiffs (e.g. Eyecandies) are cast to float32. Points with any non-finite coordinate
    are treated as missing: all three coordinates are set to 0.
    """
    path = Path(path)
    try:
        xyz = tifffile.imread(path)
    except Exception as e:  # tifffile raises many types for damaged files
        raise DataError(f"{path}: unreadable or truncated tiff ({_detail(e, path)})") from e
    if xyz.ndim != 3 or xyz.shape[-1] != 3:
        raise DataError(f"{path}: expected an organized cloud (H, W, 3), got shape {xyz.shape}")
    if xyz.dtype not in (np.float32, np.float64):
        raise DataError(f"{path}: expected float32 or float64 coordinates, got {xyz.dtype}")
    xyz = xyz.astype(np.float32)
    bad = ~np.all(np.isfinite(xyz), axis=-1)
    num_bad = int(bad.sum())
    if num_bad:
        xyz[bad] = 0.0
    return xyz, num_bad


def read_xyz(path: str | Path) -> np.ndarray:
    """Like `read_xyz_counted`, logging a warning when non-finite points were zeroed."""
    xyz, num_bad = read_xyz_counted(path)
    if num_bad:
        logging.warning("%s: %d points with NaN/inf set to missing (0, 0, 0)", path, num_bad)
    return xyz


def read_gt(path: str | Path | None, shape: tuple[int, int]) -> np.ndarray:
    """Ground-truth png -> bool (H, W), binarised with > 0 (defect codes are 252-255).

    `path=None` (good samples) gives an all-false mask of `shape`.
    """
    if path is None:
        return np.zeros(shape, bool)
    gt = _open_image(Path(path), _GT_MODES, "L")
    if gt.shape != tuple(shape):
        raise DataError(f"{path}: mask shape {gt.shape} does not match the image shape {shape}")
    return gt > 0


def read_calibration(class_dir: str | Path) -> dict | None:
    """Parsed `calibration/camera_parameters.json` of a class folder, or None when absent."""
    path = Path(class_dir) / "calibration" / "camera_parameters.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable calibration file ({e})") from e


@dataclasses.dataclass(frozen=True)
class RawSample:
    """One sample as read from disk, at the original resolution."""

    rgb: np.ndarray  # uint8 (H, W, 3)
    xyz: np.ndarray  # float32 (H, W, 3)
    mask: np.ndarray  # bool (H, W)
    num_nonfinite: int  # xyz points with NaN/inf, zeroed


def read_sample(files: SampleFiles) -> RawSample:
    """Reads rgb, xyz and gt of one sample and checks that their sizes agree."""
    rgb = read_rgb(files.rgb_path)
    xyz, num_bad = read_xyz_counted(files.xyz_path)
    if rgb.shape[:2] != xyz.shape[:2]:
        raise DataError(
            f"{files.xyz_path}: cloud size {xyz.shape[:2]} does not match "
            f"{files.rgb_path} size {rgb.shape[:2]}"
        )
    mask = read_gt(files.gt_path, rgb.shape[:2])
    return RawSample(rgb=rgb, xyz=xyz, mask=mask, num_nonfinite=num_bad)
