"""Memory banks split by rows over 4 (forced host) devices (`patchcore.shard_bank`) give the
unsharded answers: nearest rows and distances for both exact searches, image scores and maps,
coreset indices, and a whole evaluation with the option on and off. One subprocess runs every
case (`tests/helpers/host_devices.py`); the references are the unsharded code on one device and
brute force in numpy."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from configs.base import get_base_config
from lsfa_jax.jobs.common import ConfigError
from lsfa_jax.jobs.validate import validate
from lsfa_jax.patchcore.sharding import shard_size
from tests.helpers.host_devices import run_on_host_devices

pytestmark = pytest.mark.slow  # one 4-device subprocess: every search and scorer compiled twice

# 1030 rows do not split over 4 devices, nor into the screen's groups of 8 rows (the unsharded
# scorer then searches in float32); 20480 rows give two scan steps of 2560 rows per device.
BANK_ROWS = (1030, 20480)
# (rows, bank dtype, search) of the scoring cases.
SCORED = (
    (1030, "float32", "exact"),
    (1030, "float32", "screened"),
    (1030, "bfloat16", "screened"),
    (20480, "float32", "screened"),
)
SCRIPT = f"BANK_ROWS, SCORED = {BANK_ROWS!r}, {SCORED!r}\n" + textwrap.dedent(
    """
    import dataclasses, json, sys
    from pathlib import Path
    import jax, jax.numpy as jnp, numpy as np
    from configs.base import get_base_config
    from lsfa_jax.jobs import run_evaluation
    from lsfa_jax.mesh import make_mesh
    from lsfa_jax.model_folder import load_bank
    from lsfa_jax.patchcore import sharding
    from lsfa_jax.patchcore.bank import MemoryBank
    from lsfa_jax.patchcore.coreset import greedy_coreset
    from lsfa_jax.patchcore.knn import nearest_neighbours, screened_nearest_neighbour
    from lsfa_jax.patchcore.knn import search_index
    from lsfa_jax.patchcore.normalisation import FeatureStats, identity_stats
    from lsfa_jax.patchcore.scorer import ScoringSettings, score_features
    from tests.helpers.tiny import tiny_evaluation_config

    assert jax.device_count() == 4, jax.devices()
    work = Path(sys.argv[1])
    one, four = make_mesh(jax.devices()[:1]), make_mesh(jax.devices())
    rng = np.random.default_rng(0)
    out, banks = {}, {}
    settings = dataclasses.replace(
        ScoringSettings.from_config(get_base_config()), out_size=16, batch_size=3
    )
    for rows in BANK_ROWS:
        bank_rows = rng.normal(size=(rows, 24)).astype(np.float32)
        # Row 1 again at the other end of the bank (another device): an exact tie.
        bank_rows[rows - 9] = bank_rows[1]
        valid = np.arange(rows) < rows - 7
        queries = rng.normal(size=(200, 24)).astype(np.float32)
        queries[:20] = bank_rows[1] + 0.01 * queries[:20]
        bank = MemoryBank(jnp.asarray(bank_rows), jnp.asarray(valid), identity_stats())
        out |= {f"{rows}/bank": bank_rows, f"{rows}/valid": valid, f"{rows}/queries": queries}
        dist, idx = nearest_neighbours(queries, bank.features, bank.valid, k=1)
        out[f"{rows}/unsharded/exact"] = np.asarray(idx[:, 0])
        if rows % 4096 == 0 or (rows <= 4096 and rows % 8 == 0):
            index = search_index(bank.features, bank.valid)
            chunk = min(4096, rows)
            _, idx, _ = screened_nearest_neighbour(queries, bank.features, index, bank_chunk=chunk)
            out[f"{rows}/unsharded/screened"] = np.asarray(idx)
        for search in ("exact", "screened"):
            placed = sharding.shard_bank(bank, four, screened=search == "screened")
            out[f"{rows}/rows_per_device"] = placed.features.addressable_shards[0].data.shape[0]
            dist, idx = sharding.sharded_nearest_neighbour(placed, queries, four, search=search)
            out[f"{rows}/sharded/{search}"], out[f"{rows}/sharded/{search}/dist"] = idx, dist
        banks[rows] = bank
    # Scores: standardisation and the reweighting, whose neighbours lie on every device.
    images = rng.normal(size=(5, 16, 24)).astype(np.float32)
    stats = FeatureStats(jnp.float32(0.1), jnp.float32(1.3))
    for rows, dtype, search in SCORED:
        bank = banks[rows]
        scored = bank._replace(stats=stats, features=bank.features.astype(dtype))
        case = f"score/{rows}/{dtype}/{search}"
        use = dataclasses.replace(settings, search=search)
        want = score_features(scored, images, use, mesh=one)
        got = sharding.score_features_sharded(scored, images, use, mesh=four)
        out[f"{case}/unsharded/scores"], out[f"{case}/unsharded/maps"] = want
        out[f"{case}/sharded/scores"], out[f"{case}/sharded/maps"] = got
    # 3001 rows (no multiple of 4), projected to 197 dimensions.
    library = rng.normal(size=(3001, 400)).astype(np.float32)
    for name, mesh in (("unsharded", None), ("sharded", four)):
        out[f"coreset/{name}"] = greedy_coreset(library, 300, key=jax.random.key(3), mesh=mesh)
    for option in (False, True):
        # FPFH: no random backbones to initialise; the 3D bank and scores only.
        config = tiny_evaluation_config(work / "raw")
        config.method = "fpfh"
        config.data.classes = "torus"
        config.data.synthetic.classes = ("torus",)
        config.report.update(num_overlays=0, plots=False)
        config.cache_dir = str(work / "cache")
        config.patchcore.shard_bank = option
        run = work / f"shard_{option}"
        results = run_evaluation.run_evaluation(config, run)
        assert set(results) == {"3D"}, results
        scores = json.loads((run / "scores" / "torus.json").read_text())
        out[f"e2e/{option}/scores"] = np.asarray(scores["3D"])
        out[f"e2e/{option}/i_auroc"] = results["3D"]["torus"]["i_auroc"]
        out[f"e2e/{option}/bank"] = load_bank(run / "model" / "torus" / "xyz.npz").features
    np.savez(work / "out.npz", **{k: np.asarray(v) for k, v in out.items()})
    """
)


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    return run_on_host_devices(SCRIPT, tmp_path_factory.mktemp("sharded"))


def _close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Within 1e-6 of the values' scale: float32 rounding of the standardised queries differs
    by one unit in the last place between the two programs (XLA fuses them differently)."""
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(got - want).max() <= 1e-6 * scale, what


def test_shard_size_splits_and_pads_every_bank() -> None:
    assert shard_size(1001, 4) == 256  # 251 rows rounded up to the screen's 8-row groups
    assert shard_size(4096, 4) == 1024
    assert shard_size(20480, 4) == 5120  # two scan steps of 2560 rows
    # The benchmark's bank: 25600 rows per device in 7 steps of 3658 -> 3664 rows.
    assert shard_size(102400, 4) == 7 * 3664
    assert shard_size(3, 1) == 8


@pytest.mark.parametrize("rows", BANK_ROWS)
def test_sharded_nearest_rows_equal_the_unsharded_and_brute_force(out: dict, rows: int) -> None:
    bank, valid, queries = (out[f"{rows}/{k}"] for k in ("bank", "valid", "queries"))
    queries, bank = queries.astype(np.float64), bank.astype(np.float64)
    # Expanded in float64: cancellation costs ~1e-16 of ||q||^2, far below any gap here.
    squared = (queries**2).sum(1)[:, None] + (bank**2).sum(1)[None] - 2.0 * queries @ bank.T
    squared[:, ~valid] = np.inf
    brute = squared.argmin(1)
    assert (brute[:20] == 1).all()  # the tied queries: the lower of the two equal rows
    assert int(out[f"{rows}/rows_per_device"]) == shard_size(rows, 4)
    for search in ("exact", "screened"):
        sharded = out[f"{rows}/sharded/{search}"]
        np.testing.assert_array_equal(sharded, brute, err_msg=search)
        np.testing.assert_array_equal(sharded, out[f"{rows}/unsharded/exact"], err_msg=search)
        _close(out[f"{rows}/sharded/{search}/dist"], np.sqrt(squared.min(1)), search)
    if f"{rows}/unsharded/screened" in out:
        np.testing.assert_array_equal(out[f"{rows}/sharded/screened"], brute)
        np.testing.assert_array_equal(out[f"{rows}/unsharded/screened"], brute)


def test_sharded_scores_and_maps_equal_the_unsharded(out: dict) -> None:
    tail = "/sharded/scores"
    cases = sorted(k[: -len(tail)] for k in out if k.startswith("score/") and k.endswith(tail))
    assert cases == sorted(f"score/{rows}/{dtype}/{search}" for rows, dtype, search in SCORED)
    for case in cases:
        want_scores = out[f"{case}/unsharded/scores"]
        assert want_scores.shape == (5,) and np.ptp(want_scores) > 0, case
        _close(out[f"{case}/sharded/scores"], want_scores, f"{case} scores")
        _close(out[f"{case}/sharded/maps"], out[f"{case}/unsharded/maps"], f"{case} maps")


def test_sharded_coreset_selects_the_unsharded_rows(out: dict) -> None:
    unsharded = out["coreset/unsharded"]
    assert unsharded[0] == 0 and len(set(unsharded.tolist())) == 300
    np.testing.assert_array_equal(out["coreset/sharded"], unsharded)


def test_evaluation_with_sharded_banks_gives_the_same_scores(out: dict) -> None:
    """`patchcore.shard_bank` on and off in a whole evaluation on 4 devices: the same coreset
    rows in the saved bank, the same scores and metric."""
    np.testing.assert_array_equal(out["e2e/True/bank"], out["e2e/False/bank"])
    assert out["e2e/False/scores"].shape == (5,) and np.ptp(out["e2e/False/scores"]) > 0
    _close(out["e2e/True/scores"], out["e2e/False/scores"], "scores")
    assert out["e2e/True/i_auroc"] == out["e2e/False/i_auroc"]


def test_validate_refuses_a_search_the_sharded_bank_lacks() -> None:
    config = get_base_config()
    config.patchcore.update(shard_bank=True, search="approximate")
    with pytest.raises(ConfigError, match=r"patchcore\.shard_bank"):
        validate(config)
    config.patchcore.search = "faiss"  # on the host, over the whole bank: it cannot shard
    with pytest.raises(ConfigError, match=r"patchcore\.shard_bank"):
        validate(config)
    for search in ("screened", "exact", "auto"):  # auto chooses among the in-graph searches
        config.patchcore.search = search
        validate(config)
