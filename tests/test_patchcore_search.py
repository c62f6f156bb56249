"""search=faiss against float64 brute force and the float32 search; search=auto's choice (device
kind, calibration, the per-machine cache and its failures) and that it never changes a score."""

from __future__ import annotations

import json
import logging
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import get_base_config
from lsfa_jax.errors import UserError
from lsfa_jax.jobs.common import ConfigError
from lsfa_jax.jobs.validate import validate
from lsfa_jax.patchcore import faiss_search, knn, scorer, search_choice
from lsfa_jax.patchcore.bank import MemoryBank
from lsfa_jax.patchcore.normalisation import FeatureStats, identity_stats


def brute_nn(queries: np.ndarray, bank: np.ndarray, valid: np.ndarray) -> tuple:
    """float64 distance to and index of the nearest valid row."""
    d = np.sqrt(np.sum((queries[:, None].astype(np.float64) - bank[None]) ** 2, -1))
    d = np.where(valid[None], d, np.inf)
    return d.min(1), d.argmin(1)


def bank_with_traps(rng: np.random.Generator, rows: int, dim: int, queries: np.ndarray) -> tuple:
    """(rows, dim) bank, 30 % invalid, the invalid rows holding the queries themselves: they
    would be the nearest rows (distance 0) if a search ignored the mask."""
    bank = rng.normal(size=(rows, dim)).astype(np.float32)
    valid = rng.random(rows) > 0.3
    traps = np.flatnonzero(~valid)[: len(queries)]
    bank[traps] = queries[: len(traps)]
    return bank, valid


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_faiss_finds_the_exact_nearest_valid_rows(dtype) -> None:
    rng = np.random.default_rng(3)
    queries = (rng.normal(size=(300, 48)) * 1.1).astype(np.float32)
    bank, valid = bank_with_traps(rng, 2000, 48, queries)
    bank_j = jnp.asarray(bank, dtype)
    stored = np.asarray(bank_j, np.float32)  # bfloat16 rows as the searches see them
    dist, idx = faiss_search.faiss_nearest_neighbour(
        queries, bank_j, faiss_search.faiss_index(bank_j, valid)
    )
    ref_d, ref_i = brute_nn(queries, stored, valid)
    exact_d, exact_i = knn.nearest_neighbours(jnp.asarray(queries), bank_j, jnp.asarray(valid))
    np.testing.assert_array_equal(np.asarray(idx), ref_i)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(exact_i[:, 0]))
    np.testing.assert_allclose(np.asarray(dist), ref_d, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(dist), np.asarray(exact_d[:, 0]), rtol=1e-5)


def test_faiss_on_a_bank_without_valid_rows() -> None:
    bank = jnp.ones((64, 8), jnp.float32)
    index = faiss_search.faiss_index(bank, np.zeros(64, bool))
    dist, idx = faiss_search.faiss_nearest_neighbour(np.zeros((5, 8), np.float32), bank, index)
    np.testing.assert_array_equal(np.asarray(idx), -1)
    assert np.all(np.isinf(np.asarray(dist)))


def scoring_case(seed: int = 5) -> tuple[MemoryBank, jax.Array]:
    """A 1024-row bank (screenable with bank_chunk 256) with trap rows, and 3 images of 64
    patches normalised by non-trivial stats."""
    rng = np.random.default_rng(seed)
    images = (rng.normal(size=(3, 64, 32)) * 1.2).astype(np.float32)
    stats = FeatureStats(mean=jnp.float32(0.1), std=jnp.float32(1.3))
    bank, valid = bank_with_traps(rng, 1024, 32, (images[0] - 0.1) / 1.3)
    return MemoryBank(jnp.asarray(bank), jnp.asarray(valid), stats), jnp.asarray(images)


def score(bank: MemoryBank, images: jax.Array, search: str) -> tuple[np.ndarray, np.ndarray]:
    scores, maps = scorer.score_batch(bank, images, out_size=16, bank_chunk=256, search=search)
    return np.asarray(scores), np.asarray(maps)


def seed_choice(path, search: str) -> None:
    """A cache at `path` whose entry for this machine makes `search` the fastest."""
    seconds = {s: 1.0 if s == search else 2.0 for s in search_choice.candidates()}
    search_choice.remember(path, search_choice.machine_key(), seconds)


@pytest.mark.parametrize("chosen", ["screened", "exact", "faiss"])
def test_auto_gives_the_exact_scores_whichever_search_it_picks(
    chosen: str, tmp_path, monkeypatch
) -> None:
    """Timings (load) decide which search runs, never the scores: each candidate, as auto's
    choice, gives the float32 search's image scores (reweighting included) and maps."""
    bank, images = scoring_case()
    want_scores, want_maps = score(bank, images, "exact")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    seed_choice(search_choice.cache_file(), chosen)
    assert search_choice.resolve_search("auto").search == chosen
    got_scores, got_maps = score(bank, images, "auto")
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_maps, want_maps, rtol=1e-6, atol=1e-6)
    # And against float64 brute force: without reweighting the score is the worst patch's
    # nearest valid distance.
    plain, _ = scorer.score_batch(bank, images, out_size=16, bank_chunk=256, reweight=False)
    normalised = (np.asarray(images, np.float64) - 0.1) / 1.3
    rows, valid = np.asarray(bank.features), np.asarray(bank.valid)
    ref = [brute_nn(q, rows, valid)[0].max() for q in normalised]
    np.testing.assert_allclose(np.asarray(plain), ref, rtol=1e-6)


def test_auto_times_the_searches_once_then_reuses_the_choice(tmp_path, monkeypatch) -> None:
    """The one test that calibrates (the real searches, on smaller shapes than a machine's
    first run): it stores the fastest search, which later calls (and processes) read back
    without timing anything."""
    shapes = {search: [256, 8192] for search in ("screened", "exact", "faiss")}
    small = {"dim": 64, "repeats": 1, "queries_rows": shapes}
    monkeypatch.setattr(search_choice, "CALIBRATION", small)
    path = tmp_path / "lsfa_jax" / "knn_search.json"
    first = search_choice.choose_search(path)
    seconds = dict(first.seconds)
    assert first.source == "calibrated"
    assert set(seconds) == set(search_choice.candidates())
    assert first.search == min(seconds, key=seconds.__getitem__)
    entry = json.loads(path.read_text())["entries"][search_choice.machine_key()]
    assert entry["search"] == first.search and entry["seconds"] == seconds
    assert entry["calibration"] == small

    def no_timing(*args, **kwargs):
        raise AssertionError("calibrated again")

    monkeypatch.setattr(search_choice, "calibrate", no_timing)
    again = search_choice.choose_search(path)
    assert (again.search, again.source, dict(again.seconds)) == (first.search, "cache", seconds)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert search_choice.resolve_search("auto").search == first.search
    path.unlink()  # the process keeps its choice
    assert search_choice.resolve_search("auto").search == first.search


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe\x00",
        b"[1, 2]",
        b'{"format": 1, "entries": []}',
        b'{"format": 99, "entries": {}}',
        "bad entry",
    ],
)
def test_a_corrupt_cache_is_measured_again_with_a_warning(
    content, tmp_path, monkeypatch, caplog
) -> None:
    path = tmp_path / "knn_search.json"
    key = search_choice.machine_key()
    if content == "bad entry":  # this machine's entry is broken, another machine's is kept
        search_choice.remember(path, "another machine", {"exact": 1.0})
        data = json.loads(path.read_text())
        data["entries"][key] = {"search": "exact", "seconds": {"exact": "fast"}}
        content = json.dumps(data).encode()
    path.write_bytes(content)
    timings = {s: 0.5 if s == "exact" else 1.0 for s in search_choice.candidates()}
    monkeypatch.setattr(search_choice, "calibrate", lambda searches: dict(timings))
    with caplog.at_level(logging.WARNING):
        choice = search_choice.choose_search(path)
    assert (choice.search, choice.source) == ("exact", "calibrated")
    assert str(path) in caplog.text and "measuring the kNN searches again" in caplog.text
    entries = json.loads(path.read_text())["entries"]
    assert entries[key]["seconds"] == timings
    if "another machine" in content.decode(errors="replace"):
        assert entries["another machine"]["search"] == "exact"


def test_an_unwritable_cache_is_only_logged(tmp_path, monkeypatch, caplog) -> None:
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "knn_search.json"  # its folder is a file
    monkeypatch.setattr(search_choice, "calibrate", lambda searches: dict.fromkeys(searches, 1.0))
    with caplog.at_level(logging.WARNING):
        choice = search_choice.choose_search(path)
    assert choice.search in search_choice.candidates()
    assert "cannot store the kNN search choice" in caplog.text


def test_cache_location_follows_xdg(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert search_choice.cache_file() == tmp_path / "lsfa_jax" / "knn_search.json"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # ignored, as the XDG spec says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert search_choice.cache_file() == tmp_path / "home" / ".cache/lsfa_jax/knn_search.json"


def test_an_accelerator_decides_by_its_kind_without_timing(tmp_path, monkeypatch) -> None:
    gpu = SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(jax, "devices", lambda *args: [gpu])
    monkeypatch.setattr(search_choice, "calibrate", None)  # calling it would fail
    choice = search_choice.choose_search(tmp_path / "knn_search.json")
    assert (choice.search, choice.source) == ("screened", "device")
    assert "NVIDIA H100" in choice.reason
    assert not (tmp_path / "knn_search.json").exists()


def test_configured_searches_and_the_in_graph_equivalents(tmp_path, monkeypatch) -> None:
    for search in ("screened", "exact", "approximate", "faiss"):
        assert search_choice.resolve_search(search).search == search
    assert search_choice.in_graph_search("screened").search == "screened"
    assert search_choice.in_graph_search("faiss").search == "exact"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    seed_choice(search_choice.cache_file(), "faiss")
    assert search_choice.in_graph_search("auto").search == "exact"
    assert "cannot be exported" in search_choice.in_graph_search("auto").reason


def test_faiss_missing_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    assert not faiss_search.available()
    assert search_choice.candidates() == search_choice.IN_GRAPH
    assert "faiss absent" in search_choice.machine_key()
    bank, images = scoring_case()
    with pytest.raises(UserError, match="pip install faiss-cpu"):
        score(bank, images, "faiss")
    config = get_base_config()
    config.patchcore.search = "faiss"
    with pytest.raises(ConfigError, match=r"config\.patchcore\.search=faiss needs faiss-cpu"):
        validate(config)


def test_faiss_neighbours_are_given_for_faiss_only() -> None:
    bank = MemoryBank(jnp.zeros((64, 4)), jnp.ones(64, bool), identity_stats())
    with pytest.raises(ValueError, match="neighbours are given for search='faiss' only"):
        scorer._score_images(
            bank,
            jnp.zeros((1, 4, 4)),
            None,
            out_size=8,
            reweight=True,
            sigma=None,
            bank_chunk=64,
            search="faiss",
            approximate_dim=4,
        )
