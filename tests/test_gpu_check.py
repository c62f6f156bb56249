"""benchmarks/gpu_check.sh runs unchanged on CPU with --quick and writes its whole summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_gpu_check_quick_on_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHON": sys.executable}
    subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        check=True,
        timeout=600,
    )
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["skipped"] == []
    assert summary["device"].startswith("cpu")
    errors = summary["parity"]["max_abs_error"]
    assert set(errors) == {"highest", "tf32", "bf16"}
    # The default policy keeps the torch parity tolerance; bfloat16 operands do not.
    assert max(errors["highest"].values()) <= 1e-4
    assert max(errors["bf16"].values()) > 1e-4
    for batch in (1, 2):
        assert summary["end_to_end"][f"batch_{batch}"]["samples_per_s"] > 0
    assert set(summary["knn"]["s_per_image"]) == {"float32", "screened", "bf16"}
    assert summary["knn"]["screened_vs_float32"]["max_distance_difference"] <= 1e-3
    assert summary["train_step"]["mean_step_s"] > 0
    assert len(summary["memory"]["compiled_stage_mib"]) >= 5
    assert "## knn" in (tmp_path / "gpu_check.md").read_text()
