"""Robustness: every kind of bad input gets an error naming the file and the problem, or a
documented, tested behaviour (docs/what_happens_when.md lists the cases and points here).

Bad inputs are built from a copy of the tiny synthetic dataset of conftest.py, laid out as the
MVTec 3D-AD class `bagel` so the real `mvtec3d` readers and TFDS builder are exercised.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
import tifffile
import torch
from absl import flags
from ml_collections import config_flags
from PIL import Image

from configs.base import get_base_config
from lsfa_jax import metrics
from lsfa_jax.adaptation.checkpointing import (
    CheckpointCorruptError,
    Checkpointer,
    load_adaptor_params,
)
from lsfa_jax.data import mvtec3d, preprocess
from lsfa_jax.features import fpfh, point_mae_grid
from lsfa_jax.jobs import run_evaluation, run_job
from lsfa_jax.jobs.common import ConfigError, prepare_workdir
from lsfa_jax.mesh import make_mesh
from lsfa_jax.models import checkpoint_io, point_mae, vit
from lsfa_jax.reports import tables

REPO = Path(__file__).resolve().parents[1]
TINY_POINT = dict(
    num_group=8, group_size=4, trans_dim=16, depth=1, num_heads=2, mlp_ratio=2, out_layers=(0,)
)


@pytest.fixture
def bagel_root(synthetic_root: Path, tmp_path: Path) -> Path:
    """A private, writable MVTec-layout copy: synthetic `torus` renamed to class `bagel`."""
    root = tmp_path / "mvtec"
    shutil.copytree(synthetic_root / "torus", root / "bagel")
    return root


def _prepare_config(root: Path, **overrides) -> ml_collections.ConfigDict:
    config = get_base_config()
    config.mode = "prepare"
    config.data_dir = str(root)
    config.data.classes = "bagel"
    config.data.image_size = 32
    config.data.preprocess = False
    config.data.num_workers = 1
    for key, value in overrides.items():
        config[key] = value
    return config


def _first(root: Path, split: str, kind: str, modality: str, suffix: str) -> Path:
    return sorted((root / "bagel" / split / kind / modality).glob(f"*{suffix}"))[0]


# --- dataset layout -----------------------------------------------------------------------------


def test_missing_dataset_folder_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dataset"
    with pytest.raises(mvtec3d.DataError, match=f"{missing}: MVTec 3D-AD folder not found"):
        run_job(_prepare_config(missing), tmp_path / "work")


def test_class_folder_missing_is_named(tmp_path: Path) -> None:
    (tmp_path / "mvtec").mkdir()
    with pytest.raises(mvtec3d.DataError, match="class 'bagel' folder not found"):
        mvtec3d.list_samples(tmp_path / "mvtec", "bagel", "train")


def test_wrong_layout_split_without_rgb_folder(bagel_root: Path) -> None:
    shutil.rmtree(bagel_root / "bagel" / "validation" / "good" / "rgb")
    expected = bagel_root / "bagel" / "validation" / "good" / "rgb"
    with pytest.raises(mvtec3d.DataError, match=f"{expected}: sample folder not found"):
        mvtec3d.list_samples(bagel_root, "bagel", "validation")


def test_unpaired_rgb_and_xyz_files_are_listed(bagel_root: Path) -> None:
    xyz = _first(bagel_root, "train", "good", "xyz", ".tiff")
    xyz.rename(xyz.with_name("999.tiff"))
    with pytest.raises(mvtec3d.DataError, match=r"do not line up \(only in rgb: \['000'\]"):
        mvtec3d.list_samples(bagel_root, "bagel", "train")


def test_defect_without_gt_mask_is_named(bagel_root: Path) -> None:
    gt = _first(bagel_root, "test", "geometric", "gt", ".png")
    gt.unlink()
    with pytest.raises(mvtec3d.DataError, match=f"{gt}: ground-truth mask missing"):
        mvtec3d.list_samples(bagel_root, "bagel", "test")


def test_class_without_training_samples(bagel_root: Path, tmp_path: Path) -> None:
    for modality in ("rgb", "xyz"):
        for path in (bagel_root / "bagel" / "train" / "good" / modality).iterdir():
            path.unlink()
    train_dir = bagel_root / "bagel" / "train"
    with pytest.raises(mvtec3d.DataError, match=f"{train_dir}: the train split holds no samples"):
        run_job(_prepare_config(bagel_root), tmp_path / "work")


def test_unknown_class_is_a_config_error(bagel_root: Path, tmp_path: Path) -> None:
    config = _prepare_config(bagel_root)
    config.data.classes = "bagel,bagle"
    with pytest.raises(
        ConfigError, match=r"config.data.classes: unknown mvtec3d classes \['bagle'\]"
    ):
        run_job(config, tmp_path / "work")


# --- image and cloud files ----------------------------------------------------------------------


def test_rgb_and_xyz_of_different_sizes(bagel_root: Path, tmp_path: Path) -> None:
    xyz_path = _first(bagel_root, "train", "good", "xyz", ".tiff")
    tifffile.imwrite(xyz_path, np.ones((48, 64, 3), np.float32), photometric="rgb")
    with pytest.raises(mvtec3d.DataError, match=r"cloud size \(48, 64\) does not match"):
        run_job(_prepare_config(bagel_root), tmp_path / "work")


def test_truncated_png_is_named(bagel_root: Path) -> None:
    png = _first(bagel_root, "train", "good", "rgb", ".png")
    png.write_bytes(png.read_bytes()[:200])
    with pytest.raises(mvtec3d.DataError, match=f"{png}: unreadable or truncated image"):
        mvtec3d.read_rgb(png)


def test_garbage_png_is_named(tmp_path: Path) -> None:
    png = tmp_path / "000.png"
    png.write_bytes(b"this is not an image at all")
    with pytest.raises(mvtec3d.DataError, match=f"{png}: unreadable or truncated image"):
        mvtec3d.read_rgb(png)


def test_16bit_png_is_rejected_not_rescaled(tmp_path: Path) -> None:
    png = tmp_path / "000.png"
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(png)
    with pytest.raises(mvtec3d.DataError, match=f"{png}: unsupported image mode"):
        mvtec3d.read_rgb(png)


def test_truncated_tiff_is_named(bagel_root: Path) -> None:
    tiff = _first(bagel_root, "train", "good", "xyz", ".tiff")
    tiff.write_bytes(tiff.read_bytes()[:100])
    with pytest.raises(mvtec3d.DataError, match=f"{tiff}: unreadable or truncated tiff"):
        mvtec3d.read_xyz(tiff)


@pytest.mark.parametrize(
    ("array", "problem"),
    [
        (np.ones((8, 8, 3), np.int16), "expected float32 or float64 coordinates, got int16"),
        (np.ones((8, 8), np.float32), r"expected an organized cloud \(H, W, 3\)"),
        (np.ones((8, 8, 4), np.float32), r"expected an organized cloud \(H, W, 3\)"),
    ],
)
def test_wrong_dtype_or_shape_tiff(tmp_path: Path, array: np.ndarray, problem: str) -> None:
    tiff = tmp_path / "000.tiff"
    tifffile.imwrite(tiff, array, photometric="minisblack")
    with pytest.raises(mvtec3d.DataError, match=f"{tiff}: {problem}"):
        mvtec3d.read_xyz(tiff)


def test_bad_file_in_a_prepare_run_names_the_file(bagel_root: Path, tmp_path: Path) -> None:
    png = _first(bagel_root, "validation", "good", "rgb", ".png")
    png.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(mvtec3d.DataError, match=f"{png}: unreadable or truncated image"):
        run_job(_prepare_config(bagel_root), tmp_path / "work")


def test_skip_bad_samples_reports_every_bad_file_once(
    bagel_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = [
        _first(bagel_root, "train", "good", "rgb", ".png"),
        _first(bagel_root, "test", "good", "xyz", ".tiff"),
    ]
    for path in bad:
        path.write_bytes(b"broken")
    work = tmp_path / "work"
    run_job(_prepare_config(bagel_root, skip_bad_samples=True), work)
    report = capsys.readouterr().out + (work / "run.log").read_text()
    for path in bad:
        assert report.count(str(path)) == 1, f"{path} should be reported exactly once"
    summary = (work / "dataset_summary.md").read_text()
    assert "| bagel | train | good | 3 |" in summary  # 4 generated, 1 skipped


def test_nan_and_inf_in_xyz_become_missing_points(tmp_path: Path) -> None:
    xyz = np.full((6, 5, 3), 0.5, np.float32)
    xyz[0, 0, 1] = np.nan
    xyz[2, 3] = np.inf
    xyz[5, 4, 2] = -np.inf
    tiff = tmp_path / "000.tiff"
    tifffile.imwrite(tiff, xyz, photometric="rgb")
    out, count = mvtec3d.read_xyz_counted(tiff)
    assert count == 3
    expected = xyz.copy()
    expected[[0, 2, 5], [0, 3, 4]] = 0.0
    np.testing.assert_array_equal(out, expected)
    assert np.isfinite(tifffile.imread(tiff)).sum() == xyz.size - 5  # the file is untouched


# --- clouds too small for the point backbone ----------------------------------------------------


def _point_variables() -> dict:
    return point_mae.init_random_point_mae_variables(jax.random.PRNGKey(0), TINY_POINT)


def test_cloud_empty_after_preprocessing_is_named() -> None:
    clouds = np.zeros((2, 16, 16, 3), np.float32)
    clouds[0, 4:12, 4:12] = np.random.default_rng(0).uniform(0.1, 1.0, (8, 8, 3))
    with pytest.raises(ValueError, match=r"test/good/001\[1\]: only 0 valid points"):
        point_mae_grid.point_mae_patch_grid_batch(
            _point_variables(), clouds, TINY_POINT, grid_size=4, name="test/good/001"
        )


def test_cloud_with_fewer_points_than_group_size_is_named() -> None:
    cloud = np.zeros((16, 16, 3), np.float32)
    cloud[0, :3] = [[0.1, 0.2, 0.6], [0.2, 0.1, 0.6], [0.3, 0.3, 0.7]]
    with pytest.raises(
        ValueError, match=r"sample-7\[0\]: only 3 valid points, fewer than group_size=4"
    ):
        point_mae_grid.point_mae_patch_grid(
            _point_variables(), cloud, TINY_POINT, grid_size=4, name="sample-7"
        )


def test_cloud_with_fewer_points_than_groups_is_documented_and_finite() -> None:
    """group_size <= points < num_group: allowed (FPS repeats centres), features stay finite."""
    cloud = np.zeros((16, 16, 3), np.float32)
    cloud[5, 2:8] = np.random.default_rng(1).uniform(0.1, 1.0, (6, 3))
    features, foreground = point_mae_grid.point_mae_patch_grid(
        _point_variables(), cloud, TINY_POINT, grid_size=4
    )
    assert np.all(np.isfinite(np.asarray(features)))
    foreground = np.asarray(foreground).reshape(4, 4)
    # The 6 points lie in grid cells (1, 0) and (1, 1) (4 pixels per cell); the grid projection
    # smooths over neighbouring cells, so the foreground covers those and stays within one cell.
    assert foreground[1, 0] and foreground[1, 1]
    reach = np.zeros((4, 4), bool)
    reach[0:3, 0:3] = True
    assert not np.any(foreground & ~reach)


def test_cloud_that_is_only_the_support_plane_becomes_empty_and_is_named() -> None:
    """Plane removal may leave nothing (documented: kept as an empty cloud, counted in the info);
    the feature step then fails naming the sample instead of producing features of nothing."""
    v, u = np.mgrid[0:32, 0:32].astype(np.float32)
    xyz = np.stack([(u - 16) * 0.003, (v - 16) * 0.003, 0.6 + 0.001 * u], axis=-1)
    rgb = np.full((32, 32, 3), 200, np.uint8)
    out_xyz, out_rgb, info = preprocess.remove_support_plane(
        xyz, rgb, preprocess.PlaneRemovalParams(), seed=0
    )
    assert info.skipped is None and info.num_kept == 0
    assert not out_xyz.any() and not out_rgb.any()
    assert xyz.any() and rgb.all()  # inputs are not modified
    with pytest.raises(ValueError, match="test/good/000: fpfh_patch_features: no valid points"):
        fpfh.fpfh_patch_features(out_xyz, name="test/good/000", grid_size=8)


# --- ground-truth masks -------------------------------------------------------------------------


def test_gt_codes_other_than_255_count_as_defect(tmp_path: Path) -> None:
    codes = np.array([[0, 1, 128], [252, 253, 255]], np.uint8)
    png = tmp_path / "000.png"
    Image.fromarray(codes, "L").save(png)
    np.testing.assert_array_equal(mvtec3d.read_gt(png, (2, 3)), codes > 0)


def test_gt_of_wrong_size_is_named(bagel_root: Path, tmp_path: Path) -> None:
    gt = _first(bagel_root, "test", "colour", "gt", ".png")
    Image.fromarray(np.full((32, 32), 255, np.uint8), "L").save(gt)
    with pytest.raises(mvtec3d.DataError, match=rf"{gt}: mask shape \(32, 32\) does not match"):
        run_job(_prepare_config(bagel_root), tmp_path / "work")


def test_gt_in_rgb_mode_is_rejected(tmp_path: Path) -> None:
    png = tmp_path / "000.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8), "RGB").save(png)
    with pytest.raises(mvtec3d.DataError, match=f"{png}: unsupported image mode 'RGB'"):
        mvtec3d.read_gt(png, (4, 4))


# --- a test split without defects ---------------------------------------------------------------


def test_test_split_without_defects_gives_nan_with_a_note() -> None:
    rng = np.random.default_rng(0)
    labels = np.zeros(5, np.int32)
    result = metrics.evaluate_class(
        labels, rng.normal(size=5), np.zeros((5, 8, 8), np.uint8), rng.normal(size=(5, 8, 8))
    )
    assert math.isnan(result.i_auroc) and math.isnan(result.p_auroc)
    assert math.isnan(result.aupro_30) and math.isnan(result.aupro_01)
    assert "I-AUROC undefined: the test split has no defective sample" in result.notes
    assert "P-AUROC and AUPRO undefined: no defect pixel in any mask" in result.notes

    results = {"3D": {"bagel": result.values()}}
    text = tables.format_console_table(results, notes={"3D": {"bagel": result.notes}})
    assert "nan" not in text.lower()
    assert "n/a 3D/bagel: I-AUROC undefined: the test split has no defective sample" in text
    with pytest.raises(ValueError, match="bagel/i_auroc is NaN without a note"):
        tables.format_console_table(results)


# --- checkpoints --------------------------------------------------------------------------------


def _vit_cfg() -> vit.ViTConfig:
    return vit.vit_config(dict(patch_size=8, embed_dim=32, depth=1, num_heads=2, img_size=32))


def test_truncated_pth_is_named(tmp_path: Path) -> None:
    path = tmp_path / "dino.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 32), "pos_embed": torch.zeros(1, 17, 32)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(checkpoint_io.CheckpointError, match=f"{path}: not a PyTorch zip"):
        vit.load_vit_params(path, _vit_cfg())


def test_corrupt_safetensors_is_named(tmp_path: Path) -> None:
    path = tmp_path / "dino.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(checkpoint_io.CheckpointError, match=f"{path}: cannot read safetensors"):
        vit.load_vit_params(path, _vit_cfg())


def test_pointmae_checkpoint_given_as_rgb_backbone(tmp_path: Path) -> None:
    path = tmp_path / "pretrain.pth"
    torch.save(
        {"base_model": {"encoder.first_conv.0.weight": torch.zeros(128, 3, 1)}, "epoch": 300},
        path,
    )
    with pytest.raises(checkpoint_io.CheckpointError, match=f"{path}: non-tensor top-level"):
        vit.load_vit_params(path, _vit_cfg())


def test_checkpoint_of_the_wrong_model_lists_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"encoder.first_conv.0.weight": torch.zeros(128, 3, 1)}, path)
    with pytest.raises(checkpoint_io.CheckpointError) as info:
        vit.load_vit_params(path, _vit_cfg())
    message = str(info.value)
    assert message.startswith(f"{path}: checkpoint does not match the model")
    assert "missing keys" in message and "patch_embed.proj.weight" in message
    assert "unexpected keys (1): encoder.first_conv.0.weight" in message


def test_unknown_checkpoint_extension(tmp_path: Path) -> None:
    path = tmp_path / "weights.h5"
    path.write_bytes(b"x")
    with pytest.raises(checkpoint_io.CheckpointError, match=f"{path}: unknown checkpoint ext"):
        checkpoint_io.load_state_dict(path)


def _saved_adaptor_checkpoint(directory: Path) -> np.ndarray:
    params = np.random.default_rng(0).normal(size=512).astype(np.float32)
    checkpointer = Checkpointer(directory)
    checkpointer.save(3, {"params": {"w": params}, "step": np.int32(3)})
    checkpointer.close()
    return params


def _largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_truncated_adaptor_checkpoint_raises_naming_the_folder(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    _saved_adaptor_checkpoint(directory)
    data = _largest_file(directory)
    data.write_bytes(data.read_bytes()[:64])
    # orbax raises a bare Exception whose message holds the TensorStore spec with the path.
    with pytest.raises(Exception, match=str(directory.resolve())):
        load_adaptor_params(directory)


def test_bit_flip_in_adaptor_checkpoint_is_detected(tmp_path: Path) -> None:
    """orbax's data files carry no checksum; the digest saved with each step catches this."""
    directory = tmp_path / "checkpoints"
    _saved_adaptor_checkpoint(directory)
    data = _largest_file(directory)
    content = bytearray(data.read_bytes())
    content[len(content) // 2] ^= 0xFF
    data.write_bytes(bytes(content))
    step_dir = directory.resolve() / "3"
    with pytest.raises(CheckpointCorruptError, match=f"{step_dir}: checkpoint data do not match"):
        load_adaptor_params(directory)


def test_adaptor_checkpoint_folder_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        load_adaptor_params(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint steps found"):
        load_adaptor_params(tmp_path / "empty")


def test_eval_with_a_checkpoint_trained_with_other_adaptor_settings(tmp_path: Path) -> None:
    """mode=eval must not apply a checkpoint with head counts it was not trained with."""
    checkpoints = tmp_path / "adaptation" / "checkpoints"
    _saved_adaptor_checkpoint(checkpoints)
    trained = get_base_config().adaptation
    trained.rgb_heads = 2
    (tmp_path / "adaptation" / "adaptation_config.json").write_text(trained.to_json())
    config = get_base_config()
    config.update(mode="eval", method="lsfa", checkpoint=str(checkpoints))
    config.adaptation.rgb_heads = 4
    try:
        _, settings = run_evaluation.load_or_train_adaptors(
            config, None, ("bagel",), tmp_path, None, make_mesh()
        )
    except ConfigError as error:
        assert "rgb_heads" in str(error) and str(checkpoints) in str(error)
    else:
        assert settings.rgb_heads == 2


# --- config -------------------------------------------------------------------------------------


def _parse(args: list[str]) -> ml_collections.ConfigDict:
    """Parses a command line the way main.py does (override flags come from the argv)."""
    argv = ["main.py", f"--config={REPO / 'configs/synthetic.py'}", *args]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "config", flag_values=flag_values, sys_argv=argv
    )
    flag_values(argv)
    return flag_values.config


def test_config_override_parses() -> None:
    config = _parse(["--config.seed=3", "--config.adaptation.lr=0.5"])
    assert config.seed == 3 and config.data.seed == 3 and config.adaptation.lr == 0.5
    with pytest.raises(AttributeError):  # the loaded config is locked: typos do not pass
        config.adaptation.learning_rate = 0.1


@pytest.mark.parametrize(
    "override",
    ["--config.no_such_key=1", "--config.adaptation.learning_rate=0.1", "--config.data.clases=x"],
)
def test_config_unknown_key_is_rejected(override: str) -> None:
    key = override.split("=")[0].rsplit(".", 1)[-1]
    with pytest.raises((KeyError, AttributeError), match=key):
        _parse([override])


@pytest.mark.parametrize(
    "override", ["--config.seed=zero", "--config.adaptation.lr=fast", "--config.data.preprocess=7"]
)
def test_config_wrong_type_is_rejected(override: str) -> None:
    with pytest.raises(flags.IllegalFlagValueError):
        _parse([override])


def test_config_wrong_type_in_python_is_rejected() -> None:
    config = get_base_config()
    with pytest.raises(TypeError):
        config.seed = "zero"
    with pytest.raises(TypeError):
        config.data.image_size = "large"


@pytest.mark.parametrize(("key", "value"), [("mode", "fit"), ("method", "patchcore")])
def test_unknown_mode_or_method(tmp_path: Path, key: str, value: str) -> None:
    config = get_base_config()
    config[key] = value
    with pytest.raises(ConfigError, match=f"config.{key}={value!r}: use one of"):
        run_job(config, tmp_path / "work")
    assert not (tmp_path / "work").exists()  # checked before anything is written


# --- workdir ------------------------------------------------------------------------------------


def test_workdir_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=f"workdir {blocker / 'work'}: not writable"):
        prepare_workdir(blocker / "work")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through missing permissions")
def test_workdir_without_write_permission(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    work.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match=f"workdir {work}: not writable"):
            prepare_workdir(work)
    finally:
        work.chmod(0o700)


def test_prepare_reads_inputs_without_modifying_them(bagel_root: Path, tmp_path: Path) -> None:
    def snapshot() -> dict[str, tuple[int, bytes]]:
        return {
            str(p.relative_to(bagel_root)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(bagel_root.rglob("*"))
            if p.is_file()
        }

    before = snapshot()
    run_job(_prepare_config(bagel_root), tmp_path / "work")
    assert "| bagel | train | good | 4 |" in (tmp_path / "work" / "dataset_summary.md").read_text()
    assert snapshot() == before
