"""tf.data pipeline over the prepared datasets -> numpy batches for JAX.

TensorFlow is used only for input; it is kept off the GPUs so JAX owns them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError as e:  # TensorFlow's devices were initialised before this import
    logging.warning("could not hide GPUs from TensorFlow (%s); it may reserve GPU memory", e)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_TEXT_KEYS = ("defect_type", "class", "file_id")


@functools.lru_cache(maxsize=64)
def _builder(data_dir: str) -> tfds.core.DatasetBuilder:
    return tfds.builder_from_directory(data_dir)


def _builder_of(prepared: Mapping[str, str], class_name: str) -> tfds.core.DatasetBuilder:
    if class_name not in prepared:
        raise KeyError(f"class {class_name!r} was not prepared; prepared: {sorted(prepared)}")
    return _builder(prepared[class_name])


def normalise_rgb(rgb_uint8: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) -> float32 ImageNet-normalised, in the float32 operations of the tf.data
    map below, so a sample prepared outside the pipeline gets bit-identical inputs."""
    rgb = rgb_uint8.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(IMAGENET_MEAN, np.float32)
    std = np.asarray(IMAGENET_STD, np.float32)
    return (rgb - mean) / std


def _to_model_inputs(example: dict) -> dict:
    rgb = tf.cast(example["rgb"], tf.float32) / 255.0
    return {
        "rgb": (rgb - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD),
        "rgb_uint8": example["rgb"],
        "xyz": example["xyz"],
        "mask": example["mask"],
        "label": tf.cast(example["label"], tf.int32),
        **{key: example[key] for key in _TEXT_KEYS},
    }


def make_batches(
    prepared: Mapping[str, str],
    class_name: str,
    split: str,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    drop_remainder: bool = False,
    repeat: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of one class and split.

    Yields dicts: rgb float32 (B, S, S, 3) ImageNet-normalised, rgb_uint8 uint8 (B, S, S, 3),
    xyz float32 (B, S, S, 3), mask uint8 (B, S, S), label int32 (B,), and defect_type, class,
    file_id as numpy str arrays (B,). Order is the sorted file-id order unless `shuffle`, which
    is seeded (a new order each epoch, the same sequence of orders for the same seed).
    """
    builder = _builder_of(prepared, class_name)
    ds = builder.as_dataset(split=split, shuffle_files=False)
    if shuffle:
        ds = ds.shuffle(
            builder.info.splits[split].num_examples, seed=seed, reshuffle_each_iteration=True
        )
    if repeat:
        ds = ds.repeat()
    ds = ds.map(_to_model_inputs, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
    for batch in tfds.as_numpy(ds):
        for key in _TEXT_KEYS:
            batch[key] = np.char.decode(batch[key].astype(bytes), "utf-8")
        yield batch


def num_examples(prepared: Mapping[str, str], class_name: str, split: str) -> int:
    return _builder_of(prepared, class_name).info.splits[split].num_examples


def split_summary(prepared: Mapping[str, str]) -> dict[str, dict[str, dict[str, int]]]:
    """class -> split -> defect type -> number of samples (recorded when preparing)."""
    return {
        class_name: dict(_builder_of(prepared, class_name).info.metadata["counts"])
        for class_name in prepared
    }


def has_masks(prepared: Mapping[str, str], class_name: str) -> bool:
    """Whether the class's test split has ground-truth masks (own data may have none)."""
    return bool(_builder_of(prepared, class_name).info.metadata.get("has_masks", True))
