"""The command line a user meets: each bad input, run through `main.py` in a subprocess, ends
with a non-zero exit code, no traceback, and one message naming the file or key.

Bad datasets are a copy of conftest's tiny synthetic `torus` laid out as MVTec 3D-AD `bagel`;
method fpfh where the case is about the data (no weights needed).
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

REPO = Path(__file__).resolve().parents[1]
MVTEC = f"--config={REPO / 'configs/mvtec3d.py'}"
SYNTHETIC = f"--config={REPO / 'configs/synthetic.py'}"


def run_main(*args: str, cwd: Path, env: dict | None = None) -> tuple[int, str, float]:
    """(exit code, stdout + stderr, CPU seconds) of `python main.py args`.

    CPU time rather than wall time: on a loaded machine the wall time of the same work varies
    several-fold, its CPU time hardly at all.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [sys.executable, str(REPO / "main.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done.returncode, done.stdout + done.stderr, cpu


def assert_user_error(code: int, output: str, *names: str) -> None:
    assert code not in (0, 1), output  # 1 would be an uncaught exception
    assert "Traceback" not in output, output
    for name in names:
        assert name in output, (name, output)


@pytest.fixture
def bagel_root(synthetic_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "mvtec"
    shutil.copytree(synthetic_root / "torus", root / "bagel")
    return root


def data_args(root: Path, work: Path, *extra: str) -> list[str]:
    return [
        MVTEC,
        f"--workdir={work}",
        f"--config.data_dir={root}",
        "--config.data.classes=bagel",
        "--config.data.image_size=32",
        "--config.data.preprocess=False",
        "--config.grid_size=8",
        "--config.method=fpfh",
        "--config.mode=prepare",
        *extra,
    ]


def first(root: Path, split: str, kind: str, modality: str, suffix: str) -> Path:
    return sorted((root / "bagel" / split / kind / modality).glob(f"*{suffix}"))[0]


@pytest.mark.slow
def test_wrong_data_dir(tmp_path: Path) -> None:
    code, out, _ = run_main(*data_args(tmp_path / "nowhere", tmp_path / "w"), cwd=tmp_path)
    assert_user_error(code, out, str(tmp_path / "nowhere"), "config.data_dir")


@pytest.mark.slow
def test_unknown_class(bagel_root: Path, tmp_path: Path) -> None:
    args = data_args(bagel_root, tmp_path / "w", "--config.data.classes=bagle")
    code, out, _ = run_main(*args, cwd=tmp_path)
    assert_user_error(code, out, "config.data.classes", "bagle")


@pytest.mark.slow
def test_rgb_without_xyz(bagel_root: Path, tmp_path: Path) -> None:
    tiff = first(bagel_root, "train", "good", "xyz", ".tiff")
    tiff.unlink()
    code, out, _ = run_main(*data_args(bagel_root, tmp_path / "w"), cwd=tmp_path)
    assert_user_error(code, out, str(tiff.parent.parent), tiff.stem)
    assert not (tmp_path / "w" / "cache").exists()  # found by the early checks


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_png_is_named_once(bagel_root: Path, tmp_path: Path, workers: int) -> None:
    png = first(bagel_root, "test", "good", "rgb", ".png")
    png.write_bytes(png.read_bytes()[:40])
    args = data_args(bagel_root, tmp_path / "w", f"--config.data.num_workers={workers}")
    code, out, _ = run_main(*args, cwd=tmp_path)
    assert_user_error(code, out, str(png))
    assert out.count(str(png)) == 1, out  # one message, also from worker processes


@pytest.mark.slow
def test_tiff_of_wrong_shape(bagel_root: Path, tmp_path: Path) -> None:
    tiff = first(bagel_root, "validation", "good", "xyz", ".tiff")
    tifffile.imwrite(tiff, np.zeros((8, 8), np.float32))
    code, out, _ = run_main(*data_args(bagel_root, tmp_path / "w"), cwd=tmp_path)
    assert_user_error(code, out, str(tiff))


@pytest.mark.slow
def test_config_key_typo(tmp_path: Path) -> None:
    code, out, _ = run_main(SYNTHETIC, "--config.patchcore.coreset_ration=0.2", cwd=tmp_path)
    assert_user_error(code, out, "--config.patchcore.coreset_ration", "--config.mode=keys")


def test_config_wrong_type(tmp_path: Path) -> None:
    code, out, _ = run_main(SYNTHETIC, "--config.batch_size=eight", cwd=tmp_path)
    assert_user_error(code, out, "--config.batch_size", "eight")


@pytest.mark.slow
def test_unwritable_workdir(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, out, _ = run_main(SYNTHETIC, f"--workdir={blocker / 'work'}", cwd=tmp_path)
    assert_user_error(code, out, str(blocker / "work"), "not writable")


def weights_args(work: Path, weights: Path) -> list[str]:
    return [
        MVTEC,
        f"--workdir={work}",
        "--config.method=raw",
        f"--config.data_dir={work.parent / 'no_data_needed_yet'}",
        f"--config.rgb_weights={weights}",
    ]


@pytest.mark.slow
def test_missing_weights_fail_fast(tmp_path: Path, bagel_root: Path) -> None:
    args = weights_args(tmp_path / "w", tmp_path / "dino.pth")
    args[3] = f"--config.data_dir={bagel_root}"
    code, out, seconds = run_main(*args, "--config.data.classes=bagel", cwd=tmp_path)
    assert_user_error(code, out, "config.rgb_weights", str(tmp_path / "dino.pth"))
    assert seconds < 10, seconds


@pytest.mark.slow
def test_text_file_as_weights(tmp_path: Path, bagel_root: Path) -> None:
    text = tmp_path / "dino.pth"
    text.write_text("not a checkpoint\n")
    args = weights_args(tmp_path / "w", text)
    args[3] = f"--config.data_dir={bagel_root}"
    code, out, _ = run_main(*args, "--config.data.classes=bagel", cwd=tmp_path)
    assert_user_error(code, out, str(text), "not a PyTorch zip checkpoint")


@pytest.mark.slow
def test_model_folder_of_the_wrong_kind(tmp_path: Path, bagel_root: Path) -> None:
    wrong = tmp_path / "adaptation" / "checkpoints"  # the adaptor folder, not `model`
    wrong.mkdir(parents=True)
    sample = first(bagel_root, "test", "good", "xyz", ".tiff")
    code, out, _ = run_main(
        SYNTHETIC,
        f"--workdir={tmp_path / 'w'}",
        "--config.mode=predict",
        f"--config.checkpoint={wrong}",
        f"--config.input={sample}",
        cwd=tmp_path,
    )
    assert_user_error(code, out, str(wrong), "model.json")


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    code, out, _ = run_main(
        *data_args(tmp_path / "nowhere", tmp_path / "w"), cwd=tmp_path, env={"LSFA_DEBUG": "1"}
    )
    assert code != 0 and "Traceback" in out and "DataError" in out


@pytest.mark.slow
def test_help_lists_modes_methods_and_variants(tmp_path: Path) -> None:
    code, out, _ = run_main("--help", cwd=tmp_path)
    assert code == 0
    for word in ("train_eval", "predict", "fpfh", "eyecandies", "configs/mvtec3d.py", ":raw"):
        assert word in out, word
    code, out, _ = run_main(SYNTHETIC, "--config.mode=keys", cwd=tmp_path)
    assert code == 0
    assert "--config.patchcore.search='auto'" in out
    assert re.search(r"--config\.data\.image_size=224 +side of the square images", out), out


@pytest.mark.slow
def test_ctrl_c_says_how_to_resume(bagel_root: Path, tmp_path: Path) -> None:
    """SIGINT to the whole process group (what a terminal's Ctrl-C does) during preparation
    with worker processes: one message, exit code 130, no traceback from any process."""
    args = data_args(
        bagel_root, tmp_path / "w", "--config.data.num_workers=2", "--config.data.preprocess=True"
    )
    process = subprocess.Popen(
        [sys.executable, str(REPO / "main.py"), *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        start_new_session=True,
    )
    lines = []
    for line in process.stdout:  # the stage line comes before the long work
        lines.append(line)
        if line.startswith("preparing") or "/train:" in line:
            break
    os.killpg(process.pid, signal.SIGINT)
    rest, _ = process.communicate(timeout=120)
    output = "".join(lines) + rest
    assert process.returncode == 130, output
    assert "interrupted; rerun the same command to resume" in output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
