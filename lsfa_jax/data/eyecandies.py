"""Eyecandies reader and conversion to the MVTec 3D-AD layout (docs/method.md#eyecandies-conversion).

The conversion follows M3DM's `utils/preprocess_eyecandies.py`, the preprocessing behind the
paper's Table 3, so that the clouds equal the reference's up to float rounding.

Source layout, per class: `<src>/<Class>/{train,val,test_public}/data/NNN_*` with
  NNN_image_4.png      RGB (copied unchanged),
  NNN_depth.png        16-bit depth,
  NNN_info_depth.yaml  `normalization: {min, max}` of the depth,
  NNN_pose.txt         4x4 pose matrix (`np.loadtxt`),
  NNN_mask.png         defect mask (read in test_public only).

Steps, per sample (as the reference):
  1. depth = png / 65535 * (max - min) + min, computed in float32.
  2. Back-projection with intrinsics K (f = 711.11, principal point (W/2, H/2)) padded to 4x4:
     p = inv(K4 @ pose) @ (u, v, 1, 1/depth) * depth in float64 (1/depth in float32), first
     three components. With pose the world-to-camera transform this is the world point.
  3. Background: the reference pixels are the middle of the top and bottom rows (row-major
     indices W/2 and -W/2; 256 and -256 at 512x512). With b the bottom one, t the top one and
     (dz, dy) = (t_y - b_y, t_z - b_z), the cloud is translated by -(0, b_y, b_z) and rotated
     about x by R = [[1, 0, 0], [0, c, -s], [0, s, c]], c = dy / |(dz, dy)|, s = dz / |(dz, dy)|,
     which puts both reference points on y' = 0 (the table line). A point is background when
     y' > -0.02 (on or behind the table), z' > 1.8 (beyond 1.8 along the table from b) or
     |x'| > 1.
  4. Rotate back (R^T, then + (0, b_y, b_z)), reorder the axes to (x, z, y) and multiply by
     (0.1, -0.1, 0.1).

Where this differs from the reference:
  - Background points. The reference writes one constant point for them: R^T (-(0, b_y, b_z)) +
    (0, b_y, b_z) after reordering and scaling, whose x is exactly 0, so that its loader's
    all-coordinates-nonzero test treats them as missing. Here they are (0, 0, 0), this project's
    missing-point marker. The same all-nonzero test decides validity downstream
    (`features.patch_grid.valid_point_mask`, `data.preprocess.valid_points`), so both encodings
    give the same valid points, features and scores. Support-plane removal is off for Eyecandies
    (configs/eyecandies.py): step 3 already removed the table.
  - Data type. The reference writes float64 tiffs and its loader casts them to float32; they are
    written here as float32, the same values once loaded.
  - Paths. The reference's `os.path.join(root, '/train/data')` drops `root` (leading '/'); here
    every path is built from the given roots. The reference counts samples as files / 17 and
    assumes ids 0..n-1; here the ids are the NNN of the NNN_image_4.png files present.
  - Splits. The reference converts train and test_public only; `val` is also converted here, to
    validation/good. Output ids are zero-padded to three digits, as the reference names them.
The source is never modified.
"""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path

import numpy as np
import tifffile
import yaml
from PIL import Image

from lsfa_jax.atomic_io import atomic_write_bytes
from lsfa_jax.data.mvtec3d import DataError
from lsfa_jax.errors import InputNotFoundError

EYECANDIES_CLASSES = (
    "CandyCane",
    "ChocolateCookie",
    "ChocolatePraline",
    "Confetto",
    "GummyBear",
    "HazelnutTruffle",
    "LicoriceSandwich",
    "Lollipop",
    "Marshmallow",
    "PeppermintCandy",
)
# Names the conversion in cache paths and keys; bump when the converted files change.
CONVERSION = "m3dm1"
FOCAL_LENGTH = 711.11
DEPTH_PNG_MAX = 65535.0
RGB_SUFFIX = "_image_4.png"
# Output axis order (x, z, y) and per-axis scale of the reference.
OUTPUT_AXES = (0, 2, 1)
OUTPUT_SCALE = (0.1, -0.1, 0.1)
# Output split -> source split folder.
SPLITS = {"train": "train", "validation": "val", "test": "test_public"}
# PIL modes of a single-channel 16-bit PNG.
_DEPTH_MODES = ("I;16", "I;16B", "I")


@dataclasses.dataclass(frozen=True)
class BackgroundRule:
    """The reference thresholds, in the rotated frame of step 3 (before output scaling)."""

    min_height: float = -0.02  # background when y' > min_height
    max_along: float = 1.8  # background when z' > max_along
    max_abs_x: float = 1.0  # background when |x'| > max_abs_x


def _open_png(path: str | os.PathLike) -> Image.Image:
    """The decoded image; ValueError naming the file when it cannot be decoded."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(f"eyecandies: {path}: cannot decode the image ({error})") from error


def read_depth_range(yaml_path: str | os.PathLike) -> tuple[float, float]:
    """(min, max) of the depth normalisation from NNN_info_depth.yaml (`normalization`)."""
    try:
        with open(yaml_path) as f:
            info = yaml.safe_load(f)
    except yaml.YAMLError as error:
        raise DataError(f"eyecandies: {yaml_path}: not valid YAML ({error})") from error
    norm = info.get("normalization") if isinstance(info, dict) else None
    lo, hi = (norm.get("min"), norm.get("max")) if isinstance(norm, dict) else (None, None)
    if not isinstance(lo, int | float) or not isinstance(hi, int | float) or not hi > lo > 0:
        raise DataError(
            f"eyecandies: {yaml_path}: expected numeric 0 < normalization.min < normalization.max"
        )
    return float(lo), float(hi)


def read_depth(png_path: str | os.PathLike, yaml_path: str | os.PathLike) -> np.ndarray:
    """(H, W) float32 depth: png / 65535 * (max - min) + min, in float32 as the reference."""
    image = _open_png(png_path)
    if image.mode not in _DEPTH_MODES:
        raise DataError(
            f"eyecandies: {png_path}: expected a single-channel 16-bit depth PNG, "
            f"got PIL mode {image.mode!r}"
        )
    raw = np.asarray(image)
    if raw.min() < 0 or raw.max() > DEPTH_PNG_MAX:
        raise DataError(f"eyecandies: {png_path}: values outside the 16-bit range")
    lo, hi = read_depth_range(yaml_path)
    return raw.astype(np.float32) / np.float32(DEPTH_PNG_MAX) * np.float32(hi - lo) + np.float32(lo)


def read_pose(pose_path: str | os.PathLike) -> np.ndarray:
    """(4, 4) float64 pose from NNN_pose.txt."""
    try:
        pose = np.loadtxt(pose_path, dtype=np.float64)
    except ValueError as error:
        raise DataError(f"eyecandies: {pose_path}: not a numeric matrix ({error})") from error
    if pose.shape != (4, 4) or not np.all(np.isfinite(pose)):
        raise DataError(f"eyecandies: {pose_path}: expected a finite 4x4 matrix, got {pose.shape}")
    if abs(np.linalg.det(pose)) < 1e-12:
        raise DataError(f"eyecandies: {pose_path}: the pose matrix is singular")
    return pose


def intrinsics_4x4(height: int, width: int, focal_length: float = FOCAL_LENGTH) -> np.ndarray:
    """K padded to 4x4, principal point (W/2, H/2)."""
    return np.array(
        [
            [focal_length, 0.0, width / 2, 0.0],
            [0.0, focal_length, height / 2, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )


def back_project(
    depth: np.ndarray, pose: np.ndarray, *, focal_length: float = FOCAL_LENGTH
) -> np.ndarray:
    """(H, W) float32 depth -> (H, W, 3) float64 points: inv(K4 @ pose) @ (u, v, 1, 1/d) * d.

    pose: (4, 4) world-to-camera transform; the points are in its world frame.
    """
    depth = np.asarray(depth, np.float32)
    if depth.ndim != 2 or not np.all(depth > 0):
        raise DataError(f"eyecandies: depth must be (H, W) and positive, got {depth.shape}")
    h, w = depth.shape
    proj = intrinsics_4x4(h, w, focal_length) @ np.asarray(pose, np.float64)
    v, u = np.meshgrid(
        np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij"
    )
    # The reference takes 1/depth in float32 before the float64 product.
    inv_depth = (np.float32(1.0) / depth).astype(np.float64)
    vec = np.stack([u, v, np.ones_like(u), inv_depth], axis=-1).reshape(-1, 4)
    points = (np.linalg.inv(proj) @ vec.T).T * depth.reshape(-1, 1).astype(np.float64)
    return points[:, :3].reshape(h, w, 3)


def remove_background(
    points: np.ndarray, rule: BackgroundRule = BackgroundRule()
) -> tuple[np.ndarray, np.ndarray]:
    """Steps 3 and 4 of the module docstring on an (H, W, 3) world cloud.

    Returns:
      xyz (H, W, 3) float32: axes (x, z, y) scaled by OUTPUT_SCALE, background (0, 0, 0);
      background (H, W) bool.
    """
    points = np.asarray(points, np.float64)
    h, w, _ = points.shape
    flat = points.reshape(-1, 3)
    top, bottom = flat[w // 2], flat[-(w // 2)]
    dz, dy = top[1] - bottom[1], top[2] - bottom[2]
    norm = np.hypot(dz, dy)
    if not norm > 0:
        raise DataError("eyecandies: the two reference pixels coincide in (y, z)")
    c, s = dy / norm, dz / norm
    rotation = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    start = np.array([0.0, bottom[1], bottom[2]])
    rotated = (flat - start) @ rotation.T
    background = (
        (rotated[:, 1] > rule.min_height)
        | (rotated[:, 2] > rule.max_along)
        | (np.abs(rotated[:, 0]) > rule.max_abs_x)
    )
    restored = rotated @ rotation + start
    xyz = restored[:, OUTPUT_AXES] * np.asarray(OUTPUT_SCALE)
    xyz[background] = 0.0
    return xyz.reshape(h, w, 3).astype(np.float32), background.reshape(h, w)


def list_sample_ids(data_dir: str | os.PathLike) -> list[str]:
    """Sorted sample ids NNN of an Eyecandies `.../data` folder (from NNN_image_4.png)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputNotFoundError(f"eyecandies: {data_dir} is not a folder")
    return sorted(p.name[: -len(RGB_SUFFIX)] for p in data_dir.glob(f"*{RGB_SUFFIX}"))


def _required(data_dir: Path, sample_id: str, suffix: str) -> Path:
    path = data_dir / f"{sample_id}{suffix}"
    if not path.is_file():
        raise InputNotFoundError(f"eyecandies: {path} is missing for sample {sample_id}")
    return path


def read_sample(
    data_dir: str | os.PathLike,
    sample_id: str,
    *,
    with_mask: bool,
    rule: BackgroundRule = BackgroundRule(),
) -> dict[str, np.ndarray | bytes]:
    """One sample: {"rgb_png": bytes, "xyz": (H, W, 3) float32, "mask": (H, W) uint8 {0, 1}}.

    "mask" only when with_mask. xyz is the reference's output cloud (module docstring).
    """
    data_dir = Path(data_dir)
    rgb_path = _required(data_dir, sample_id, RGB_SUFFIX)
    depth = read_depth(
        _required(data_dir, sample_id, "_depth.png"),
        _required(data_dir, sample_id, "_info_depth.yaml"),
    )
    pose = read_pose(_required(data_dir, sample_id, "_pose.txt"))
    xyz, _ = remove_background(back_project(depth, pose), rule)
    size = _open_png(rgb_path).size
    if size != (depth.shape[1], depth.shape[0]):
        raise DataError(f"eyecandies: {rgb_path} is {size} but the depth map is {depth.shape}")
    out: dict[str, np.ndarray | bytes] = {"rgb_png": rgb_path.read_bytes(), "xyz": xyz}
    if with_mask:
        mask_path = _required(data_dir, sample_id, "_mask.png")
        mask = np.asarray(_open_png(mask_path))
        if mask.ndim == 3:
            mask = mask.max(axis=-1)
        if mask.shape != depth.shape:
            raise DataError(f"eyecandies: {mask_path} is {mask.shape}, depth is {depth.shape}")
        out["mask"] = (mask > 0).astype(np.uint8)
    return out


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _tiff_bytes(xyz: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # Same TIFF flavour as MVTec 3D-AD's xyz files: RGB photometric, contiguous samples.
    tifffile.imwrite(buf, xyz.astype(np.float32), photometric="rgb", planarconfig="contig")
    return buf.getvalue()


def _write_sample(dst: Path, out_id: str, sample: dict, write_gt: bool) -> None:
    atomic_write_bytes(dst / "rgb" / f"{out_id}.png", sample["rgb_png"])
    atomic_write_bytes(dst / "xyz" / f"{out_id}.tiff", _tiff_bytes(sample["xyz"]))
    if write_gt:
        atomic_write_bytes(dst / "gt" / f"{out_id}.png", _png_bytes(sample["mask"] * np.uint8(255)))


def _output_ids(data_dir: Path, ids: list[str]) -> list[str]:
    """Source ids zero-padded to three digits (the reference's names); must stay distinct."""
    out = [i.zfill(3) for i in ids]
    if len(set(out)) != len(out):
        raise DataError(f"eyecandies: {data_dir}: sample ids collide once padded: {ids}")
    return out


def convert_eyecandies(
    src_root: str | os.PathLike,
    dst_root: str | os.PathLike,
    classes: tuple[str, ...] | list[str] = EYECANDIES_CLASSES,
    *,
    rule: BackgroundRule = BackgroundRule(),
) -> dict[str, dict[str, int]]:
    """Writes `<dst>/<Class>/` in the MVTec 3D-AD layout; returns counts per class and split.

      train/good      <- <src>/<Class>/train/data
      validation/good <- <src>/<Class>/val/data
      test/good, test/bad <- <src>/<Class>/test_public/data, split by mask non-emptiness
    Each sample: rgb/NNN.png (source bytes), xyz/NNN.tiff (float32), and in test gt/NNN.png
    (0 / 255). Every file is written atomically; the source is only read.
    """
    src_root, dst_root = Path(src_root).resolve(), Path(dst_root).resolve()
    if dst_root == src_root or src_root in dst_root.parents:
        raise DataError(f"eyecandies: destination {dst_root} lies inside the source {src_root}")
    unknown = [c for c in classes if c not in EYECANDIES_CLASSES]
    if unknown:
        raise DataError(f"eyecandies: unknown classes {unknown}; expected {EYECANDIES_CLASSES}")
    counts: dict[str, dict[str, int]] = {}
    for cls in classes:
        counts[cls] = {}
        for split, src_split in SPLITS.items():
            data_dir = src_root / cls / src_split / "data"
            ids = list_sample_ids(data_dir)
            if not ids:
                raise InputNotFoundError(f"eyecandies: no *{RGB_SUFFIX} in {data_dir}")
            is_test = split == "test"
            for sample_id, out_id in zip(ids, _output_ids(data_dir, ids), strict=True):
                sample = read_sample(data_dir, sample_id, with_mask=is_test, rule=rule)
                kind = "bad" if is_test and sample["mask"].any() else "good"
                _write_sample(dst_root / cls / split / kind, out_id, sample, write_gt=is_test)
                key = f"{split}/{kind}"
                counts[cls][key] = counts[cls].get(key, 0) + 1
    return counts
