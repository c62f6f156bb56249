"""Tests for lsfa_jax.data.eyecandies on tiny fake samples written in the Eyecandies layout."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from lsfa_jax.data import eyecandies as ec

H, W = 12, 16
F = ec.FOCAL_LENGTH
D_MIN, D_MAX = 0.5, 1.5


def _depth_png(depth: np.ndarray) -> np.ndarray:
    return np.round((depth - D_MIN) / (D_MAX - D_MIN) * 65535).astype(np.uint16)


def _quantised(depth: np.ndarray) -> np.ndarray:
    return _depth_png(depth).astype(np.float64) / 65535 * (D_MAX - D_MIN) + D_MIN


def _table_depth() -> np.ndarray:
    """A table tilted by 60 degrees about x, 1 m away at the image centre."""
    a = np.deg2rad(60.0)
    yn = (np.arange(H)[:, None] - H / 2) / F
    return np.broadcast_to(np.sin(a) / (yn * np.cos(a) + np.sin(a)), (H, W)).copy()


OBJECT = (slice(3, 9), slice(5, 11))


def _write_sample(data_dir: Path, sample_id: str, depth: np.ndarray, mask: np.ndarray, seed: int):
    data_dir.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(data_dir / f"{sample_id}_image_4.png")
    Image.fromarray(rgb[..., 0]).save(data_dir / f"{sample_id}_image_0.png")  # ignored
    Image.fromarray(_depth_png(depth)).save(data_dir / f"{sample_id}_depth.png")
    (data_dir / f"{sample_id}_info_depth.yaml").write_text(
        f"normalization:\n  max: {D_MAX}\n  min: {D_MIN}\n"
    )
    Image.fromarray(mask.astype(np.uint8) * 255).save(data_dir / f"{sample_id}_mask.png")


def _scene() -> np.ndarray:
    depth = _table_depth()
    depth[OBJECT] -= 0.2  # an object 20 cm in front of the table
    return depth


def _make_dataset(root: Path, cls: str = "CandyCane") -> None:
    empty = np.zeros((H, W), bool)
    defect = empty.copy()
    defect[4:6, 6:9] = True
    for i in range(2):
        _write_sample(root / cls / "train" / "data", f"{i:03d}", _scene(), empty, i)
    _write_sample(root / cls / "val" / "data", "000", _scene(), empty, 10)
    test = root / cls / "test_public" / "data"
    _write_sample(test, "000", _scene(), empty, 20)
    _write_sample(test, "001", _scene(), defect, 21)
    _write_sample(test, "002", _scene(), np.roll(defect, 2, axis=1), 22)


def _hashes(root: Path) -> dict[str, tuple[str, float]]:
    return {
        str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_flat_plane_back_projects_to_constant_z(tmp_path):
    depth = np.full((H, W), 0.8)
    _write_sample(tmp_path, "000", depth, np.zeros((H, W)), 0)
    d = ec.read_depth(tmp_path / "000_depth.png", tmp_path / "000_info_depth.yaml")
    assert d.dtype == np.float32 and d.shape == (H, W)
    np.testing.assert_allclose(d, 0.8, atol=2e-5)
    xyz = ec.back_project(d)
    assert xyz.shape == (H, W, 3) and xyz.dtype == np.float32
    np.testing.assert_array_equal(xyz[..., 2], d)
    np.testing.assert_array_equal(xyz[H // 2, W // 2, :2], [0.0, 0.0])
    np.testing.assert_allclose(xyz[H // 2, W // 2 + 3, 0], 3 * d[0, 0] / F, rtol=1e-6)
    np.testing.assert_allclose(xyz[0, W // 2, 1], -(H // 2) * d[0, 0] / F, rtol=1e-6)


def test_back_project_with_pose_matches_per_pixel_inverse():
    rng = np.random.default_rng(0)
    depth = rng.uniform(0.5, 2.0, size=(3, 4))
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = q, rng.normal(size=3)
    xyz = ec.back_project(depth, pose=pose)
    K = np.array([[F, 0, 2.0, 0], [0, F, 1.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    for v in range(3):
        for u in range(4):
            world = np.linalg.solve(K @ pose, [u, v, 1.0, 1.0 / depth[v, u]]) * depth[v, u]
            np.testing.assert_allclose(xyz[v, u], world[:3], rtol=1e-5, atol=1e-6)
            # Projecting the world point back lands on the pixel at the right depth.
            cam = pose @ np.append(world[:3], 1.0)
            np.testing.assert_allclose(cam[2], depth[v, u], rtol=1e-6)
            np.testing.assert_allclose(
                [F * cam[0] / cam[2] + 2.0, F * cam[1] / cam[2] + 1.5], [u, v], atol=1e-6
            )


def test_background_removal_keeps_the_object_only():
    xyz = ec.back_project(_scene())
    out = ec.remove_background(xyz)
    kept = np.any(out != 0, axis=-1)
    want = np.zeros((H, W), bool)
    want[OBJECT] = True
    np.testing.assert_array_equal(kept, want)
    np.testing.assert_array_equal(out[kept], xyz[kept])
    # Depth and |x| bounds alone (table margin disabled): only the far point goes.
    far = _table_depth()
    far[2, 3] = 1.9
    rule = ec.BackgroundRule(table_margin=-np.inf)
    kept = np.any(ec.remove_background(ec.back_project(far), rule) != 0, axis=-1)
    assert not kept[2, 3] and kept.sum() == H * W - 1


def test_convert_layout_splits_masks_and_geometry(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _make_dataset(src)
    before = _hashes(src)
    counts = ec.convert_eyecandies(src, dst, ["CandyCane"])
    assert _hashes(src) == before  # the source is never modified
    assert counts == {
        "CandyCane": {"train/good": 2, "validation/good": 1, "test/good": 1, "test/bad": 2}
    }
    root = dst / "CandyCane"
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == sorted(
        [f"train/good/rgb/{i}.png" for i in ("000", "001")]
        + [f"train/good/xyz/{i}.tiff" for i in ("000", "001")]
        + ["validation/good/rgb/000.png", "validation/good/xyz/000.tiff"]
        + ["test/good/rgb/000.png", "test/good/xyz/000.tiff", "test/good/gt/000.png"]
        + [f"test/bad/rgb/{i}.png" for i in ("001", "002")]
        + [f"test/bad/xyz/{i}.tiff" for i in ("001", "002")]
        + [f"test/bad/gt/{i}.png" for i in ("001", "002")]
    )
    sdata = src / "CandyCane" / "test_public" / "data"
    for kind, sid in (("good", "000"), ("bad", "001"), ("bad", "002")):
        assert (root / f"test/{kind}/rgb/{sid}.png").read_bytes() == (
            sdata / f"{sid}_image_4.png"
        ).read_bytes()
        gt = np.asarray(Image.open(root / f"test/{kind}/gt/{sid}.png"))
        src_mask = np.asarray(Image.open(sdata / f"{sid}_mask.png"))
        np.testing.assert_array_equal(gt, np.where(src_mask > 0, 255, 0).astype(np.uint8))
    xyz = tifffile.imread(root / "train/good/xyz/001.tiff")
    assert xyz.dtype == np.float32 and xyz.shape == (H, W, 3)
    d = _quantised(_scene())
    v, u = np.mgrid[0:H, 0:W]
    want = np.stack([(u - W / 2) * d / F, (v - H / 2) * d / F, d], axis=-1) * 0.1
    want[~np.pad(np.ones((6, 6), bool), ((3, 3), (5, 5)))] = 0.0
    np.testing.assert_allclose(xyz, want, rtol=1e-5, atol=1e-7)


def test_missing_files_and_bad_destination_are_named(tmp_path):
    src = tmp_path / "src"
    _make_dataset(src)
    (src / "CandyCane" / "val" / "data" / "000_info_depth.yaml").unlink()
    with pytest.raises(FileNotFoundError, match=r"000_info_depth\.yaml"):
        ec.convert_eyecandies(src, tmp_path / "dst", ["CandyCane"])
    with pytest.raises(ValueError, match="inside the source"):
        ec.convert_eyecandies(src, src / "out", ["CandyCane"])
    with pytest.raises(ValueError, match="unknown classes"):
        ec.convert_eyecandies(src, tmp_path / "dst", ["Candy"])
    bad_yaml = tmp_path / "x.yaml"
    bad_yaml.write_text("normalization:\n  min: 2.0\n  max: 1.0\n")
    with pytest.raises(ValueError, match=r"x\.yaml"):
        ec.read_depth_range(bad_yaml)
    flat = tmp_path / "flat.yaml"
    flat.write_text("depth_min: 0.25\ndepth_max: 0.75\n")
    assert ec.read_depth_range(flat) == (0.25, 0.75)


def test_eyecandies_config_prepares_through_the_mvtec_pipeline(tmp_path):
    from configs.eyecandies import get_config
    from lsfa_jax.data import pipeline, prepare

    src = tmp_path / "eyecandies"
    _make_dataset(src)
    before = _hashes(src)
    config = get_config()
    config.data_dir = str(src)
    config.data.classes = "CandyCane"
    config.data.image_size = 8
    config.data.num_workers = 1
    prepared = prepare.prepare_dataset(config.data, tmp_path / "cache")
    batch = next(pipeline.make_batches(prepared, "CandyCane", "test", 8))
    assert batch["xyz"].shape == (3, 8, 8, 3)
    assert batch["label"].tolist() == [1, 1, 0]  # test/bad (2 samples) then test/good
    assert pipeline.num_examples(prepared, "CandyCane", "train") == 2
    assert _hashes(src) == before
    # A second call reuses the conversion and the prepared data.
    assert prepare.prepare_dataset(config.data, tmp_path / "cache") == prepared
