"""Open3D's DBSCAN labels, exactly, for an organized cloud, from pixel-window neighbour searches.

An organized cloud comes from one camera, so two points closer than `eps` lie within a few
pixels of each other. `window_bound` derives that pixel bound from the cloud itself (proof in
docs/plane_removal.md) and `dbscan_labels` then finds every eps-neighbour inside the window:

  1. a small window (`small_radius` pixels) over the whole image counts neighbours; a point
     with `min_points` of them there (itself included, as Open3D counts) is core for sure;
  2. the other points (edges, holes, outliers) are counted over the full window;
  3. core points joined inside the small window form provisional components (scipy), which a
     full-window search from the pixels that see another component merges where two of them
     hold core points closer than `eps`;
  4. labels are numbered as Open3D's sequential scan numbers them (by the first core point in
     row-major order), and a border point takes the lowest label among the clusters with a core
     point within `eps` of it, the cluster that reaches it first in Open3D's scan.

Distances are compared as Open3D compares them: ((dx^2 + dy^2) + dz^2) < eps^2 in float64.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse import csgraph

_BLOCK = 1 << 19  # (point, offset) pairs per block of the full-window search: ~4 MiB per array


@dataclasses.dataclass(frozen=True)
class DbscanResult:
    """Labels (H, W) int32: cluster id in Open3D's numbering, -1 noise, -2 not a point."""

    labels: np.ndarray
    num_clusters: int
    window: tuple[int, int]  # (rows, cols) pixel half-widths searched
    num_ambiguous_border: int  # border points within eps of core points of 2+ clusters


def window_bound(
    xyz: np.ndarray, valid: np.ndarray, eps: float, max_window: int
) -> tuple[int, int] | str:
    """(rows, cols) half-widths such that points closer than `eps` are within them, or why not.

    Args:
      xyz: (H, W, 3) float64 organized cloud, camera frame (z > 0 in front of the camera).
      valid: (H, W) bool, the points to cluster.
      eps: neighbour distance.
      max_window: larger bounds are refused (the search would be slower than a k-d tree).

    Returns:
      The two half-widths, or a reason string when the cloud breaks the assumptions.
    """
    z = xyz[..., 2][valid]
    if z.size == 0:
        return 0, 0
    if not z.min() > 0:
        return "points at or behind the camera plane (z <= 0)"
    ratios = xyz[..., :2][valid] / z[:, None]
    # |x_i/z_i - x_j/z_j| <= sqrt(1 + (x_j/z_j)^2) |p_i - p_j| / z_i (docs/plane_removal.md);
    # the factors cover float64 rounding of the distance test and of the ratios.
    slack = np.sqrt(1.0 + np.max(ratios**2, axis=0)) * eps * (1.0 + 1e-9) / z.min() + 1e-12
    rows, cols = np.nonzero(valid)
    bounds = []
    for axis, pixel in ((1, rows), (0, cols)):
        width = min(
            _axis_bound(sign * ratios[:, axis], pixel, valid.shape[1 - axis], slack[axis])
            for sign in (1.0, -1.0)
        )
        if width > max_window:
            return f"pixel window {width} > max_window={max_window} (camera too close / skewed)"
        bounds.append(width)
    return bounds[0], bounds[1]


def _axis_bound(ratio: np.ndarray, pixel: np.ndarray, size: int, slack: float) -> int:
    """Smallest w such that points more than w pixels apart along this axis have ratios that
    differ by at least `slack` (larger pixel, larger ratio)."""
    lo = np.full(size, np.inf)
    hi = np.full(size, -np.inf)
    np.minimum.at(lo, pixel, ratio)
    np.maximum.at(hi, pixel, ratio)
    suffix_lo = np.minimum.accumulate(lo[::-1])[::-1]  # non-decreasing
    used = np.nonzero(hi > -np.inf)[0]
    # First line from which every ratio is >= hi + slack: no eps-neighbour of line c there.
    first_far = np.searchsorted(suffix_lo, hi[used] + slack, side="left")
    last = used.max()
    reach = np.minimum(first_far - 1, last) - used
    return int(reach.max())


def _squared_distance(x, y, z, a, b) -> np.ndarray:
    """Open3D's (nanoflann's) squared distance, summed in the same order."""
    dx, dy, dz = x[a] - x[b], y[a] - y[b], z[a] - z[b]
    return dx * dx + dy * dy + dz * dz


def _offsets(half_rows: int, half_cols: int, stride: int, positive_half: bool) -> np.ndarray:
    """Flat offsets of a (2 half_rows + 1, 2 half_cols + 1) window without its centre, nearest
    pixels first; with `positive_half` only the half after the centre in row-major order."""
    dr, dc = np.meshgrid(
        np.arange(-half_rows, half_rows + 1), np.arange(-half_cols, half_cols + 1), indexing="ij"
    )
    dr, dc = dr.ravel(), dc.ravel()
    order = np.argsort(dr * dr + dc * dc, kind="stable")
    flat = (dr * stride + dc)[order]
    return flat[flat > 0] if positive_half else flat[flat != 0]


def _window_pairs(
    x, y, z, points: np.ndarray, offsets: np.ndarray, eps2: float
) -> tuple[np.ndarray, np.ndarray]:
    """All (point, neighbour) flat-index pairs closer than eps among `points` + `offsets`."""
    found_a, found_b = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    step = max(1, _BLOCK // max(1, len(offsets)))
    for start in range(0, len(points), step):
        block = points[start : start + step]
        a = np.repeat(block, len(offsets))
        b = a + np.tile(offsets, len(block))
        near = _squared_distance(x, y, z, a, b) < eps2
        found_a.append(a[near])
        found_b.append(b[near])
    return np.concatenate(found_a), np.concatenate(found_b)


def _count_and_border_pairs(
    x, y, z, points: np.ndarray, offsets: np.ndarray, eps2: float, min_points: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which `points` are core, and every neighbour pair of those that are not.

    Offsets are searched nearest first, in chunks; a point leaves the search once it has
    `min_points` neighbours (core), so only the few non-core points see the whole window.
    """
    count = np.ones(len(points), np.int64)  # the point itself
    active = np.arange(len(points))
    pair_a, pair_b = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    start, chunk = 0, 64
    while start < len(offsets) and active.size:
        a, b = _window_pairs(x, y, z, points[active], offsets[start : start + chunk], eps2)
        pair_a.append(a)
        pair_b.append(b)
        count[active] += np.bincount(np.searchsorted(points, a), minlength=len(points))[active]
        active = active[count[active] < min_points]
        start, chunk = start + chunk, 2 * chunk
    core = count >= min_points
    a, b = np.concatenate(pair_a), np.concatenate(pair_b)
    keep = ~core[np.searchsorted(points, a)]
    return core, a[keep], b[keep]


def dbscan_labels(
    xyz: np.ndarray,
    valid: np.ndarray,
    eps: float,
    min_points: int,
    window: tuple[int, int],
    small_radius: int = 3,
) -> DbscanResult:
    """Open3D's `cluster_dbscan` labels of the valid points, in row-major point order.

    Args:
      xyz: (H, W, 3) float64 organized cloud.
      valid: (H, W) bool, the points to cluster.
      eps, min_points: as in Open3D (a point counts itself among its neighbours).
      window: (rows, cols) half-widths from `window_bound`; it must bound every eps-neighbour.
      small_radius: half-width of the first, whole-image pass.

    Returns:
      The labels and what was searched.
    """
    height, width = valid.shape
    labels = np.full((height, width), -2, np.int32)
    if not valid.any():
        return DbscanResult(labels, 0, window, 0)
    rows, cols = np.nonzero(valid)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    h, w = r1 - r0, c1 - c0
    wr, wc = window
    # Padded, flattened crop: points outside the cloud are NaN, never closer than eps.
    stride = w + 2 * wc
    pad = np.full((h + 2 * wr, stride, 3), np.nan)
    inner = (slice(wr, wr + h), slice(wc, wc + w))
    pad[inner] = np.where(valid[r0:r1, c0:c1, None], xyz[r0:r1, c0:c1], np.nan)
    x, y, z = (np.ascontiguousarray(pad[..., k]).ravel() for k in range(3))
    eps2 = float(eps) * float(eps)
    in_cloud = np.zeros(pad.shape[:2], bool)
    in_cloud[inner] = valid[r0:r1, c0:c1]
    points = np.flatnonzero(in_cloud)  # row-major: Open3D's point order

    # 1. Small window over the whole cloud: lower bounds of the neighbour counts, and the pairs.
    sr, sc = min(small_radius, wr), min(small_radius, wc)
    small_offsets = _offsets(sr, sc, stride, positive_half=True)
    count = np.zeros(x.size, np.int32)
    count[points] = 1  # the point itself
    small_a, small_b = [], []
    for offset in small_offsets:
        near = _squared_distance(x, y, z, points, points + offset) < eps2
        a = points[near]
        small_a.append(a)
        small_b.append(a + offset)
    small_a = np.concatenate(small_a) if small_a else np.zeros(0, np.int64)
    small_b = np.concatenate(small_b) if small_b else np.zeros(0, np.int64)
    count += np.bincount(small_a, minlength=x.size).astype(np.int32)
    count += np.bincount(small_b, minlength=x.size).astype(np.int32)

    # 2. Full window for the points not yet known to be core: exact counts and all their pairs.
    full_offsets = _offsets(wr, wc, stride, positive_half=False)
    unsure = points[count[points] < min_points]
    unsure_core, unsure_a, unsure_b = _count_and_border_pairs(
        x, y, z, unsure, full_offsets, eps2, min_points
    )
    core = np.zeros(x.size, bool)
    core[points] = count[points] >= min_points
    core[unsure] = unsure_core
    if not core.any():
        labels[valid] = -1
        return DbscanResult(labels, 0, window, 0)

    # 3. Provisional components of the small-window core pairs, merged by full-window pairs
    #    searched from the side of the smaller component (the larger gets the higher number).
    joined = core[small_a] & core[small_b]
    graph = sparse.coo_matrix(
        (np.ones(joined.sum(), np.int8), (small_a[joined], small_b[joined])),
        shape=(x.size, x.size),
    )
    _, component = csgraph.connected_components(graph, directed=False)
    core_points = points[core[points]]
    ids, inverse, sizes = np.unique(component[core_points], return_inverse=True, return_counts=True)
    by_size = np.empty(len(ids), np.int64)
    by_size[np.argsort(sizes, kind="stable")] = np.arange(len(ids))
    provisional = np.full(x.size, -1, np.int64)
    provisional[core_points] = by_size[inverse]
    seen_above = ndimage.maximum_filter(
        provisional.reshape(pad.shape[:2]), size=(2 * wr + 1, 2 * wc + 1), mode="constant", cval=-1
    ).ravel()
    frontier = np.flatnonzero(core & (seen_above > provisional))
    merge_a, merge_b = _window_pairs(x, y, z, frontier, full_offsets, eps2)
    across = core[merge_b] & (provisional[merge_b] > provisional[merge_a])
    merge = sparse.coo_matrix(
        (
            np.ones(across.sum(), np.int8),
            (provisional[merge_a[across]], provisional[merge_b[across]]),
        ),
        shape=(len(ids), len(ids)),
    )
    _, final = csgraph.connected_components(merge, directed=False)
    cluster = np.where(core, final[np.maximum(provisional, 0)], -1)

    # 4. Open3D numbering: clusters in the order of their first core point.
    ids, first = np.unique(cluster[core_points], return_index=True)
    num_clusters = len(ids)
    rank = np.empty(num_clusters, np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(num_clusters)
    label = np.full(x.size, -1, np.int64)
    label[core_points] = rank[np.searchsorted(ids, cluster[core_points])]
    # Border points: the lowest label among their core neighbours (the first to reach them).
    to_core = core[unsure_b] & ~core[unsure_a]
    border_a, border_label = unsure_a[to_core], label[unsure_b[to_core]]
    lowest = np.full(x.size, np.iinfo(np.int64).max)
    np.minimum.at(lowest, border_a, border_label)
    highest = np.full(x.size, -1)
    np.maximum.at(highest, border_a, border_label)
    border = np.flatnonzero(highest >= 0)
    label[border] = lowest[border]
    labels[r0:r1, c0:c1] = np.where(valid[r0:r1, c0:c1], label.reshape(pad.shape[:2])[inner], -2)
    return DbscanResult(
        labels=labels,
        num_clusters=num_clusters,
        window=window,
        num_ambiguous_border=int(np.sum(highest[border] != lowest[border])),
    )
