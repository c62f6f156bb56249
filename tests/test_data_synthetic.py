"""Synthetic dataset: layout, determinism, modality-specific defects with exact masks."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from lsfa_jax.data import mvtec3d, synthetic

CFG = synthetic.SyntheticConfig(image_size=96, seed=3)


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_layout_matches_mvtec(synthetic_root: Path, synthetic_config) -> None:
    for class_name in synthetic_config.classes:
        train = mvtec3d.list_samples(synthetic_root, class_name, "train")
        test = mvtec3d.list_samples(synthetic_root, class_name, "test")
        assert len(train) == synthetic_config.num_train
        assert len(mvtec3d.list_samples(synthetic_root, class_name, "validation")) == 2
        assert sorted({s.defect_type for s in test}) == ["both", "colour", "geometric", "good"]
        ids = json.loads((synthetic_root / class_name / "class_ids.json").read_text())
        assert ids == {"255": "geometric", "254": "colour", "253": "both", "0": "good"}
        camera = mvtec3d.read_calibration(synthetic_root / class_name)
        assert camera["image_width"] == synthetic_config.image_size
        sample = mvtec3d.read_sample(test[0])
        assert sample.xyz.dtype == np.float32 and sample.rgb.shape == (64, 64, 3)
        valid = np.all(sample.xyz != 0, axis=-1)
        # A camera about 0.65 m away, metres, a few missing points.
        assert sample.xyz[valid, 2].min() > 0.6 and sample.xyz[valid, 2].max() < 0.7
        assert 0.9 < valid.mean() < 1.0


def test_gt_codes_per_defect_type(synthetic_root: Path) -> None:
    from PIL import Image

    for kind, code in synthetic.DEFECT_CODES.items():
        gt = np.asarray(Image.open(synthetic_root / "torus" / "test" / kind / "gt" / "000.png"))
        assert set(np.unique(gt)) == {0, code}
    good = np.asarray(Image.open(synthetic_root / "torus" / "test" / "good" / "gt" / "000.png"))
    assert not good.any()


def test_generation_is_byte_deterministic_and_parallel_safe(
    tmp_path: Path, synthetic_config
) -> None:
    serial = synthetic.generate_dataset(tmp_path / "a", synthetic_config)
    parallel = synthetic.generate_dataset(tmp_path / "b", synthetic_config, num_workers=2)
    assert _tree_digest(serial) == _tree_digest(parallel)
    other = synthetic.generate_dataset(
        tmp_path / "c",
        synthetic.SyntheticConfig.from_mapping({**synthetic_config.to_json(), "seed": 1}),
    )
    assert _tree_digest(other) != _tree_digest(serial)


def test_samples_vary() -> None:
    a = synthetic.render_sample(CFG, "box", "train", "good", 0)
    b = synthetic.render_sample(CFG, "box", "train", "good", 1)
    assert np.abs(a["rgb"].astype(int) - b["rgb"]).mean() > 5
    assert np.abs(a["xyz"] - b["xyz"]).max() > 0.005


@pytest.mark.parametrize("shape", synthetic.SHAPES)
@pytest.mark.parametrize("index", [0, 1, 2])
def test_each_defect_changes_only_its_modality(shape: str, index: int) -> None:
    changed = {}
    for kind in synthetic.DEFECT_TYPES:
        defect = synthetic.render_sample(CFG, shape, "test", kind, index)
        clean = synthetic.render_sample(CFG, shape, "test", kind, index, with_defect=False)
        mask = defect["mask"]
        assert mask.sum() >= 10 and not clean["mask"].any()
        xyz_diff = np.any(defect["xyz"] != clean["xyz"], axis=-1)
        rgb_diff = np.any(defect["rgb"] != clean["rgb"], axis=-1)
        # Nothing changes outside the mask.
        assert not (xyz_diff & ~mask).any() and not (rgb_diff & ~mask).any()
        changed[kind] = (xyz_diff, rgb_diff, mask)
    xyz_diff, rgb_diff, mask = changed["geometric"]
    assert not rgb_diff.any()
    valid = np.all(synthetic.render_sample(CFG, shape, "test", "geometric", index)["xyz"] != 0, -1)
    assert xyz_diff[mask & valid].mean() > 0.9  # the mask is where the surface moved
    xyz_diff, rgb_diff, mask = changed["colour"]
    assert not xyz_diff.any()
    assert rgb_diff[mask].all()
    xyz_diff, rgb_diff, mask = changed["both"]
    assert xyz_diff.any() and rgb_diff.any()
    valid = np.all(synthetic.render_sample(CFG, shape, "test", "both", index)["xyz"] != 0, -1)
    assert (xyz_diff | rgb_diff)[mask & valid].mean() > 0.9


def test_geometric_defect_size_is_millimetres() -> None:
    defect = synthetic.render_sample(CFG, "sphere_cap", "test", "geometric", 0)
    clean = synthetic.render_sample(CFG, "sphere_cap", "test", "geometric", 0, with_defect=False)
    depth_change = np.abs(defect["xyz"][..., 2] - clean["xyz"][..., 2])
    assert 0.0015 < depth_change.max() < 0.0045


def test_refuses_to_overwrite_a_foreign_folder(tmp_path: Path, synthetic_config) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not a synthetic dataset"):
        synthetic.generate_dataset(tmp_path / "real", synthetic_config)
    assert (tmp_path / "real" / "keep.txt").read_text() == "user data"


def test_regenerates_on_config_change_and_leaves_no_temp(tmp_path: Path) -> None:
    small = synthetic.SyntheticConfig(
        classes=("box",), image_size=32, num_train=2, num_validation=1, num_test_good=1,
        num_test_per_defect=1,
    )  # fmt: skip
    root = synthetic.generate_dataset(tmp_path / "syn", small)
    assert synthetic.is_generated(root, small)
    bigger = synthetic.SyntheticConfig.from_mapping({**small.to_json(), "num_train": 3})
    synthetic.generate_dataset(root, bigger)
    assert synthetic.is_generated(root, bigger) and not synthetic.is_generated(root, small)
    assert len(mvtec3d.list_samples(root, "box", "train")) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"]


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="subset"):
        synthetic.SyntheticConfig(classes=("teapot",))
