"""One small train_eval run through `main.py` in a subprocess, as a user sees it: a short console
ending with the table and the report's path, strict JSON everywhere, a run.log, files 0644 /
folders 0755, and results/index.html checked in a headless chromium.

The run: the synthetic demo data at 32 px, two classes, depth-1 backbones, a few adaptor steps.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.runs import CONFIG_FILE

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("sphere_cap", "box")


def _is_progress(line: str) -> bool:
    return "|" in line and ("it/s" in line or "s/it" in line or "/s]" in line or "%|" in line)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, int]:
    """(workdir, console output, exit code) of the run, started from an unrelated folder."""
    folder = tmp_path_factory.mktemp("cli_run")
    workdir = folder / "work"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "main.py"),
            f"--config={CONFIG_FILE}:{','.join(CLASSES)}",
            f"--workdir={workdir}",
        ],
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # interleaved, as on a terminal
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"},
    )
    return workdir, done.stdout, done.returncode


@pytest.mark.slow
def test_console_is_short_and_ends_with_the_table_and_the_report(demo_run) -> None:
    workdir, output, code = demo_run
    assert code == 0, output[-3000:]
    # Progress bars rewrite their line with \r; what is left after the last \r is shown.
    lines = [line.rsplit("\r", 1)[-1] for line in output.splitlines()]
    lines = [line for line in lines if line.strip() and not _is_progress(line)]
    assert len(lines) < 40, "\n".join(lines)
    assert not [line for line in lines if "Traceback" in line or line.startswith("I0000")]
    text = "\n".join(lines)
    assert "I-AUROC" in text
    assert lines[-1] == f"Report (tables, curves, images): {workdir / 'results' / 'index.html'}"
    for class_name in CLASSES:
        assert f"{class_name}: memory banks" in text  # one stage line per class
    assert not (workdir.parent / "data").exists()  # the generated data stays in the workdir
    assert (workdir / "cache" / "synthetic_raw").is_dir()


def test_every_json_is_strict(demo_run) -> None:
    workdir, output, code = demo_run
    assert code == 0, output[-3000:]

    def reject(constant: str):
        raise ValueError(f"non-strict JSON constant {constant}")

    found = sorted(workdir.rglob("*.json"))
    assert any(p.name == "thresholds.json" for p in found)
    for path in found:
        try:
            json.loads(path.read_text(), parse_constant=reject)
        except ValueError as error:
            pytest.fail(f"{path}: {error}")


def test_run_log_and_file_modes(demo_run) -> None:
    workdir, output, code = demo_run
    assert code == 0, output[-3000:]
    log = (workdir / "run.log").read_text()
    assert "train_eval, method lsfa" in log and "training the LSFA adaptors" in log
    umask = os.umask(0)
    os.umask(umask)
    for path in [workdir / "results" / "thresholds.json", workdir / "results" / "index.html"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    for folder in [workdir / "results", workdir / "cache" / "features"]:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask, folder
    assert list((workdir / "adaptation" / "tensorboard").glob("events.out.tfevents.*"))
    assert list((workdir / "tensorboard" / "eval").glob("events.out.tfevents.*"))


def test_report_lists_every_class_with_its_images(demo_run) -> None:
    workdir, output, code = demo_run
    assert code == 0, output[-3000:]
    page = (workdir / "results" / "index.html").read_text()
    assert "http://" not in page and "https://" not in page  # no external assets
    for class_name in CLASSES:
        assert f'id="row-{class_name}"' in page and f'id="class-{class_name}"' in page
        for image in (workdir / "images" / class_name).glob("*.png"):
            assert f"../images/{class_name}/{image.name}" in page
        assert f"../plots/{class_name}_roc.png" in page


IMAGE_PROBE = """<script>
window.addEventListener("load", () => {
  for (const img of document.images) {
    if (!img.complete || img.naturalWidth === 0) console.error("image not loaded: " + img.src);
  }
  console.log("images checked: " + document.images.length);
});
</script>"""


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium not installed: run scripts/install_browser.sh (make test does)")
    return path


@pytest.mark.slow
def test_report_loads_in_a_headless_browser(demo_run, tmp_path: Path) -> None:
    workdir, output, code = demo_run
    assert code == 0, output[-3000:]
    browser = _chromium()
    page = workdir / "results" / "index.html"
    args = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--allow-file-access-from-files",
        "--enable-logging=stderr",
        "--v=0",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
    ]
    dom = subprocess.run(
        [*args, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-3000:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert not console, "\n".join(console)
    assert "Failed to load resource" not in dom.stderr, dom.stderr[-3000:]
    for class_name in CLASSES:
        assert f'id="class-{class_name}"' in dom.stdout and f'id="row-{class_name}"' in dom.stdout
        assert f"../images/{class_name}/" in dom.stdout
    # Every image really loads: a copy of the page (same folder, so the same relative paths)
    # with a script that reports each <img> the browser could not decode.
    probe = page.with_name("index_probe.html")
    probe.write_text(page.read_text() + IMAGE_PROBE)
    try:
        loaded = subprocess.run(
            [*args, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120
        )
    finally:
        probe.unlink()
    expected = len(list((workdir / "images").rglob("*.png"))) + len(
        list((workdir / "plots").glob("*.png"))
    )
    assert f"images checked: {expected}" in loaded.stderr, loaded.stderr[-3000:]
    assert "image not loaded" not in loaded.stderr, loaded.stderr[-3000:]
    shot = tmp_path / "report.png"
    subprocess.run(
        [*args, f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.stat().st_size > 10_000  # a page with tables and images, not a blank one
