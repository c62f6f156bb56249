"""Eyecandies reader and conversion to the MVTec 3D-AD layout (reference notes 1.5).

Source layout, per class: `<src>/<Class>/{train,val,test_public}/data/NNN_*` with
  NNN_image_4.png      RGB (copied unchanged),
  NNN_depth.png        16-bit depth, depth = png / 65535 * (max - min) + min,
  NNN_info_depth.yaml  min and max (`normalization: {min, max}`, or `depth_min` / `depth_max`),
  NNN_mask.png         defect mask (test_public only is needed).

Geometry: intrinsics K with f = 711.11 and principal point (W/2, H/2); a pixel (u, v) with depth
d back-projects to inv(K4 @ pose) @ (u, v, 1, 1/d) * d, i.e. for pose = identity (camera frame)
x = (u - W/2) d / f, y = (v - H/2) d / f, z = d.

Background removal (documented equivalent of the reference, in the camera frame since the
converter does not use the pose): the table is the plane that contains the camera x direction
and the two reference pixels at the middle of the top and bottom rows (row-major indices W/2 and
-W/2, i.e. 256 and -256 at 512x512). After rotating about x so that both reference points have
the same y, a point is background when it lies less than `table_margin` (0.02) above the table
(towards the camera), has depth z > `max_depth` (1.8) or |x| > `max_abs_x` (1.0); background
points become (0, 0, 0), the missing-point marker. The kept points are written in the camera
frame scaled by `output_scale` (0.1, the scale of the reference output); the reference's
rotation back and axis swap to a world frame are not reproduced.

The reference script's path bug (`os.path.join(root, '/train/data')` drops root) does not exist
here: every path is built from the given roots. The source is never modified.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import tifffile
import yaml
from PIL import Image

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
FOCAL_LENGTH = 711.11
DEPTH_PNG_MAX = 65535.0
RGB_SUFFIX = "_image_4.png"
# Output split -> source split folder.
SPLITS = {"train": "train", "validation": "val", "test": "test_public"}


@dataclasses.dataclass(frozen=True)
class BackgroundRule:
    table_margin: float = 0.02
    max_depth: float = 1.8
    max_abs_x: float = 1.0


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_depth_range(yaml_path: str | os.PathLike) -> tuple[float, float]:
    """(min, max) of the depth normalisation from NNN_info_depth.yaml."""
    with open(yaml_path) as f:
        info = yaml.safe_load(f)
    if isinstance(info, dict) and isinstance(info.get("normalization"), dict):
        lo, hi = info["normalization"].get("min"), info["normalization"].get("max")
    elif isinstance(info, dict):
        lo, hi = info.get("depth_min"), info.get("depth_max")
    else:
        lo = hi = None
    if not isinstance(lo, int | float) or not isinstance(hi, int | float) or not hi > lo:
        raise ValueError(
            f"{yaml_path}: expected numeric normalization.min < normalization.max "
            "(or depth_min < depth_max)"
        )
    return float(lo), float(hi)


def read_depth(png_path: str | os.PathLike, yaml_path: str | os.PathLike) -> np.ndarray:
    """(H, W) float32 depth: png / 65535 * (max - min) + min."""
    raw = np.asarray(Image.open(png_path))
    if raw.ndim != 2 or raw.dtype not in (np.uint16, np.int32, np.uint8):
        raise ValueError(f"{png_path}: expected a single-channel 16-bit depth PNG, got {raw.dtype}")
    lo, hi = read_depth_range(yaml_path)
    return (raw.astype(np.float64) / DEPTH_PNG_MAX * (hi - lo) + lo).astype(np.float32)


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
    depth: np.ndarray, *, focal_length: float = FOCAL_LENGTH, pose: np.ndarray | None = None
) -> np.ndarray:
    """(H, W) depth -> (H, W, 3) float32 organized cloud: inv(K4 @ pose) @ (u, v, 1, 1/d) * d.

    pose: (4, 4) world-to-camera transform; None is the identity (camera frame).
    """
    depth = np.asarray(depth, np.float64)
    if depth.ndim != 2 or not np.all(depth > 0):
        raise ValueError(f"eyecandies: depth must be (H, W) and positive, got {depth.shape}")
    h, w = depth.shape
    proj = intrinsics_4x4(h, w, focal_length) @ (np.eye(4) if pose is None else np.asarray(pose))
    v, u = np.meshgrid(
        np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij"
    )
    vec = np.stack([u, v, np.ones_like(u), 1.0 / depth], axis=-1)  # (H, W, 4)
    points = np.einsum("ij,hwj->hwi", np.linalg.inv(proj), vec) * depth[..., None]
    return points[..., :3].astype(np.float32)


def remove_background(xyz: np.ndarray, rule: BackgroundRule = BackgroundRule()) -> np.ndarray:
    """(H, W, 3) camera-frame cloud -> copy with background points set to (0, 0, 0).

    See the module docstring for the rule. The reference pixels (top and bottom rows, middle
    column) must lie on the table.
    """
    xyz = np.asarray(xyz, np.float64)
    h, w, _ = xyz.shape
    top, bottom = xyz[0, w // 2], xyz[h - 1, w // 2]
    # Rotation about x by theta: y' = y cos - z sin; equal y' for both references.
    theta = np.arctan2(top[1] - bottom[1], top[2] - bottom[2])
    y_rot = xyz[..., 1] * np.cos(theta) - xyz[..., 2] * np.sin(theta)
    table_y = top[1] * np.cos(theta) - top[2] * np.sin(theta)
    if table_y == 0:
        raise ValueError("eyecandies: the table plane passes through the camera")
    # Height above the table, positive towards the camera (which sits at y' = 0).
    height = (y_rot - table_y) * np.sign(-table_y)
    background = (
        (height < rule.table_margin)
        | (xyz[..., 2] > rule.max_depth)
        | (np.abs(xyz[..., 0]) > rule.max_abs_x)
    )
    return np.where(background[..., None], 0.0, xyz).astype(np.float32)


def list_sample_ids(data_dir: str | os.PathLike) -> list[str]:
    """Sorted sample ids NNN of an Eyecandies `.../data` folder (from NNN_image_4.png)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"eyecandies: {data_dir} is not a folder")
    return sorted(p.name[: -len(RGB_SUFFIX)] for p in data_dir.glob(f"*{RGB_SUFFIX}"))


def _required(data_dir: Path, sample_id: str, suffix: str) -> Path:
    path = data_dir / f"{sample_id}{suffix}"
    if not path.is_file():
        raise FileNotFoundError(f"eyecandies: {path} is missing for sample {sample_id}")
    return path


def read_sample(
    data_dir: str | os.PathLike,
    sample_id: str,
    *,
    with_mask: bool,
    rule: BackgroundRule = BackgroundRule(),
    output_scale: float = 0.1,
) -> dict[str, np.ndarray | bytes]:
    """One sample: {"rgb_png": bytes, "xyz": (H, W, 3) float32, "mask": (H, W) uint8 {0, 1}}.

    "mask" only when with_mask. xyz has the background removed and is scaled by output_scale.
    """
    data_dir = Path(data_dir)
    rgb_path = _required(data_dir, sample_id, RGB_SUFFIX)
    depth = read_depth(
        _required(data_dir, sample_id, "_depth.png"),
        _required(data_dir, sample_id, "_info_depth.yaml"),
    )
    xyz = remove_background(back_project(depth), rule) * np.float32(output_scale)
    rgb_bytes = rgb_path.read_bytes()
    size = Image.open(io.BytesIO(rgb_bytes)).size
    if size != (depth.shape[1], depth.shape[0]):
        raise ValueError(f"eyecandies: {rgb_path} is {size} but the depth map is {depth.shape}")
    out: dict[str, np.ndarray | bytes] = {"rgb_png": rgb_bytes, "xyz": xyz}
    if with_mask:
        mask_path = _required(data_dir, sample_id, "_mask.png")
        mask = np.asarray(Image.open(mask_path))
        if mask.ndim == 3:
            mask = mask.max(axis=-1)
        if mask.shape != depth.shape:
            raise ValueError(f"eyecandies: {mask_path} is {mask.shape}, depth is {depth.shape}")
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


def _write_sample(dst: Path, sample_id: str, sample: dict, write_gt: bool) -> None:
    _atomic_write(dst / "rgb" / f"{sample_id}.png", sample["rgb_png"])
    _atomic_write(dst / "xyz" / f"{sample_id}.tiff", _tiff_bytes(sample["xyz"]))
    if write_gt:
        _atomic_write(dst / "gt" / f"{sample_id}.png", _png_bytes(sample["mask"] * np.uint8(255)))


def convert_eyecandies(
    src_root: str | os.PathLike,
    dst_root: str | os.PathLike,
    classes: tuple[str, ...] | list[str] = EYECANDIES_CLASSES,
    *,
    rule: BackgroundRule = BackgroundRule(),
    output_scale: float = 0.1,
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
        raise ValueError(f"eyecandies: destination {dst_root} lies inside the source {src_root}")
    unknown = [c for c in classes if c not in EYECANDIES_CLASSES]
    if unknown:
        raise ValueError(f"eyecandies: unknown classes {unknown}; expected {EYECANDIES_CLASSES}")
    counts: dict[str, dict[str, int]] = {}
    for cls in classes:
        counts[cls] = {}
        for split, src_split in SPLITS.items():
            data_dir = src_root / cls / src_split / "data"
            ids = list_sample_ids(data_dir)
            if not ids:
                raise FileNotFoundError(f"eyecandies: no *{RGB_SUFFIX} in {data_dir}")
            is_test = split == "test"
            for sample_id in ids:
                sample = read_sample(
                    data_dir, sample_id, with_mask=is_test, rule=rule, output_scale=output_scale
                )
                kind = "bad" if is_test and sample["mask"].any() else "good"
                _write_sample(dst_root / cls / split / kind, sample_id, sample, write_gt=is_test)
                key = f"{split}/{kind}"
                counts[cls][key] = counts[cls].get(key, 0) + 1
    return counts
