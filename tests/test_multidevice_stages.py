"""Extraction, adaptor application and PatchCore scoring split over 4 (forced host) devices
give what one device gives: the same stages (`tests/helpers/tiny_stages.py`) on a 1-device and
a 4-device mesh in one subprocess (the device-count flag must be set before JAX starts)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.host_devices import run_on_host_devices

pytestmark = pytest.mark.slow  # about 50 s of CPU: two meshes, every stage compiled on each

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import jax
    import numpy as np
    from lsfa_jax.adaptation.train import init_train_state
    from lsfa_jax.mesh import make_mesh
    from tests.helpers import tiny_stages as stages

    assert jax.device_count() == 4, jax.devices()
    one, four = make_mesh(jax.devices()[:1]), make_mesh(jax.devices())
    work = Path(sys.argv[1])
    params = init_train_state(stages.adaptation_config(), 2, 2).params
    params = jax.tree.map(np.asarray, params)
    out = {}
    # Same rows per device: 1 device at batch b, 4 devices at batch 4b. Every stage gets the
    # 1-device run's inputs.
    features = stages.extract(work, one, batch_size=2)
    adapted = stages.adapt(one, params, features, batch_size=1)
    runs = {
        "one": (features, adapted, stages.score(one, adapted, batch_size=1)),
        "four": (
            stages.extract(work, four, batch_size=8),
            stages.adapt(four, params, features, batch_size=4),
            stages.score(four, adapted, batch_size=4),
        ),
        # The run's settings on both meshes: batch 6 (2 rows per device on 4 devices).
        "one_b6": (stages.extract(work, one), stages.adapt(one, params, features), {}),
        "four_b6": (stages.extract(work, four), stages.adapt(four, params, features), {}),
    }
    for name, (f, a, s) in runs.items():
        out |= {f"{name}:features/{k}": v for k, v in f.items()}
        out |= {f"{name}:adapted/{k}": v for k, v in a.items()}
        out |= {f"{name}:{k}": v for k, v in s.items()}
    np.savez(work / "out.npz", **out)
    """
)


def _keys(out: dict[str, np.ndarray], run: str) -> list[str]:
    return [k[len(run) + 1 :] for k in out if k.startswith(f"{run}:")]


def test_stages_on_four_devices_match_one_device(tmp_path: Path) -> None:
    """Extraction, adaptors and scoring split over 4 devices == 1 device, bit for bit where
    each device sees as many rows as the single device did; at the run's batch of 6 (6 rows on
    one device, 2 on each of four) the features agree to <= 1e-6 of their scale."""
    out = run_on_host_devices(SCRIPT, tmp_path)
    for key in ("features/rgb", "features/xyz", "features/fg", "adapted/rgb", "adapted/xyz"):
        assert out[f"one:{key}"].shape[0] == 10, key
    for key in ("scores/rgb", "scores/xyz", "maps/rgb", "maps/xyz"):
        assert out[f"one:{key}"].shape[0] == 4, key
    assert np.ptp(out["one:scores/xyz"]) > 0  # distinct samples, not one repeated row
    assert len(_keys(out, "one")) == 10
    for key in _keys(out, "one"):
        np.testing.assert_array_equal(out[f"four:{key}"], out[f"one:{key}"], err_msg=key)
    assert len(_keys(out, "one_b6")) == 6
    for key in _keys(out, "one_b6"):
        one, four = out[f"one_b6:{key}"], out[f"four_b6:{key}"]
        if one.dtype.kind == "b":
            np.testing.assert_array_equal(four, one, err_msg=key)
        else:
            # XLA:CPU blocks the ViT's and adaptors' matmuls by the rows a device holds, so
            # their float32 rounding differs (measured <= 4.8e-7 of the scale).
            deviation = np.abs(four - one).max() / max(1.0, np.abs(one).max())
            assert deviation <= 1e-6, (key, deviation)
