"""`lsfa_jax.distributed.distributed_settings`: config keys win over JAX_* variables, a
single-process run needs nothing, and incomplete settings are one-line user errors; the
manifest records each stage's devices_used."""

from __future__ import annotations

import json

import pytest

from lsfa_jax.distributed import DistributedConfigError, distributed_settings
from lsfa_jax.errors import UserError
from lsfa_jax.reports.manifest import RunManifest

UNSET = dict(coordinator_address="", num_processes=0, process_id=-1, local_device_ids="")


def test_single_process_needs_no_settings() -> None:
    assert distributed_settings(UNSET, {}) is None
    assert distributed_settings(None, {"JAX_NUM_PROCESSES": "1"}) is None


def test_config_wins_over_environment() -> None:
    env = {
        "JAX_COORDINATOR_ADDRESS": "10.0.0.9:1",
        "JAX_NUM_PROCESSES": "4",
        "JAX_PROCESS_ID": "3",
        "JAX_LOCAL_DEVICE_IDS": "0,1",
    }
    from_env = distributed_settings(UNSET, env)
    assert (from_env.coordinator_address, from_env.num_processes, from_env.process_id) == (
        "10.0.0.9:1",
        4,
        3,
    )
    assert from_env.local_device_ids == (0, 1)
    mixed = distributed_settings({**UNSET, "num_processes": 2, "process_id": 1}, env)
    assert (mixed.coordinator_address, mixed.num_processes, mixed.process_id) == (
        "10.0.0.9:1",
        2,
        1,
    )


@pytest.mark.parametrize(
    ("section", "named"),
    [
        (dict(num_processes=2, process_id=0), "coordinator_address"),
        (dict(coordinator_address="host", num_processes=2, process_id=0), "host:port"),
        (dict(coordinator_address="h:1", num_processes=2, process_id=2), "process_id=2"),
        (dict(coordinator_address="h:1", num_processes=2), "process_id=-1"),
        (dict(coordinator_address="h:1", num_processes="two"), "num_processes='two'"),
    ],
)
def test_incomplete_settings_are_user_errors(section: dict, named: str) -> None:
    with pytest.raises(DistributedConfigError, match=named) as error:
        distributed_settings({**UNSET, **section}, {})
    assert isinstance(error.value, UserError) and "\n" not in str(error.value)


def test_manifest_records_devices_used(tmp_path) -> None:
    manifest = RunManifest({})
    with manifest.stage("features", devices_used=4):
        pass
    with manifest.stage("prepare"):
        pass
    doc = json.loads(manifest.write(tmp_path / "m.json").read_text())
    assert [s.get("devices_used") for s in doc["stages"]] == [4, None]
    assert doc["process"] == {"index": 0, "count": 1}
