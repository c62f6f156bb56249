"""Fixed-size batches: every jitted stage (extraction, adaptors, scoring) sees one batch shape.

A jitted function compiles once per input shape, so a split of N samples in batches of B would
compile twice (B and N mod B). `pad_batch` pads a short batch to B by repeating its last sample
(a real sample, so host-side checks such as a cloud's valid-point count still hold) and returns
the mask of the real rows; `map_in_batches` runs a function over a whole split that way and keeps
only the real rows of its outputs. Data-parallel stages pad to `padded_batch_size`, a multiple
of the device count (`lsfa_jax.mesh`).

Inside a jitted function, `map_in_chunks` is the one way to bound the memory of a large
intermediate (kNN distances, attention weights, contrastive logits): a function of one row is
mapped over the rows a chunk at a time with `jax.lax.map(..., batch_size=...)`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

Batch = dict[str, Any]


def padded_batch_size(batch_size: int, num_devices: int) -> int:
    """The static batch of a data-parallel stage: `batch_size` rounded up to a multiple of
    `num_devices`, so every device gets the same number of rows."""
    if batch_size < 1 or num_devices < 1:
        raise ValueError(f"padded_batch_size: {batch_size} rows over {num_devices} devices")
    return -(-batch_size // num_devices) * num_devices


def pad_batch(batch: Mapping[str, Any], size: int) -> tuple[Batch, np.ndarray]:
    """(n, ...) entries with 1 <= n <= size -> (size, ...) entries and the (size,) bool mask of
    the n real rows. Arrays and lists (e.g. file ids) are padded with copies of their last row."""
    lengths = {key: len(value) for key, value in batch.items()}
    count = next(iter(lengths.values()))
    if set(lengths.values()) != {count}:
        raise ValueError(f"pad_batch: entries of different lengths {lengths}")
    if not 1 <= count <= size:
        raise ValueError(f"pad_batch: {count} samples do not fit a batch of {size}")
    pad = size - count
    padded: Batch = {}
    for key, value in batch.items():
        if isinstance(value, Sequence) and not isinstance(value, str | bytes):
            padded[key] = list(value) + [value[-1]] * pad
        else:
            value = np.asarray(value)
            padded[key] = np.concatenate([value, np.repeat(value[-1:], pad, axis=0)])
    return padded, np.arange(size) < count


def map_in_batches(
    fn: Callable[[Batch, np.ndarray], Mapping[str, Any]],
    inputs: Mapping[str, Any],
    batch_size: int,
    *,
    desc: str | None = None,
) -> dict[str, np.ndarray]:
    """`fn` over consecutive fixed-size batches of `inputs` (N rows each); (N, ...) outputs.

    fn(batch, mask) gets `batch_size` rows (the last batch padded, `mask` (batch_size,) bool
    True for real rows) and returns a dict of (batch_size, ...) arrays. Outputs are written into
    preallocated arrays (a split's features are held once, not concatenated); `desc` shows a
    progress bar.
    """
    count = len(next(iter(inputs.values())))
    starts = range(0, count, batch_size)
    if desc is not None:
        starts = tqdm(starts, desc=desc, unit="batch", leave=False)
    out: dict[str, np.ndarray] = {}
    for start in starts:
        stop = min(start + batch_size, count)
        batch, mask = pad_batch({k: v[start:stop] for k, v in inputs.items()}, batch_size)
        for name, value in fn(batch, mask).items():
            value = np.asarray(value)
            if name not in out:
                out[name] = np.empty((count, *value.shape[1:]), value.dtype)
            out[name][start:stop] = value[: stop - start]
    return out


def map_in_chunks(
    fn: Callable[[Any], Any], xs: Any, chunk_size: int | None, *, remat: bool = False
) -> Any:
    """`fn` of one row over the leading axis of the pytree `xs` (leaves (N, ...)), `chunk_size`
    rows at a time: (N, ...) outputs, as `jax.vmap(fn)(xs)`.

    Each chunk is one `jax.vmap` of `fn` inside a `jax.lax.map` (`batch_size=chunk_size`; the
    last N mod chunk_size rows are one more vmap, no padding), so at most chunk_size rows of
    fn's intermediates exist at once. `chunk_size` None or >= N: one vmap over all rows. With
    `remat` each chunk is recomputed in the backward pass instead of kept (only when chunked).
    """
    n = jax.tree.leaves(xs)[0].shape[0]
    if chunk_size is None or chunk_size >= n:
        return jax.vmap(fn)(xs)
    return jax.lax.map(jax.checkpoint(fn) if remat else fn, xs, batch_size=chunk_size)
