"""Tests for lsfa_jax.data.eyecandies on small generated samples in the Eyecandies layout.

The scene: a camera 0.5 m above a table, pitched down so that the table spans more than 1.8 m
along the view; raised slabs (objects) stand on it. `_reference_cloud` follows the reference
preprocessing (M3DM utils/preprocess_eyecandies.py) step by step with per-pixel loops.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from lsfa_jax.data import eyecandies as ec
from lsfa_jax.features import patch_grid

H, W = 48, 64
F = ec.FOCAL_LENGTH
D_MIN, D_MAX = 2.0, 10.0
CAMERA_HEIGHT, PITCH = 0.5, 0.10
# Pixel regions of the slabs: (rows, cols, height above the table in metres).
NEAR = (slice(30, 44), slice(8, 28), 0.15)  # kept
FAR = (slice(2, 8), slice(8, 28), 0.05)  # more than 1.8 m along the table: background
WIDE = (slice(30, 44), slice(46, 60), 0.15)  # |x| > 1 in the world frame: background
# World-to-camera pose: rotation about x and a translation whose x puts the WIDE slab past x = 1.
TX = -0.95


def _pose(tilt: float = 0.4) -> np.ndarray:
    pose = np.eye(4)
    pose[1:3, 1:3] = [[math.cos(tilt), -math.sin(tilt)], [math.sin(tilt), math.cos(tilt)]]
    pose[:3, 3] = [TX, 0.3, -0.2]
    return pose


def _scene_depth(slabs=(NEAR, FAR, WIDE)) -> np.ndarray:
    """Camera-frame z of the first surface along each pixel's ray (table or slab tops)."""
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    ray = np.stack([(u - W / 2) / F, (v - H / 2) / F, np.ones_like(u)], axis=-1)
    up = np.array([0.0, -math.cos(PITCH), -math.sin(PITCH)])  # world up in camera coordinates
    height = np.zeros((H, W))
    for rows, cols, h in slabs:
        height[rows, cols] = h
    # A point t * ray lies at height CAMERA_HEIGHT + t * (up . ray) above the table.
    return (height - CAMERA_HEIGHT) / (ray @ up)


def _depth_png(depth: np.ndarray) -> np.ndarray:
    return np.round((depth - D_MIN) / (D_MAX - D_MIN) * 65535).astype(np.uint16)


def _write_sample(data_dir: Path, sample_id: str, depth: np.ndarray, mask: np.ndarray, seed: int):
    data_dir.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(data_dir / f"{sample_id}_image_4.png")
    Image.fromarray(rgb[..., 0]).save(data_dir / f"{sample_id}_image_0.png")  # ignored
    Image.fromarray(_depth_png(depth)).save(data_dir / f"{sample_id}_depth.png")
    (data_dir / f"{sample_id}_info_depth.yaml").write_text(
        f"normalization:\n  max: {D_MAX}\n  min: {D_MIN}\n"
    )
    np.savetxt(data_dir / f"{sample_id}_pose.txt", _pose(0.1 * seed))
    Image.fromarray(mask.astype(np.uint8) * 255).save(data_dir / f"{sample_id}_mask.png")


def _make_dataset(root: Path, cls: str = "CandyCane") -> None:
    empty = np.zeros((H, W), bool)
    defect = empty.copy()
    defect[32:36, 10:14] = True
    for i in range(2):
        _write_sample(root / cls / "train" / "data", f"{i:03d}", _scene_depth(), empty, i)
    _write_sample(root / cls / "val" / "data", "00", _scene_depth(), empty, 10)
    test = root / cls / "test_public" / "data"  # two-digit ids, as in Eyecandies test_public
    _write_sample(test, "00", _scene_depth(), empty, 20)
    _write_sample(test, "01", _scene_depth(), defect, 21)
    _write_sample(test, "02", _scene_depth(), np.roll(defect, 3, axis=1), 22)


def _hashes(root: Path) -> dict[str, tuple[str, float]]:
    return {
        str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _reference_cloud(depth_png: Path, yaml_min: float, yaml_max: float, pose: np.ndarray):
    """The reference steps, literally: returns its (H*W, 3) float64 output."""
    dimg = np.asarray(Image.open(depth_png)).astype(np.float32)
    dimg = dimg / 65535.0 * (yaml_max - yaml_min) + yaml_min
    height, width = dimg.shape
    k = np.array([[F, 0, width / 2, 0], [0, F, height / 2, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    vectors = np.zeros((width * height, 4))
    n = 0
    for j in range(height):
        for i in range(width):
            vectors[n] = [i, j, 1, 1 / dimg[j, i]]
            n += 1
    pc = (dimg.reshape(-1, 1) * (np.linalg.inv(k @ pose) @ vectors.T).T)[:, :3]
    top, bottom = pc[width // 2], pc[-(width // 2)]
    dz, dy = top[1] - bottom[1], top[2] - bottom[2]
    norm = math.sqrt(dz**2 + dy**2)
    start = np.array([0, bottom[1], bottom[2]])
    cos, sin = dy / norm, dz / norm
    rot = np.array([[1, 0, 0], [0, cos, -sin], [0, sin, cos]])
    p = (rot @ (pc - start).T).T
    for i in range(p.shape[0]):
        if p[i, 1] > -0.02:
            p[i] = -start
        if p[i, 2] > 1.8 or p[i, 0] > 1 or p[i, 0] < -1:
            p[i] = -start
    p = (rot.T @ p.T).T + start
    return p[:, [0, 2, 1]] * [0.1, -0.1, 0.1]


def test_conversion_matches_the_reference_steps(tmp_path):
    for seed in (0, 3):
        _write_sample(tmp_path, "000", _scene_depth(), np.zeros((H, W)), seed)
        ref = _reference_cloud(tmp_path / "000_depth.png", D_MIN, D_MAX, _pose(0.1 * seed))
        ours = ec.read_sample(tmp_path, "000", with_mask=False)["xyz"]
        assert ours.dtype == np.float32 and ours.shape == (H, W, 3)
        ours = ours.reshape(-1, 3)
        # The reference marks background with one constant point whose x is 0: missing under
        # the all-nonzero test. Ours writes (0, 0, 0) there; every other point must agree.
        ref_missing = ~np.all(ref != 0, axis=-1)
        constant = ref[ref_missing]
        assert np.all(constant[:, 0] == 0) and np.ptp(constant, axis=0).max() == 0
        np.testing.assert_array_equal(ours[ref_missing], 0.0)
        np.testing.assert_allclose(ours[~ref_missing], ref[~ref_missing], rtol=1e-6, atol=1e-9)
        valid = np.asarray(patch_grid.valid_point_mask(ours.reshape(H, W, 3))).reshape(-1)
        np.testing.assert_array_equal(valid, ~ref_missing)
        assert 0 < valid.sum() < H * W


def test_background_is_table_far_and_wide_and_the_object_is_kept(tmp_path):
    _write_sample(tmp_path, "000", _scene_depth(), np.zeros((H, W)), 0)
    xyz = ec.read_sample(tmp_path, "000", with_mask=False)["xyz"]
    kept = np.all(xyz != 0, axis=-1)
    want = np.zeros((H, W), bool)
    want[NEAR[:2]] = True
    np.testing.assert_array_equal(kept, want)
    # Each object is removed only by its own rule: without it, it would be kept.
    depth = ec.read_depth(tmp_path / "000_depth.png", tmp_path / "000_info_depth.yaml")
    points = ec.back_project(depth, _pose(0.0))
    for rule, region in (
        (ec.BackgroundRule(max_along=math.inf), FAR),
        (ec.BackgroundRule(max_abs_x=math.inf), WIDE),
    ):
        _, background = ec.remove_background(points, rule)
        relaxed = want.copy()
        relaxed[region[:2]] = True
        np.testing.assert_array_equal(background, ~relaxed)
    # Output axes: (x, z, y) * (0.1, -0.1, 0.1) of the world point.
    world = points[NEAR[0].start, NEAR[1].start]
    np.testing.assert_allclose(
        xyz[NEAR[0].start, NEAR[1].start],
        [0.1 * world[0], -0.1 * world[2], 0.1 * world[1]],
        rtol=1e-6,
    )


@pytest.mark.parametrize("angle", [0.0, 0.7, 2.5])
def test_background_thresholds_in_the_table_frame(angle):
    # Reference pixels (0, 2) and (1, 2) of a 2x4 cloud: bottom (0, 1, 2), top (0, 1, 3), so the
    # table frame is the input shifted by -(0, 1, 2); then the whole cloud is rotated about x
    # and shifted, which must not change the result.
    table_frame = np.array(
        [
            [[0.5, -0.021, 0.5], [0.0, -0.019, 0.5], [0.0, 0.0, 1.0], [-0.99, -0.5, 1.79]],
            [[0.0, -0.5, 1.81], [1.01, -0.5, 0.5], [0.0, 0.0, 0.0], [-1.01, -0.5, 0.5]],
        ]
    )
    rot = np.array(
        [[1, 0, 0], [0, math.cos(angle), -math.sin(angle)], [0, math.sin(angle), math.cos(angle)]]
    )
    shift = np.array([0.0, 1.0, 2.0])
    points = (table_frame + shift) @ rot.T + [0.0, -0.3, 0.4]
    xyz, background = ec.remove_background(points)
    np.testing.assert_array_equal(
        background, [[False, True, True, False], [True, True, True, True]]
    )
    kept = ~background
    np.testing.assert_allclose(
        xyz[kept], points[kept][:, [0, 2, 1]] * [0.1, -0.1, 0.1], rtol=1e-6, atol=1e-7
    )
    np.testing.assert_array_equal(xyz[background], 0.0)


def test_back_project_matches_per_pixel_inverse():
    rng = np.random.default_rng(0)
    depth = rng.uniform(0.5, 2.0, size=(3, 4)).astype(np.float32)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = q, rng.normal(size=3)
    xyz = ec.back_project(depth, pose)
    assert xyz.dtype == np.float64
    K = np.array([[F, 0, 2.0, 0], [0, F, 1.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    for v in range(3):
        for u in range(4):
            d = float(depth[v, u])
            world = np.linalg.solve(K @ pose, [u, v, 1.0, 1.0 / d]) * d
            np.testing.assert_allclose(xyz[v, u], world[:3], rtol=1e-6, atol=1e-7)
            # Projecting the world point back lands on the pixel at the right depth.
            cam = pose @ np.append(world[:3], 1.0)
            np.testing.assert_allclose(cam[2], d, rtol=1e-6)
            np.testing.assert_allclose(
                [F * cam[0] / cam[2] + 2.0, F * cam[1] / cam[2] + 1.5], [u, v], atol=1e-6
            )


def test_depth_is_decoded_in_float32_as_the_reference(tmp_path):
    depth = _scene_depth()
    _write_sample(tmp_path, "000", depth, np.zeros((H, W)), 0)
    d = ec.read_depth(tmp_path / "000_depth.png", tmp_path / "000_info_depth.yaml")
    assert d.dtype == np.float32 and d.shape == (H, W)
    raw = _depth_png(depth).astype(np.float32)
    np.testing.assert_array_equal(d, raw / 65535.0 * (D_MAX - D_MIN) + D_MIN)
    np.testing.assert_allclose(d, depth, atol=(D_MAX - D_MIN) / 65535)


def test_convert_layout_splits_masks_and_source_unchanged(tmp_path):
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
        [
            f"train/good/{k}/{i}.{e}"
            for i in ("000", "001")
            for k, e in (("rgb", "png"), ("xyz", "tiff"))
        ]
        + ["validation/good/rgb/000.png", "validation/good/xyz/000.tiff"]
        + ["test/good/rgb/000.png", "test/good/xyz/000.tiff", "test/good/gt/000.png"]
        + [
            f"test/bad/{k}/{i}.{e}"
            for i in ("001", "002")
            for k, e in (("rgb", "png"), ("xyz", "tiff"), ("gt", "png"))
        ]
    )
    sdata = src / "CandyCane" / "test_public" / "data"
    for kind, sid in (("good", "00"), ("bad", "01"), ("bad", "02")):
        out = root / "test" / kind
        assert (out / "rgb" / f"0{sid}.png").read_bytes() == (
            sdata / f"{sid}_image_4.png"
        ).read_bytes()
        gt = np.asarray(Image.open(out / "gt" / f"0{sid}.png"))
        src_mask = np.asarray(Image.open(sdata / f"{sid}_mask.png"))
        np.testing.assert_array_equal(gt, np.where(src_mask > 0, 255, 0).astype(np.uint8))
    xyz = tifffile.imread(root / "train/good/xyz/001.tiff")
    assert xyz.dtype == np.float32 and xyz.shape == (H, W, 3)
    sdir = src / "CandyCane" / "train" / "data"
    ref = _reference_cloud(sdir / "001_depth.png", D_MIN, D_MAX, _pose(0.1))
    ref[~np.all(ref != 0, axis=-1)] = 0.0
    np.testing.assert_allclose(xyz.reshape(-1, 3), ref, rtol=1e-6, atol=1e-9)


def test_bad_inputs_are_named(tmp_path):
    src = tmp_path / "src"
    _make_dataset(src)
    data = src / "CandyCane" / "val" / "data"
    (data / "00_info_depth.yaml").unlink()
    with pytest.raises(FileNotFoundError, match=r"00_info_depth\.yaml"):
        ec.convert_eyecandies(src, tmp_path / "dst", ["CandyCane"])
    with pytest.raises(ValueError, match="inside the source"):
        ec.convert_eyecandies(src, src / "out", ["CandyCane"])
    with pytest.raises(ValueError, match="unknown classes"):
        ec.convert_eyecandies(src, tmp_path / "dst", ["Candy"])

    one = tmp_path / "one"
    _write_sample(one, "000", _scene_depth(), np.zeros((H, W)), 0)
    (one / "000_depth.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # corrupt
    with pytest.raises(ValueError, match=r"000_depth\.png.*cannot decode"):
        ec.read_sample(one, "000", with_mask=False)
    Image.fromarray(np.full((H, W), 7, np.uint8)).save(one / "000_depth.png")  # 8-bit depth
    with pytest.raises(ValueError, match=r"000_depth\.png.*16-bit"):
        ec.read_sample(one, "000", with_mask=False)
    Image.fromarray(_depth_png(_scene_depth())).save(one / "000_depth.png")
    (one / "000_pose.txt").write_text("1 0 0\n0 1 0\n0 0 1\n")
    with pytest.raises(ValueError, match=r"000_pose\.txt.*4x4"):
        ec.read_sample(one, "000", with_mask=False)
    (one / "000_pose.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"000_pose\.txt"):
        ec.read_sample(one, "000", with_mask=False)

    bad_yaml = tmp_path / "x.yaml"
    bad_yaml.write_text("normalization:\n  min: 2.0\n  max: 1.0\n")
    with pytest.raises(ValueError, match=r"x\.yaml"):
        ec.read_depth_range(bad_yaml)
    bad_yaml.write_text("depth_min: 0.25\ndepth_max: 0.75\n")  # not the Eyecandies key
    with pytest.raises(ValueError, match=r"x\.yaml.*normalization"):
        ec.read_depth_range(bad_yaml)
    bad_yaml.write_text("normalization: [1, 2\n")
    with pytest.raises(ValueError, match=r"x\.yaml.*YAML"):
        ec.read_depth_range(bad_yaml)


def test_eyecandies_config_prepares_through_the_mvtec_pipeline(tmp_path):
    from configs.eyecandies import get_config
    from lsfa_jax.data import pipeline, prepare

    src = tmp_path / "eyecandies"
    _make_dataset(src)
    before = _hashes(src)
    config = get_config()
    assert config.data.preprocess is False  # the conversion already removed the table
    config.data_dir = str(src)
    config.data.classes = "CandyCane"
    config.data.image_size = 8
    config.data.num_workers = 1
    prepared = prepare.prepare_dataset(config.data, tmp_path / "cache")
    batch = next(pipeline.make_batches(prepared, "CandyCane", "test", 8))
    assert batch["xyz"].shape == (3, 8, 8, 3)
    assert batch["label"].tolist() == [1, 1, 0]  # test/bad (2 samples) then test/good
    # Only the NEAR slab survives the resize: every kept point is valid, the rest (0, 0, 0).
    xyz = batch["xyz"]
    nonzero = np.any(xyz != 0, axis=-1)
    assert 0 < nonzero.sum() < nonzero.size
    np.testing.assert_array_equal(nonzero, np.all(xyz != 0, axis=-1))
    assert pipeline.num_examples(prepared, "CandyCane", "train") == 2
    assert _hashes(src) == before
    marker = tmp_path / f"cache/eyecandies_mvtec-{ec.CONVERSION}/CandyCane/CONVERTED.json"
    assert json.loads(marker.read_text())["conversion"] == ec.CONVERSION
    assert prepare.cache_key(config.data, "CandyCane")["eyecandies_conversion"] == ec.CONVERSION
    # A second call reuses the conversion and the prepared data.
    assert prepare.prepare_dataset(config.data, tmp_path / "cache") == prepared
