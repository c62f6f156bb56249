"""TensorBoard event files (tf.summary: scalars and images) for training and evaluation.

What a run writes, to view with `tensorboard --logdir <workdir>` (then http://localhost:6006):
  adaptation/tensorboard   per logged step: the losses, the learning rate, each bank's fill
  tensorboard/eval         per class: the metrics of each setting and a few overlays
TensorFlow loads on first use (the data pipeline needs it anyway).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np


class SummaryWriter:
    """One TensorBoard log folder; `close` flushes it."""

    def __init__(self, logdir: str | os.PathLike):
        import tensorflow as tf

        self._tf = tf
        self._writer = tf.summary.create_file_writer(str(logdir))

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """{tag: value} at `step`; NaN values (undefined metrics) are left out."""
        with self._writer.as_default(step=step):
            for name, value in values.items():
                if np.isfinite(value):
                    self._tf.summary.scalar(name, float(value))

    def images(self, images: Mapping[str, np.ndarray], step: int) -> None:
        """{tag: (H, W, 3) uint8 image} at `step`."""
        with self._writer.as_default(step=step):
            for name, image in images.items():
                self._tf.summary.image(name, np.asarray(image, np.uint8)[None], max_outputs=1)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()
