"""The reference resize rules against independent computations (torch, PIL, index formulas)."""

import numpy as np
import pytest
import torch

from lsfa_jax.data import resize


@pytest.mark.parametrize(
    ("in_size", "out_size"), [(800, 224), (400, 224), (64, 32), (50, 224), (7, 7)]
)
def test_xyz_matches_torch_legacy_nearest(in_size: int, out_size: int) -> None:
    rng = np.random.default_rng(in_size)
    xyz = rng.normal(size=(in_size, in_size + 3, 3)).astype(np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(xyz).permute(2, 0, 1)[None], size=(out_size, out_size), mode="nearest"
    )[0].permute(1, 2, 0)
    np.testing.assert_array_equal(resize.resize_xyz(xyz, out_size), expected.numpy())


def test_xyz_indices_follow_the_documented_rule() -> None:
    # Reference notes 1.4: for H = 800 -> 224 the rows are 0, 3, 7, 10, 14, ...
    np.testing.assert_array_equal(resize.legacy_nearest_indices(800, 224)[:5], [0, 3, 7, 10, 14])


def test_missing_points_stay_exactly_zero() -> None:
    rng = np.random.default_rng(0)
    xyz = rng.uniform(0.6, 0.7, size=(400, 400, 3)).astype(np.float32)
    xyz[rng.uniform(size=(400, 400)) < 0.3] = 0.0
    out = resize.resize_xyz(xyz, 224)
    rows = (np.arange(224) * 400) // 224
    source = xyz[rows[:, None], rows[None, :]]
    missing = np.all(source == 0, axis=-1)
    assert missing.any()
    assert np.all(out[missing] == 0.0)
    # Nearest never mixes points: every output point is one of the input points.
    assert np.all(np.any(out == 0, axis=-1) == missing)


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((x - 5) * x + 8) * x * a - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _antialiased_cubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of an antialiased bicubic resize: the kernel widens by the scale."""
    scale = in_size / out_size
    support = 2.0 * max(scale, 1.0)
    centre = (np.arange(out_size) + 0.5) * scale
    taps = np.arange(in_size) + 0.5
    weights = _cubic((taps[None, :] - centre[:, None]) / max(scale, 1.0))
    weights *= np.abs(taps[None, :] - centre[:, None]) < support + 0.5
    return weights / weights.sum(axis=1, keepdims=True)


def test_rgb_matches_a_separable_antialiased_bicubic() -> None:
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, size=(25, 25, 3), dtype=np.uint8)
    rgb = np.kron(base, np.ones((16, 16, 1), np.uint8))  # 400 x 400, sharp edges
    out = resize.resize_rgb(rgb, 224)
    assert out.dtype == np.uint8 and out.shape == (224, 224, 3)
    # Horizontal pass, rounded and clipped to uint8 (which clips the overshoot), then vertical.
    m = _antialiased_cubic_matrix(400, 224)
    horizontal = np.clip(np.rint(np.einsum("oj,ijc->ioc", m, rgb.astype(np.float64))), 0, 255)
    expected = np.clip(np.rint(np.einsum("oi,ijc->ojc", m, horizontal)), 0, 255)
    assert np.abs(out.astype(np.float64) - expected).max() <= 1.0
    assert np.mean(out == expected) > 0.99


def test_rgb_rejects_float_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        resize.resize_rgb(np.zeros((8, 8, 3), np.float32), 4)


@pytest.mark.parametrize(("in_size", "out_size"), [(800, 224), (400, 224), (64, 32), (100, 224)])
def test_mask_is_pil_nearest_pixel_centres(in_size: int, out_size: int) -> None:
    rng = np.random.default_rng(in_size)
    mask = rng.uniform(size=(in_size, in_size)) < 0.5
    centres = np.floor((np.arange(out_size) + 0.5) * in_size / out_size).astype(int)
    expected = mask[centres[:, None], centres[None, :]]
    out = resize.resize_mask(mask, out_size)
    assert out.dtype == bool
    np.testing.assert_array_equal(out, expected)


def test_mask_and_xyz_rules_differ_for_800() -> None:
    # The two nearest rules sample different rows (notes 1.4: 1, 5, 8, 12 vs 0, 3, 7, 10).
    mask = np.tile(np.arange(800)[:, None], (1, 800)).astype(np.uint16) % 256
    rows = resize.resize_mask(mask.astype(np.uint8), 224)[:4, 0]
    np.testing.assert_array_equal(rows, [1, 5, 8, 12])
