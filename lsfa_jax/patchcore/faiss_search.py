"""`patchcore.search=faiss`: the 1-nearest bank row by faiss-cpu's exact IndexFlatL2, on the host.

faiss is the field's standard exact CPU search; it runs outside jit, so the scorer asks it for
the nearest rows of a batch first and gives them to its jitted computation, which recomputes
each winner's distance in float32 from the difference (as it does for every search). The
distances and scores therefore equal those of `search=exact` whenever the rows do.

The rows can differ only on near-ties: faiss ranks by ||q||^2 + ||x||^2 - 2 q.x with its own
BLAS blocking, as `knn.nearest_neighbours` does with XLA's, and the two lose different last
digits (about 1e-7 ||q||^2) to cancellation, so two rows whose distances agree to that many
digits may swap; the distance then differs by that rounding only. Exact ties go to whichever
row faiss finds first (not guaranteed to be the lowest index, as ours are).

faiss is imported only when this search is used; without it `FaissNotInstalledError` says how
to install it.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np

from lsfa_jax.errors import UserError
from lsfa_jax.patchcore.normalisation import FeatureStats, normalise

MISSING = (
    "patchcore.search=faiss needs faiss-cpu, which is not installed: pip install faiss-cpu, "
    "or use patchcore.search=auto or exact"
)


class FaissNotInstalledError(UserError, ImportError):
    """faiss was asked for and cannot be imported."""


def faiss_module() -> ModuleType:
    """The faiss module, or FaissNotInstalledError."""
    try:
        return importlib.import_module("faiss")
    except ImportError as error:
        raise FaissNotInstalledError(MISSING) from error


def available() -> bool:
    """Whether faiss can be imported."""
    try:
        faiss_module()
    except FaissNotInstalledError:
        return False
    return True


def version() -> str | None:
    """faiss's version, or None when it is not installed."""
    return faiss_module().__version__ if available() else None


@dataclasses.dataclass(frozen=True)
class FaissIndex:
    """An IndexFlatL2 over the valid rows of a bank and their row numbers in it.

    index: faiss.IndexFlatL2 holding the V valid rows as float32 (bfloat16 rows widen exactly);
    rows: (V,) int64 bank row of each of them.
    """

    index: object
    rows: np.ndarray


def faiss_index(features: np.ndarray | jax.Array, valid: np.ndarray | jax.Array) -> FaissIndex:
    """FaissIndex of a bank: features (M, D) float32 or bfloat16, valid (M,) bool.

    Only the valid rows go in, so padding rows can never win (faiss has no mask).
    """
    faiss = faiss_module()
    rows = np.flatnonzero(np.asarray(valid, bool))
    kept = np.ascontiguousarray(np.asarray(jnp.asarray(features)[rows], np.float32))
    index = faiss.IndexFlatL2(kept.shape[1])
    index.add(kept)
    return FaissIndex(index=index, rows=rows)


def nearest_rows(index: FaissIndex, queries: np.ndarray) -> np.ndarray:
    """Nearest valid bank row of each query: queries (..., D) float32 -> (...,) int32, -1 where
    the bank has no valid row."""
    queries = np.asarray(queries, np.float32)
    if not index.rows.size:
        return np.full(queries.shape[:-1], -1, np.int32)
    _, found = index.index.search(np.ascontiguousarray(queries.reshape(-1, queries.shape[-1])), 1)
    found = found[:, 0]  # -1 only for queries with no finite distance (NaN features)
    rows = np.where(found >= 0, index.rows[found], -1)
    return rows.astype(np.int32).reshape(queries.shape[:-1])


@jax.jit
def _normalised(queries: jax.Array, stats: FeatureStats) -> jax.Array:
    return normalise(queries, stats)


def normalised_nearest_rows(
    index: FaissIndex, queries: np.ndarray, stats: FeatureStats
) -> np.ndarray:
    """Raw patch features (B, P, D) -> (B, P) int32 nearest bank rows of the features
    normalised with the bank's `stats`, as the scorer searches them."""
    return nearest_rows(index, np.asarray(_normalised(jnp.asarray(queries, jnp.float32), stats)))


@jax.jit
def winner_distances(queries: jax.Array, features: jax.Array, rows: jax.Array) -> jax.Array:
    """||q - features[row]|| in float32 from the difference, (Q, D), (M, D), (Q,) -> (Q,);
    inf where row is -1."""
    nearest = features[jnp.maximum(rows, 0)].astype(jnp.float32)
    dist = jnp.sqrt(jnp.sum(jnp.square(queries.astype(jnp.float32) - nearest), axis=-1))
    return jnp.where(rows >= 0, dist, jnp.inf)


def faiss_nearest_neighbour(
    queries: np.ndarray | jax.Array, features: jax.Array, index: FaissIndex
) -> tuple[jax.Array, jax.Array]:
    """Exact 1-nearest bank row by faiss, as `knn.nearest_neighbours(..., k=1)` (ties aside,
    see the module docstring).

    Args:
      queries: (Q, D) float.
      features: (M, D) the bank rows `index` was built from.
      index: `faiss_index(features, valid)`.

    Returns:
      distances (Q,) float32 from the differences and indices (Q,) int32, inf and -1 where no
      row is valid.
    """
    queries = np.asarray(queries, np.float32)
    rows = jnp.asarray(nearest_rows(index, queries))
    return winner_distances(jnp.asarray(queries), features, rows), rows
