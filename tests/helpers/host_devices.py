"""Running test code on several forced host devices: XLA reads the device count once, when JAX
starts, so the code runs in a fresh Python with `XLA_FLAGS` set, from the repository root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def host_devices_env(devices: int, **extra: str) -> dict[str, str]:
    """This process's environment with `devices` forced host devices, the repository on the
    path and `extra` variables."""
    env = dict(os.environ, **extra)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_on_host_devices(
    script: str, workdir: Path, *, devices: int = 4, timeout: float = 600
) -> dict[str, np.ndarray]:
    """Runs the Python source `script` with `devices` host devices and sys.argv[1] = workdir;
    the script writes its results to `workdir/out.npz`, which is returned as a dict. A failing
    script fails the test with the end of its stderr."""
    result = subprocess.run(
        [sys.executable, "-c", script, str(workdir)],
        env=host_devices_env(devices),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    with np.load(Path(workdir) / "out.npz") as out:
        return dict(out)
