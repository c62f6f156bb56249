"""Shared fixtures: a tiny synthetic dataset and the real MVTec 3D-AD samples (when present)."""

from pathlib import Path

import pytest

from lsfa_jax.data import synthetic
from lsfa_jax.patchcore import search_choice

MVTEC_SAMPLE = Path(__file__).resolve().parents[2] / "shared/data/mvtec3d_sample"

# Small enough for a fast test run; 64 px keeps a 10 px plane-fitting border meaningful.
TINY_SYNTHETIC = synthetic.SyntheticConfig(
    classes=("sphere_cap", "torus"),
    image_size=64,
    num_train=4,
    num_validation=2,
    num_test_good=2,
    num_test_per_defect=2,
    seed=0,
)


@pytest.fixture(scope="session", autouse=True)
def knn_search_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """search=auto (the default) reads its choice from a seeded cache instead of timing the
    searches in every test process (main.py runs inherit XDG_CACHE_HOME): screened, the search
    the tests were written against. test_patchcore_search times them itself."""
    cache_home = tmp_path_factory.mktemp("xdg_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(cache_home))
        seconds = {s: 1.0 if s == "screened" else 2.0 for s in search_choice.candidates()}
        search_choice.remember(search_choice.cache_file(), search_choice.machine_key(), seconds)
        yield cache_home


@pytest.fixture(scope="session")
def synthetic_config() -> synthetic.SyntheticConfig:
    """The config `synthetic_root` was generated from."""
    return TINY_SYNTHETIC


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated MVTec-3D-format tree of TINY_SYNTHETIC (read-only for tests)."""
    return synthetic.generate_dataset(tmp_path_factory.mktemp("synthetic") / "raw", TINY_SYNTHETIC)


@pytest.fixture(scope="session")
def mvtec_sample_root() -> Path:
    """The shared real cable_gland samples; skips when the shared folder is absent."""
    if not (MVTEC_SAMPLE / "cable_gland").is_dir():
        pytest.skip(f"real MVTec 3D-AD samples not found at {MVTEC_SAMPLE}")
    return MVTEC_SAMPLE
