"""The reference's local-rotation augmentation: every 4x4 pixel block turned by k * 90 degrees.

One block of 4x4 pixels is one cell of the 56x56 feature grid at 224 pixels, so the rotated
image keeps each cell's content in its cell while changing its local orientation; the rotation
term of the loss (`losses.rotation_loss`) asks the adapted RGB features to ignore that change.

The reference draws a fresh, unseeded k per block every time it loads an image. Here the k of
a sample are drawn once from (seed, crc32(class/file id)), so features of the rotated image can
be computed once and cached like the other frozen-backbone features; every epoch then sees the
same rotation of a sample.
"""

from __future__ import annotations

import zlib

import numpy as np


def block_rotation_turns(sample_id: str, grid: int, seed: int) -> np.ndarray:
    """(grid, grid) int8 quarter turns in {0, 1, 2, 3}, seeded by the sample's id."""
    rng = np.random.default_rng((seed, zlib.crc32(sample_id.encode())))
    return rng.integers(0, 4, size=(grid, grid)).astype(np.int8)


def rotate_blocks(image: np.ndarray, turns: np.ndarray) -> np.ndarray:
    """Rotates block (i, j) of `image` (H, W, C) counter-clockwise by turns[i, j] * 90 degrees.

    turns (gh, gw): H and W must be multiples of gh and gw, with square blocks. Returns a new
    array; the input is not modified.
    """
    H, W, C = image.shape
    gh, gw = turns.shape
    if H % gh or W % gw or H // gh != W // gw:
        raise ValueError(f"rotate_blocks: image {image.shape} does not split into {turns.shape}")
    b = H // gh
    blocks = image.reshape(gh, b, gw, b, C).transpose(0, 2, 1, 3, 4)  # (gh, gw, b, b, C)
    options = np.stack([np.rot90(blocks, k, axes=(2, 3)) for k in range(4)])
    rotated = np.take_along_axis(options, turns[None, :, :, None, None, None].astype(int), 0)[0]
    return rotated.transpose(0, 2, 1, 3, 4).reshape(H, W, C)
