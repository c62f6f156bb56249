"""Own parts: the folder dataset, the portable model folder, mode=test, predict with ground
truth, and results that do not depend on which other classes ran."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs.folder import get_config as folder_config
from configs.synthetic import get_config as synthetic_config
from lsfa_jax import model_folder
from lsfa_jax.data import folder, synthetic
from lsfa_jax.data.mvtec3d import DataError
from lsfa_jax.jobs import run_job
from lsfa_jax.jobs.common import ConfigError
from tests.helpers.tiny import shrink

pytestmark = pytest.mark.slow


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def _pair(type_dir: Path, stem: str, rgb_suffix: str = ".png", xyz_suffix: str = ".tiff") -> None:
    _touch(type_dir / "rgb" / f"{stem}{rgb_suffix}")
    _touch(type_dir / "xyz" / f"{stem}{xyz_suffix}")


def _listing_root(tmp_path: Path, n_train: int = 10) -> Path:
    root = tmp_path / "parts"
    for i in range(n_train):
        _pair(root / "housing" / "train" / "good", f"{i:03d}", ".JPG" if i % 2 else ".png")
    _pair(root / "housing" / "test" / "good", "g0")
    _pair(root / "housing" / "test" / "scratch on lid", "s0", ".jpeg", ".TIF")
    _touch(root / "housing" / "test" / "scratch on lid" / "gt" / "s0.png")
    _touch(root / "not_a_class" / "readme.txt")
    return root


def _list(root: Path, split: str, seed: int = 0) -> list:
    return folder.list_folder_samples(root, "housing", split, validation_fraction=0.2, seed=seed)


def test_folder_reader_free_names_any_suffix_case_and_held_out_validation(tmp_path: Path) -> None:
    root = _listing_root(tmp_path)
    assert folder.folder_classes(root) == ("housing",)
    test = _list(root, "test")
    assert [(s.defect_type, s.file_id) for s in test] == [
        ("good", "test/good/g0"),
        ("scratch on lid", "test/scratch on lid/s0"),
    ]
    assert test[1].rgb_path.name == "s0.jpeg" and test[1].xyz_path.name == "s0.TIF"
    assert test[1].gt_path.name == "s0.png" and folder.has_masks(test)
    train, validation = _list(root, "train"), _list(root, "validation")
    # 20 % of 10 held out, disjoint from train, the same on every call, chosen by the seed.
    assert len(validation) == 2 and len(train) == 8
    assert {s.file_id for s in train}.isdisjoint({s.file_id for s in validation})
    assert all(s.split == "validation" and s.file_id.startswith("train/good/") for s in validation)
    assert [s.file_id for s in _list(root, "validation")] == [s.file_id for s in validation]
    chosen = [tuple(s.file_id for s in _list(root, "validation", seed)) for seed in range(8)]
    assert len(set(chosen)) > 1
    np.testing.assert_array_equal(
        folder.held_out("housing", 10, 0.2, 0), folder.held_out("housing", 10, 0.2, 0)
    )
    # A validation folder, when there is one, is used as it is and train keeps every sample.
    _pair(root / "housing" / "validation" / "good", "v0")
    assert [s.file_id for s in _list(root, "validation")] == ["validation/good/v0"]
    assert len(_list(root, "train")) == 10


def test_folder_reader_without_masks(tmp_path: Path) -> None:
    root = _listing_root(tmp_path)
    shutil.rmtree(root / "housing" / "test" / "scratch on lid" / "gt")
    test = _list(root, "test")
    assert test[1].gt_path is None and not folder.has_masks(test)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("rgb_without_xyz", r"rgb without xyz: \['extra'\]"),
        ("xyz_without_rgb", r"xyz without rgb: \['extra'\]"),
        ("two_files_one_stem", r"two files with the stem '000' \(000\.jpg, 000\.png\)"),
        ("partial_masks", r"1 defective samples have masks but 1 do not"),
    ],
)
def test_folder_reader_bad_layouts_name_the_folder(
    tmp_path: Path, breakage: str, message: str
) -> None:
    root = _listing_root(tmp_path)
    train_good = root / "housing" / "train" / "good"
    split = "train"
    if breakage == "rgb_without_xyz":
        _touch(train_good / "rgb" / "extra.png")
    elif breakage == "xyz_without_rgb":
        _touch(train_good / "xyz" / "extra.tiff")
    elif breakage == "two_files_one_stem":
        _touch(train_good / "rgb" / "000.jpg")
    else:
        _pair(root / "housing" / "test" / "dent", "d0")
        split = "test"
    with pytest.raises(DataError, match=message):
        _list(root, split)


def test_folder_reader_needs_train_good(tmp_path: Path) -> None:
    root = _listing_root(tmp_path)
    (root / "bare" / "test").mkdir(parents=True)
    with pytest.raises(DataError, match=r"bare/train/good: folder not found"):
        folder.list_folder_samples(root, "bare", "test", validation_fraction=0.2, seed=0)
    with pytest.raises(DataError, match="no class folder with train/good"):
        folder.folder_classes(root / "bare")


# --- end to end on generated data ----------------------------------------------------------------


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic samples laid out as own data: classes `my_part` and `other_part`, no
    validation folder (held out), one class's rgb as JPEG."""
    root = tmp_path_factory.mktemp("own")
    syn = synthetic.SyntheticConfig.from_mapping(
        dict(synthetic_config().data.synthetic.to_dict())
        | dict(
            classes=("box", "torus"),
            image_size=64,
            num_train=6,
            num_validation=2,
            num_test_good=2,
            num_test_per_defect=1,
        )
    )
    raw = synthetic.generate_dataset(root / "raw", syn)
    parts = root / "parts"
    for source, name in (("box", "my_part"), ("torus", "other_part")):
        shutil.copytree(raw / source, parts / name, ignore=shutil.ignore_patterns("validation"))
    for png in (parts / "other_part" / "train" / "good" / "rgb").glob("*.png"):
        Image.open(png).save(png.with_suffix(".JPG"), quality=95)
        png.unlink()
    return parts


def _folder_run(parts: Path, method: str, classes: str) -> ml_collections.ConfigDict:
    config = shrink(folder_config())
    config.method = method
    config.data_dir = str(parts)
    config.data.classes = classes
    return config


def _scores(workdir: Path, class_name: str) -> dict:
    return json.loads((workdir / "scores" / f"{class_name}.json").read_text())


def _moved_model(workdir: Path, tmp_path: Path) -> Path:
    moved = tmp_path / "elsewhere" / "model"
    moved.parent.mkdir()
    shutil.move(workdir / "model", moved)
    return moved


@pytest.mark.parametrize("method", ["fpfh", "lsfa"])
def test_saved_model_moved_then_tested_and_predicted_gives_the_run_numbers(
    parts: Path, tmp_path: Path, method: str, capsys: pytest.CaptureFixture
) -> None:
    config = _folder_run(parts, method, "my_part")
    trained = tmp_path / "train"
    run_job(config, trained)
    first = _scores(trained, "my_part")
    assert "held out as the validation split" in (trained / "run.log").read_text()
    moved = _moved_model(trained, tmp_path)
    info = json.loads((moved / "model.json").read_text())
    assert info["format_version"] == model_folder.FORMAT_VERSION
    assert str(trained) not in json.dumps(info["scoring"]) + json.dumps(info.get("adaptors"))
    assert (moved / "adaptors" / "params.npz").is_file() == (method == "lsfa")
    shutil.rmtree(trained / "adaptation", ignore_errors=True)  # the model needs none of it

    test_config = folder_config()
    test_config.update(mode="test", checkpoint=str(moved), data_dir=str(parts))
    tested = tmp_path / "test"
    capsys.readouterr()
    run_job(test_config, tested)
    assert _scores(tested, "my_part") == first
    # The method comes from the model folder, so the run's first line names the model.
    assert capsys.readouterr().out.startswith(f"test, model {moved}, folder: output in")
    for name in ("results.json", "thresholds.json", "per_defect.json"):
        assert (tested / "results" / name).read_text() == (trained / "results" / name).read_text()
    assert (tested / "plots" / "my_part_roc.png").is_file()
    assert not (tested / "cache" / "features" / "my_part-train").exists()

    predict_config = folder_config()
    predict_config.update(
        mode="predict", checkpoint=str(moved), input=str(parts / "my_part" / "test")
    )
    predicted = tmp_path / "predict"
    run_job(predict_config, predicted)
    rows = json.loads((predicted / "predictions.json").read_text())
    main = "RGB+3D" if method == "lsfa" else "3D"
    assert [r["name"] for r in rows] == [
        i.split("/", 1)[1].replace("/", "_") for i in first["file_id"]
    ]
    np.testing.assert_array_equal([r["score"] for r in rows], first[main])
    assert (
        json.loads((predicted / "results" / "results.json").read_text())["metrics"]
        == (json.loads((trained / "results" / "results.json").read_text())["metrics"])
    )


def test_without_masks_only_image_metrics(parts: Path, tmp_path: Path) -> None:
    unmasked = tmp_path / "unmasked"
    shutil.copytree(parts / "my_part", unmasked / "my_part")
    for gt in unmasked.glob("my_part/test/*/gt"):
        shutil.rmtree(gt)
    config = _folder_run(unmasked, "fpfh", "my_part")
    run_job(config, tmp_path / "work")
    metrics = json.loads((tmp_path / "work" / "results" / "results.json").read_text())["metrics"]
    cell = metrics["p_auroc"]["3D"]["my_part"]
    assert cell["value"] is None and "no ground-truth masks" in " ".join(cell["notes"])
    assert metrics["i_auroc"]["3D"]["my_part"]["value"] is not None
    assert not (tmp_path / "work" / "plots" / "my_part_pro.png").exists()


def test_a_class_scores_the_same_whatever_other_classes_ran(parts: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    both = _folder_run(parts, "fpfh", "my_part,other_part")
    both.cache_dir = str(cache)
    run_job(both, tmp_path / "both")
    alone = _folder_run(parts, "fpfh", "other_part")
    alone.cache_dir = str(cache)
    run_job(alone, tmp_path / "alone")
    assert _scores(tmp_path / "alone", "other_part") == _scores(tmp_path / "both", "other_part")


def test_bad_model_folders_are_refused(parts: Path, tmp_path: Path) -> None:
    config = _folder_run(parts, "fpfh", "my_part")
    run_job(config, tmp_path / "train")
    model = tmp_path / "train" / "model"
    test_config = folder_config()
    test_config.update(mode="test", checkpoint=str(model), data_dir=str(parts))

    test_config.data.classes = "other_part"
    with pytest.raises(ConfigError, match=r"holds \['my_part'\], not \['other_part'\]"):
        run_job(test_config, tmp_path / "t1")
    test_config.data.classes = "all"

    eval_config = _folder_run(parts, "lsfa", "my_part")
    eval_config.update(mode="eval", checkpoint=str(model))
    with pytest.raises(
        ConfigError, match=r"is a model folder: evaluate it with --config\.mode=test"
    ):
        run_job(eval_config, tmp_path / "t2")

    (tmp_path / "train" / "adaptation" / "checkpoints").mkdir(parents=True)
    test_config.checkpoint = str(tmp_path / "train" / "adaptation")
    with pytest.raises(model_folder.ModelFolderError, match="adaptor checkpoint folder"):
        run_job(test_config, tmp_path / "t3")
    test_config.checkpoint = str(model)

    record = json.loads((model / "model.json").read_text())
    (model / "model.json").write_text(json.dumps({**record, "format_version": 1}))
    with pytest.raises(model_folder.ModelFolderError, match=r"format 1.*older lsfa-jax"):
        run_job(test_config, tmp_path / "t4")
    (model / "model.json").write_text(json.dumps(record))

    (model / "my_part" / "xyz.npz").unlink()
    with pytest.raises(model_folder.ModelFolderError, match=r"incomplete model folder.*xyz\.npz"):
        run_job(test_config, tmp_path / "t5")


def test_weights_other_than_the_models_are_refused_with_both_hashes(tmp_path: Path) -> None:
    trained, other = tmp_path / "trained.pth", tmp_path / "other.pth"
    trained.write_bytes(b"weights the model was trained with")
    other.write_bytes(b"other weights")
    info = model_folder.ModelInfo(
        method="lsfa",
        modalities=("rgb", "xyz"),
        classes=("a",),
        feature_fingerprint="x",
        weights={
            "rgb": model_folder.WeightsRecord(
                model_folder.weights_digest(trained), str(trained), False
            ),
            "point": model_folder.WeightsRecord(None, None, True),
        },
        scoring={},
        config={},
    )
    model_folder.check_weights(info, "rgb", str(trained), tmp_path)
    moved = tmp_path / "moved.pth"
    shutil.copy(trained, moved)
    model_folder.check_weights(info, "rgb", str(moved), tmp_path)  # the hash, not the path
    expected = model_folder.weights_digest(other)
    with pytest.raises(model_folder.ModelFolderError, match=f"sha256 {expected} differs"):
        model_folder.check_weights(info, "rgb", str(other), tmp_path)
    with pytest.raises(model_folder.ModelFolderError, match=r"set --config\.rgb_weights"):
        model_folder.check_weights(info, "rgb", "", tmp_path)
    with pytest.raises(model_folder.ModelFolderError, match="randomly initialised point"):
        model_folder.check_weights(info, "point", str(other), tmp_path)


def test_a_mask_of_another_size_names_the_file(parts: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(parts / "my_part", broken / "my_part")
    mask = next((broken / "my_part" / "test").glob("geometric/gt/*.png"))
    Image.new("L", (10, 10)).save(mask)
    config = _folder_run(broken, "fpfh", "my_part")
    with pytest.raises(DataError, match=f"{mask.name}: mask shape \\(10, 10\\)"):
        run_job(config, tmp_path / "work")
