"""Data-parallel training over 4 (forced host) devices matches the 1-device run.

The device count flag must be set before JAX initialises, so the runs happen in a subprocess.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from tests.helpers.host_devices import run_on_host_devices

SCRIPT = textwrap.dedent(
    """
    import sys
    import jax
    import numpy as np
    from lsfa_jax.adaptation.train import make_mesh, train_adaptors
    from tests.helpers.configs import adaptation_defaults

    assert jax.device_count() == 4, jax.devices()
    B, P, CI, CP = 8, 9, 8, 12
    cfg = adaptation_defaults()
    cfg.update(dict(
        rgb_dim=CI, xyz_dim=CP, num_patches=P, proj_dim=6, rgb_heads=2, xyz_heads=2,
        batch_size=B, warmup_steps=1, local_bank_size=60, global_bank_size=6, lr=1e-3,
        kmeans_clusters=2, kmeans_iters=3, clc_chunk_size=16, nn_chunk_size=32,
        checkpoint_every=100, log_every=1, num_steps=5, eps=1e-3,
    ))
    # AdamW with eps=1e-8 turns gradient entries near 0 into steps of about lr whose sign is
    # float32 reduction-order noise (seen on AMD CPUs); eps=1e-3 keeps the comparison about the
    # gradients the two meshes compute, not about that noise.
    rng = np.random.default_rng(0)
    data = [
        dict(
            rgb=rng.normal(size=(B, P, CI)).astype(np.float32),
            xyz=rng.normal(size=(B, P, CP)).astype(np.float32),
            fg=rng.random((B, P)) < 0.8,
            class_id=rng.integers(0, 3, B).astype(np.int32),
        )
        for _ in range(2)
    ]
    out = {}
    for name, devices in (("one", jax.devices()[:1]), ("four", jax.devices())):
        state = train_adaptors(
            cfg, lambda epoch: data, f"{sys.argv[1]}/{name}", num_classes=3, resume=False,
            mesh=make_mesh(devices),
        )
        leaves = jax.tree_util.tree_leaves_with_path((state.params, state.banks))
        for path, leaf in leaves:
            out[name + jax.tree_util.keystr(path)] = np.asarray(leaf)
        out[name + "_nshards"] = np.int32(len(state.params["rgb_head"]["kernel"].devices()))
    np.savez(f"{sys.argv[1]}/out.npz", **out)
    """
)


@pytest.mark.slow
def test_four_devices_match_one_device(tmp_path):
    out = run_on_host_devices(SCRIPT, tmp_path, timeout=300)
    assert int(out["one_nshards"]) == 1 and int(out["four_nshards"]) == 4
    keys = [k[len("one") :] for k in out if k.startswith("one") and k != "one_nshards"]
    assert len(keys) > 20
    for key in keys:
        a, b = out["one" + key], out["four" + key]
        if a.dtype.kind in "iu":
            np.testing.assert_array_equal(a, b, key)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=key)
