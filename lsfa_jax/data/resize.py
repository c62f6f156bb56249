"""The reference resize rules (docs/method.md#resize-rules), on host numpy arrays.

- xyz: PyTorch legacy nearest, source index = floor(dst * in / out) in float32. Nearest never
  mixes points, so missing points (0, 0, 0) stay exactly zero. Never interpolate xyz.
- rgb: PIL bicubic on uint8 (PIL always antialiases when downscaling), as torchvision's Resize
  does on PIL images.
- mask: PIL nearest, which samples pixel centres: source = floor((dst + 0.5) * in / out).
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def legacy_nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """(out_size,) int source indices of PyTorch's legacy 'nearest' interpolation.

    PyTorch's CPU kernel computes the scale and the product in float32, so this does too.
    """
    if in_size == out_size:
        return np.arange(out_size)
    scale = np.float32(in_size) / np.float32(out_size)
    index = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, in_size - 1)


def resize_xyz(xyz: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) float -> (size, size, 3) float32 by legacy nearest."""
    rows = legacy_nearest_indices(xyz.shape[0], size)
    cols = legacy_nearest_indices(xyz.shape[1], size)
    return np.asarray(xyz, np.float32)[rows[:, None], cols[None, :]]


def resize_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 by PIL bicubic."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"resize_rgb expects uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    image = Image.fromarray(rgb, "RGB").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """(H, W) bool or uint8 -> (size, size) of the same dtype by PIL nearest."""
    if mask.ndim != 2:
        raise ValueError(f"resize_mask expects (H, W), got shape {mask.shape}")
    image = Image.fromarray(mask.astype(np.uint8), "L").resize(
        (size, size), Image.Resampling.NEAREST
    )
    return np.asarray(image).astype(mask.dtype)
