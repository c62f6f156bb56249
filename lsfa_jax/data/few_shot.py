"""Seeded few-shot training sets (paper 4.4: "5/10/50 images per class as the training set").

The draw of a class depends only on its name, its training-set size, the shot count and the
seed, never on the class's position in a run's class list, so the adaptors and the PatchCore
banks of a run (and of two runs on different class subsets) see the same samples.
"""

from __future__ import annotations

import zlib

import numpy as np


def few_shot_indices(class_name: str, n_train: int, k: int, seed: int) -> np.ndarray:
    """`k` distinct indices into a class's `n_train` training samples, sorted (int64, (k,)).

    numpy's Generator is seeded with (seed, crc32(class_name)), a hash that is stable across
    processes and Python versions (unlike `hash`).
    """
    if k < 1:
        raise ValueError(f"few_shot_indices: k={k} must be >= 1")
    if n_train < k:
        raise ValueError(
            f"few-shot: class {class_name!r} has {n_train} training samples, fewer than "
            f"adaptation.few_shot={k}"
        )
    rng = np.random.default_rng((seed, zlib.crc32(class_name.encode())))
    return np.sort(rng.choice(n_train, size=k, replace=False))
