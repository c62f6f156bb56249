"""The rotation term's inputs: block-rotated images (brute force per block) and the training
batches that carry their features."""

from __future__ import annotations

import types

import jax
import ml_collections
import numpy as np
import pytest

from lsfa_jax.data.block_rotation import block_rotation_turns, rotate_blocks
from lsfa_jax.features.extract import Backbones
from lsfa_jax.features.source import FeatureSource
from lsfa_jax.jobs.adaptor_training import make_batches_fn
from lsfa_jax.models import vit


def test_rotate_blocks_matches_a_per_block_loop_and_keeps_the_input():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(16, 16, 3)).astype(np.float32)
    before = image.copy()
    turns = block_rotation_turns("bagel/000", 4, seed=0)
    assert turns.shape == (4, 4) and set(np.unique(turns)) <= {0, 1, 2, 3}
    got = rotate_blocks(image, turns)
    want = image.copy()
    for i in range(4):
        for j in range(4):
            block = image[4 * i : 4 * i + 4, 4 * j : 4 * j + 4]
            want[4 * i : 4 * i + 4, 4 * j : 4 * j + 4] = np.rot90(block, int(turns[i, j]))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(image, before)
    np.testing.assert_array_equal(rotate_blocks(image, np.zeros((4, 4), np.int8)), image)
    # Each block keeps its own pixels (only their arrangement changes).
    np.testing.assert_allclose(
        got.reshape(4, 4, 4, 4, 3).sum(axis=(1, 3)),
        image.reshape(4, 4, 4, 4, 3).sum(axis=(1, 3)),
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match="does not split"):
        rotate_blocks(image, np.zeros((3, 3), np.int8))


def test_turns_are_seeded_by_sample_id():
    a = block_rotation_turns("bagel/000", 56, 0)
    np.testing.assert_array_equal(a, block_rotation_turns("bagel/000", 56, 0))
    assert not np.array_equal(a, block_rotation_turns("bagel/001", 56, 0))
    assert not np.array_equal(a, block_rotation_turns("bagel/000", 56, 1))
    assert np.all(np.abs(np.bincount(a.ravel(), minlength=4) / a.size - 0.25) < 0.03)


def test_batches_carry_the_rotated_features_of_their_samples():
    rng = np.random.default_rng(1)

    def split(n, offset):
        arrays = dict(
            rgb=rng.normal(size=(n, 4, 3)).astype(np.float32),
            rgb_cls=rng.normal(size=(n, 3)).astype(np.float32),
            xyz=rng.normal(size=(n, 4, 5)).astype(np.float32),
            fg=np.ones((n, 4), bool),
        )
        rot = dict(rgb_rot=arrays["rgb"] + offset)
        return types.SimpleNamespace(arrays=arrays), types.SimpleNamespace(arrays=rot)

    (a, a_rot), (b, b_rot) = split(5, 100.0), split(3, 200.0)
    pairs = [(0, i) for i in range(5)] + [(1, i) for i in range(3)]
    fn = make_batches_fn({"a": a, "b": b}, pairs, 4, seed=0, rotated={"b": b_rot, "a": a_rot})
    batches = list(fn(0))
    assert len(batches) == 2
    for batch in batches:
        offsets = np.where(batch["class_id"] == 0, 100.0, 200.0)[:, None, None]
        np.testing.assert_allclose(batch["rgb_rot"], batch["rgb"] + offsets)
    assert "rgb_rot" not in next(iter(make_batches_fn({"a": a, "b": b}, pairs, 4, seed=0)(0)))


@pytest.mark.slow
def test_rotated_features_are_dino_features_of_the_block_rotated_images(tmp_path):
    cfg = vit.vit_config(
        dict(patch_size=8, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2, img_size=32)
    )
    params = vit.init_random_vit_params(jax.random.PRNGKey(0), cfg)
    backbones = Backbones(params, cfg, None, None, {}, {})
    config = ml_collections.ConfigDict(dict(grid_size=8, seed=3, batch_size=2))
    source = FeatureSource(config, {}, tmp_path, backbones)
    rng = np.random.default_rng(2)
    batch = dict(
        rgb=rng.normal(size=(2, 32, 32, 3)).astype(np.float32),
        **{"class": np.array(["bagel", "bagel"]), "file_id": np.array(["000", "001"])},
    )
    got = source.extract_rotated(batch)["rgb_rot"]
    rotated = np.stack(
        [
            rotate_blocks(batch["rgb"][i], block_rotation_turns(f"bagel/{fid}", 8, 3))
            for i, fid in enumerate(("000", "001"))
        ]
    )
    want = np.asarray(vit.dino_patch_grid(params, rotated, model_cfg=cfg))
    assert got.shape == (2, 64, 16)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    plain = np.asarray(vit.dino_patch_grid(params, batch["rgb"], model_cfg=cfg))
    assert np.abs(got - plain).max() > 1e-3  # the rotation changes the features
