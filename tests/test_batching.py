"""lsfa_jax.batching against plain slicing."""

from __future__ import annotations

import numpy as np
import pytest

from lsfa_jax.batching import map_in_batches, pad_batch


def test_pad_batch_repeats_the_last_row_and_masks_it() -> None:
    batch = {"x": np.arange(6).reshape(3, 2), "name": ["a", "b", "c"]}
    padded, mask = pad_batch(batch, 5)
    assert padded["x"].tolist() == [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]]
    assert padded["name"] == ["a", "b", "c", "c", "c"]
    assert mask.tolist() == [True, True, True, False, False]
    with pytest.raises(ValueError, match="different lengths"):
        pad_batch({"x": np.zeros(2), "y": np.zeros(3)}, 4)
    with pytest.raises(ValueError, match="do not fit"):
        pad_batch({"x": np.zeros(5)}, 4)


def test_map_in_batches_sees_one_shape_and_returns_the_real_rows() -> None:
    x = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    shapes, masks = [], []

    def fn(batch, mask):
        shapes.append(batch["x"].shape)
        masks.append(mask.sum())
        return {"double": 2 * batch["x"], "norm": np.linalg.norm(batch["x"], axis=1)}

    out = map_in_batches(fn, {"x": x}, 4)
    assert shapes == [(4, 3)] * 3 and masks == [4, 4, 2]
    np.testing.assert_array_equal(out["double"], 2 * x)
    np.testing.assert_allclose(out["norm"], np.linalg.norm(x, axis=1))
