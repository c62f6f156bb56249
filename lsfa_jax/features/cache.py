"""Disk cache of frozen-backbone features, one entry per (class, split).

Backbones are frozen, so their features are computed once per dataset and reused by adaptor
training (every epoch), bank building and testing. An entry is keyed by the backbones'
fingerprint (sizes and weight files), the prepared dataset (whose own key covers preprocessing
and image size) and the grid size. It is written into a temporary folder and renamed into place
when complete, so an interrupted run never leaves an entry that a later run would use.

Layout of an entry: one .npy per array the extractor returns (for the backbones: rgb (N, P, D_rgb),
rgb_cls (N, D_rgb), xyz (N, P, D_xyz), fg (N, P) bool; for FPFH: xyz and fg) and meta.json (file
ids, labels, defect types, array names). Arrays are opened memory-mapped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from absl import logging
from tqdm import tqdm

from lsfa_jax.atomic_io import make_temp_dir
from lsfa_jax.data import pipeline

Extractor = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclasses.dataclass
class SplitFeatures:
    """Cached features of one class and split (arrays memory-mapped, read-only)."""

    arrays: dict[str, np.ndarray]
    file_id: list[str]
    label: np.ndarray
    defect_type: list[str]
    path: Path

    def __len__(self) -> int:
        return len(self.file_id)


def entry_key(fingerprint: str, prepared: str, class_name: str, split: str) -> str:
    payload = json.dumps([fingerprint, str(prepared), class_name, split])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def open_entry(path: Path) -> SplitFeatures:
    meta = json.loads((path / "meta.json").read_text())
    arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}
    return SplitFeatures(
        arrays=arrays,
        file_id=meta["file_id"],
        label=np.asarray(meta["label"], np.int32),
        defect_type=meta["defect_type"],
        path=path,
    )


def split_features(
    extract: Extractor,
    fingerprint: str,
    prepared: Mapping[str, str],
    class_name: str,
    split: str,
    cache_root: str | os.PathLike,
    *,
    batch_size: int = 8,
) -> SplitFeatures:
    """Features of every sample of (class, split), computed once and cached on disk.

    Args:
      extract: maps a pipeline batch to a dict of (B, ...) arrays.
      prepared: class -> prepared dataset folder (`data.prepare.prepare_dataset`).
      fingerprint: identifies the extractor (model sizes, weights, parameters): part of the key.
    """
    key = entry_key(fingerprint, prepared[class_name], class_name, split)
    final = Path(cache_root) / "features" / f"{class_name}-{split}-{key}"
    if (final / "meta.json").exists():
        logging.info("Features of %s/%s: cached at %s", class_name, split, final)
        return open_entry(final)

    count = pipeline.num_examples(prepared, class_name, split)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(final.parent, prefix=f".{final.name}.")
    try:
        arrays: dict[str, np.ndarray] = {}
        meta: dict[str, list] = {"file_id": [], "label": [], "defect_type": [], "arrays": []}
        start = 0
        batches = pipeline.make_batches(prepared, class_name, split, batch_size)
        for batch in tqdm(
            batches,
            total=-(-count // batch_size),
            desc=f"features {class_name}/{split}",
            unit="batch",
        ):
            features = extract(batch)
            if not arrays:
                arrays = {
                    name: np.lib.format.open_memmap(
                        tmp / f"{name}.npy",
                        mode="w+",
                        dtype=value.dtype,
                        shape=(count, *value.shape[1:]),
                    )
                    for name, value in features.items()
                }
            stop = start + len(batch["file_id"])
            for name, value in features.items():
                arrays[name][start:stop] = value
            meta["file_id"] += [str(v) for v in batch["file_id"]]
            meta["label"] += [int(v) for v in batch["label"]]
            meta["defect_type"] += [str(v) for v in batch["defect_type"]]
            start = stop
        if start != count:
            raise RuntimeError(f"{class_name}/{split}: expected {count} samples, read {start}")
        for array in arrays.values():
            array.flush()
        meta["arrays"] = sorted(arrays)
        del arrays
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(tmp, final)
        except OSError:
            # Another run sharing this cache finished the same entry first: use its copy.
            if not (final / "meta.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logging.info("Features of %s/%s (%d samples) cached at %s", class_name, split, count, final)
    return open_entry(final)
