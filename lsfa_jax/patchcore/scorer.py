"""PatchCore scoring: exact kNN against a memory bank, image scores and anomaly maps.

Everything on the device path is jitted with static shapes. The searches themselves live in
`knn`: the patches' nearest bank rows by the certified bfloat16 screen or the plain float32
search, or in `faiss_search` (faiss-cpu, on the host, before the jitted part); all give the
float32 nearest row. The default, auto, is the fastest of them on the machine
(`search_choice`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from PIL import Image, ImageFilter

from lsfa_jax import mesh as meshes
from lsfa_jax.batching import map_in_batches, padded_batch_size
from lsfa_jax.patchcore import faiss_search
from lsfa_jax.patchcore.bank import MemoryBank, with_search_index
from lsfa_jax.patchcore.knn import (
    approximate_index,
    approximate_nearest_neighbour,
    nearest_neighbours,
    screened_nearest_neighbour,
    search_index,
)
from lsfa_jax.patchcore.normalisation import normalise
from lsfa_jax.patchcore.search_choice import resolve_search

_HIGHEST = jax.lax.Precision.HIGHEST
SEARCHES = ("auto", "screened", "exact", "faiss", "approximate")
BLURS = ("gaussian", "pil", "none")


def patchcore_image_score(
    queries: jax.Array,
    bank: jax.Array,
    nn_dist: jax.Array,
    nn_idx: jax.Array,
    dim: int | None = None,
    *,
    bank_valid: jax.Array | None = None,
    reweight: bool = True,
    bank_chunk: int = 4096,
) -> jax.Array:
    """Image-level score of one image from its patch NN distances -> () float32.

    Args:
      queries: (P, D) normalised patch features; bank: (M, D); bank_valid: optional (M,) bool.
      nn_dist, nn_idx: (P,) nearest-bank-row distance and index of each patch.
      dim: D in the exponent's sqrt(D) (defaults to queries.shape[-1]).
      reweight: False gives the plain max patch score s*.

    The reweighting is the LSFA reference's variant (docs/method.md#image-score), not the PatchCore
    paper's:
    p* = argmax nn_dist, s* = nn_dist[p*], m* = bank[nn_idx[p*]]; take the 3 bank rows nearest
    to m* (the first is normally m* itself) and r_j = ||X[p*] - bank[nb_j]|| for the other two;
    w = 1 - exp(s*/sqrt(D)) / sum_j exp(r_j/sqrt(D)); score = w * s*. The sum excludes m* and
    the exponent is scaled by 1/sqrt(D), so w can be negative.
    """
    worst = jnp.argmax(nn_dist)
    s_star = nn_dist[worst]
    if not reweight:
        return s_star
    dim = queries.shape[-1] if dim is None else dim
    m_star = bank[nn_idx[worst]].astype(jnp.float32)
    _, neighbours = nearest_neighbours(
        m_star[None, :], bank, bank_valid, k=3, bank_chunk=bank_chunk
    )
    others = bank[neighbours[0, 1:]].astype(jnp.float32)
    return reweighted_score(queries[worst], s_star, others, dim)


def reweighted_score(query: jax.Array, s_star: jax.Array, others: jax.Array, dim: int) -> jax.Array:
    """w * s* of `patchcore_image_score` from the worst patch's query (D,), its score s* () and
    the two bank rows others (2, D) nearest to its nearest row m* (m* excluded) -> () float32."""
    r = jnp.sqrt(jnp.sum(jnp.square(query.astype(jnp.float32) - others), axis=-1))
    scale = math.sqrt(dim)
    weight = 1.0 - jnp.exp(s_star / scale) / jnp.sum(jnp.exp(r / scale))
    return weight * s_star


@functools.cache
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float64 matrix of PyTorch's bilinear resize, align_corners=False.

    Source coordinate (i + 0.5) * in/out - 0.5, clamped at 0; the upper neighbour is clamped
    to the last input sample.
    """
    src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
    lower = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    upper = np.minimum(lower + 1, in_size - 1)
    frac = src - lower
    matrix = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, lower), 1.0 - frac)
    np.add.at(matrix, (rows, upper), frac)
    return matrix


@functools.cache
def gaussian_blur_matrix(size: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """(size, size) float64 matrix of a 1-D Gaussian filter with 'reflect' boundaries.

    Same kernel as scipy.ndimage.gaussian_filter: radius int(truncate * sigma + 0.5), weights
    exp(-x^2 / (2 sigma^2)) normalised; mode 'reflect' mirrors about the edge, repeating the
    edge sample (d c b a | a b c d).
    """
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * np.square(offsets / sigma))
    kernel /= kernel.sum()
    source = np.pad(np.arange(size), radius, mode="symmetric")
    rows = np.repeat(np.arange(size), offsets.size)
    cols = source[np.arange(size)[:, None] + radius + offsets[None, :]].reshape(-1)
    matrix = np.zeros((size, size), np.float64)
    np.add.at(matrix, (rows, cols), np.tile(kernel, size))
    return matrix


@functools.partial(jax.jit, static_argnames=("out_size", "sigma"))
def anomaly_map(
    patch_scores: jax.Array, *, out_size: int = 224, sigma: float | None = 4.0
) -> jax.Array:
    """(B, G, G) patch scores -> (B, out_size, out_size) float32 anomaly maps.

    Bilinear upsampling (PyTorch align_corners=False) then a float Gaussian blur (sigma, 4-sigma
    truncation, 'reflect' boundaries as scipy.ndimage.gaussian_filter); sigma=None skips the
    blur. Both steps are linear and separable, so they fold into one (out, G) matrix per axis.
    The reference's 8-bit PIL blur is `pil_blur` (host only).
    """
    _, height, width = patch_scores.shape
    rows = bilinear_matrix(height, out_size)
    cols = bilinear_matrix(width, out_size)
    if sigma is not None:
        rows = gaussian_blur_matrix(out_size, sigma) @ rows
        cols = gaussian_blur_matrix(out_size, sigma) @ cols
    return jnp.einsum(
        "oh,bhw,pw->bop",
        jnp.asarray(rows, jnp.float32),
        patch_scores.astype(jnp.float32),
        jnp.asarray(cols, jnp.float32),
        precision=_HIGHEST,
    )


def pil_blur(maps: np.ndarray, radius: float = 4.0) -> np.ndarray:
    """(B, H, W) -> (B, H, W) float32: the reference's KNNGaussianBlur, on the host.

    Per map: divide by its max, x255 truncated to uint8, PIL GaussianBlur(radius), /255, times
    the max. An all-zero map stays zero (the reference would divide by zero).
    """
    maps = np.asarray(maps, np.float32)
    out = np.empty_like(maps)
    for i, image in enumerate(maps):
        peak = float(image.max())
        if peak <= 0.0:
            if peak < 0.0 or image.min() < 0.0:
                raise ValueError("pil_blur: anomaly maps must be non-negative")
            out[i] = 0.0
            continue
        # torch's float -> byte conversion truncates toward zero.
        quantised = np.clip(image / peak * 255.0, 0.0, 255.0).astype(np.uint8)
        blurred = Image.fromarray(quantised, mode="L").filter(ImageFilter.GaussianBlur(radius))
        out[i] = np.asarray(blurred, np.float32) / 255.0 * peak
    return out


SCREEN_GROUP = 8


def _screen_chunk(n_bank: int, bank_chunk: int) -> int | None:
    """Bank rows per step of the screened search, or None where the bank's size does not allow
    it (then the plain float32 search runs: same answer, slower)."""
    chunk = min(bank_chunk, n_bank)
    if n_bank % chunk or chunk % SCREEN_GROUP:
        return None
    return chunk


@functools.partial(
    jax.jit,
    static_argnames=("out_size", "reweight", "sigma", "bank_chunk", "search", "approximate_dim"),
)
def _score_images(
    bank: MemoryBank,
    queries: jax.Array,
    patch_mask: jax.Array | None,
    neighbours: jax.Array | None = None,
    *,
    out_size: int,
    reweight: bool,
    sigma: float | None,
    bank_chunk: int,
    search: str,
    approximate_dim: int,
) -> tuple[jax.Array, jax.Array]:
    batch, n_patches, dim = queries.shape
    grid = math.isqrt(n_patches)
    if grid * grid != n_patches:
        raise ValueError(f"score_batch: {n_patches} patches do not form a square grid")
    mask = jnp.ones((batch, n_patches), bool) if patch_mask is None else patch_mask
    if (search == "faiss") != (neighbours is not None):
        raise ValueError("score_batch: the (B, P) neighbours are given for search='faiss' only")
    screen_chunk = _screen_chunk(bank.features.shape[0], bank_chunk)
    if search == "screened" and screen_chunk is not None:
        index = search_index(bank.features, bank.valid) if bank.index is None else bank.index

        def nearest(features):
            dist, idx, _ = screened_nearest_neighbour(
                features,
                bank.features,
                index,
                bank_chunk=screen_chunk,
                group=SCREEN_GROUP,
                exact_chunk=bank_chunk,
            )
            return dist, idx
    elif search == "approximate" and screen_chunk is not None:
        approximate = bank.approximate
        if approximate is None or approximate.basis.shape[1] != approximate_dim:
            approximate = approximate_index(bank.features, bank.valid, dim=approximate_dim)

        def nearest(features):
            dist, idx, _ = approximate_nearest_neighbour(
                features, bank.features, approximate, bank_chunk=screen_chunk, group=SCREEN_GROUP
            )
            return dist, idx
    else:

        def nearest(features):
            dist, idx = nearest_neighbours(
                features, bank.features, bank.valid, k=1, bank_chunk=bank_chunk
            )
            return dist[:, 0], idx[:, 0]

    def one_image(args):
        features, foreground, given = args
        features = normalise(features, bank.stats)
        # faiss's rows come from the host (`faiss_search`); their distances are computed below.
        dist, idx = nearest(features) if given is None else (jnp.full(given.shape, jnp.inf), given)
        # The float32 searches rank by ||q||^2 + ||b||^2 - 2 q.b, which loses about
        # 1e-7 ||q||^2 to cancellation (a few % of a small NN distance), and by how much
        # depends on how XLA blocks the matmul, i.e. on the rows per device. The winner's
        # distance from the difference itself is exact to float32 rounding of the distance,
        # so patch scores do not depend on the batch size or the device count.
        nearest_rows = bank.features[jnp.maximum(idx, 0)].astype(jnp.float32)
        exact = jnp.sqrt(jnp.sum(jnp.square(features - nearest_rows), axis=-1))
        dist = jnp.where(idx >= 0, exact, dist)
        dist = jnp.where(foreground, dist, 0.0)
        score = patchcore_image_score(
            features,
            bank.features,
            dist,
            idx,
            dim,
            bank_valid=bank.valid,
            reweight=reweight,
            bank_chunk=bank_chunk,
        )
        return score, dist

    scores, patch_scores = jax.lax.map(one_image, (queries, mask, neighbours))
    maps = anomaly_map(patch_scores.reshape(batch, grid, grid), out_size=out_size, sigma=sigma)
    return scores, maps


def _check_request(bank: MemoryBank, shape: tuple[int, ...], search: str, blur: str) -> None:
    """The scoring options and the (B, P, D) query shape, checked before any jitted call."""
    if search not in SEARCHES:
        raise ValueError(f"score_batch: search must be one of {SEARCHES}, got {search!r}")
    if blur not in BLURS:
        raise ValueError(f"score_batch: blur must be 'gaussian', 'pil' or 'none', got {blur!r}")
    if len(shape) != 3 or shape[-1] != bank.features.shape[-1]:
        raise ValueError(
            f"score_batch: queries must be (B, P, {bank.features.shape[-1]}), got {tuple(shape)}"
        )


def score_batch(
    bank: MemoryBank,
    queries: jax.Array,
    *,
    out_size: int = 224,
    reweight: bool = True,
    blur: str = "gaussian",
    sigma: float = 4.0,
    patch_mask: jax.Array | None = None,
    bank_chunk: int = 4096,
    search: str = "auto",
    approximate_dim: int = 128,
) -> tuple[jax.Array, jax.Array]:
    """Scores a batch of images of one modality against its memory bank.

    Args:
      bank: the modality's MemoryBank (queries are normalised with bank.stats here).
      queries: (B, P, D) raw patch features, P = G*G in row-major order.
      out_size: side of the anomaly maps.
      reweight: the reference's image-score reweighting (see `patchcore_image_score`).
      blur: "gaussian" (float, jitted), "pil" (the reference's 8-bit PIL blur, on the host) or
        "none".
      sigma: blur sigma (PIL radius) in output pixels.
      patch_mask: optional (B, P) bool foreground; patches outside it score 0 (off by default,
        as in the reference).
      bank_chunk: bank rows per kNN scan step.
      search: "screened" (bfloat16 screen certified in float32, see `knn`; needs a bank whose
        rows are a multiple of min(bank_chunk, M) and of 8, else the float32 search runs),
        "exact" (the float32 search), "faiss" (faiss-cpu's IndexFlatL2 on the host,
        `faiss_search`) or "auto" (the fastest of them here, `search_choice`). All give the
        float32 nearest rows (ties within float32 rounding aside). "approximate"
        (opt-in): screen on `approximate_dim` principal directions of the bank, re-rank in
        float32 (`knn.approximate_nearest_neighbour`); distances can only come out too large.
      approximate_dim: directions of the approximate search (its index is taken from
        bank.approximate when that has this many, else computed in the call).

    Returns:
      image_scores (B,) float32 and anomaly maps (B, out_size, out_size) float32.
    """
    _check_request(bank, queries.shape, search, blur)
    search = resolve_search(search).search
    neighbours = None
    if search == "faiss":
        index = faiss_search.faiss_index(bank.features, bank.valid)
        neighbours = faiss_search.normalised_nearest_rows(index, np.asarray(queries), bank.stats)
    scores, maps = _score_images(
        bank,
        queries,
        patch_mask,
        neighbours,
        out_size=out_size,
        reweight=reweight,
        sigma=float(sigma) if blur == "gaussian" else None,
        bank_chunk=bank_chunk,
        search=search,
        approximate_dim=min(approximate_dim, bank.features.shape[1]),
    )
    if blur == "pil":
        maps = jnp.asarray(pil_blur(np.asarray(maps), sigma))
    return scores, maps


@dataclasses.dataclass(frozen=True)
class ScoringSettings:
    """How a split is scored against a bank (`score_batch`'s options plus the batch size)."""

    out_size: int
    reweight: bool
    blur: str
    sigma: float
    search: str
    approximate_dim: int
    batch_size: int

    @classmethod
    def from_config(cls, config: Any) -> ScoringSettings:
        """From a run config: `data.image_size`, `batch_size` and `patchcore.*`."""
        patchcore = config.patchcore
        return cls(
            out_size=int(config.data.image_size),
            reweight=bool(patchcore.reweight),
            blur=str(patchcore.blur),
            sigma=float(patchcore.blur_sigma),
            search=str(patchcore.search),
            approximate_dim=int(patchcore.approximate_dim),
            batch_size=int(config.batch_size),
        )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ScoringSettings:
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _score_images_split(bank: MemoryBank, queries: jax.Array, **static: Any) -> tuple:
    """`_score_images` without a patch mask, the shape `mesh.data_parallel` splits."""
    return _score_images(bank, queries, None, **static)


def _score_images_given(
    bank: MemoryBank, queries: jax.Array, neighbours: jax.Array, **static: Any
) -> tuple:
    """`_score_images_split` with the nearest rows found on the host (search=faiss)."""
    return _score_images(bank, queries, None, neighbours, **static)


def score_features(
    bank: MemoryBank,
    features: np.ndarray,
    settings: ScoringSettings,
    desc: str = "scoring",
    mesh: Mesh | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(N, P, C) features of a split -> image scores (N,) and maps (N, S, S), in fixed batches.

    Batches of `settings.batch_size` rounded up to a multiple of the devices of `mesh`
    (default: every device) are split over them with the bank replicated (`lsfa_jax.mesh`);
    each device runs `score_batch`'s computation on its rows. Every call sees a full batch
    (`batching.map_in_batches`), so the jitted scorer compiles once. The bank's search index
    for the search that runs (`search_choice.resolve_search(settings.search)`) is computed here
    once if it lacks it; with faiss, every process searches the whole batch on the host first.
    """
    approximate_dim = min(settings.approximate_dim, bank.features.shape[1])
    _check_request(bank, features.shape, settings.search, settings.blur)
    search = resolve_search(settings.search).search
    if search not in ("exact", "faiss"):
        bank = with_search_index(bank, approximate_dim if search == "approximate" else None)
    host_index = None if search != "faiss" else faiss_search.faiss_index(bank.features, bank.valid)
    mesh = mesh or meshes.make_mesh()
    run = meshes.data_parallel(
        _score_images_split if host_index is None else _score_images_given,
        mesh,
        1,
        2 if host_index is None else 3,
        out_size=settings.out_size,
        reweight=settings.reweight,
        sigma=float(settings.sigma) if settings.blur == "gaussian" else None,
        bank_chunk=4096,
        search=search,
        approximate_dim=approximate_dim,
    )
    placed = meshes.replicate(mesh, bank)

    def score(batch: dict, _) -> dict[str, np.ndarray]:
        args = [np.asarray(batch["features"], np.float32)]
        if host_index is not None:
            args.append(faiss_search.normalised_nearest_rows(host_index, args[0], bank.stats))
        scores, maps = meshes.to_host(run(placed, *meshes.shard_rows(mesh, args)))
        if settings.blur == "pil":
            maps = pil_blur(maps, settings.sigma)
        return {"scores": scores, "maps": maps}

    size = padded_batch_size(settings.batch_size, mesh.size)
    out = map_in_batches(score, {"features": features}, size, desc=desc)
    return out["scores"], out["maps"]
