"""A 2-process run (2 host devices each, gloo collectives over localhost) equals a 1-process
run on 4 host devices: features, adaptor training (parameters and banks), adapted features and
scores; and the checkpoints the two processes wrote together restore in the 1-process run.

Process 0 joins through `config.distributed`, process 1 through the JAX_* environment
variables: the two ways `main.py` reads the settings (`lsfa_jax.distributed`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # three JAX processes compile every stage

MULTI = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import ml_collections
    import numpy as np
    from lsfa_jax.distributed import initialize_from_config

    work, address, pid = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    section = dict(coordinator_address="", num_processes=0, process_id=-1,
                   local_device_ids="", initialization_timeout=120)
    if pid == 0:  # process 1 reads the same settings from its environment
        section.update(coordinator_address=address, num_processes=2, process_id=0)
    config = ml_collections.ConfigDict(dict(distributed=section))
    assert initialize_from_config(config)
    import jax
    from lsfa_jax.mesh import make_mesh
    from tests.helpers import tiny_stages as stages

    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
    out, state = stages.run_stages(work / "multi", make_mesh())
    np.savez(work / f"multi_{pid}.npz", **out)
    """
)

SINGLE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import jax
    import numpy as np
    from lsfa_jax.adaptation.checkpointing import Checkpointer, load_adaptor_params
    from lsfa_jax.mesh import make_mesh
    from tests.helpers import tiny_stages as stages

    work = Path(sys.argv[1])
    assert (jax.process_count(), jax.device_count()) == (1, 4)
    out, state = stages.run_stages(work / "single", make_mesh())
    # The 2-process run's last checkpoint, restored into this run's (4-device) state.
    written = work / "multi" / "adaptation" / "checkpoints"
    restored = Checkpointer(written).restore(state)
    leaves = jax.tree_util.tree_leaves_with_path((restored.params, restored.banks))
    out |= {f"restored{jax.tree_util.keystr(p)}": np.asarray(v) for p, v in leaves}
    params = load_adaptor_params(written)
    out |= {f"loaded{jax.tree_util.keystr(p)}": v for p, v in
            jax.tree_util.tree_leaves_with_path(params)}
    out["restored_step"] = np.int32(restored.step)
    np.savez(work / "single.npz", **out)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(extra, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _wait(process: subprocess.Popen, name: str) -> None:
    try:
        _, stderr = process.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
    assert process.returncode == 0, f"{name}:\n{stderr[-4000:]}"


def test_two_processes_match_one_process_on_four_devices(tmp_path: Path) -> None:
    address = f"127.0.0.1:{_free_port()}"
    env1 = dict(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1")
    multi = [
        subprocess.Popen(
            [sys.executable, "-c", MULTI, str(tmp_path), address, str(pid)],
            env=_env(2, **(env1 if pid else {})),
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in (0, 1)
    ]
    for pid, process in enumerate(multi):
        _wait(process, f"process {pid}")
    single = subprocess.Popen(
        [sys.executable, "-c", SINGLE, str(tmp_path)],
        env=_env(4),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait(single, "single process")

    one = dict(np.load(tmp_path / "single.npz"))
    two = [dict(np.load(tmp_path / f"multi_{pid}.npz")) for pid in (0, 1)]
    keys = sorted(two[0])
    assert keys == sorted(two[1])
    assert {"scores/rgb", "scores/xyz", "features/rgb", "adapted/xyz"} <= set(keys)
    assert sum(k.startswith("train") for k in keys) > 20
    for key in keys:
        # Both processes gathered every output: the same numbers on each.
        np.testing.assert_array_equal(two[1][key], two[0][key], err_msg=key)
        if key.startswith("train") and one[key].dtype.kind == "f":
            # Gradients are all-reduced by gloo here and in-process there.
            np.testing.assert_allclose(two[0][key], one[key], rtol=1e-5, atol=1e-7, err_msg=key)
        else:
            np.testing.assert_allclose(two[0][key], one[key], rtol=0, atol=1e-6, err_msg=key)

    assert int(one["restored_step"]) == 2
    for key in [k for k in keys if k.startswith("train")]:
        np.testing.assert_array_equal(one[f"restored{key[len('train') :]}"], two[0][key], key)
    params = [k for k in keys if k.startswith("train[0]")]
    for key in params:
        loaded = one[f"loaded{key[len('train[0]') :]}"]
        np.testing.assert_array_equal(loaded, two[0][key], err_msg=key)
