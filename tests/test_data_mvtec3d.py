"""MVTec 3D-AD listing and readers: layout rules, binarisation, and errors that name the file."""

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from lsfa_jax.data import mvtec3d


def _write_sample(folder: Path, stem: str, size: int = 8, gt: np.ndarray | None = None) -> None:
    for sub in ("rgb", "xyz"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), 7, np.uint8)).save(folder / "rgb" / f"{stem}.png")
    tifffile.imwrite(
        folder / "xyz" / f"{stem}.tiff", np.ones((size, size, 3), np.float32), photometric="rgb"
    )
    if gt is not None:
        (folder / "gt").mkdir(exist_ok=True)
        Image.fromarray(gt).save(folder / "gt" / f"{stem}.png")


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    cls = tmp_path / "bagel"
    for stem in ("001", "000"):
        _write_sample(cls / "train" / "good", stem)
    _write_sample(cls / "validation" / "good", "000")
    _write_sample(cls / "test" / "good", "000")
    _write_sample(cls / "test" / "hole", "000", gt=np.zeros((8, 8), np.uint8))
    _write_sample(cls / "test" / "crack", "000", gt=np.zeros((8, 8), np.uint8))
    return tmp_path


def test_classes_in_reference_order() -> None:
    assert mvtec3d.MVTEC3D_CLASSES == (
        "bagel", "cable_gland", "carrot", "cookie", "dowel",
        "foam", "peach", "potato", "rope", "tire",
    )  # fmt: skip


def test_listing_sorted_with_ids_and_gt(fake_root: Path) -> None:
    train = mvtec3d.list_samples(fake_root, "bagel", "train")
    assert [s.file_id for s in train] == ["train/good/000", "train/good/001"]
    assert all(s.gt_path is None and s.defect_type == "good" for s in train)
    test = mvtec3d.list_samples(fake_root, "bagel", "test")
    assert [s.file_id for s in test] == ["test/crack/000", "test/good/000", "test/hole/000"]
    assert [s.gt_path is None for s in test] == [False, True, False]
    assert test[0].rgb_path.name == "000.png" and test[0].xyz_path.parent.name == "xyz"
    assert len(mvtec3d.list_samples(fake_root, "bagel", "validation")) == 1


def test_real_sample_listing(mvtec_sample_root: Path) -> None:
    test = mvtec3d.list_samples(mvtec_sample_root, "cable_gland", "test")
    assert sorted({s.defect_type for s in test}) == ["bent", "cut", "good", "hole", "thread"]
    sample = mvtec3d.read_sample(test[0])
    assert sample.rgb.shape == (400, 400, 3) and sample.rgb.dtype == np.uint8
    assert sample.xyz.shape == (400, 400, 3) and sample.xyz.dtype == np.float32
    assert sample.mask.dtype == bool and sample.mask.any()
    assert sample.num_nonfinite == 0
    calibration = mvtec3d.read_calibration(mvtec_sample_root / "cable_gland")
    assert calibration["image_width"] == 400


@pytest.mark.parametrize(
    ("class_name", "split", "needle"),
    [("carrot", "train", "class 'carrot'"), ("bagel", "nope", "unknown split")],
)
def test_missing_class_or_bad_split(fake_root: Path, class_name, split, needle) -> None:
    with pytest.raises(mvtec3d.DataError, match=needle):
        mvtec3d.list_samples(fake_root, class_name, split)


def test_missing_root_and_split_folder(fake_root: Path, tmp_path: Path) -> None:
    with pytest.raises(mvtec3d.DataError, match="dataset root"):
        mvtec3d.list_samples(tmp_path / "absent", "bagel", "train")
    (fake_root / "bagel" / "validation").rename(fake_root / "bagel" / "val")
    with pytest.raises(mvtec3d.DataError, match=r"validation.*split 'validation'"):
        mvtec3d.list_samples(fake_root, "bagel", "validation")


def test_rgb_xyz_lists_must_line_up(fake_root: Path) -> None:
    (fake_root / "bagel" / "train" / "good" / "xyz" / "001.tiff").unlink()
    with pytest.raises(mvtec3d.DataError, match=r"train/good: rgb and xyz.*only in rgb: \['001'\]"):
        mvtec3d.list_samples(fake_root, "bagel", "train")


def test_empty_train_split(tmp_path: Path) -> None:
    for sub in ("rgb", "xyz"):
        (tmp_path / "foam" / "train" / "good" / sub).mkdir(parents=True)
    with pytest.raises(mvtec3d.DataError, match="train split holds no samples"):
        mvtec3d.list_samples(tmp_path, "foam", "train")


def test_defect_without_gt(fake_root: Path) -> None:
    (fake_root / "bagel" / "test" / "hole" / "gt" / "000.png").unlink()
    with pytest.raises(mvtec3d.DataError, match=r"hole/gt/000.png: ground-truth mask missing"):
        mvtec3d.list_samples(fake_root, "bagel", "test")


def test_gt_codes_252_to_255_are_defects(tmp_path: Path) -> None:
    codes = np.array([[0, 252, 253], [254, 255, 0]], np.uint8)
    Image.fromarray(codes).save(tmp_path / "gt.png")
    np.testing.assert_array_equal(mvtec3d.read_gt(tmp_path / "gt.png", (2, 3)), codes > 0)
    zero = mvtec3d.read_gt(None, (4, 5))
    assert zero.shape == (4, 5) and zero.dtype == bool and not zero.any()


def test_xyz_float64_is_cast(tmp_path: Path) -> None:
    xyz = np.random.default_rng(0).normal(size=(4, 5, 3))
    tifffile.imwrite(tmp_path / "a.tiff", xyz, photometric="rgb")
    out = mvtec3d.read_xyz(tmp_path / "a.tiff")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, xyz.astype(np.float32))


def test_xyz_nonfinite_points_become_missing(tmp_path: Path) -> None:
    xyz = np.ones((3, 4, 3), np.float32)
    xyz[0, 1, 2] = np.nan
    xyz[2, 3, 0] = np.inf
    tifffile.imwrite(tmp_path / "a.tiff", xyz, photometric="rgb")
    out, count = mvtec3d.read_xyz_counted(tmp_path / "a.tiff")
    assert count == 2
    expected = xyz.copy()
    expected[0, 1] = expected[2, 3] = 0.0
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(
    ("array", "needle"),
    [
        (np.ones((4, 4, 3), np.int16), "expected float32 or float64"),
        (np.ones((4, 4), np.float32), r"expected an organized cloud \(H, W, 3\)"),
        (np.ones((4, 4, 4), np.float32), r"expected an organized cloud \(H, W, 3\)"),
    ],
)
def test_xyz_wrong_dtype_or_shape(tmp_path: Path, array: np.ndarray, needle: str) -> None:
    tifffile.imwrite(tmp_path / "bad.tiff", array)
    with pytest.raises(mvtec3d.DataError, match=rf"bad.tiff: {needle}"):
        mvtec3d.read_xyz(tmp_path / "bad.tiff")


def test_truncated_files_name_the_file(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "t.tiff", np.ones((64, 64, 3), np.float32), photometric="rgb")
    data = (tmp_path / "t.tiff").read_bytes()
    (tmp_path / "t.tiff").write_bytes(data[: len(data) // 3])
    with pytest.raises(mvtec3d.DataError, match=r"t.tiff: unreadable or truncated tiff"):
        mvtec3d.read_xyz(tmp_path / "t.tiff")
    Image.fromarray(np.full((64, 64, 3), 9, np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(mvtec3d.DataError, match=r"t.png: unreadable or truncated image"):
        mvtec3d.read_rgb(tmp_path / "t.png")


def test_rgb_16_bit_is_rejected(tmp_path: Path) -> None:
    Image.fromarray(np.ones((4, 4), np.uint16) * 1000).save(tmp_path / "deep.png")
    with pytest.raises(mvtec3d.DataError, match=r"deep.png: unsupported image mode"):
        mvtec3d.read_rgb(tmp_path / "deep.png")


def test_rgb_xyz_size_mismatch(fake_root: Path) -> None:
    sample = mvtec3d.list_samples(fake_root, "bagel", "train")[0]
    tifffile.imwrite(sample.xyz_path, np.ones((6, 8, 3), np.float32), photometric="rgb")
    with pytest.raises(mvtec3d.DataError, match=r"000.tiff: cloud size \(6, 8\) does not match"):
        mvtec3d.read_sample(sample)


def test_calibration_absent_or_present(tmp_path: Path) -> None:
    assert mvtec3d.read_calibration(tmp_path) is None
    (tmp_path / "calibration").mkdir()
    (tmp_path / "calibration" / "camera_parameters.json").write_text(json.dumps({"focus": 0.01}))
    assert mvtec3d.read_calibration(tmp_path) == {"focus": 0.01}
