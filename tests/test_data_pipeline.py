"""Prepared TFDS data and the tf.data pipeline on a tiny synthetic set (64 px raw -> 32 px)."""

import os
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from lsfa_jax.data import mvtec3d, pipeline, prepare, preprocess

SIZE = 32


def _data_cfg(raw: Path, synthetic_config, **overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(
        dict(
            name="synthetic",
            data_dir=str(raw),
            classes=synthetic_config.classes,
            image_size=SIZE,
            preprocess=True,
            plane=dict(
                border=10,
                ransac_distance=0.004,
                ransac_n=50,
                ransac_iterations=1000,
                remove_distance=0.005,
                dbscan_eps=0.006,
                dbscan_min_points=30,
            ),
            num_workers=1,
            seed=0,
            synthetic=synthetic_config.to_json(),
        )
    )
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def prepared(synthetic_root: Path, synthetic_config, tmp_path_factory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("cache")
    return prepare.prepare_dataset(_data_cfg(synthetic_root, synthetic_config), cache)


def _all(prepared, class_name, split, **kwargs) -> dict[str, np.ndarray]:
    batches = list(pipeline.make_batches(prepared, class_name, split, 3, **kwargs))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_batches_shapes_dtypes_and_normalisation(prepared) -> None:
    batch = next(pipeline.make_batches(prepared, "torus", "test", 4))
    expected = {
        "rgb": ((4, SIZE, SIZE, 3), np.float32),
        "rgb_uint8": ((4, SIZE, SIZE, 3), np.uint8),
        "xyz": ((4, SIZE, SIZE, 3), np.float32),
        "mask": ((4, SIZE, SIZE), np.uint8),
        "label": ((4,), np.int32),
    }
    for key, (shape, dtype) in expected.items():
        assert batch[key].shape == shape and batch[key].dtype == dtype, key
    for key in ("defect_type", "class", "file_id"):
        assert batch[key].dtype.kind == "U" and batch[key].shape == (4,)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(batch["rgb"], (batch["rgb_uint8"] / 255.0 - mean) / std, atol=1e-5)


def test_order_labels_and_arrays_match_direct_preparation(prepared, synthetic_root) -> None:
    for class_name in ("sphere_cap", "torus"):
        files = mvtec3d.list_samples(synthetic_root, class_name, "test")
        data = _all(prepared, class_name, "test")
        assert list(data["file_id"]) == sorted(f.file_id for f in files)
        assert list(data["class"]) == [class_name] * len(files)
        np.testing.assert_array_equal(data["label"], [f.defect_type != "good" for f in files])
        np.testing.assert_array_equal(data["defect_type"], [f.defect_type for f in files])
        for i, f in enumerate(files):
            direct = preprocess.prepare_sample(f, SIZE, preprocess.PlaneRemovalParams(), seed=0)
            np.testing.assert_array_equal(data["xyz"][i], direct.xyz)
            np.testing.assert_array_equal(data["rgb_uint8"][i], direct.rgb)
            np.testing.assert_array_equal(data["mask"][i], direct.mask)
        assert set(np.unique(data["mask"])) <= {0, 1}
        assert not data["mask"][data["label"] == 0].any()
        assert all(m.any() for m in data["mask"][data["label"] == 1])


def test_counts_and_summary(prepared, synthetic_config) -> None:
    assert pipeline.num_examples(prepared, "torus", "train") == synthetic_config.num_train
    assert pipeline.num_examples(prepared, "torus", "validation") == 2
    summary = pipeline.split_summary(prepared)
    assert summary["sphere_cap"] == {
        "train": {"good": 4},
        "validation": {"good": 2},
        "test": {"both": 2, "colour": 2, "geometric": 2, "good": 2},
    }


def test_seeded_shuffle_and_batching_options(prepared) -> None:
    ordered = list(_all(prepared, "torus", "test")["file_id"])
    first = list(_all(prepared, "torus", "test", shuffle=True, seed=1)["file_id"])
    again = list(_all(prepared, "torus", "test", shuffle=True, seed=1)["file_id"])
    other = list(_all(prepared, "torus", "test", shuffle=True, seed=2)["file_id"])
    assert first == again and sorted(first) == ordered
    assert first != ordered or other != ordered
    sizes = [len(b["label"]) for b in pipeline.make_batches(prepared, "torus", "test", 3)]
    assert sizes == [3, 3, 2]
    dropped = pipeline.make_batches(prepared, "torus", "test", 3, drop_remainder=True)
    assert [len(b["label"]) for b in dropped] == [3, 3]
    endless = pipeline.make_batches(prepared, "torus", "train", 3, repeat=True)
    ids = np.concatenate([next(endless)["file_id"] for _ in range(3)])
    assert list(ids[:4]) == list(ids[4:8])


def test_unknown_class_is_named(prepared) -> None:
    with pytest.raises(KeyError, match="'box' was not prepared"):
        pipeline.num_examples(prepared, "box", "test")


def test_cache_is_reused_and_keyed(synthetic_root, synthetic_config, tmp_path: Path) -> None:
    cfg = _data_cfg(synthetic_root, synthetic_config, classes=("torus",))
    # A leftover of an interrupted build is never taken for a finished one.
    key = prepare.cache_key(cfg, "torus")
    digest = prepare.key_digest(key)
    leftover = prepare.cache_entry(tmp_path, key) / "synthetic3d" / f"torus_{digest}"
    (leftover / "incomplete.ABC_1.0.0").mkdir(parents=True)
    first = prepare.prepare_dataset(cfg, tmp_path)["torus"]
    assert pipeline.num_examples({"torus": first}, "torus", "test") == 8
    stamp = os.stat(Path(first) / "dataset_info.json").st_mtime_ns
    assert prepare.prepare_dataset(cfg, tmp_path)["torus"] == first
    assert os.stat(Path(first) / "dataset_info.json").st_mtime_ns == stamp
    # Any parameter that changes the arrays gives a new entry.
    entries = {first}
    for change in (dict(image_size=16), dict(preprocess=False), dict(seed=5)):
        changed = _data_cfg(synthetic_root, synthetic_config, classes=("torus",), **change)
        entries.add(prepare.prepare_dataset(changed, tmp_path)["torus"])
    assert len(entries) == 4
    small_cfg = _data_cfg(synthetic_root, synthetic_config, classes=("torus",), image_size=16)
    small = prepare.prepare_dataset(small_cfg, tmp_path)
    assert next(pipeline.make_batches(small, "torus", "test", 2))["xyz"].shape == (2, 16, 16, 3)


@pytest.mark.slow
def test_pool_gives_the_same_data(prepared, synthetic_root, synthetic_config, tmp_path) -> None:
    cfg = _data_cfg(synthetic_root, synthetic_config, classes=("sphere_cap",), num_workers=2)
    pooled = prepare.prepare_dataset(cfg, tmp_path)
    serial, parallel = _all(prepared, "sphere_cap", "test"), _all(pooled, "sphere_cap", "test")
    for key in ("xyz", "rgb_uint8", "mask", "file_id"):
        np.testing.assert_array_equal(serial[key], parallel[key])


def test_bad_config_is_named(synthetic_root, synthetic_config, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"unknown synthetic classes \['teapot'\]"):
        prepare.prepare_dataset(
            _data_cfg(synthetic_root, synthetic_config, classes=("teapot",)), tmp_path
        )
    mvtec = _data_cfg(tmp_path / "absent", synthetic_config, name="mvtec3d", classes=("bagel",))
    with pytest.raises(mvtec3d.DataError, match=r"absent: MVTec 3D-AD folder not found"):
        prepare.prepare_dataset(mvtec, tmp_path)
