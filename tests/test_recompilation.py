"""No recompilation across samples and classes: the scorer and the feature extractors compile once.

Compilations are counted from JAX's own compilation log (`jax_log_compiles`): every XLA
compilation logs one "Compiling jit(<name>) ..." record. A jitted function that sees a new shape,
dtype or static argument compiles again, so a constant count over a second class / batch shows
that the shapes the pipeline feeds are static.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lsfa_jax.features.point_mae_grid import point_mae_patch_grid_batch
from lsfa_jax.models import point_mae, vit
from lsfa_jax.patchcore.bank import build_memory_bank
from lsfa_jax.patchcore.coreset import coreset_size
from lsfa_jax.patchcore.scorer import score_batch
from tests.helpers.tiny import TINY_POINT_BACKBONE, tiny_evaluation_config
from tests.helpers.tiny_stages import organized_cloud

_COMPILING = re.compile(r"Compiling (?:jit\()?([^\s()]+)")


class _CompileLog(logging.Handler):
    """Collects the names of the functions XLA compiles while installed."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = _COMPILING.match(record.getMessage())
        if match:
            self.names.append(match.group(1))

    def count(self, substring: str = "") -> int:
        return sum(substring in name for name in self.names)

    def since(self, start: int) -> Counter:
        return Counter(self.names[start:])


@contextlib.contextmanager
def compile_log() -> Iterator[_CompileLog]:
    handler = _CompileLog()
    logger = logging.getLogger("jax")
    previous_flag = jax.config.jax_log_compiles
    previous_level = logger.level
    jax.config.update("jax_log_compiles", True)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
        jax.config.update("jax_log_compiles", previous_flag)


def test_compile_log_sees_a_new_shape() -> None:
    """The counter itself: a new input shape is one more compilation, a repeated one is not."""

    @jax.jit
    def double(x):
        return 2.0 * x

    with compile_log() as log:
        double(jnp.ones(3)).block_until_ready()
        first = log.count("double")
        double(jnp.zeros(3)).block_until_ready()
        repeated = log.count("double")
        double(jnp.ones(5)).block_until_ready()
        new_shape = log.count("double")
    assert (first, repeated, new_shape) == (1, 1, 2)


def _class_library(n_images: int, patches: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n_images * patches, dim)).astype(np.float32)


@pytest.mark.slow
def test_scorer_compiles_once_for_two_classes() -> None:
    """Two classes with different library sizes, banks padded to one size as
    `evaluators/banks.py::bank_padded_size` does: scoring the second class compiles nothing."""
    patches, dim, batch, ratio = 16, 8, 2, 0.25
    libraries = [_class_library(6, patches, dim, 0), _class_library(9, patches, dim, 1)]
    largest = max(len(lib) for lib in libraries)
    padded = -(-coreset_size(largest, ratio) // 32) * 32
    banks = [
        build_memory_bank(lib, ratio=ratio, key=jax.random.key(i), padded_size=padded)
        for i, lib in enumerate(libraries)
    ]
    assert int(banks[0].valid.sum()) != int(banks[1].valid.sum())
    rng = np.random.default_rng(2)
    queries = [rng.normal(size=(batch, patches, dim)).astype(np.float32) for _ in range(2)]
    with compile_log() as log:
        counts = []
        for bank, query in zip(banks, queries, strict=True):
            scores, maps = score_batch(bank, jnp.asarray(query), out_size=32, bank_chunk=32)
            jax.block_until_ready((scores, maps))
            counts.append(len(log.names))
    assert log.count("_score_images") == 1, log.names
    assert counts[1] == counts[0], f"second class compiled {log.since(counts[0])}"


@pytest.mark.slow
def test_extractors_compile_once_for_two_batches() -> None:
    """ViT and the Point-MAE branch on two batches whose clouds have different numbers of valid
    points (packing to a fixed size with a mask keeps the shapes static)."""
    rgb_cfg = vit.ViTConfig(img_size=32, embed_dim=16, depth=1, num_heads=2)
    rgb_params = vit.init_random_vit_params(jax.random.key(0), rgb_cfg)
    point_cfg = ml_collections.ConfigDict(TINY_POINT_BACKBONE)
    point_vars = point_mae.init_random_point_mae_variables(jax.random.key(1), point_cfg)
    rng = np.random.default_rng(0)
    batches = [
        (
            rng.normal(size=(2, 32, 32, 3)).astype(np.float32),
            np.stack([organized_cloud(32, hole, seed) for seed, hole in enumerate(holes)]),
        )
        for holes in ((0, 5), (11, 17))
    ]
    valid_counts = {int(np.all(c != 0, -1).sum()) for _, clouds in batches for c in clouds}
    assert len(valid_counts) == 4
    with compile_log() as log:
        counts = []
        for images, clouds in batches:
            rgb = vit.dino_patch_grid(rgb_params, jnp.asarray(images), model_cfg=rgb_cfg)
            xyz, fg = point_mae_patch_grid_batch(point_vars, clouds, point_cfg, grid_size=8)
            jax.block_until_ready((rgb, xyz, fg))
            counts.append(len(log.names))
    assert rgb.shape == (2, 64, 16) and xyz.shape == (2, 64, 32)
    assert log.count("dino_patch_grid") == 1, log.names
    assert counts[1] == counts[0], f"second batch compiled {log.since(counts[0])}"


@pytest.mark.slow
def test_split_of_ten_at_batch_eight_compiles_the_backbones_once(tmp_path: Path) -> None:
    """Extraction of a 10-sample split in batches of 8 (the run's path: FeatureSource over
    `extract_batch`): the last batch of 2 is padded to 8, so neither backbone compiles again,
    and the padded batch gives the real samples the features they get in a full batch."""
    from lsfa_jax.features.extract import Backbones
    from lsfa_jax.features.source import FeatureSource

    rgb_cfg = vit.ViTConfig(img_size=32, embed_dim=16, depth=1, num_heads=2)
    point_cfg = ml_collections.ConfigDict(TINY_POINT_BACKBONE)
    backbones = Backbones(
        rgb_params=vit.init_random_vit_params(jax.random.key(0), rgb_cfg),
        rgb_cfg=rgb_cfg,
        point_variables=point_mae.init_random_point_mae_variables(jax.random.key(1), point_cfg),
        point_cfg=point_cfg,
        weight_files={"rgb": "random-init (seed 0)", "point": "random-init (seed 0)"},
        random_init={"rgb": True, "point": True},
    )
    config = ml_collections.ConfigDict(dict(batch_size=8, grid_size=8))
    source = FeatureSource(config, {}, tmp_path, backbones)
    rng = np.random.default_rng(0)
    inputs = {
        "rgb": rng.normal(size=(10, 32, 32, 3)).astype(np.float32),
        "xyz": np.stack([organized_cloud(32, 3 + i, i) for i in range(10)]),
        "file_id": np.asarray([f"s{i}" for i in range(10)]),
    }
    jax.clear_caches()
    with compile_log() as log:
        features = source.extract_in_batches(inputs)
    assert features["rgb"].shape == (10, 64, 16) and features["xyz"].shape == (10, 64, 32)
    assert log.count("dino_patch_grid") == 1, log.names
    point_jits = [n for n in log.names if "point_mae_clouds" in n]
    assert len(point_jits) == 1, log.names
    alone = source.extract({k: v[8:] for k, v in inputs.items()})
    for name in ("rgb", "xyz", "fg"):
        np.testing.assert_array_equal(alone[name], features[name][8:])


@pytest.mark.slow
def test_run_evaluation_scores_the_second_class_without_compiling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run_evaluation` in-process on two synthetic classes: every jitted call made while
    scoring the second class (validation and test splits, both modalities) reuses the first
    class's executables."""
    from lsfa_jax.evaluators import class_eval
    from lsfa_jax.jobs import run_evaluation

    jax.clear_caches()  # earlier tests in this process may have compiled the same shapes
    config = tiny_evaluation_config(tmp_path / "raw")
    per_class: list[dict] = []
    original_score = class_eval.score_features
    original_one_class = run_evaluation.evaluate_one_class

    def counting_one_class(config, class_name, *args, **kwargs):
        per_class.append({"class": class_name, "score_split": Counter()})
        return original_one_class(config, class_name, *args, **kwargs)

    def counting_score_split(bank, features, settings, desc, **kwargs):
        start = len(log.names)
        out = original_score(bank, features, settings, desc, **kwargs)
        per_class[-1]["score_split"].update(log.since(start))
        return out

    monkeypatch.setattr(run_evaluation, "evaluate_one_class", counting_one_class)
    monkeypatch.setattr(class_eval, "score_features", counting_score_split)
    with compile_log() as log:
        results = run_evaluation.run_evaluation(config, tmp_path / "work")
    assert [c["class"] for c in per_class] == ["sphere_cap", "torus"]
    assert set(results) == {"RGB", "3D", "RGB+3D"}
    first, second = (c["score_split"] for c in per_class)
    # One executable per modality (16 and 32 channels), split over the run's mesh.
    assert first["_score_images_split"] == 2, first
    assert sum(second.values()) == 0, f"scoring the second class compiled {dict(second)}"


@pytest.mark.slow
def test_adaptors_apply_compiles_once_for_splits_of_different_sizes() -> None:
    """Adapted features of two splits whose sizes leave different remainders modulo the batch
    size (4 and 3 samples, batch 2): the second split must reuse the first one's executable."""
    from lsfa_jax.models.adaptors import (
        AdaptorSettings,
        LSFAModel,
        adapt_features,
        init_lsfa_params,
    )

    patches, rgb_dim, xyz_dim = 4, 8, 12
    model = LSFAModel(rgb_dim=rgb_dim, xyz_dim=xyz_dim, proj_dim=4, rgb_heads=2, xyz_heads=2)
    settings = AdaptorSettings(structure="encoder1", rgb_heads=2, xyz_heads=2, prepend_cls=False)
    params = init_lsfa_params(model, jax.random.key(0), patches)
    rng = np.random.default_rng(0)

    def split(n: int) -> dict[str, np.ndarray]:
        return {
            "rgb": rng.normal(size=(n, patches, rgb_dim)).astype(np.float32),
            "xyz": rng.normal(size=(n, patches, xyz_dim)).astype(np.float32),
            "rgb_cls": rng.normal(size=(n, rgb_dim)).astype(np.float32),
        }

    first, second = split(4), split(3)
    with compile_log() as log:
        out = adapt_features(params, settings, first, batch_size=2)
        after_first = log.count("apply_adaptors")
        out_second = adapt_features(params, settings, second, batch_size=2)
    assert out["xyz"].shape == (4, patches, xyz_dim)
    assert out_second["rgb"].shape == (3, patches, rgb_dim)
    assert after_first == 1
    assert log.count("apply_adaptors") == after_first, log.names
