"""The one atomic writer: readers see the old file or the new one; failures leave no temp file."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lsfa_jax import atomic_io

REPO = Path(__file__).resolve().parents[1]


def test_writes_bytes_text_and_json(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b"
    assert atomic_io.atomic_write_bytes(folder / "x.bin", b"\x00\xff") == folder / "x.bin"
    assert (folder / "x.bin").read_bytes() == b"\x00\xff"
    atomic_io.atomic_write_text(folder / "x.txt", "grüße\n")
    assert (folder / "x.txt").read_bytes() == "grüße\n".encode()
    payload = {"b": [1.5, None], "a": {"c": "d"}}
    atomic_io.atomic_write_json(folder / "x.json", payload, sort_keys=True)
    text = (folder / "x.json").read_text()
    assert text == json.dumps(payload, indent=2, sort_keys=True) + "\n"
    atomic_io.atomic_write_json(folder / "x.json", [1], indent=None)
    assert (folder / "x.json").read_text() == "[1]\n"
    assert sorted(p.name for p in folder.iterdir()) == ["x.bin", "x.json", "x.txt"]


def test_failing_serialisation_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    atomic_io.atomic_write_json(target, {"i_auroc": 0.9})
    with pytest.raises(TypeError, match="not JSON serializable"):
        atomic_io.atomic_write_json(target, {"i_auroc": object()})
    assert json.loads(target.read_text()) == {"i_auroc": 0.9}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_full_disk_keeps_the_previous_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC after half the data reached the temp file: the old file stays, no temp is left."""
    target = tmp_path / "results" / "results.json"
    atomic_io.atomic_write_json(target, {"i_auroc": 0.9})

    def fsync_fails(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic_io.os, "fsync", fsync_fails)
    with pytest.raises(OSError, match="No space left on device"):
        atomic_io.atomic_write_json(target, {"i_auroc": 0.1})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"i_auroc": 0.9}
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.json"]


def test_result_file_is_never_half_written(tmp_path: Path) -> None:
    """A writer SIGKILLed after writing its temp file but before the rename leaves only that
    hidden temp file (holding the new data); readers still see the old file, and the next write
    succeeds."""
    target = tmp_path / "scores" / "box.json"
    atomic_io.atomic_write_json(target, {"scores": [1.0, 2.0]})
    script = (
        "import time\n"
        "from lsfa_jax import atomic_io\n"
        "def slow_fsync(fd):\n"
        "    print('written', flush=True)\n"
        "    time.sleep(60)\n"
        "atomic_io.os.fsync = slow_fsync\n"
        f"atomic_io.atomic_write_json({str(target)!r}, {{'scores': [3.0, 4.0]}})\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "written"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stdout.close()
    assert json.loads(target.read_text()) == {"scores": [1.0, 2.0]}
    leftovers = [p for p in target.parent.iterdir() if p.name != "box.json"]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".box.json.")
    assert json.loads(leftovers[0].read_text()) == {"scores": [3.0, 4.0]}
    atomic_io.atomic_write_json(target, {"scores": [3.0, 4.0]})
    assert json.loads(target.read_text()) == {"scores": [3.0, 4.0]}
