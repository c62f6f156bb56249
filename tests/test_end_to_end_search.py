"""Tiny raw-feature evaluations end to end with each nearest-neighbour search (auto as it picks
faiss), and banks built from a capped number of training samples."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lsfa_jax import model_folder as model_store
from lsfa_jax.jobs import run_evaluation, run_job
from lsfa_jax.jobs.common import ConfigError
from lsfa_jax.patchcore import search_choice
from lsfa_jax.patchcore.coreset import coreset_size
from tests.helpers.tiny import tiny_evaluation_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("search")
    out = {}
    for name, overrides in (
        ("exact", dict(search="exact")),
        ("screened", dict(search="screened")),
        # Every principal direction: the projection keeps all distances.
        ("approximate", dict(search="approximate", approximate_dim=4096)),
        ("capped", dict(search="screened", max_train_samples=2)),
    ):
        config = tiny_evaluation_config(root / "raw")
        config.cache_dir = str(root / "cache")
        config.patchcore.update(overrides)
        out[name] = (config, root / name, run_evaluation.run_evaluation(config, root / name))
    with pytest.MonkeyPatch.context() as patch:
        # auto as on a machine where faiss timed fastest: the host-side search, end to end.
        patch.setenv("XDG_CACHE_HOME", str(root / "xdg"))
        seconds = {s: 1.0 if s == "faiss" else 2.0 for s in search_choice.candidates()}
        search_choice.remember(search_choice.cache_file(), search_choice.machine_key(), seconds)
        config = tiny_evaluation_config(root / "raw")
        config.cache_dir = str(root / "cache")
        assert config.patchcore.search == "auto"  # the default
        out["auto"] = (config, root / "auto", run_evaluation.run_evaluation(config, root / "auto"))
    return out


def _assert_same_results(got: tuple, want: tuple) -> None:
    """Per-sample image scores within 1e-3 relative, metrics within the bfloat16 test's bounds.

    Why not equal: the float32 search's distances, ||q||^2 + ||x||^2 - 2 q.x, carry about
    1e-7 ||q||^2 of cancellation error (here up to ~1e-4 relative), which the others do not,
    and those last-digit differences break near-ties among blurred map pixels differently.
    """
    (_, got_dir, got_metrics), (_, want_dir, want_metrics) = got, want
    for class_name in ("sphere_cap", "torus"):
        a = json.loads((got_dir / "scores" / f"{class_name}.json").read_text())
        b = json.loads((want_dir / "scores" / f"{class_name}.json").read_text())
        assert a["file_id"] == b["file_id"]
        for setting in ("RGB", "3D"):
            np.testing.assert_allclose(a[setting], b[setting], rtol=1e-3, err_msg=setting)
    assert set(got_metrics) == set(want_metrics) == {"RGB", "3D", "RGB+3D"}
    for setting, per_class in want_metrics.items():
        for class_name, values in per_class.items():
            other = got_metrics[setting][class_name]
            where = (setting, class_name)
            assert abs(other["i_auroc"] - values["i_auroc"]) <= 0.02, where
            assert abs(other["aupro_30"] - values["aupro_30"]) <= 0.02, where
            assert abs(other["p_auroc"] - values["p_auroc"]) <= 0.005, where


def test_screened_search_gives_the_exact_search_results(runs: dict) -> None:
    _assert_same_results(runs["screened"], runs["exact"])


def test_auto_gives_the_exact_scores_and_the_manifest_says_what_ran(runs: dict) -> None:
    """Every search auto can pick recomputes the winner's distance from the difference, so
    faiss's scores equal the float32 search's to float32 rounding (not just 1e-3)."""
    for name, ran in (("auto", "faiss"), ("exact", "exact")):
        manifest = json.loads((runs[name][1] / "results" / "manifest.json").read_text())
        record = manifest["extra"]["knn_search"]
        assert (record["configured"], record["search"]) == (name, ran)
        assert record["source"] == ("cache" if name == "auto" else "config")
    for class_name in ("sphere_cap", "torus"):
        got, want = (
            json.loads((runs[n][1] / "scores" / f"{class_name}.json").read_text())
            for n in ("auto", "exact")
        )
        for setting in ("RGB", "3D"):
            np.testing.assert_allclose(got[setting], want[setting], rtol=1e-6, err_msg=setting)
    assert runs["auto"][2] == runs["exact"][2]  # every metric


def test_approximate_search_on_every_direction_gives_the_exact_results(runs: dict) -> None:
    _assert_same_results(runs["approximate"], runs["exact"])


def test_max_train_samples_caps_the_bank_library(runs: dict) -> None:
    """3 training samples per class; the capped run builds its banks from the first 2."""
    for name, samples in (("screened", 3), ("capped", 2)):
        config, workdir, _ = runs[name]
        patches = config.grid_size**2
        for class_name in ("sphere_cap", "torus"):
            for modality in ("rgb", "xyz"):
                bank = model_store.load_bank(workdir / "model" / class_name / f"{modality}.npz")
                ratio = (
                    config.patchcore.rgb_coreset_ratio
                    if modality == "rgb"
                    else config.patchcore.coreset_ratio
                )
                assert int(bank.valid.sum()) == coreset_size(samples * patches, ratio)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("search", "nope", "config.patchcore.search='nope'"),
        ("approximate_dim", 0, "approximate_dim=0"),
        ("max_train_samples", -1, "max_train_samples=-1"),
    ],
)
def test_bad_patchcore_settings_fail_before_any_work(tmp_path, key, value, message) -> None:
    config = tiny_evaluation_config(tmp_path / "raw")
    config.patchcore[key] = value
    with pytest.raises(ConfigError, match=message):
        run_job(config, tmp_path / "work")
    assert not (tmp_path / "raw").exists()  # nothing was prepared
    assert not (tmp_path / "work").exists()
